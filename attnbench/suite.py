"""Suites: YAML files validated into frozen dataclasses before anything runs.

A micro suite declares what to measure; its cases are the product of the implementations
(a list value in ``params`` sweeps that parameter), the maps, the channels and the input
families, warp-match at each ``sharpness``. Errors name the file, the key path and what is
allowed; ``attnbench validate`` reports them without running anything.

    name: quick                 # default: the file's stem
    kind: micro
    include: common.yaml        # optional: shared settings, overridden by this file
    plugins: [mypackage.attn]   # optional: modules that register implementations
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
import difflib
import hashlib
import itertools
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

CONFIG = ConfigDict(extra="forbid", strict=False)
PositiveInt = Annotated[int, Field(ge=1)]
Direction = Literal["fwd", "fwdbwd"]
Metric = Literal["time", "memory", "fidelity"]
Family = Literal["gaussian", "smooth", "warp-copy", "warp-match"]
DType = Literal["float16", "bfloat16", "float32", "float64"]


class SuiteError(ValueError):
    """A suite file is wrong; ``problems`` lists each as 'file: key.path: message'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True, config=CONFIG)
class ImplEntry:
    """One implementation; a list value in ``params`` sweeps that parameter.

    ``generator`` (train suites) overrides generator settings for this entry alone, over the
    suite's ``generator`` (e.g. ``{small_attention: none}``: no copying at any level).
    """

    name: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    generator: dict[str, Any] = dataclasses.field(default_factory=dict)


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


@dataclass(frozen=True, config=CONFIG)
class DataConfig:
    """Where training pairs come from: the synthetic mannequin, an image folder or DeepFashion.

    ``root`` is the image folder (folder, deepfashion); ``annotations`` and ``pairs`` are the
    DeepFashion CSV files; ``fit`` stretches images to the generator's size or pads them
    (the paper pads DeepFashion's 256x176 to 256x256). ``train_size`` distinct training items
    are cycled through; the held-out set has ``test_size`` items drawn with a fixed seed of its
    own. ``pose`` is what each branch sees of its pose: keypoint heatmaps, or heatmaps plus
    a coordinate map (the source's own; the target's warped like the image, so it says where
    each target pixel comes from — what a folder of images without keypoints gets anyway; in
    the pose task, where the keypoints put it, limb by limb: ``limb_flow``). The pose task's
    held-out DeepFashion pairs come from ``test_pairs`` (DeepFashion's test split), with
    ``test_root`` and ``test_annotations`` where the test images live apart (default: ``root``
    and ``annotations``).
    """

    source: Literal["mannequin", "folder", "deepfashion"] = "mannequin"
    root: str | None = None
    annotations: str | None = None
    pairs: str | None = None
    sigma: Annotated[float, Field(gt=0)] = 2.0
    noise: Annotated[float, Field(ge=0, le=0.5)] = 0.15
    pose: Literal["heatmaps", "heatmaps+coords"] = "heatmaps"
    fit: Literal["stretch", "pad"] = "stretch"
    train_size: PositiveInt = 10_000
    test_size: PositiveInt = 64
    test_root: str | None = None
    test_annotations: str | None = None
    test_pairs: str | None = None


@dataclass(frozen=True, config=CONFIG)
class Budget:
    """A training-time budget: a run stops after the step that reaches ``minutes``."""

    minutes: Annotated[float, Field(gt=0)]


@dataclass(frozen=True, config=CONFIG)
class GanConfig:
    """The pose task's adversarial loss L_GAN: a StyleGAN2-style discriminator on (image, pose).

    Non-saturating logistic loss; the lazy R1 penalty (gamma / 2 times the squared gradient of
    the real logits by the real images) every ``r1_every`` steps, scaled by ``r1_every``; its
    own Adam (``lr``, betas ``betas``). ``channels``: the discriminator's block widths from the
    full-resolution block down (one per halving to 4x4).
    """

    lr: Annotated[float, Field(gt=0)] = 2e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.0,
        0.99,
    )
    r1_gamma: Annotated[float, Field(ge=0)] = 1.0
    r1_every: PositiveInt = 16
    channels: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (32, 64, 128, 128)


