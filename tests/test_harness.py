"""Suites, the runner and result rows: validation, rows, resume, shards, failures as rows."""

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from attnbench import cli, harness, measure, registry, results
from attnbench.inputs import make_inputs
from attnbench.kinds.micro import fidelity
from attnbench.kinds.micro import measure as micro_measure
from attnbench.kinds.micro.suite import expand
from attnbench.registry import Attention, register
from attnbench.results import append_row, read_rows
from attnbench.schema import MICRO_KEYS, REQUIRED_KEYS
from attnbench.spec import AttentionSpec
from attnbench.suite import SuiteError, load_suite

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((ROOT / "suites").glob("*.yaml"))

SMALL = """
kind: micro
implementations:
  - name: full.sdpa
  - name: xformers.mea
  - name: none
  - name: gpa.torch
    params: {downsample: 2, topk: [2, 4]}
maps: [8, {q: [8, 8], kv: [4, 8]}]
channels: [8]
metrics: [time, memory, fidelity]
timing: {min_run_time: 0.01}
"""


def write(tmp_path, text, name="small.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def run(path, out, **kw):
    return harness.run_suite(load_suite(path), out, progress=False, min_run_time=0.01, **kw)


@pytest.mark.parametrize("path", SUITES, ids=[p.name for p in SUITES])
def test_committed_suites_validate(path, capsys):
    assert cli.main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_validate_names_a_misspelled_key(tmp_path, capsys):
    path = write(tmp_path, SMALL.replace("min_run_time", "min_runtime"))
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: timing.min_runtime: unknown key 'min_runtime'" in err
    assert "did you mean 'min_run_time'" in err


@pytest.mark.parametrize(
    "change, expected",
    [
        (("full.sdpa", "full.spda"), "implementations[0].name: unknown implementation 'full.spda'"),
        (
            ("topk: [2, 4]", "topk: [2, 0]"),
            "implementations[3].params.topk: gpa.torch: parameter topk=0",
        ),
        (
            ("channels: [8]", "channels: [0]"),
            "channels[0]: Input should be greater than or equal to 1",
        ),
        (("kind: micro", "kind: macro"), "kind: 'macro' is not a suite kind (allowed: micro"),
        (
            ("metrics: [time, memory, fidelity]", "metrics: [time]\ninputs: [smooth]"),
            "inputs: ['smooth'] only change the fidelity metric",
        ),
        (
            ("channels: [8]", "channels: [8]\nsharpness: [1.0, 4.0]"),
            "sharpness: [1.0, 4.0] applies to warp-match inputs only, which inputs does not list "
            "(add 'warp-match' to inputs, or leave sharpness unset: [1.0])",
        ),
    ],
)
def test_validation_errors_name_file_key_and_allowed(tmp_path, change, expected):
    path = write(tmp_path, SMALL.replace(*change))
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert f"{path}: {expected}" in str(err.value)


def test_include_merges_and_this_file_wins(tmp_path):
    write(tmp_path, "channels: [16]\nheads: 2\nmaps: [4]\n", "common.yaml")
    path = write(tmp_path, "include: common.yaml\nheads: 3\nimplementations: [{name: none}]\n")
    suite = load_suite(path)
    assert (suite.channels, suite.heads, suite.name) == ((16,), 3, "small")
    write(tmp_path, "include: small.yaml\n", "common.yaml")
    with pytest.raises(SuiteError, match="include: cycle"):
        load_suite(path)


def test_rows_carry_every_key_and_unsupported_is_a_row(tmp_path):
    path, rows = run(write(tmp_path, SMALL), tmp_path / "out")
    assert path == tmp_path / "out" / "small-cpu.jsonl"
    assert len(rows) == 4 * 2 + 2  # gpa.torch sweeps topk over two values
    on_disk = read_rows([path])
    assert [r["case_id"] for r in on_disk] == [r["case_id"] for r in rows]
    for row in on_disk:
        missing = set(REQUIRED_KEYS + MICRO_KEYS) - set(row)
        assert not missing, f"{row['label']} lacks {missing}"
    xf = [r for r in on_disk if r["impl"] == "xformers.mea"]
    assert all(
        r["status"] == "unsupported" and "device=cpu (supported: cuda)" in r["reason"] for r in xf
    )
    sdpa = next(r for r in on_disk if r["impl"] == "full.sdpa")
    assert sdpa["status"] == "ok" and sdpa["time_fwd_ms"] > 0 and sdpa["time_fwdbwd_ms"] > 0
    assert sdpa["rel_err_out"] < 1e-5 and sdpa["rel_err_grad"] < 1e-5
    assert sdpa["peak_fraction"] > 0 and sdpa["flops_fwd"] == 2 * 64 * 64 * 16
    gpa = [r for r in on_disk if r["impl"] == "gpa.torch"]
    assert {r["label"] for r in gpa} == {"gpa.torch(d=2,s=2,k=2)", "gpa.torch(d=2,s=2,k=4)"}
    assert all(r["time_phase1_ms"] > 0 for r in gpa)


def test_existing_results_need_resume_or_overwrite(tmp_path):
    path = write(tmp_path, "implementations: [{name: none}]\nmaps: [4]\nmetrics: [time]\n")
    run(path, tmp_path)
    with pytest.raises(ValueError, match="already holds rows: pass --resume .* --overwrite"):
        run(path, tmp_path)
    _, rows = run(path, tmp_path, overwrite=True)
    assert len(read_rows([tmp_path / "small-cpu.jsonl"])) == len(rows) == 1


def test_interrupted_run_resumes_without_repeating(tmp_path, monkeypatch):
    path = write(tmp_path, SMALL)
    measure_case = micro_measure.measure_case
    calls = []

    def interrupt_third(*args, **kw):
        calls.append(args[0].case_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return measure_case(*args, **kw)

    monkeypatch.setattr(micro_measure, "measure_case", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        run(path, tmp_path)
    kept = read_rows([tmp_path / "small-cpu.jsonl"])
    assert len(kept) == 2
    calls.clear()
    monkeypatch.setattr(micro_measure, "measure_case", measure_case)
    _, rows = run(path, tmp_path, resume=True)
    final = read_rows([tmp_path / "small-cpu.jsonl"])
    ids = [r["case_id"] for r in final]
    assert len(ids) == len(set(ids)) == len(expand(load_suite(path), "cpu"))
    assert final[:2] == kept, "rows written before the interruption are untouched"
    assert {r["case_id"] for r in rows}.isdisjoint({r["case_id"] for r in kept})


def test_shards_partition_the_cases(tmp_path):
    path = write(tmp_path, SMALL.replace("metrics: [time, memory, fidelity]", "metrics: [time]"))
    ids = []
    for i in (1, 2, 3):
        _, rows = run(path, tmp_path / f"s{i}", shard=(i, 3))
        ids.append({r["case_id"] for r in rows})
    every = {c.case_id for c in expand(load_suite(path), "cpu")}
    assert set().union(*ids) == every and sum(map(len, ids)) == len(every)
    assert harness.parse_shard("2/4") == (2, 4)
    with pytest.raises(ValueError, match="allowed: 1 <= i <= N"):
        harness.parse_shard("5/4")


def test_truncated_last_line_is_skipped_and_next_row_survives(tmp_path):
    path = tmp_path / "r.jsonl"
    row = {k: None for k in REQUIRED_KEYS} | {"status": "ok", "case_id": "a"}
    append_row(path, row)
    with open(path, "a") as f:
        f.write('{"case_id": "b", "stat')  # killed mid-write
    with pytest.warns(UserWarning, match="r.jsonl:2: skipped a truncated"):
        assert [r["case_id"] for r in read_rows([path])] == ["a"]
    append_row(path, row | {"case_id": "c"})
    with pytest.warns(UserWarning):
        assert [r["case_id"] for r in read_rows([tmp_path])] == ["a", "c"]


def test_predicted_oom_is_a_row_and_skips_nothing_else(tmp_path, monkeypatch):
    # Budget: 5% of 1 GiB = 51 MiB. full.naive at 64x64 needs two 64 MiB score matrices.
    monkeypatch.setattr(micro_measure, "available_memory", lambda device: 2**30)
    text = "implementations: [{name: full.naive}, {name: none}]\nmaps: [64]\nmemory_budget: 0.05\n"
    _, rows = run(write(tmp_path, text), tmp_path)
    naive, none = rows
    assert naive["status"] == "oom" and naive["reason"].startswith("predicted: needs")
    assert none["status"] == "ok"


class Exploding(Attention):
    def forward(self, q, k, v, spec):
        raise RuntimeError("boom")


class Slow(Attention):
    def forward(self, q, k, v, spec):
        time.sleep(0.05)
        return torch.zeros(q.shape[:-1] + v.shape[-1:])


class NoisyOnce(Attention):
    """1 ms a call, but its second and third take 0.3 s (a busy machine): with a short
    ``min_run_time``, the first timed run is one of them."""

    def __init__(self, **params):
        super().__init__(**params)
        self.calls = 0

    def forward(self, q, k, v, spec):
        self.calls += 1
        time.sleep(0.3 if self.calls in (2, 3) else 0.001)
        return torch.zeros(q.shape[:-1] + v.shape[-1:])


@pytest.fixture
def test_impls():
    register("test.exploding")(Exploding)
    register("test.slow")(Slow)
    register("test.noisy_once")(NoisyOnce)
    yield
    registry.unregister("test.exploding")
    registry.unregister("test.slow")
    registry.unregister("test.noisy_once")


def test_failures_are_rows_and_the_run_goes_on(tmp_path, test_impls):
    text = "implementations: [{name: test.exploding}, {name: none}]\nmaps: [4]\n"
    _, rows = run(write(tmp_path, text), tmp_path)
    assert rows[0]["status"] == "error" and rows[0]["reason"] == "RuntimeError: boom"
    assert rows[1]["status"] == "ok"


def test_time_budget_skips_larger_maps(tmp_path, test_impls):
    text = (
        "implementations: [{name: test.slow}]\nmaps: [4, 8, 16]\ndirections: [fwd]\n"
        "metrics: [time]\ntiming: {min_run_time: 0.01, time_budget_s: 0.01}\n"
    )
    _, rows = run(write(tmp_path, text), tmp_path)
    assert rows[0]["status"] == "ok"
    for row in rows[1:]:
        assert row["status"] == "unsupported"
        assert "the median of 1 timed run at 4x4 took" in row["reason"]
        assert "time budget 0.01 s" in row["reason"]


def test_time_budget_predicts_from_flops(tmp_path, test_impls):
    # 50 ms per call at 4x4; exact-attention FLOPs grow 16x at 8x8: ~0.8 s > 0.2 s.
    text = (
        "implementations: [{name: test.slow}]\nmaps: [4, 8]\ndirections: [fwd]\n"
        "metrics: [time]\ntiming: {min_run_time: 0.01, time_budget_s: 0.2}\n"
    )
    _, (small, large) = run(write(tmp_path, text), tmp_path)
    assert small["status"] == "ok"
    assert large["status"] == "unsupported"
    predicted = re.match(r"predicted: one call would take ~([\d.]+) s", large["reason"])
    assert predicted and 0.7 <= float(predicted.group(1)) <= 2.0, large["reason"]
    assert large["reason"].endswith("over the time budget 0.2 s")


def test_one_noisy_call_does_not_decide_the_time_budget(tmp_path, test_impls):
    # Issue 17: one slow call at the first size (the only timed run) used to predict 16 x 0.3 s
    # at 8x8, over the budget. Now the budget sees the median of at least 3 timed runs.
    text = (
        "implementations: [{name: test.noisy_once}]\nmaps: [4, 8]\ndirections: [fwd]\n"
        "metrics: [time]\ntiming: {min_run_time: 0.01, time_budget_s: 0.5}\n"
    )
    _, (small, large) = run(write(tmp_path, text), tmp_path)
    assert small["time_fwd_runs"] >= 3 and small["time_fwd_ms"] < 100, small
    (warning,) = small["warnings"]  # the noise shows as a spread instead of IQR 0
    assert warning.startswith("time_fwd: IQR ") and warning.endswith("% of the median")
    assert large["status"] == "ok", large["reason"]


def test_the_time_budget_applies_from_the_first_size(tmp_path, test_impls, monkeypatch):
    # No earlier size: one call at 64x64, C = 64 is 4.3 GFLOP, which at a matmul rate of
    # 1 GFLOP/s takes at least 4.3 s, over the budget of 1 s. none (no FLOPs) still runs.
    monkeypatch.setattr(measure, "matmul_gflops", lambda **kw: 1.0)
    text = (
        "implementations: [{name: test.slow}, {name: none}]\nmaps: [64]\ndirections: [fwd]\n"
        "metrics: [time]\ntiming: {min_run_time: 0.01, time_budget_s: 1}\n"
    )
    _, (slow, none) = run(write(tmp_path, text), tmp_path)
    assert slow["status"] == "unsupported" and slow["time_fwd_ms"] is None
    assert slow["reason"] == (
        "predicted: one fwd call would take at least ~4.3 s (4.29 GFLOP at this run's matmul "
        "rate of 1 GFLOP/s), over the time budget 1 s"
    )
    assert none["status"] == "ok"


def test_resumed_run_remembers_the_time_budget(tmp_path, test_impls):
    text = (
        "implementations: [{name: test.slow}]\nmaps: MAPS\ndirections: [fwd]\n"
        "metrics: [time]\ntiming: {min_run_time: 0.01, time_budget_s: 0.2}\n"
    )
    run(write(tmp_path, text.replace("MAPS", "[4]")), tmp_path)
    _, (large,) = run(write(tmp_path, text.replace("MAPS", "[4, 8]")), tmp_path, resume=True)
    assert large["status"] == "unsupported" and large["reason"].startswith("predicted:")
    assert large["label"] == "test.slow"


def test_warp_copy_reports_copy_psnr(tmp_path):
    text = (
        "implementations: [{name: full.sdpa}, {name: none}]\nmaps: [16]\nchannels: [16]\n"
        "directions: [fwd]\nmetrics: [fidelity]\ninputs: [warp-copy]\n"
    )
    _, (sdpa, none) = run(write(tmp_path, text), tmp_path)
    assert sdpa["v_channels"] == 3 and sdpa["rel_err_out"] < 1e-5
    assert sdpa["copy_psnr"] > none["copy_psnr"] + 5, (sdpa["copy_psnr"], none["copy_psnr"])


def test_exact_reference_is_shared_by_equal_inputs_and_equals_a_fresh_computation(monkeypatch):
    monkeypatch.setattr(fidelity, "REFERENCES_KEPT", 2)
    monkeypatch.setattr(fidelity, "_references", type(fidelity._references)())
    spec = AttentionSpec.square(6, 4, v_channels=3, heads=2)
    first = make_inputs("gaussian", spec, 0)
    again = make_inputs("gaussian", spec, 0)  # the same contents in new tensors
    out, grad = fidelity.exact_reference(first.q, first.k, first.v, None, True)
    assert fidelity.exact_reference(again.q, again.k, again.v, None, True)[0] is out
    q, k, v = (t.clone().requires_grad_() for t in (first.q, first.k, first.v))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    want.backward(fidelity.output_grad(want.shape))
    torch.testing.assert_close(out, want.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.cat([t.grad.flatten() for t in (q, k, v)]))
    other = make_inputs("gaussian", spec, 1)
    assert not torch.equal(fidelity.exact_reference(other.q, other.k, other.v, None, True)[0], out)
    assert fidelity.exact_reference(first.q, first.k, first.v, 0.5, True)[0] is not out  # scale
    # Two newer inputs since: the first was dropped and is computed again, equal to before.
    recomputed = fidelity.exact_reference(first.q, first.k, first.v, None, True)[0]
    assert recomputed is not out and torch.equal(recomputed, out)


def test_methods_of_one_run_are_scored_as_if_each_ran_alone(tmp_path, monkeypatch):
    text = (
        "implementations: [{name: none}, {name: gpa.torch, params: {downsample: 2, topk: 2}}]\n"
        "maps: [8]\nchannels: [4]\nmetrics: [fidelity]\ninputs: [gaussian, smooth]\n"
    )  # inputs of the same shapes: a reference looked up by shape alone would be shared
    _, rows = run(write(tmp_path, text), tmp_path)
    for row in rows:
        monkeypatch.setattr(fidelity, "_references", type(fidelity._references)())
        (case,) = [
            c
            for c in expand(load_suite(tmp_path / "small.yaml"), "cpu")
            if c.case_id == row["case_id"]
        ]
        alone = micro_measure.measure_case(case, results.context("cpu"), None, math.inf, 0.01)
        for key in ("rel_err_out", "rel_err_grad", "copy_psnr"):
            assert row[key] == alone[key], (row["label"], row["inputs"], key)
    assert {r["inputs"] for r in rows} == {"gaussian", "smooth"} and len(rows) == 4


def test_warp_match_sweeps_sharpness_and_rows_record_it(tmp_path):
    text = (
        "implementations: [{name: full.sdpa}]\nmaps: [16]\nchannels: [16]\ndirections: [fwd]\n"
        "metrics: [fidelity]\ninputs: [gaussian, warp-copy, warp-match]\nsharpness: [1.0, 4.0]\n"
    )
    _, rows = run(write(tmp_path, text), tmp_path)
    assert [(r["inputs"], r["sharpness"]) for r in rows] == [
        ("gaussian", None),
        ("warp-copy", None),
        ("warp-match", 1.0),
        ("warp-match", 4.0),
    ]
    assert len({r["case_id"] for r in rows}) == 4
    match = rows[2:]
    assert all(r["v_channels"] == 3 and r["rel_err_out"] < 1e-5 for r in match)
    assert match[1]["copy_psnr"] > match[0]["copy_psnr"]


@pytest.mark.parametrize("sigma", [0.5, 2.0, 3.7])
def test_blur_is_torchvisions_gaussian_blur(sigma):
    from torchvision.transforms.v2.functional import gaussian_blur

    from attnbench.inputs import blur

    x = torch.randn(2, 3, 24, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    size = 2 * int(3 * sigma) + 1  # torchvision's kernel and reflected border, computed by it
    want = gaussian_blur(x, [size, size], [sigma, sigma])
    torch.testing.assert_close(blur(x, sigma), want, rtol=0, atol=1e-12)
    assert blur(x, 0.2) is x  # below 0.3 pixels: no blur


def test_warp_match_scores_are_distances_of_warp_copy_features():
    # q.k / sqrt(C) is -s^2 |f_q - f_k|^2 / (2 sqrt(C - 1)) up to a term of the query alone, f
    # warp-copy's features with C - 1 channels; source, warp and values are warp-copy's.
    spec = AttentionSpec.square(8, 6, v_channels=3, batch=2)
    match = make_inputs("warp-match", spec, 3, sharpness=2.5)
    copy = make_inputs("warp-copy", dataclasses.replace(spec, channels=5), 3)
    scores = match.q @ match.k.transpose(-1, -2) / math.sqrt(6)
    distances = -(2.5**2) * torch.cdist(copy.q, copy.k) ** 2 / (2 * math.sqrt(5))
    torch.testing.assert_close(scores.softmax(-1), distances.softmax(-1))
    for name in ("v", "target", "valid"):
        assert torch.equal(getattr(match, name), getattr(copy, name)), name
    with pytest.raises(ValueError, match="only warp-match has a sharpness"):
        make_inputs("warp-copy", spec, 3, sharpness=2.5)


def test_sharper_warp_match_lets_exact_attention_copy_at_30_db():
    # Measured on 64x64, C = 64 (seeds 0, 1, 2): about 22 dB at s = 1, 30-32 dB at s = 2.5 and
    # 31-34 dB at s = 4; warp-copy's dot-product scores stay near 19 dB.
    spec = AttentionSpec.square(64, 64, v_channels=3)
    sdpa = registry.create("full.sdpa")
    psnr = {
        s: fidelity.measure_fidelity(sdpa, make_inputs("warp-match", spec, 0, s), spec, False)[
            "copy_psnr"
        ]
        for s in (1.0, 2.5, 4.0)
    }
    assert psnr[1.0] + 5 < min(psnr[2.5], psnr[4.0]), psnr
    assert psnr[4.0] >= 30, psnr


def test_committed_case_ids_stay_valid():
    # sharpness is left out of the hash at its default: the committed rows keep their ids.
    committed = read_rows([ROOT / "results" / "raw" / "fidelity-cpu.jsonl"])
    cases = expand(load_suite(ROOT / "suites" / "fidelity.yaml"), "cpu")

    def key(impl: str, params: dict, side: int, family: str, sharpness) -> tuple:
        return impl, json.dumps(params, sort_keys=True), side, family, sharpness or 1.0

    ids = {key(c.impl, c.params_dict, c.q_hw[0], c.family, c.sharpness): c.case_id for c in cases}
    for row in committed:
        where = key(row["impl"], row["params"], row["q_h"], row["inputs"], row.get("sharpness"))
        assert ids[where] == row["case_id"], where
    assert len(ids) == len(cases) == len({c.case_id for c in cases})  # every case its own id
    assert sorted(r["case_id"] for r in committed) == sorted(ids.values())  # one row each
    assert {c.sharpness for c in cases if c.family == "warp-match"} == {1.0, 2.5, 4.0}


def test_cli_run_prints_a_summary(tmp_path, capsys):
    path = write(tmp_path, "implementations: [{name: none}]\nmaps: [4]\nmetrics: [time]\n")
    assert cli.main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| implementation" in out and "| none" in out
    assert "1 new rows" in out
    assert json.loads((tmp_path / "small-cpu.jsonl").read_text())["label"] == "none"


def test_fwdbwd_memory_counts_the_input_gradients(tmp_path):
    # full.sdpa's backward makes gradients for q, k and v: 3 x 4 MiB at 128x128, C = 64. The
    # timing runs before leave gradients behind; the memory reading must not net their release
    # against the new ones.
    path = write(
        tmp_path,
        "implementations: [{name: full.sdpa}]\nmaps: [128]\nchannels: [64]\n"
        "metrics: [time, memory]\ntiming: {min_run_time: 0.01}\n",
    )
    _, (row,) = run(path, tmp_path / "out")
    grads = 3 * 128 * 128 * 64 * 4
    assert row["mem_fwdbwd_bytes"] >= 0.95 * grads, row["mem_fwdbwd_bytes"] / 2**20
