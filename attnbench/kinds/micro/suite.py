"""The micro-benchmark suite: what to measure, and its cases.

A micro suite declares what to measure; its cases are the product of the implementations
(a list value in ``params`` sweeps that parameter), the maps, the channels and the input
families, warp-match at each ``sharpness``.

    kind: micro
    implementations:
      - name: full.sdpa
      - name: gpa.torch
        params: {phase1_res: 16, topk: [4, 12]}
    maps: [32, [64, 32], {q: [64, 64], kv: [32, 32]}]   # side, [h, w], or q and kv maps
    channels: [64]
    directions: [fwd, fwdbwd]
    metrics: [time, memory, fidelity]
    inputs: [gaussian, warp-match]
    sharpness: [1.0, 4.0]       # warp-match only: its features multiplied by s
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass

from attnbench.suite import CONFIG, CaseIdentity, ImplEntry, PositiveInt, sweep

Direction = Literal["fwd", "fwdbwd"]
Metric = Literal["time", "memory", "fidelity"]
Family = Literal["gaussian", "smooth", "warp-copy", "warp-match"]
DType = Literal["float16", "bfloat16", "float32", "float64"]


@dataclass(frozen=True, config=CONFIG)
class MapSize:
    """Query map and key/value map, (height, width) each."""

    q: tuple[PositiveInt, PositiveInt]
    kv: tuple[PositiveInt, PositiveInt]


@dataclass(frozen=True, config=CONFIG)
class TimingConfig:
    """``min_run_time``: seconds of timed runs per measurement (after the first call), and at
    least 3 timed runs (fewer only where they have taken 3 x ``time_budget_s``: the row's
    ``time_fwd_runs`` and ``time_fwdbwd_runs`` give the count, and a warning says so).
    ``time_budget_s``: once the median call of an implementation takes longer, its larger maps
    are skipped (rows with the reason); so is a map predicted to take longer: scaled by FLOPs
    from the implementation's last size, or, at its first size, its FLOPs at the run's matmul
    rate."""

    min_run_time: Annotated[float, Field(gt=0)] = 0.5
    time_budget_s: Annotated[float, Field(gt=0)] | None = None


@dataclass(frozen=True, config=CONFIG)
class MicroSuite:
    """A micro-benchmark suite (see the module docstring)."""

    name: str
    implementations: Annotated[tuple[ImplEntry, ...], Field(min_length=1)]
    maps: Annotated[tuple[MapSize, ...], Field(min_length=1)]
    kind: Literal["micro"] = "micro"
    channels: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (64,)
    v_channels: PositiveInt | None = None
    batch: PositiveInt = 1
    heads: PositiveInt = 1
    dtype: DType = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    directions: Annotated[tuple[Direction, ...], Field(min_length=1)] = ("fwd", "fwdbwd")
    metrics: Annotated[tuple[Metric, ...], Field(min_length=1)] = ("time", "memory")
    inputs: Annotated[tuple[Family, ...], Field(min_length=1)] = ("gaussian",)
    sharpness: Annotated[tuple[Annotated[float, Field(gt=0)], ...], Field(min_length=1)] = (1.0,)
    timing: TimingConfig = TimingConfig()
    memory_budget: Annotated[float, Field(gt=0, le=1)] = 0.7
    seed: int = 0
    plugins: tuple[str, ...] = ()
    include: str | None = None

    @field_validator("maps", mode="before")
    @classmethod
    def _expand_maps(cls, value):
        if not isinstance(value, list | tuple):
            return value
        out = []
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool):
                out.append({"q": (item, item), "kv": (item, item)})
            elif isinstance(item, list | tuple):
                out.append({"q": tuple(item), "kv": tuple(item)})
            elif isinstance(item, dict) and "kv" not in item and "q" in item:
                out.append({**item, "kv": item["q"]})
            else:
                out.append(item)
        return out

    @field_validator("channels", "directions", "metrics", "inputs", "sharpness", mode="before")
    @classmethod
    def _scalar_to_list(cls, value):
        return [value] if isinstance(value, int | float | str) else value


@dataclasses.dataclass(frozen=True)
class MicroCase(CaseIdentity):
    """One measured configuration: an implementation with resolved parameters on one input;
    ``sharpness`` is warp-match's (1.0 for the other families)."""

    UNHASHED_DEFAULTS: typing.ClassVar[dict[str, Any]] = {"sharpness": 1.0}

    suite: str
    impl: str
    params: tuple[tuple[str, Any], ...]
    q_hw: tuple[int, int]
    kv_hw: tuple[int, int]
    channels: int
    v_channels: int
    batch: int
    heads: int
    dtype: str
    device: str
    directions: tuple[str, ...]
    metrics: tuple[str, ...]
    family: str
    seed: int
    sharpness: float = 1.0


def check(suite: MicroSuite, file: str) -> list[str]:
    """What the schema cannot see: combinations of inputs, channels and metrics."""
    from attnbench.inputs import WARP_FAMILIES

    problems = [
        f"{file}: implementations[{i}].generator: only train suites have a generator"
        for i, entry in enumerate(suite.implementations)
        if entry.generator
    ]
    warp = [family for family in suite.inputs if family in WARP_FAMILIES]
    if warp and suite.v_channels not in (None, 3):
        problems.append(
            f"{file}: v_channels: {suite.v_channels} cannot be used with inputs "
            f"{', '.join(map(repr, warp))} (their values are RGB pixels: v_channels 3, or leave "
            "it unset)"
        )
    if "warp-match" not in suite.inputs and suite.sharpness != (1.0,):
        problems.append(
            f"{file}: sharpness: {list(suite.sharpness)} applies to warp-match inputs only, "
            f"which inputs does not list (add 'warp-match' to inputs, or leave sharpness unset: "
            "[1.0])"
        )
    if "warp-match" in suite.inputs and min(suite.channels) < 2:
        problems.append(
            f"{file}: channels: {min(suite.channels)} cannot be used with inputs 'warp-match' "
            "(it needs a feature channel besides its distance channel: channels >= 2)"
        )
    if set(suite.inputs) != {"gaussian"} and "fidelity" not in suite.metrics:
        problems.append(
            f"{file}: inputs: {list(suite.inputs)} only change the fidelity metric, which "
            "metrics does not ask for (add 'fidelity' to metrics or use inputs: [gaussian])"
        )
    return problems


def expand(suite: MicroSuite, device: str) -> list[MicroCase]:
    """The cases of ``suite`` on ``device``, in a deterministic order: implementations (swept),
    maps, channels, input families, warp-match's sharpness."""
    from attnbench.inputs import WARP_FAMILIES

    cases = []
    for entry in suite.implementations:
        for combo, size, c, family in itertools.product(
            sweep(entry.params), suite.maps, suite.channels, suite.inputs
        ):
            cv = 3 if family in WARP_FAMILIES else suite.v_channels or c
            sharpness = suite.sharpness if family == "warp-match" else (1.0,)
            cases += [
                MicroCase(
                    suite=suite.name,
                    impl=entry.name,
                    params=tuple(sorted(combo.items())),
                    q_hw=tuple(size.q),
                    kv_hw=tuple(size.kv),
                    channels=c,
                    v_channels=cv,
                    batch=suite.batch,
                    heads=suite.heads,
                    dtype=suite.dtype,
                    device=device,
                    directions=tuple(suite.directions),
                    metrics=tuple(suite.metrics),
                    family=family,
                    seed=suite.seed,
                    sharpness=s,
                )
                for s in sharpness
            ]
    return cases
