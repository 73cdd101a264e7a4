"""attnbench report: tables against hand-computed values and a checked-in fixture; plots.

Table and plot functions take the result frame; rows written here as dicts become one through
:func:`attnbench.report.table.prepare`, as :func:`attnbench.results.frame` gives it.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from attnbench.report import write_report
from attnbench.report.micro_tables import (
    fidelity_table,
    kappa_fidelity_table,
    micro_table,
    overtakes,
    scaling_table,
)
from attnbench.report.not_run_table import not_run_table
from attnbench.report.table import markdown_table
from attnbench.report.tables import all_tables
from attnbench.report.train_tables import kappa_training_table, task_table, welch
from attnbench.results import REQUIRED_KEYS, machine_name, valid_rows

ROOT = Path(__file__).resolve().parents[1]
UNIT = re.compile(r"\((ms|s|MiB|1|dB|pixels|tokens|count)\)$")  # an axis label ends in its unit
FIXTURE = ROOT / "tests" / "fixtures" / "report"


def copying_table(rows):
    """The affine-copying task's table of ``rows``."""
    return task_table("copying", rows)


def base_row(kind: str, suite: str, case_id: str, impl: str, seed: int) -> dict:
    """A row with every required key, measured on one test machine."""
    row = dict.fromkeys(REQUIRED_KEYS)
    row |= {
        "suite": suite,
        "kind": kind,
        "case_id": case_id,
        "impl": impl,
        "params": {},
        "label": impl,
        "status": "ok",
        "device": "cpu",
        "device_name": "Test CPU",
        "dtype": "float32",
        "threads": 2,
        "torch_version": "2.0",
        "seed": seed,
    }
    return row


def micro_row(impl: str, side: int, time_ms: float | None, mem: int | None, **extra) -> dict:
    """A micro row of a square map; not run (unsupported) when ``time_ms`` is None."""
    row = base_row("micro", "s", f"{impl}-{side}", impl, 0)
    row |= {
        "status": "ok" if time_ms is not None else "unsupported",
        "reason": None if time_ms is not None else "too big",
        "batch": 1,
        "heads": 1,
        "q_h": side,
        "q_w": side,
        "kv_h": side,
        "kv_w": side,
        "channels": 64,
        "inputs": "gaussian",
        "time_fwd_ms": time_ms,
        "mem_fwd_bytes": mem,
    }
    return row | extra


def train_row(impl: str, seed: int, l1: float, **extra) -> dict:
    """A copying run of ``impl`` with held-out L1 ``l1``."""
    row = base_row("train", "t", f"{impl}-{seed}", impl, seed)
    row |= {
        "task": "copying",
        "preset": "cpu64",
        "steps": 10,
        "batch": 2,
        "test_l1": l1,
        "attn_mem_bytes": 2**20,
        "step_time_s": 0.5,
    }
    return row | extra


def records(section) -> list[dict]:
    """A section's records as dicts (NaN where a value is null)."""
    return section.records.to_dict("records")


def test_speedup_is_the_baseline_time_over_the_method_time():
    rows = [
        micro_row("full.sdpa", 32, 40.0, 100),
        micro_row("none", 32, 2.5, 10),
        micro_row("none", 64, 1.0, 10),  # no baseline at 64: no speed-up
    ]
    by_key = {(r["label"], r["map"]): r for r in records(micro_table(rows).sections[0])}
    assert by_key["none", "32x32"]["speedup_fwd"] == pytest.approx(16.0)
    assert by_key["full.sdpa", "32x32"]["speedup_fwd"] == pytest.approx(1.0)
    assert pd.isna(by_key["none", "64x64"]["speedup_fwd"])


