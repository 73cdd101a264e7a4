"""Faults and bad inputs a user hits (issue 17): each ends with a clear message or a row with a
status and reason, never a hang, a traceback where a message belongs, or lost rows."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from attnbench import registry
from attnbench.generators import CopyingGenerator, preset
from attnbench.results import read_rows
from attnbench.tasks import training

FIXTURE = Path(__file__).parent / "fixtures" / "report"

UNRUNNABLE = """
kind: train
implementations:
  - name: gpa.torch
    params: {topk: 999}
  - name: none
steps: 1
batch: 2
checkpoint_every: 1
eval_batch: 2
grid_samples: 1
data: {train_size: 2, test_size: 2}
"""


def test_unsupported_error_survives_pickling():
    err = pickle.loads(pickle.dumps(registry.UnsupportedError("gpa.torch", ["a", "b"])))
    assert isinstance(err, registry.UnsupportedError)
    assert err.reasons == ["a", "b"] and "gpa.torch cannot run" in str(err)


def test_an_error_in_the_memory_probe_reaches_the_parent():
    config = preset("cpu64")
    with pytest.raises(registry.UnsupportedError) as info:  # it used to hang the pool forever
        training.attention_memory(config, "gpa.torch", {"topk": 999}, "cpu")
    assert any("topk=999" in r for r in info.value.reasons)


def test_a_training_run_whose_attention_cannot_train_is_an_unsupported_row(tmp_path):
    suite = tmp_path / "bad.yaml"
    suite.write_text(UNRUNNABLE)
    command = [sys.executable, "-m", "attnbench", "run", str(suite), "--out", str(tmp_path)]
    proc = subprocess.run(command + ["--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    gpa, none = read_rows([tmp_path / "bad-cpu.jsonl"])
    assert gpa["status"] == "unsupported" and none["status"] == "ok", "the suite goes on"
    for block in ("level2_32x32", "level3_64x64"):
        assert f"{block}: topk=999 exceeds the 256 low-res keys" in gpa["reason"]


def test_every_block_that_cannot_train_is_named():
    model = CopyingGenerator(preset("cpu64"), "gpa.flex")
    reasons = training.unsupported_blocks(model, batch=4, device="cpu")
    assert [r.split(":")[0] for r in reasons] == ["level2_32x32", "level3_64x64"]


TINY = """
kind: train
implementations:
  - name: none
  - name: full.sdpa