@dataclass(frozen=True, config=CONFIG)
class PoseConfig:
    """The pose task's loss weights: L = perceptual L_per(G(M1, B1, B2), M2) + self L_self
    (the affine self-supervision of M1) + gan L_GAN. L_per and L_self use the suite's
    ``loss`` (l1, lpips or a weighted sum); a weight of 0 leaves its term out."""

    perceptual: Annotated[float, Field(ge=0)] = 1.0
    self: Annotated[float, Field(ge=0)] = 1.0
    gan: Annotated[float, Field(ge=0)] = 0.05
    discriminator: GanConfig = GanConfig()


@dataclass(frozen=True, config=CONFIG)
class TrainSuite:
    """A training suite: the same generator trained with each implementation and seed.

    The implementation (with its parameters) replaces the attention at the decoder levels
    larger than the preset's ``full_attn_max``; everything else is equal for every case.
    ``generator`` overrides fields of the preset (:class:`GeneratorConfig`). A run takes
    ``steps`` steps, or stops earlier at the end of the step that exhausts ``budget``; the
    learning rate warms up linearly over ``warmup_steps`` and then stays (``constant``) or
    decays to zero (``cosine``) over the run's progress, max(step / steps, time / budget).
    The copying blocks' temperatures (``generator: {learn_temperature: true}``) train with
    ``temperature_lr`` (default ``lr``): Adam moves a log-temperature by about its learning rate
    per step, so with 5e-4 a temperature could not even double in 1,000 steps.
    Every ``checkpoint_every`` steps the run saves a checkpoint and records the copy hit rate
    on the first ``hit_samples`` held-out pairs.
    """

    name: str
    kind: Literal["train"]
    implementations: Annotated[tuple[ImplEntry, ...], Field(min_length=1)]
    steps: PositiveInt
    budget: Budget | None = None
    task: Literal["copying", "pose"] = "copying"
    pose: PoseConfig | None = None
    preset: str = "cpu64"
    generator: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: DataConfig = DataConfig()
    seeds: Annotated[tuple[int, ...], Field(min_length=1)] = (0,)
    batch: PositiveInt = 4
    lr: Annotated[float, Field(gt=0)] = 2e-4
    temperature_lr: Annotated[float, Field(gt=0)] | None = None
    loss: Literal["l1", "lpips"] | dict[Literal["l1", "lpips"], Annotated[float, Field(ge=0)]] = (
        "l1"
    )
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    checkpoint_every: PositiveInt = 50
    hit_samples: PositiveInt = 8
    eval_batch: PositiveInt = 16
    grid_samples: PositiveInt = 4
    device: Literal["auto", "cpu", "cuda"] = "auto"
    plugins: tuple[str, ...] = ()
    include: str | None = None

    @field_validator("seeds", mode="before")
    @classmethod
    def _scalar_seed(cls, value):
        return [value] if isinstance(value, int) else value


Suite = MicroSuite | TrainSuite
SUITE_TYPES = {"micro": MicroSuite, "train": TrainSuite}