def test_scaling_fits_power_laws_and_finds_where_a_method_overtakes():
    sides = [16, 32, 64, 128]
    rows = [micro_row("full.sdpa", s, 1e-4 * (s * s) ** 2, 10 * s * s) for s in sides]
    # linear in tokens, slower than quadratic below 64x64 (crossing between 32² and 64²)
    rows += [micro_row("performer.torch", s, 0.05 * s * s, 3000 * s * s) for s in sides]
    rows.append(micro_row("performer.torch", 256, None, None))  # not run: not part of the fit
    (section,) = scaling_table(rows).sections
    by_method = {r["method"].split("(")[0]: r for r in records(section)}
    assert by_method["full.sdpa"]["time_exponent"] == pytest.approx(2.0)
    assert by_method["full.sdpa"]["memory_exponent"] == pytest.approx(1.0)
    performer = by_method["performer.torch"]
    assert performer["time_exponent"] == pytest.approx(1.0)
    # 0.05 n < 1e-4 n² <=> n > 500 tokens: first faster at 32x32 = 1,024 tokens
    assert performer["time_overtakes"] == "1,024 tokens (32x32)"
    assert performer["memory_overtakes"] == "not up to 16,384 tokens"


def test_scaling_of_methods_timed_without_memory_leaves_memory_out():
    # Rows whose memory was not measured (no peak counter) used to crash the table.
    sides = [8, 16, 32]
    rows = [micro_row("full.sdpa", s, 1e-4 * (s * s) ** 2, None) for s in sides]
    rows += [micro_row("none", s, 1e-3 * s * s, None) for s in sides]
    (section,) = scaling_table(rows).sections
    none = next(r for r in records(section) if r["method"] == "none")
    assert none["time_exponent"] == pytest.approx(1.0)
    assert none["time_overtakes"] is not None and pd.isna(none["memory_exponent"])
    assert none["memory_overtakes"] is None


def test_copying_means_and_stds_over_seeds_per_machine():
    l1 = {0: 0.10, 1: 0.12, 2: 0.13}
    rows = [train_row("none", seed, value) for seed, value in l1.items()]
    other = [train_row("none", seed, 0.5, threads=8) for seed in (0, 1)]
    diverged = train_row("none", 3, None, status="diverged", reason="nan")
    table = copying_table(rows + other + [diverged])
    assert [s.context["machine"] for s in table.sections] == [
        machine_name(("cpu", "Test CPU", 2, "2.0")),
        machine_name(("cpu", "Test CPU", 8, "2.0")),
    ]
    mine, theirs = (records(s)[0] for s in table.sections)
    assert mine["test_l1"] == pytest.approx(statistics.fmean(l1.values()))
    assert mine["test_l1_std"] == pytest.approx(statistics.stdev(l1.values()))
    assert mine["runs"] == "3/4"  # the diverged run is counted, not averaged
    assert theirs["test_l1"] == pytest.approx(0.5)  # never mixed with the other machine


def test_a_section_whose_runs_span_days_names_the_methods_of_each_day():
    def run(impl: str, seed: int, when: str) -> dict:
        return train_row(impl, seed, 0.1, timestamp=f"2026-01-0{when}+00:00")

    one_day = [run("none", 0, "1T00:00:00"), run("full.sdpa", 0, "1T23:59:59")]
    assert copying_table(one_day).sections[0].notes == []
    rows = [*one_day, run("full.sdpa", 1, "3T00:00:01"), run("none", 1, "1T12:00:00")]
    notes = copying_table(rows).sections[0].notes
    assert notes[0].startswith(
        "step times come from runs of 2 days (2026-01-01: none, full.sdpa; 2026-01-03: full.sdpa)"
    )
    failed = run("gpa.torch", 0, "5T00:00:00") | {"status": "error", "reason": "boom"}
    assert copying_table([*rows, failed]).sections[0].notes == notes  # ok runs only


def hits(r1: float, r2: float) -> dict:
    """A ``copy_hit_rate`` whose largest level has these hit rates."""
    return {"largest": r1, "largest_r2": r2, "levels": {"level3_64x64": {"r1": r1, "r2": r2}}}