steps: 4
batch: 2
checkpoint_every: 2
eval_batch: 2
grid_samples: 1
data: {train_size: 4, test_size: 2}
"""


def test_a_checkpoint_without_its_row_is_not_silently_discarded(tmp_path, suite_from_text):
    from attnbench import harness
    from attnbench.kinds.train.suite import expand as expand_train

    suite = suite_from_text(TINY.replace("  - name: full.sdpa\n", ""))
    path, _ = harness.run_suite(suite, tmp_path, progress=False)
    path.unlink()  # as if killed after the last checkpoint, before the row
    (case,) = expand_train(suite, "cpu")
    checkpoint = training.checkpoint_path(tmp_path, case)
    with pytest.raises(ValueError, match="pass --resume to continue from step 4 or --overwrite"):
        harness.run_suite(suite, tmp_path, progress=False)
    assert training.checkpoint_step(checkpoint) == 4, "the checkpoint is left as it was"
    _, (row,) = harness.run_suite(suite, tmp_path, overwrite=True, progress=False)
    assert row["status"] == "ok" and [p["step"] for p in row["hit_curve"]] == [2, 4]


def test_retry_errors_reruns_the_failed_cases_and_keeps_the_rest(
    tmp_path, suite_from_text, monkeypatch
):
    from attnbench import harness

    suite = suite_from_text(TINY)
    train_case = training.train_case

    def failing(case, *args, **kwargs):
        if case.impl == "full.sdpa":
            raise RuntimeError("corrupt checkpoint")
        return train_case(case, *args, **kwargs)

    monkeypatch.setattr(training, "train_case", failing)
    path, _ = harness.run_suite(suite, tmp_path, progress=False)
    good, bad = read_rows([path])
    assert bad["status"] == "error"
    monkeypatch.setattr(training, "train_case", train_case)
    _, rows = harness.run_suite(suite, tmp_path, retry_errors=True, progress=False)
    assert [r["impl"] for r in rows] == ["full.sdpa"], "only the failed case runs again"
    assert read_rows([path]) == [good, rows[0]] and rows[0]["status"] == "ok"


def test_a_checkpoint_cannot_run_code_when_loaded(tmp_path, suite_from_text):
    import pathlib

    import torch

    from attnbench import harness
    from attnbench.kinds.train.suite import expand as expand_train

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    suite = suite_from_text(TINY.replace("  - name: full.sdpa\n", ""))
    (case,) = expand_train(suite, "cpu")
    checkpoint = training.checkpoint_path(tmp_path, case)
    checkpoint.parent.mkdir(parents=True)
    torch.save({"step": 2, "payload": Payload()}, checkpoint)
    _, (row,) = harness.run_suite(suite, tmp_path, resume=True, progress=False)
    assert row["status"] == "error" and "weights_only" in row["reason"].lower().replace(" ", "_")
    assert not marker.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "attnbench", "list", "gpa.cpp"],
        ["-c", "import attnbench.impls.gpa.reference, torch.utils.cpp_extension; print('gpa.cpp')"],
    ],
)
def test_commands_do_not_print_the_cuda_home_notice(command):
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "gpa.cpp" in proc.stdout and "No CUDA runtime is found" not in proc.stderr


def test_a_second_run_into_the_same_results_file_is_refused(tmp_path, suite_from_text):
    from attnbench import harness

    suite = suite_from_text(TINY)
    path = harness.output_path(suite, "cpu", tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from attnbench.harness import results_lock"
            "\nwith results_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n"
            "    time.sleep(120)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"another run \\(process {holder.pid}\\)"):
            harness.run_suite(suite, tmp_path, progress=False)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert not path.exists(), "the refused run wrote nothing"
    with harness.results_lock(path):  # free again once the holder is gone
        pass


def test_a_resumed_run_with_another_configuration_summarises_only_its_own_rows(tmp_path, capsys):
    from attnbench import cli

    one = TINY.replace("  - name: full.sdpa\n", "")
    (tmp_path / "tiny.yaml").write_text(one + "seeds: [0]\n")
    args = ["run", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path), "--no-progress"]
    assert cli.main(args) == 0
    (tmp_path / "tiny.yaml").write_text(one + "seeds: [1]\n")
    capsys.readouterr()
    assert cli.main(args + ["--resume"]) == 0
    out, err = capsys.readouterr()
    assert "1 rows in" in err and "another configuration" in err
    table = [line for line in out.splitlines() if line.startswith("| none")]
    assert len(table) == 1 and "|      1 |" in table[0], out
    assert len(read_rows([tmp_path / "tiny-cpu.jsonl"])) == 2, "the other seed's row stays"


def test_a_binary_suite_file_is_named_and_validate_checks_the_rest(tmp_path, capsys):
    from attnbench import cli

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"kind: micro\n\xff\xfe\x00garbage")
    good = tmp_path / "good.yaml"
    good.write_text("implementations: [{name: none}]\nmaps: [[8, 8]]\n")
    assert cli.main(["validate", str(binary), str(good)]) == 1
    out, err = capsys.readouterr()
    assert f"{binary}: not a UTF-8 text file (byte 12" in err
    assert f"{good}: ok" in out


def test_a_plugin_that_raises_on_import_is_named(tmp_path, monkeypatch):
    from attnbench.suite import SuiteError, load_suites

    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('no licence server')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = tmp_path / "s.yaml"
    suite.write_text("plugins: [broken_plugin]\nimplementations: [{name: none}]\nmaps: [[8, 8]]\n")
    with pytest.raises(SuiteError, match="'broken_plugin' raised RuntimeError on import: no lic"):
        load_suites(suite)


def test_report_skips_rows_with_wrong_types_or_statuses(tmp_path):
    import json

    from attnbench.results import valid_rows

    base = next(r for r in read_rows([FIXTURE]) if r["kind"] == "micro")
    bad_type = {**base, "case_id": "b1", "time_fwd_ms": "fast"}
    bad_status = {**base, "case_id": "b2", "status": "great"}
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in (base, bad_type, bad_status)))
    with pytest.warns(UserWarning) as caught:
        rows = valid_rows([results])
    assert [r["case_id"] for r in rows] == [base["case_id"]]
    messages = " ".join(str(w.message) for w in caught)
    assert "row 2 skipped: not numbers: time_fwd_ms='fast'" in messages
    assert "row 3 skipped: status='great'" in messages


def test_out_pointing_at_a_file_is_a_message(tmp_path, capsys):
    from attnbench import cli

    suite = tmp_path / "s.yaml"
    suite.write_text("implementations: [{name: none}]\nmaps: [[8, 8]]\nmetrics: [fidelity]\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["run", str(suite), "--out", str(blocker), "--no-progress"]) == 2
    assert f"--out '{blocker}' cannot hold results" in capsys.readouterr().err


def test_ctrl_c_during_start_up_is_a_message(monkeypatch, capsys):
    from attnbench import cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["list"].set_defaults(func=interrupted)
    assert cli.main(["list"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_an_infinite_scale_is_refused_before_it_reaches_a_compiler():
    with pytest.raises(ValueError, match=r"gpa.flex: parameter scale=inf .*a finite number"):
        registry.create("gpa.flex", scale=float("inf"))


def test_the_euclid_oracle_never_forms_all_differences_at_once(monkeypatch):
    import torch
    from torch.profiler import profile

    from attnbench.impls.gpa import reference

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1024, 64, generator=g)  # all differences at once: 256 MiB
    with profile(profile_memory=True) as prof:
        reference.affinity_scores(q, k, "euclid", 0.5)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest <= 4 * reference.DIFFERENCE_ELEMENTS, f"{largest / 2**20:.0f} MiB at once"
    small_q, small_k = q[:37, :8], k[:29, :8]
    whole = -0.5 * ((small_q[:, None] - small_k[None]) ** 2).sum(-1)
    monkeypatch.setattr(reference, "DIFFERENCE_ELEMENTS", 29 * 8 * 5)  # chunks of 5 queries
    assert torch.equal(reference.affinity_scores(small_q, small_k, "euclid", 0.5), whole)


def test_the_run_summary_says_what_the_relative_error_means():
    from attnbench.kinds import micro

    rows = [r for r in read_rows([FIXTURE]) if r["kind"] == "micro"]
    gaussian = {**rows[0], "inputs": "gaussian", "rel_err_out": 4.1}
    copying = {**gaussian, "inputs": "warp-copy", "copy_psnr": 18.5}
    table = micro.summary_table([gaussian, copying])
    assert "copy PSNR dB" in table
    assert "18.5" in table and micro.RELATIVE_ERROR_NOTE in table


def test_the_quick_suite_checks_fidelity_on_structured_inputs():
    from attnbench.suite import load_suites

    suites = load_suites(Path(__file__).parents[1] / "suites" / "quick.yaml")
    structured = [s for s in suites if s.kind == "micro" and "warp-copy" in s.inputs]
    assert structured and "fidelity" in structured[0].metrics


# --- path handling: a suite's name is a file name, results paths are what they say ----------


@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", "a/b", "..", "", "x" * 101])
def test_a_suite_name_that_is_no_file_name_is_refused_before_anything_is_written(tmp_path, name):
    from attnbench.suite import SuiteError, load_suite

    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: {name!r}\nimplementations: [{{name: none}}]\nmaps: [8]\n")
    with pytest.raises(SuiteError, match="cannot name a results file"):
        load_suite(suite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_results_load_takes_a_path_a_string_a_glob_or_a_list(tmp_path):
    import shutil

    from attnbench.results import load

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(FIXTURE / "rows.jsonl", runs / "a-cpu.jsonl")
    expected = len(load([runs]))
    assert len(load(str(runs))) == len(load(runs)) == len(load(str(runs / "*-cpu.jsonl")))
    assert len(load(runs)) == expected > 0
    (tmp_path / "sub").mkdir()
    parent = tmp_path / "sub" / ".."  # the parent folder, not the folder "." of the string's dots
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl results file"):
        load(str(parent))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(str(tmp_path / "none-*.jsonl"))


# --- YAML loading: duplicate keys and alias bombs -------------------------------------------


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    from attnbench.suite import SuiteError, load_suites

    path = tmp_path / "dup.yaml"
    path.write_text(
        "implementations: [{name: none}]\nmaps: [8]\nimplementations: [{name: full.sdpa}]\n"
    )
    with pytest.raises(SuiteError, match=r"duplicate key 'implementations' \(first at line 1\)"):
        load_suites(path)


def test_an_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    import time

    from attnbench.suite import SuiteError, load_suite

    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    lines += ["channels: [*a7, *a7]", "implementations: [{name: none}]", "maps: [8]"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert time.perf_counter() - start < 30, "refused before anything expands the aliases"
    sizes = [10]  # a list of 9 numbers: itself and its values
    for _ in range(7):
        sizes.append(1 + 9 * sizes[-1])
    # the documents, the mapping, a0..a7, channels (two a7), implementations (3), maps (2)
    total = 2 + sum(sizes) + 1 + 2 * sizes[-1] + 3 + 2
    assert f"expands to {total:,} values" in str(err.value) and len(str(err.value)) < 400


def test_a_long_bad_value_is_cut_in_the_message(tmp_path):
    from attnbench.suite import SuiteError, load_suite

    path = tmp_path / "long.yaml"
    path.write_text(f"implementations: [{{name: none}}]\nmaps: [8]\nseed: '{'x' * 5000}'\n")
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert "... (5,002 characters)" in str(err.value) and len(str(err.value)) < 600


# --- row validation: numbers are finite or null ---------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_row_with_a_non_finite_number_is_skipped_with_a_warning(tmp_path, literal):
    import json

    from attnbench.results import valid_rows

    base = next(r for r in read_rows([FIXTURE / "rows.jsonl"]) if r["kind"] == "micro")
    bad = json.dumps({**base, "case_id": "bad", "time_fwd_ms": 0.0}).replace(
        '"time_fwd_ms": 0.0', f'"time_fwd_ms": {literal}'
    )
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(base) + "\n" + bad + "\n")
    with pytest.warns(UserWarning, match="row 2 skipped: not finite numbers .*time_fwd_ms"):
        rows = valid_rows(path)
    assert [r["case_id"] for r in rows] == [base["case_id"]]


# --- report output: only files it wrote, each whole -----------------------------------------


def test_the_report_removes_only_the_plots_it_wrote_before(tmp_path):
    from attnbench.report import write_report
    from attnbench.results import valid_rows

    rows = valid_rows(FIXTURE / "rows.jsonl")
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "mine.png").write_bytes(b"a user's own picture")
    written = write_report(rows, tmp_path)
    names = {p.name for p in written if p.suffix == ".png"}
    assert (plots / "mine.png").read_bytes() == b"a user's own picture"
    fewer = [r for r in rows if r["kind"] == "micro"]
    write_report(fewer, tmp_path)
    left = {p.name for p in plots.glob("*.png")}
    assert "mine.png" in left, "a file the report did not write is never removed"
    gone = names - {p.name for p in write_report(fewer, tmp_path) if p.suffix == ".png"}
    assert gone and not gone & left, "the plots of rows that are gone are removed"
    assert not list(tmp_path.rglob("*.partial")), "every file written whole"


# --- messages where a traceback was ----------------------------------------------------------


def test_a_shard_without_cases_is_a_summary_not_a_traceback(tmp_path, capsys):
    from attnbench import cli

    suite = tmp_path / "one.yaml"
    suite.write_text("implementations: [{name: none}]\nmaps: [8]\nmetrics: [memory]\n")
    code = cli.main(["run", str(suite), "--out", str(tmp_path / "o"), "--shard", "2/2"])
    assert code == 0 and "0 new rows" in capsys.readouterr().out


def test_a_map_shape_that_is_no_pair_is_named():
    import torch

    x = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match=r"q_hw=8 is not allowed \(allowed: \(height, width\)"):
        registry.create("full.sdpa")(x, x, x, q_hw=8, kv_hw=(8, 8))


def test_the_cpu_allocator_failing_is_out_of_memory():
    from attnbench.kinds.base import record_failure

    row = {"status": "ok", "reason": None}
    err = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 68719476736 bytes.")  # fmt: skip
    record_failure(row, err)
    assert row["status"] == "oom" and "68719476736 bytes" in row["reason"]


# --- process lifetime: no child outlives a run ----------------------------------------------


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def test_sigterm_ends_a_run_and_its_workers_with_code_143(tmp_path):
    import os
    import signal
    import time

    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "attnbench", "run", str(suite), "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd + ["--no-progress"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    workers: set[int] = set()
    while not workers and proc.poll() is None and time.monotonic() < deadline:
        workers = children(proc.pid)  # the attention-memory probe and its resource tracker
        time.sleep(0.05)
    assert workers, "the run measures attention memory in a child process"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted" in err
    time.sleep(2)
    alive = {pid for pid in workers if Path(f"/proc/{pid}").exists()}
    assert not alive, f"worker processes outlived the run: {alive}"