class CaseIdentity:
    """What every case has: its parameters as a dict and a stable id.

    ``UNHASHED_DEFAULTS``: fields added after cases were first run, with their default values;
    a case that holds the default hashes as it did before the field existed.
    """

    UNHASHED_DEFAULTS: typing.ClassVar[dict[str, Any]] = {}

    @property
    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def case_id(self) -> str:
        """Stable hash of everything that determines the case (the suite's name excluded)."""
        config = dataclasses.asdict(self)
        config.pop("suite")
        for key, default in self.UNHASHED_DEFAULTS.items():
            if config[key] == default:
                del config[key]
        text = json.dumps(config, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


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


def _loc_text(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _field_type_at(root: type, loc: tuple) -> type | None:
    """The dataclass that holds the last key of ``loc``, walking field annotations."""
    current: Any = root
    for part in loc:
        if isinstance(part, int):
            args = [a for a in typing.get_args(current) if a is not Ellipsis]
            current = args[0] if args else None
        elif dataclasses.is_dataclass(current):
            hints = typing.get_type_hints(current, include_extras=True)
            current = hints.get(part)
        else:
            return None
        while typing.get_origin(current) in (Annotated, Union, typing.Union) or (
            current is not None and type(current).__name__ == "UnionType"
        ):
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[0]
    return current if dataclasses.is_dataclass(current) else None


def _format_pydantic(file: str, root: type, err: ValidationError) -> list[str]:
    problems = []
    errors = err.errors()
    locs = [tuple(e["loc"]) for e in errors]
    for e in errors:
        loc = tuple(e["loc"])
        if any(other[: len(loc)] == loc and other != loc for other in locs):
            continue  # a container's complaint about a member already reported
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            owner = _field_type_at(root, loc[:-1])
            allowed = [f.name for f in dataclasses.fields(owner)] if owner else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(
                f"{file}: {_loc_text(loc)}: unknown key {loc[-1]!r}{hint} "
                f"(allowed: {', '.join(allowed)})"
            )
        elif e["type"] == "missing":
            problems.append(f"{file}: {_loc_text(loc)}: required key is missing")
        else:
            given = e.get("input")
            problems.append(f"{file}: {_loc_text(loc)}: {e['msg']} (got {given!r})")
    return problems


def not_text(path: Path, err: UnicodeDecodeError) -> str:
    return f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason}); a suite is YAML text"


def _read_mapping(path: Path) -> dict:
    """The single YAML mapping in ``path``."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SuiteError([f"{path}: cannot be read ({err.strerror})"]) from err
    except UnicodeDecodeError as err:
        raise SuiteError([not_text(path, err)]) from err
    except yaml.YAMLError as err:
        raise SuiteError([f"{path}: not valid YAML: {err}"]) from err
    if not isinstance(data, dict):
        raise SuiteError([f"{path}: (top level): must be a mapping of keys to values"])
    return data


def _resolve_includes(data: dict, path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """``data`` (read from ``path``) with its ``include:`` chain merged in; ``data`` wins."""
    include = data.get("include")
    if include is None:
        return data
    if not isinstance(include, str):
        raise SuiteError([f"{path}: include: must be a file path (got {include!r})"])
    target = (path.parent / include).resolve()
    if target in (*seen, path.resolve()):
        chain = " -> ".join(str(p) for p in (*seen, path, target))
        raise SuiteError([f"{path}: include: cycle ({chain})"])
    base = _resolve_includes(_read_mapping(target), target, (*seen, path.resolve()))
    base.pop("name", None)
    return {**base, **data}


def load_suites(path: str | Path) -> list[Suite]:
    """Every suite in ``path``: one per YAML document (``---`` separates them)."""
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as err:
        raise SuiteError([f"{path}: cannot be read ({err.strerror})"]) from err
    except UnicodeDecodeError as err:
        raise SuiteError([not_text(path, err)]) from err
    except yaml.YAMLError as err:
        raise SuiteError([f"{path}: not valid YAML: {err}"]) from err
    if len(documents) <= 1:
        return [load_suite(path)]
    suites, problems = [], []
    for number, document in enumerate(documents, 1):
        where = f"{path} (document {number})"
        if not isinstance(document, dict) or "name" not in document:
            problems.append(f"{where}: name: required when a file holds several suites")
            continue
        try:
            suites.append(build_suite(_resolve_includes(document, path), where))
        except SuiteError as err:
            problems += err.problems
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        problems.append(f"{path}: name: every suite in a file needs its own name (got {names})")
    if problems:
        raise SuiteError(problems)
    return suites


def load_suite(path: str | Path) -> Suite:
    """Read, merge includes, validate the schema and the implementations; raise SuiteError."""
    path = Path(path)
    data = _resolve_includes(_read_mapping(path), path)
    data.setdefault("name", path.stem)
    return build_suite(data, str(path))


def build_suite(data: dict, path: str) -> Suite:
    """Validate one suite's mapping (includes already merged); raise SuiteError."""
    kind = data.get("kind", "micro")
    if kind not in SUITE_TYPES:
        raise SuiteError(
            [f"{path}: kind: {kind!r} is not a suite kind (allowed: {', '.join(SUITE_TYPES)})"]
        )
    root = SUITE_TYPES[kind]
    try:
        suite = root(**data)
    except ValidationError as err:
        raise SuiteError(_format_pydantic(str(path), root, err)) from err
    except TypeError as err:  # not a mapping of keyword arguments
        raise SuiteError([f"{path}: {err}"]) from err
    problems = check_suite(suite, str(path))
    if problems:
        raise SuiteError(problems)
    return suite