def test_welch_p_value_is_scipys_and_empty_below_two_seeds_a_side():
    # t = 1.5 / sqrt(0.5 / 2) = 3 with 1 degree of freedom: p = 1 - 2 atan(3) / pi
    assert welch([1.0, 2.0], [0.0, 0.0]) == (1.5, pytest.approx(1 - 2 * math.atan(3) / math.pi))
    assert welch([1.0], [0.0, 0.5]) == (0.75, None)
    assert welch([0.0, 0.0], [0.0, 0.0, 0.0]) == (0.0, None)  # no spread on either side
    assert welch([None, None], [1.0, 2.0]) == (None, None)


def test_copying_compares_psnr_and_hit_rate_with_none_and_full_by_welch():
    rows = valid_rows([FIXTURE / "rows.jsonl"])
    (section,) = [s for s in copying_table(rows).sections if s.context["suite"] == "copying-budget"]
    by_label = {r["label"]: r for r in records(section)}
    budget = [r for r in rows if r["suite"] == "copying-budget" and r["status"] == "ok"]

    def values(label: str, generator: dict, key: str) -> list[float]:
        runs = [r for r in budget if r["label"] == label and r["generator"] == generator]
        return [r["copy_hit_rate"]["largest"] if key == "hit" else r[key] for r in runs]

    none = {key: values("none", {}, key) for key in ("psnr", "hit")}
    full = {key: values("full.sdpa(scale=None)", {}, key) for key in ("psnr", "hit")}
    no_copying = values("none", {"small_attention": "none"}, "psnr")
    assert len(none["psnr"]) == len(full["psnr"]) == 3 and len(no_copying) == 2
    welch_p = stats.ttest_ind(full["psnr"], none["psnr"], equal_var=False).pvalue
    full_record = by_label["full.sdpa(scale=None)"]
    assert full_record["psnr_p_vs_none"] == pytest.approx(welch_p)
    assert full_record["psnr_vs_none"] == pytest.approx(
        statistics.fmean(full["psnr"]) - statistics.fmean(none["psnr"])
    )
    welch_p = stats.ttest_ind(full["hit"], none["hit"], equal_var=False).pvalue
    assert full_record["hit_r1_p_vs_none"] == pytest.approx(welch_p)
    assert pd.isna(full_record["psnr_vs_full"])  # not compared with itself
    no_record = by_label["none (no copying at any level)"]
    welch_p = stats.ttest_ind(no_copying, full["psnr"], equal_var=False).pvalue
    assert no_record["psnr_p_vs_full"] == pytest.approx(welch_p)
    gpa = by_label["gpa.torch(res=16,s=2,k=12)"]
    assert gpa["runs"] == "1/2" and pd.notna(gpa["psnr_vs_none"])
    assert pd.isna(gpa["psnr_p_vs_none"]) and pd.isna(gpa["psnr_p_vs_full"])  # one seed
    assert "2000 steps or 2 min of training" in section.heading
    assert gpa["steps_done"] == 895  # the ok run's, as it stopped on its budget


def test_generator_overrides_make_a_method_of_their_own():
    shared = {"coords": "qk"}
    rows = [train_row("none", s, 0.10, psnr=15.0 + s, generator=shared) for s in (0, 1)]
    no_copying = shared | {"small_attention": "none"}
    rows += [train_row("none", s, 0.20, psnr=12.0 + s, generator=no_copying) for s in (2, 3)]
    rows += [train_row("full.sdpa", 4, 0.05, generator=shared | {"affinity": "euclid"})]
    (section,) = copying_table(rows).sections
    assert [r["label"] for r in records(section)] == [
        "none",
        "none (no copying at any level)",
        "full.sdpa (affinity=euclid)",
    ]
    none, no, _ = records(section)
    assert (none["test_l1"], no["test_l1"]) == (pytest.approx(0.10), pytest.approx(0.20))
    assert no["psnr_vs_none"] == pytest.approx(-1.0)  # against the plain none, not itself
    assert pd.isna(none["psnr_vs_none"])
    assert "generator coords=qk" in section.heading
    assert section.context["generator"] == "coords=qk"


