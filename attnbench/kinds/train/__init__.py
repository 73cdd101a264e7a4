"""The training kind: a generator trained with each attention and seed, on a task.

Its suite model and cases are :mod:`.suite`'s; a case trains by the one loop of
:mod:`attnbench.tasks.training`, on the task it names (:data:`attnbench.tasks.TASKS`).
"""

from __future__ import annotations

from pathlib import Path

from attnbench.kinds.base import Kind, RunOptions, Session, markdown_records, mib
from attnbench.kinds.train import suite as train_suite


class TrainSession(Session):
    """A run of a training suite: one process of a torchrun launch, or the only one."""

    unit = "run"

    def __init__(self, options: RunOptions) -> None:
        from attnbench.results import context
        from attnbench.tasks.distributed import init_distributed

        init_distributed(options.device)
        self.options = options
        self.ctx = context(options.device)

    def describe(self, case) -> str:
        return f"{case.impl} seed {case.seed}"

    def empty_row(self, case) -> dict:
        return empty_row(case, self.ctx)

    def run(self, case, row: dict) -> None:
        from attnbench.tasks import training

        options = self.options
        training.train_case(case, row, options.out_dir, options.resume, options.progress)


class TrainKind(Kind):
    name = "train"
    suite_model = train_suite.TrainSuite

    def check(self, suite, file: str) -> list[str]:
        return train_suite.check(suite, file)

    def expand(self, suite, device: str) -> list:
        return train_suite.expand(suite, device)

    def claim_outputs(self, suite, path: Path, device: str, resume: bool, overwrite: bool) -> None:
        """A run's checkpoint counts as a row: without ``resume`` it is refused, with
        ``overwrite`` removed."""
        from attnbench.tasks.training import checkpoint_path, checkpoint_step

        for case in self.expand(suite, device):
            checkpoint = checkpoint_path(path.parent, case)
            if not checkpoint.exists() or resume:
                continue
            if overwrite:
                checkpoint.unlink()
                continue
            step = checkpoint_step(checkpoint)
            raise ValueError(
                f"{checkpoint} holds {case.impl} seed {case.seed} stopped at step {step}: pass "
                f"--resume to continue from step {step} or --overwrite to start over"
            )

    def start(self, suite, options: RunOptions, todo: list) -> Session:
        return TrainSession(options)

    def summary(self, rows: list[dict]) -> str:
        return summary_table(rows)


def empty_row(case: train_suite.TrainCase, ctx: dict) -> dict:
    """Every key a train row has, metrics null until measured."""
    from attnbench.results import new_row

    row = new_row(case, "train", ctx, "float32")
    row.update(
        task=case.task,
        preset=case.preset,
        batch=case.batch,
        lr=case.lr,
        loss=case.loss_text,
        data=case.data_record,
        generator=dict(case.generator),
        budget_minutes=case.budget_minutes,
        max_steps=case.steps,
        schedule=case.schedule,
        warmup_steps=case.warmup_steps,
        temperature_lr=case.temperature_lr,
        grid_png=None,
    )
    if case.task_config is not None:
        row["task_config"] = case.settings_record()
    return row


def summary_table(rows: list[dict]) -> str:
    """A Markdown table of train rows, one line per run."""
    records = [
        {
            "implementation": r["label"],
            "seed": r["seed"],
            "status": r["status"],
            "test L1": r.get("test_l1"),
            "SSIM": r.get("ssim"),
            "PSNR": r.get("psnr"),
            "LPIPS": r.get("lpips"),
            "hit rate": (r.get("copy_hit_rate") or {}).get("largest"),
            "steps": r.get("steps"),
            "attention MiB": mib(r.get("attn_mem_bytes")),
            "step s": r.get("step_time_s"),
            "parameters": r.get("n_params"),
        }
        for r in rows
    ]
    return markdown_records(records, ".4g")


KIND = TrainKind()
