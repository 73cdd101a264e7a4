"""The result row's schema, in one place.

Every row has :data:`REQUIRED_KEYS`; a row of kind ``micro`` or ``train`` adds the keys of its
:class:`KindSchema` (null until measured) and may carry the kind's optional keys. Validation
(:func:`attnbench.results.row_problem`), the column types of :func:`attnbench.results.load` and
the columns the report can rely on (:data:`REPORT_COLUMNS`) are all read from here.
"""

from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("ok", "unsupported", "oom", "error", "diverged")

REQUIRED_KEYS = (
    "suite", "kind", "case_id", "impl", "params", "label", "status", "reason", "device",
    "device_name", "dtype", "threads", "torch_version", "attnbench_version", "git_commit",
    "timestamp", "seed",
)  # fmt: skip
MACHINE_KEYS = ("device", "device_name", "threads", "torch_version")  # one machine column
COMMON_OPTIONAL_KEYS = ("impl_class",)  # module.Class of the implementation measured

MICRO_KEYS = (  # the micro metrics of the design's row format
    "batch", "heads", "q_h", "q_w", "kv_h", "kv_w", "channels", "time_fwd_ms",
    "time_fwd_iqr_ms", "time_fwdbwd_ms", "mem_fwd_bytes", "mem_fwdbwd_bytes", "flops_fwd",
    "gflops_fwd", "peak_gflops", "peak_fraction", "rel_err_out", "rel_err_grad", "copy_psnr",
)  # fmt: skip
MICRO_DETAIL_KEYS = (  # what else a micro row says about its case and its timings
    "v_channels", "inputs", "sharpness", "directions", "time_fwd_first_ms", "time_fwdbwd_iqr_ms",
    "time_fwdbwd_first_ms", "time_phase1_ms", "mem_predicted_bytes", "warnings", "time_fwd_runs",
    "time_fwdbwd_runs",
)  # fmt: skip
MICRO_RECALL_KEYS = (  # the share of exact attention's mass on the kept keys: mean, worst 10%
    "attn_recall", "attn_recall_p10",
)  # fmt: skip
TRAIN_KEYS = (  # the train metrics of the design's row format
    "task", "steps", "train_time_s", "step_time_s", "test_l1", "test_loss", "ssim", "psnr",
    "lpips", "fid", "attn_mem_bytes", "n_params", "copy_hit_rate",
)  # fmt: skip
TRAIN_DETAIL_KEYS = (  # the run's configuration as it was trained
    "preset", "batch", "lr", "loss", "data", "generator", "budget_minutes", "max_steps",
    "schedule", "warmup_steps", "temperature_lr", "grid_png",
)  # fmt: skip
TRAIN_DISCOVERY_KEYS = (  # when the run learnt to copy (hit_curve holds the curves)
    "steps_to_copy", "time_to_copy_s",
)  # fmt: skip
TRAIN_OPTIONAL_KEYS = (  # keys a train row has where they apply
    "task_config", "fid_samples", "hit_curve", "world_size", "replicas_identical",
)  # fmt: skip
NUMBER_KEYS = frozenset(MICRO_KEYS + MICRO_RECALL_KEYS + TRAIN_KEYS + TRAIN_DISCOVERY_KEYS) - {
    "task",
    "copy_hit_rate",
}


@dataclass(frozen=True)
class KindSchema:
    """The keys of one kind of row.

    ``keys``: every row of the kind has them, in this order (null until measured);
    ``required``: of those, the ones never null; ``numbers``: numbers where not null;
    ``optional``: keys that some rows of the kind add.
    """

    name: str
    keys: tuple[str, ...]
    required: tuple[str, ...]
    numbers: frozenset[str]
    optional: tuple[str, ...] = ()


SCHEMAS = {
    "micro": KindSchema(
        "micro",
        MICRO_KEYS + MICRO_DETAIL_KEYS + MICRO_RECALL_KEYS,
        required=("q_h", "q_w", "kv_h", "kv_w", "channels", "batch", "heads"),
        numbers=NUMBER_KEYS & set(MICRO_KEYS + MICRO_RECALL_KEYS),
        optional=COMMON_OPTIONAL_KEYS,
    ),
    "train": KindSchema(
        "train",
        TRAIN_KEYS + TRAIN_DETAIL_KEYS + TRAIN_DISCOVERY_KEYS,
        required=(),
        numbers=NUMBER_KEYS & set(TRAIN_KEYS + TRAIN_DISCOVERY_KEYS),
        optional=COMMON_OPTIONAL_KEYS + TRAIN_OPTIONAL_KEYS,
    ),
}
DERIVED_KEYS = ("grid_png_path",)  # added when rows are read: the grid PNG's path on this machine

# Every column the report may read: present in the frame even where no row has the key.
REPORT_COLUMNS = tuple(
    dict.fromkeys(
        [
            *REQUIRED_KEYS,
            *(key for schema in SCHEMAS.values() for key in schema.keys + schema.optional),
            *DERIVED_KEYS,
        ]
    )
)