def test_rows_without_copy_hit_rate_leave_the_hit_rate_out():
    old = [train_row("none", s, 0.1) for s in (0, 1)]  # written before the hit rate existed
    (section,) = copying_table(old).sections
    assert pd.isna(records(section)[0]["hit_r1"])
    assert "hit rate" not in markdown_table(copying_table(old).cols, section.records)
    new = [train_row("full.sdpa", s, 0.1, copy_hit_rate=hits(0.1 * s, 0.2 * s)) for s in (1, 2)]
    failed = train_row("full.sdpa", 3, None, status="error", reason="boom", copy_hit_rate=None)
    old_full = train_row("full.sdpa", 0, 0.1)
    (section,) = copying_table(old + new + [failed, old_full]).sections
    full = records(section)[1]
    assert full["runs"] == "3/4"
    assert full["hit_r1"] == pytest.approx(0.15) and full["hit_r2"] == pytest.approx(0.3)
    assert pd.isna(full["hit_r1_p_vs_none"])  # none has no hit rate


def test_not_run_lists_every_row_that_is_not_ok_with_its_reason():
    rows = [micro_row("full.sdpa", 32, 1.0, 1), micro_row("none", 64, None, None)]
    rows.append(train_row("none", 0, None, status="error", reason="boom"))
    (section,) = not_run_table(rows).sections
    assert [(r["label"], r["status"], r["reason"]) for r in records(section)] == [
        ("none", "unsupported", "too big"),
        ("none", "error", "boom"),
    ]


def write_tables(rows: list[dict], out: Path) -> dict[str, bytes]:
    write_report(rows, out, plots=False)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.*"))}


def test_fixture_rows_give_the_checked_in_tables_byte_for_byte(tmp_path):
    got = write_tables(valid_rows([FIXTURE / "rows.jsonl"]), tmp_path)
    expected_dir = FIXTURE / "expected"
    expected = {
        p.relative_to(expected_dir).as_posix(): p.read_bytes()
        for p in sorted(expected_dir.rglob("*.*"))
    }
    assert sorted(got) == sorted(expected)
    for name, content in expected.items():
        assert got[name] == content, f"{name} differs from the fixture (see its README)"


def test_row_order_does_not_change_the_tables(tmp_path):
    rows = valid_rows([FIXTURE / "rows.jsonl"])
    shuffled = copy.deepcopy(rows)
    random.Random(0).shuffle(shuffled)
    assert write_tables(rows, tmp_path / "a") == write_tables(shuffled, tmp_path / "b")


def test_committed_tables_are_what_the_committed_rows_give(tmp_path):
    committed = ROOT / "results" / "tables"
    rows = valid_rows([ROOT / "results" / "raw"])
    for table in all_tables(rows):
        for suffix, text in ((".md", table.markdown()), (".csv", table.csv())):
            path = committed / f"{table.name}{suffix}"
            assert path.read_text(encoding="utf-8") == text, (
                f"{path} is stale: run `attnbench report --results results/raw --out results`"
            )


def test_load_skips_incomplete_rows_with_a_warning(tmp_path):
    good = micro_row("none", 32, 1.0, 1)
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"impl": "x"}) + "\n")
    with pytest.warns(UserWarning, match="row 2 skipped: without the required keys"):
        rows = valid_rows([tmp_path])
    assert rows == [good]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        valid_rows([tmp_path / "missing"])


def figure_texts(fig) -> tuple[str, list[tuple[str, str]], bool]:
    title = fig._suptitle.get_text() if fig._suptitle else ""
    axes = [ax for ax in fig.axes if ax.get_xlabel() or ax.get_ylabel() or ax.has_data()]
    title = title or " ".join(ax.get_title() for ax in axes)
    legend = any(ax.get_legend() is not None for ax in fig.axes) or bool(fig.legends)
    return title, [(ax.get_xlabel(), ax.get_ylabel()) for ax in axes], legend


