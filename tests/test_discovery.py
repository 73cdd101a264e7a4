"""Discovery: when a run learns to copy (steps_to_copy), its curves, and the equal-time reading."""

import pytest

from attnbench import harness
from attnbench.tasks.evaluation import COPY_THRESHOLD, first_copy


def curve(*hits: float | None, every: int = 100, step_s: float = 0.5) -> list[dict]:
    """Evaluations every ``every`` steps with these largest-level hit rates."""
    return [
        {"step": every * (i + 1), "time_s": every * (i + 1) * step_s, "largest": h, "psnr": 20.0}
        for i, h in enumerate(hits)
    ]


def test_steps_to_copy_is_the_first_evaluation_at_the_threshold():
    assert COPY_THRESHOLD == 0.5
    assert first_copy(curve(0.1, 0.3, 0.6, 0.9, 0.4)) == (300, 150.0, None)
    assert first_copy(curve(0.2, 0.5))[:2] == (200, 100.0), "reaching it counts"


def test_a_crossing_between_evaluations_is_located_at_the_later_one():
    # The rate passes 0.5 somewhere between steps 100 (0.4) and 200 (0.7): located at 200,
    # within one evaluation interval of the truth.
    assert first_copy(curve(0.4, 0.7))[:2] == (200, 100.0)


def test_never_crossing_is_null_with_the_reason():
    steps, time_s, note = first_copy(curve(0.1, 0.25, 0.2))
    assert steps is None and time_s is None
    assert note == (
        "steps_to_copy: the largest level's hit rate stayed below 0.5 in 3 evaluations "
        "(highest 0.250 at step 200)"
    )
    assert first_copy(curve(None, None))[2].endswith(
        "no evaluation scored the largest level's hit rate"
    )
    assert first_copy([]) == (None, None, first_copy(curve(None))[2])


TINY = """
kind: train
implementations:
  - name: full.sdpa
steps: 4
batch: 2
seeds: [0]
checkpoint_every: 2
eval_batch: 4
data: {train_size: 8, test_size: 4}
"""


def test_train_rows_carry_the_psnr_curve_and_steps_to_copy(tmp_path, suite_from_text):
    _, (row,) = harness.run_suite(suite_from_text(TINY), tmp_path, progress=False)
    assert row["status"] == "ok", row["reason"]
    assert [p["step"] for p in row["hit_curve"]] == [2, 4]
    assert all(0 < p["psnr"] < 100 for p in row["hit_curve"])
    assert row["hit_curve"][-1]["psnr"] == pytest.approx(row["psnr"], rel=1e-6), (
        "the last evaluation on the way is the final one"
    )
    steps, time_s, note = first_copy(row["hit_curve"])
    assert (row["steps_to_copy"], row["time_to_copy_s"]) == (steps, time_s)
    assert note is None or note in row["reason"]