def sweep(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the list-valued parameters (others fixed)."""
    keys = list(params)
    values = [v if isinstance(v, list) else [v] for v in params.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def check_train_suite(suite: TrainSuite, file: str) -> list[str]:
    """The preset exists; data files are named where the source needs them."""
    from attnbench.generators import PRESETS

    problems = []
    data = suite.data
    if suite.preset not in PRESETS:
        problems.append(
            f"{file}: preset: {suite.preset!r} is not a generator preset "
            f"(allowed: {', '.join(PRESETS)})"
        )
    else:
        checks = [("generator", suite.generator)] + [
            (f"implementations[{i}].generator", {**suite.generator, **entry.generator})
            for i, entry in enumerate(suite.implementations)
            if entry.generator
        ]
        for key, overrides in checks:
            if "pose_channels" in overrides:
                problems.append(
                    f"{file}: {key}.pose_channels: set by the data (allowed: leave it out)"
                )
                continue
            try:
                config = generator_config(suite.preset, overrides)
            except (ValueError, TypeError) as err:
                problems.append(f"{file}: {key}: {err}")
                continue
            if (
                config.coords == "pose"
                and data.source != "folder"
                and data.pose != ("heatmaps+coords")
            ):
                problems.append(
                    f"{file}: {key}.coords: 'pose' reads the pose's coordinate map (allowed: "
                    "with data.pose: heatmaps+coords, or data.source: folder)"
                )
            if suite.temperature_lr is not None and not config.learn_temperature:
                problems.append(
                    f"{file}: temperature_lr: {key} has no trainable temperature (allowed: "
                    "with generator learn_temperature: true)"
                )
    needs = {"folder": ("root",), "deepfashion": ("root", "annotations")}.get(data.source, ())
    for key in needs:
        if getattr(data, key) is None:
            problems.append(f"{file}: data.{key}: required when data.source is {data.source!r}")
    if suite.pose is not None and suite.task != "pose":
        problems.append(f"{file}: pose: only for task: pose (this suite's task is {suite.task!r})")
    if suite.task == "pose":
        if data.source == "folder":
            problems.append(
                f"{file}: data.source: 'folder' has no poses to morph between (allowed for task "
                "pose: mannequin, deepfashion with data.pairs)"
            )
        if data.source == "deepfashion":
            for key in ("pairs", "test_pairs"):
                if getattr(data, key) is None:
                    problems.append(f"{file}: data.{key}: required for task pose with DeepFashion")
        weights = suite.pose or PoseConfig()
        if not (weights.perceptual or weights.self or weights.gan):
            problems.append(f"{file}: pose: every loss weight is 0 (allowed: at least one > 0)")
    if isinstance(suite.loss, dict) and not any(suite.loss.values()):
        problems.append(f"{file}: loss: every weight is 0 (allowed: at least one weight > 0)")
    return problems


def generator_config(preset_name: str, overrides: dict[str, Any]):
    """The preset's :class:`GeneratorConfig` with ``overrides``; ValueError names a bad field."""
    from attnbench.generators import GeneratorConfig, preset

    config = preset(preset_name)
    fields = {f.name for f in dataclasses.fields(GeneratorConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown generator setting {unknown[0]!r} (allowed: {', '.join(sorted(fields))})"
        )
    try:
        return dataclasses.replace(config, **overrides)
    except TypeError as err:  # e.g. a number where the field takes a sequence
        raise ValueError(f"{sorted(overrides)}: {err}") from None


def check_suite(suite: Suite, file: str) -> list[str]:
    """What the schema cannot see: implementation names, parameter values, combinations."""
    from attnbench import registry
    from attnbench.inputs import WARP_FAMILIES

    problems = []
    try:
        registry.import_plugins(list(suite.plugins))
    except ValueError as err:
        return [f"{file}: plugins: {err}"]
    for i, entry in enumerate(suite.implementations):
        where = f"{file}: implementations[{i}]"
        try:
            cls = registry.get(entry.name)
        except ValueError as err:
            problems.append(f"{where}.name: {err}")
            continue
        bad_value = False
        for key, value in entry.params.items():
            if key not in cls.PARAMS:
                accepted = ", ".join(sorted(cls.PARAMS)) or "none"
                problems.append(
                    f"{where}.params.{key}: {entry.name} has no parameter {key!r} "
                    f"(accepted parameters: {accepted})"
                )
                bad_value = True
                continue
            if isinstance(value, list) and not value:
                problems.append(f"{where}.params.{key}: an empty list sweeps nothing")
                bad_value = True
            for v in value if isinstance(value, list) else [value]:
                try:
                    cls.PARAMS[key].validate(entry.name, key, v)
                except ValueError as err:
                    problems.append(f"{where}.params.{key}: {err}")
                    bad_value = True
        if bad_value:
            continue
        combination_errors = []
        for combo in sweep(entry.params):
            try:
                registry.create(entry.name, **combo)
            except ValueError as err:
                if str(err) not in combination_errors:
                    combination_errors.append(str(err))
        problems += [f"{where}.params: {e}" for e in combination_errors]
    if isinstance(suite, TrainSuite):
        return problems + check_train_suite(suite, file)
    problems += [
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
    """The cases of ``suite`` on ``device``, in a deterministic order."""
    from attnbench.inputs import WARP_FAMILIES

    cases = []
    for entry in suite.implementations:
        for combo in sweep(entry.params):
            for size in suite.maps:
                for c in suite.channels:
                    for family in suite.inputs:
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


@dataclasses.dataclass(frozen=True)
class TrainCase(CaseIdentity):
    """One training run: an implementation with resolved parameters and one seed."""

    UNHASHED_DEFAULTS: typing.ClassVar[dict[str, Any]] = {
        "generator": "{}",
        "budget_minutes": None,
        "schedule": "constant",
        "warmup_steps": 0,
        "temperature_lr": None,
        "task_config": "{}",
    }

    suite: str
    task: str
    impl: str
    params: tuple[tuple[str, Any], ...]
    seed: int
    preset: str
    steps: int
    batch: int
    lr: float
    loss: str
    data: str
    device: str
    generator: str = "{}"
    budget_minutes: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    temperature_lr: float | None = None
    task_config: str = "{}"


def expand_train(suite: TrainSuite, device: str) -> list[TrainCase]:
    """The runs of a training suite: implementations (swept) x seeds, in order."""
    loss = suite.loss if isinstance(suite.loss, str) else json.dumps(suite.loss, sort_keys=True)
    data = dataclasses.asdict(suite.data)
    if data["pose"] == "heatmaps":  # the default hashes as it did before the key existed
        del data["pose"]
    for key in ("test_root", "test_annotations", "test_pairs"):  # likewise
        if data[key] is None:
            del data[key]
    data = json.dumps(data, sort_keys=True)
    task_config = {}
    if suite.task == "pose":
        task_config = dataclasses.asdict(suite.pose or PoseConfig())
    task_config = json.dumps(task_config, sort_keys=True)
    return [
        TrainCase(
            suite=suite.name,
            task=suite.task,
            impl=entry.name,
            params=tuple(sorted(combo.items())),
            seed=seed,
            preset=suite.preset,
            steps=suite.steps,
            batch=suite.batch,
            lr=suite.lr,
            loss=loss,
            data=data,
            device=device,
            generator=json.dumps({**suite.generator, **entry.generator}, sort_keys=True),
            budget_minutes=suite.budget.minutes if suite.budget else None,
            schedule=suite.schedule,
            warmup_steps=suite.warmup_steps,
            temperature_lr=suite.temperature_lr,
            task_config=task_config,
        )
        for entry in suite.implementations
        for combo in sweep(entry.params)
        for seed in suite.seeds
    ]