def test_every_plot_has_a_title_axes_with_units_and_a_legend():
    from attnbench.report.plots import all_plots

    figures = all_plots(valid_rows([FIXTURE / "rows.jsonl"]))
    names = [name for name, _ in figures]
    # suite copying ran on two machines: its plots' names carry the machine; copying-budget
    # and pose ran on one each, so theirs do not
    prefixes = ("copying-memory-vs-l1-", "copying-kappa-", "micro-time-memory-c64")
    for prefix in prefixes:
        assert any(name.startswith(prefix) for name in names), (prefix, names)
    assert {"copying-budget-hit-curve", "pose-hit-curve", "pose-memory-vs-l1"} <= set(names)
    assert any(name.startswith("fidelity-error-vs-memory") for name in names)
    for name, fig in figures:
        title, labels, legend = figure_texts(fig)
        assert title, name
        assert legend, name
        for xlabel, ylabel in labels:
            assert UNIT.search(xlabel) and UNIT.search(ylabel), (name, xlabel, ylabel)


def test_machines_get_separate_plots():
    from attnbench.report.plots import memory_vs_l1

    rows = [train_row("none", s, 0.1) for s in (0, 1)]
    rows += [train_row("none", s, 0.2, device_name="Other CPU") for s in (0, 1)]
    names = [name for name, _ in memory_vs_l1(rows)]
    assert len(names) == 2 and names[0] != names[1]


