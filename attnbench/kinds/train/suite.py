"""The training suite: the same generator trained with each implementation and seed, and its
cases (runs).

    kind: train
    task: copying               # a task of attnbench.tasks; its own settings under its name
    preset: cpu64
    generator: {learn_temperature: true}
    implementations:
      - name: none
      - name: gpa.cpp
        params: {topk: [12, 4]}
    seeds: [0, 1, 2]
    steps: 400
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass

from attnbench.suite import CONFIG, CaseIdentity, ImplEntry, PositiveInt, sweep


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
class TrainSettings:
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
    on the first ``hit_samples`` held-out pairs. A task's own settings are a key named like
    the task (:func:`suite_model` adds one per task that has settings).
    """

    name: str
    kind: Literal["train"]
    implementations: Annotated[tuple[ImplEntry, ...], Field(min_length=1)]
    steps: PositiveInt
    budget: Budget | None = None
    task: str = "copying"
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


def suite_model() -> type:
    """:class:`TrainSettings` with ``task`` one of the tasks' names and, for each task with
    settings of its own (``Task.Config``), an optional key named like the task."""
    from attnbench.tasks import TASKS

    annotations: dict[str, Any] = {"task": Literal[tuple(TASKS)]}
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": TrainSettings.__doc__}
    for name, task in TASKS.items():
        if task.Config is not None:
            annotations[name] = typing.Optional[task.Config]  # noqa: UP045 - a runtime type
            namespace[name] = None
    namespace["__annotations__"] = annotations
    return dataclass(frozen=True, config=CONFIG)(type("TrainSuite", (TrainSettings,), namespace))


TrainSuite = suite_model()


def task_config(suite: TrainSettings):
    """The settings of the suite's task (its key, or the task's defaults); None for a task
    without settings."""
    from attnbench.tasks import TASKS

    config = TASKS[suite.task].Config
    if config is None:
        return None
    return getattr(suite, suite.task, None) or config()


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How a run evaluates on the way: checkpoints (with the copy hit rate on the first
    ``hit_samples`` held-out pairs) every ``checkpoint_every`` steps; evaluation batches;
    samples in the grid. Not part of a case's identity."""

    checkpoint_every: int
    hit_samples: int
    eval_batch: int
    grid_samples: int


@dataclasses.dataclass(frozen=True)
class TrainCase(CaseIdentity):
    """One training run: an implementation with resolved parameters and one seed, with the
    task, data, generator overrides, loss and the task's own settings (``task_config``, None
    for a task without settings) it trains with."""

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
    loss: str | dict[str, float]
    data: DataConfig
    device: str
    generator: dict[str, Any]
    budget_minutes: float | None
    schedule: str
    warmup_steps: int
    temperature_lr: float | None
    task_config: Any
    evaluation: Evaluation

    @property
    def loss_text(self) -> str:
        """The loss as rows record it: its name, or its weights as JSON."""
        return self.loss if isinstance(self.loss, str) else json.dumps(self.loss, sort_keys=True)

    @property
    def data_record(self) -> dict:
        """The data settings as rows record them (unset test files and the default pose
        channels left out)."""
        data = dataclasses.asdict(self.data)
        if data["pose"] == "heatmaps":
            del data["pose"]
        for key in ("test_root", "test_annotations", "test_pairs"):
            if data[key] is None:
                del data[key]
        return data

    def settings_record(self) -> dict:
        """The task's settings as rows record them, JSON values ({} for a task without
        settings)."""
        settings = {} if self.task_config is None else dataclasses.asdict(self.task_config)
        return json.loads(json.dumps(settings))

    def identity(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "impl": self.impl,
            "params": self.params,
            "seed": self.seed,
            "preset": self.preset,
            "steps": self.steps,
            "batch": self.batch,
            "lr": self.lr,
            "loss": self.loss_text,
            "data": json.dumps(self.data_record, sort_keys=True),
            "device": self.device,
            "generator": json.dumps(self.generator, sort_keys=True),
            "budget_minutes": self.budget_minutes,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "temperature_lr": self.temperature_lr,
            "task_config": json.dumps(self.settings_record(), sort_keys=True),
        }


def expand(suite: TrainSettings, device: str) -> list[TrainCase]:
    """The runs of a training suite: implementations (swept) x seeds, in order."""
    evaluation = Evaluation(
        suite.checkpoint_every, suite.hit_samples, suite.eval_batch, suite.grid_samples
    )
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
            loss=suite.loss,
            data=suite.data,
            device=device,
            generator={**suite.generator, **entry.generator},
            budget_minutes=suite.budget.minutes if suite.budget else None,
            schedule=suite.schedule,
            warmup_steps=suite.warmup_steps,
            temperature_lr=suite.temperature_lr,
            task_config=task_config(suite),
            evaluation=evaluation,
        )
        for entry in suite.implementations
        for combo in sweep(entry.params)
        for seed in suite.seeds
    ]


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


def check(suite: TrainSettings, file: str) -> list[str]:
    """What the schema cannot see: the preset and generator overrides, the data files the
    source needs, task settings under another task's key, the task's own checks, the loss."""
    from attnbench.tasks import TASKS

    problems = check_generators(suite, file) + check_data(suite, file)
    for name in TASKS:
        if name != suite.task and getattr(suite, name, None) is not None:
            problems.append(
                f"{file}: {name}: only for task: {name} (this suite's task is {suite.task!r})"
            )
    problems += TASKS[suite.task].check(suite, file)
    if isinstance(suite.loss, dict) and not any(suite.loss.values()):
        problems.append(f"{file}: loss: every weight is 0 (allowed: at least one weight > 0)")
    return problems


def check_data(suite: TrainSettings, file: str) -> list[str]:
    """The files a data source needs are named."""
    data = suite.data
    needs = {"folder": ("root",), "deepfashion": ("root", "annotations")}.get(data.source, ())
    return [
        f"{file}: data.{key}: required when data.source is {data.source!r}"
        for key in needs
        if getattr(data, key) is None
    ]


def check_generators(suite: TrainSettings, file: str) -> list[str]:
    """The preset exists, and the generator each entry trains is a valid configuration."""
    from attnbench.generators import PRESETS

    if suite.preset not in PRESETS:
        return [
            f"{file}: preset: {suite.preset!r} is not a generator preset "
            f"(allowed: {', '.join(PRESETS)})"
        ]
    checks = [("generator", suite.generator)] + [
        (f"implementations[{i}].generator", {**suite.generator, **entry.generator})
        for i, entry in enumerate(suite.implementations)
        if entry.generator
    ]
    problems = []
    for key, overrides in checks:
        problems += check_generator(suite, file, key, overrides)
    return problems


def check_generator(suite: TrainSettings, file: str, key: str, overrides: dict) -> list[str]:
    """One generator configuration: the overrides exist and fit the data and the suite."""
    where = f"{file}: {key}"
    if "pose_channels" in overrides:
        return [f"{where}.pose_channels: set by the data (allowed: leave it out)"]
    try:
        config = generator_config(suite.preset, overrides)
    except (ValueError, TypeError) as err:
        return [f"{where}: {err}"]
    problems = []
    data = suite.data
    if config.coords == "pose" and data.source != "folder" and data.pose != "heatmaps+coords":
        problems.append(
            f"{where}.coords: 'pose' reads the pose's coordinate map (allowed: "
            "with data.pose: heatmaps+coords, or data.source: folder)"
        )
    if suite.temperature_lr is not None and not config.learn_temperature:
        problems.append(
            f"{file}: temperature_lr: {key} has no trainable temperature (allowed: "
            "with generator learn_temperature: true)"
        )
    return problems