def test_cli_report_writes_tables_and_names_a_missing_path(tmp_path):
    cmd = [sys.executable, "-m", "attnbench", "report", "--no-plots", "--out", str(tmp_path)]
    ok = subprocess.run(
        cmd + ["--results", str(FIXTURE / "rows.jsonl")], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "tables" / "micro.md").exists()
    assert "130 rows" in ok.stdout
    bad = subprocess.run(
        cmd + ["--results", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "nope" in bad.stderr and "does not exist" in bad.stderr


def test_report_page_links_every_plot_it_wrote(tmp_path):
    written = write_report(valid_rows([FIXTURE / "rows.jsonl"]), tmp_path)
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in written if p.suffix == ".png")
    page = (tmp_path / "report.md").read_text()
    linked = sorted(re.findall(r"\]\((plots/[^)]+\.png)\)", page))
    assert linked == pngs
    assert "plots/gpa-selected-keys-euclid.png" in linked
    for png in pngs:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overtakes_needs_every_larger_size_to_be_below():
    maps = {n: f"m{n}" for n in (1, 2, 3, 4)}
    base = {1: 10.0, 2: 10.0, 3: 10.0, 4: 10.0}
    assert overtakes({1: 5.0, 2: 5.0, 3: 5.0, 4: 5.0}, base, maps) == "<= 1 tokens (m1)"
    assert overtakes({1: 5.0, 2: 50.0, 3: 5.0, 4: 5.0}, base, maps) == "3 tokens (m3)"
    assert overtakes({1: 5.0, 2: 5.0, 3: 5.0, 4: 50.0}, base, maps) == "not up to 4 tokens"
    assert overtakes({1: 5.0, 3: 50.0}, {1: 10.0, 2: 1.0}, maps) == "<= 1 tokens (m1)"
    assert overtakes({5: 1.0}, base, maps) is None  # no size in common


def test_machines_with_unknown_thread_counts_sort_and_stay_apart():
    rows = [train_row("none", 0, 0.1, threads=None), train_row("none", 0, 0.2)]
    table = copying_table(rows)
    assert [records(s)[0]["test_l1"] for s in table.sections] == [0.1, 0.2]
    assert "threads unknown" in table.sections[0].heading


def test_a_diverged_run_counts_in_its_methods_section():
    rows = [train_row("none", s, 0.1) for s in (0, 1)]
    rows.append(train_row("none", 2, None, status="diverged", steps=3, reason="loss became nan"))
    (section,) = copying_table(rows).sections
    assert records(section)[0]["runs"] == "2/3"
    assert "10 steps" in section.heading


def test_kappa_of_an_implementation_not_installed_here_is_left_out():
    rows = [train_row("gpa.elsewhere", s, 0.1, params={"cell": 2}) for s in (0, 1)]
    rows += [train_row("gpa.torch", 0, 0.1, params={"topk": k}, case_id=f"k{k}") for k in (4, 8)]
    (section,) = kappa_training_table(rows).sections
    assert [r["topk"] for r in records(section)] == [4, 8]


def test_micro_table_keeps_rows_measured_only_forward_and_backward():
    row = micro_row("full.sdpa", 32, None, None, status="ok", reason=None, time_fwdbwd_ms=3.0)
    (section,) = micro_table([row]).sections
    assert records(section)[0]["time_fwdbwd_ms"] == 3.0


def test_load_reads_each_file_once_and_rejects_files_without_rows(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(micro_row("none", 32, 1.0, 1)) + "\n[1, 2]\n")
    with pytest.warns(UserWarning, match="row 2 skipped: not a JSON object"):
        rows = valid_rows([tmp_path, path])
    assert len(rows) == 1
    empty = tmp_path / "empty" / "e.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    with pytest.raises(ValueError, match="no result rows"):
        valid_rows([empty])


def test_hit_curve_plots_one_line_per_method_and_skips_rows_without_curves():
    from attnbench.report.plots import hit_curve

    def curve(seed: int) -> list[dict]:
        return [
            {"step": step, "time_s": step / 10, **hits(0.01 * step + 0.1 * seed, 0.5)}
            for step in (10, 20)
        ]

    rows = [train_row("none", s, 0.1) for s in (0, 1)]
    assert hit_curve(rows) == []
    rows += [train_row("full.sdpa", s, 0.1, hit_curve=curve(s)) for s in (0, 1)]
    no_copying = {"generator": {"small_attention": "none"}}
    rows += [train_row("none", s, 0.1, hit_curve=curve(s), **no_copying) for s in (2, 3)]
    ((name, fig),) = hit_curve(rows)
    assert name == "t-hit-curve"
    (ax,) = fig.axes
    legend = ax.get_legend()
    colours = {t.get_text(): h.get_color() for t, h in zip(legend.texts, legend.legend_handles)}
    assert list(colours) == ["none (no copying at any level)", "full.sdpa"]
    drawn = [line for line in ax.get_lines() if len(line.get_xdata())]  # not the legend's
    means = {line.get_color(): list(line.get_ydata()) for line in drawn}
    assert means[colours["full.sdpa"]] == pytest.approx([0.15, 0.25])  # mean over seeds per step


def test_plots_of_two_partitions_of_one_suite_get_two_files(tmp_path):
    rows = [train_row("none", s, 0.1) for s in (0, 1)]
    rows += [train_row("none", s, 0.2, preset="other", case_id=f"o{s}") for s in (0, 1)]
    written = write_report(rows, tmp_path)
    names = sorted(p.name for p in written if p.name.startswith("t-memory-vs-l1"))
    assert names == ["t-memory-vs-l1-2.png", "t-memory-vs-l1.png"]


def test_fidelity_keeps_warp_match_sharpnesses_apart():
    from attnbench.report.plots import fidelity_vs_memory

    def scored(impl: str, inputs: str, sharpness: float | None, psnr: float | None, **params):
        return micro_row(
            impl,
            64,
            None,
            None,
            case_id=f"{impl}-{params}-{inputs}-{sharpness}",
            status="ok",
            reason=None,
            params=params,
            inputs=inputs,
            sharpness=sharpness,
            v_channels=3,
            rel_err_out=0.1,
            copy_psnr=psnr,
            mem_predicted_bytes=2**20,
        )

    rows = [scored("full.sdpa", "warp-copy", None, 19.0)]
    for sharpness, psnr in ((4.0, 32.0), (1.0, 22.0)):
        rows.append(scored("full.sdpa", "warp-match", sharpness, psnr))
        rows += [scored("gpa.torch", "warp-match", sharpness, psnr - k, topk=k) for k in (8, 4)]
    table = fidelity_table(rows)
    copy, match = table.sections
    assert [(r["sharpness"], r["copy_psnr"]) for r in records(match)] == [
        (1.0, 22.0), (1.0, 18.0), (1.0, 14.0), (4.0, 32.0), (4.0, 28.0), (4.0, 24.0),
    ]  # fmt: skip
    assert "sharpness" not in markdown_table(table.cols, copy.records)
    assert "| sharpness |" in markdown_table(table.cols, match.records)
    (kappa,) = kappa_fidelity_table(rows).sections  # GPA only on warp-match
    assert [(r["sharpness"], r["topk"]) for r in records(kappa)] == [
        (1.0, 4), (1.0, 8), (4.0, 4), (4.0, 8),
    ]  # fmt: skip
    ((_, fig),) = fidelity_vs_memory(rows)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "warp-copy inputs",
        "warp-match inputs, sharpness 1",
        "warp-match inputs, sharpness 4",
    ]
    assert [len(ax.collections[0].get_offsets()) for ax in fig.axes] == [1, 3, 3]


# --- the discovery table: calibrated time and the equal-time reading ----------------------------


def discovery_row(impl: str, seed: int, hits: list, psnrs: list, suite="d", **extra) -> dict:
    """A run evaluated every 100 steps with these hit rates and PSNRs (steps_to_copy as the
    row would have it)."""
    curve = [
        {"step": 100 * (i + 1), "time_s": 1.0 * i, "largest": h, "psnr": p}
        for i, (h, p) in enumerate(zip(hits, psnrs))
    ]
    first = next((c["step"] for c in curve if c["largest"] >= 0.5), None)
    row = train_row(impl, seed, 0.1, hit_curve=curve, steps_to_copy=first, psnr=psnrs[-1])
    return row | {"suite": suite, "case_id": f"{suite}-{impl}-{seed}", "steps": len(hits) * 100}


def calibration_row(impl: str, step_s: float) -> dict:
    return train_row(impl, 0, 0.1, step_time_s=step_s) | {
        "suite": "d-step-time",
        "case_id": f"cal-{impl}",
    }


def test_discovery_time_axis_is_steps_times_the_calibrated_step_time():
    from attnbench.report.discovery import discovery_table

    # full.sdpa: 0.5 s a step (calibrated), 400 steps -> 200 s; gpa.cpp: 0.1 s a step, 400
    # steps -> 40 s. Their own step_time_s (0.5 in train_row) is not what the axis uses.
    rows = [calibration_row("full.sdpa", 0.5), calibration_row("gpa.cpp", 0.1)]
    for seed in (0, 1):
        rows.append(discovery_row("full.sdpa", seed, [0.0, 0.1, 0.6, 0.9], [20, 21, 24, 26]))
        rows.append(discovery_row("gpa.cpp", seed, [0.0, 0.7, 0.9, 0.9], [20, 25, 27, 28]))
    (section,) = discovery_table(rows).sections
    assert section.context["equal_time_s"] == pytest.approx(40.0), "gpa.cpp's end: 400 x 0.1 s"
    full, gpa = records(section)
    assert full["label"] == "full.sdpa" and full["step_ms"] == pytest.approx(500)
    assert full["steps_to_copy"] == 300 and full["time_to_copy"] == pytest.approx(150.0)
    assert gpa["steps_to_copy"] == 200 and gpa["time_to_copy"] == pytest.approx(20.0)
    assert full["copied"] == gpa["copied"] == "2/2"
    # At T = 40 s full.sdpa is at step 80, before its first evaluation (step 100): no reading.
    assert pd.isna(full["psnr_t"]) and gpa["psnr_t"] == pytest.approx(28.0)
    assert section.notes[0].startswith("T = 40 s")
    assert "suite 'd-step-time'" in section.notes[1]


def test_discovery_reads_each_run_at_T_between_its_evaluations():
    from attnbench.report.discovery import discovery_table

    # Calibrated 0.1 s and 0.2 s a step: full.sdpa reaches 400 x 0.1 = 40 s, none 300 x 0.2 =
    # 60 s, so T = 40 s, where none is at step 200 exactly (PSNR 21 and 22 in two seeds) and
    # full.sdpa at its end (PSNR 26 and 27).
    rows = [calibration_row("full.sdpa", 0.1), calibration_row("none", 0.2)]
    rows += [discovery_row("none", s, [0.0, 0.0, 0.0], [20, 21 + s, 22]) for s in (0, 1)]
    rows += [
        discovery_row("full.sdpa", s, [0.1, 0.2, 0.4, 0.45], [20, 22, 24, 26 + s]) for s in (0, 1)
    ]
    (section,) = discovery_table(rows).sections
    none, full = records(section)
    assert section.context["equal_time_s"] == pytest.approx(40.0)
    assert none["steps_t"] == pytest.approx(200) and none["psnr_t"] == pytest.approx(21.5)
    assert none["psnr_t_std"] == pytest.approx(statistics.stdev([21, 22]))
    assert full["psnr_t"] == pytest.approx(26.5) and full["copied"] == "0/2"
    assert pd.isna(full["steps_to_copy"])
    # Halfway between two evaluations the reading is halfway between their values.
    rows = [calibration_row("full.sdpa", 0.1), calibration_row("none", 0.25)]
    rows += [discovery_row("none", s, [0.0, 0.0, 0.0], [20, 22, 24]) for s in (0, 1)]
    rows += [discovery_row("full.sdpa", s, [0.1] * 4, [20, 22, 24, 26]) for s in (0, 1)]
    none, full = records(discovery_table(rows).sections[0])
    assert none["steps_t"] == pytest.approx(160) and none["psnr_t"] == pytest.approx(21.2)
    assert pd.isna(full["psnr_t_p_vs_full"]), "the reference is not tested against itself"


def test_discovery_without_calibration_uses_the_runs_own_step_time():
    from attnbench.report.discovery import discovery_table

    rows = [discovery_row("none", s, [0.0, 0.0], [20, 21]) for s in (0, 1)]
    (section,) = discovery_table(rows).sections
    (none,) = records(section)
    assert none["step_ms"] == pytest.approx(500), "train_row's own step time"
    assert "no calibration suite 'd-step-time'" in section.notes[1]
    assert discovery_table([train_row("none", 0, 0.1)]).sections == [], "no curves: no section"


def test_discovery_figure_marks_T_and_labels_its_axes(tmp_path):
    from attnbench.report.plots import discovery_curves

    rows = [calibration_row("full.sdpa", 0.5), calibration_row("gpa.cpp", 0.1)]
    for seed in (0, 1):
        rows.append(discovery_row("full.sdpa", seed, [0.0, 0.1, 0.6, 0.9], [20, 21, 24, 26]))
        rows.append(discovery_row("gpa.cpp", seed, [0.0, 0.7, 0.9, 0.9], [20, 25, 27, 28]))
    ((name, figure),) = discovery_curves(rows)
    assert name == "d-time-curves"
    hit, psnr = figure.axes[:2]
    for ax in (hit, psnr):
        assert UNIT.search(ax.get_xlabel()) and UNIT.search(ax.get_ylabel())
        assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"] == [40.0]
    figure.savefig(tmp_path / "d.png")


def test_a_time_only_suite_of_three_maps_gets_its_plot(tmp_path):
    # Memory not measured: the legend goes with the time panel (seaborn had no legend to move).
    rows = [micro_row(impl, side, 0.1 * side, None) for impl in ("none", "full.sdpa")
            for side in (8, 16, 32)]  # fmt: skip
    written = write_report(rows, tmp_path)
    assert [p.name for p in written if p.suffix == ".png"] == ["s-time-memory-c64.png"]
