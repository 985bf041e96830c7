"""`make gpu-check` on the CPU, in pieces small enough for CI: a real correctness step (graphs
path vs eager flex vs sdpa on tiny shapes) in its own process writing JSON lines into the
chosen directory, the budget turning what does not fit into `skipped` lines with a reason,
and bench.kernels appending each cell as it is measured. The whole CPU profile (every step)
is `make gpu-check ARGS='--device cpu'` (a few minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench import gpu_check, kernels
from tests.procs import ROOT


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_correctness_compares_graphs_flex_and_sdpa_line_by_line(tmp_path):
    """Step a as the child process runs it, on tiny shapes: each comparison one line."""
    prof = {"device": "cpu", "dtype": "float32", "shape": "tiny", "setup_s": 0.0,
            "cases": [["1x1", 1, 1, 8], ["chunk16", 1, 16, 0]]}
    j = kernels.Journal(tmp_path / "results.jsonl", "correctness", echo=False)
    assert kernels.run_items(j, kernels.Budget(600), kernels.correctness_items(prof, j))
    recs = lines(tmp_path / "results.jsonl")
    res = [x for x in recs if x["kind"] == "result" and "case" in x]
    # both cases, with and without grad, two replays each; every one on the bucket path (the
    # static path without capture here) and within tolerance of sdpa
    assert sorted((x["case"], x["grad"], x["replay"]) for x in res) == sorted(
        (c, g, n) for c in ("1x1", "chunk16") for g in (True, False) for n in (1, 2))
    assert all(x["step"] == "correctness" and x["ok"] and x["graphed"] for x in res)
    assert all(x["graphs_vs_sdpa"]["max_abs_diff"] <= x["graphs_vs_sdpa"]["tol"]
               and x["flex_vs_sdpa"]["argmax_agree"] == 1.0 for x in res)
    assert [x["t"] for x in recs] == sorted(x["t"] for x in recs)  # appended as they came
    built = [x["name"].split()[-1] for x in recs if x.get("phase") == "construct"]
    assert sorted(built) == ["flex", "graphs", "graphs", "sdpa"]  # graphs: one per grad
    assert all(x["buckets"] > 0 for x in recs if x.get("phase") == "capture")


def test_items_past_the_budget_are_skipped_with_the_reason(tmp_path):
    j = kernels.Journal(tmp_path / "r.jsonl", "x", echo=False)
    budget = kernels.Budget(0.3)

    def boom() -> dict:
        raise RuntimeError("broken")

    items = [kernels.Item("broken", boom, 0.0),
             kernels.Item("slow setup", lambda: time.sleep(0.4) or {"n": 1}, 0.0),
             kernels.Item("after", lambda: {"n": 2}, 1.0),
             kernels.Item("dependent", lambda: {"n": 3}, 0.0, needs="broken")]
    assert kernels.run_items(j, budget, items) is False
    recs = lines(tmp_path / "r.jsonl")
    assert recs[0] == recs[0] | {"kind": "plan", "items": [i.name for i in items]}
    by = {x.get("name"): x for x in recs[1:]}
    assert by["slow setup"]["kind"] == "result" and by["slow setup"]["n"] == 1
    assert by["broken"]["kind"] == "error" and "broken" in by["broken"]["error"]
    assert by["after"]["kind"] == "skipped" and by["after"]["reason"].startswith("budget")
    assert by["dependent"] == by["dependent"] | {"kind": "skipped", "reason": "needs broken"}


def test_a_run_out_of_budget_says_what_it_skipped(tmp_path):
    out = tmp_path / "gc"
    r = run("--out", str(out), "--steps", "calibrate", "lossless", "--budget-s", "1",
            timeout=120)
    assert r.returncode == 1  # nothing ran: not a pass
    final = lines(out / "results.jsonl")[-1]
    assert final["kind"] == "summary" and not final["ok"]
    assert {s["step"] for s in final["skipped"]} == {"calibrate", "lossless"}
    assert all(s["reason"].startswith("budget") for s in final["skipped"])
    md = (out / "summary.md").read_text()
    assert "## Skipped" in md and "- calibrate / (whole step): budget" in md


def test_step_budgets_pass_on_what_is_left():
    todo = list(gpu_check.STEPS)
    first = gpu_check.step_budget(todo[0], 480.0, todo)
    assert abs(first - 480.0 * gpu_check.SHARES[todo[0]] / sum(gpu_check.SHARES.values())) < 1e-9
    # the last step gets everything left
    assert gpu_check.step_budget("throughput", 100.0, ["throughput"]) == 100.0


def test_kernels_appends_each_cell_as_measured(tmp_path):
    out = tmp_path / "k"
    rc = kernels.main(["--device", "cpu", "--shape", "tiny", "--dtype", "float32",
                       "--sessions", "1", "--tokens", "1", "2", "--cached", "16", "--reps", "1",
                       "--out", str(out)])
    assert rc == 0
    cells = [x for x in lines(out / "results.jsonl") if x["kind"] == "result"]
    assert [x["name"] for x in cells] == ["1x1", "1x2"]
    assert all(x["packed_sdpa_ms"] > 0 and x["dense_ms"] > 0 for x in cells)
    assert json.loads((out / "results.json").read_text())["rows"][1]["tokens_each"] == 2


def test_summary_reports_failures_and_errors():
    recs = [{"kind": "run", "device": {"device_name": "X", "device": "cuda:0", "torch": "2.11",
                                       "cuda": "12.8"}},
            {"kind": "result", "step": "lossless", "name": "session 1 vs generate()",
             "session": 1, "category": "rag", "identical": False, "ok": False,
             "divergence": {"index": 2, "got": 5, "reference": 6, "top2_margin": 1e-5}},
            {"kind": "error", "step": "latency", "name": "7b graphs 64x8",
             "error": "OutOfMemoryError: CUDA out of memory"}]
    final = {"ok": False, "wall_s": 12.0, "budget_s": 480.0, "skipped": [],
             "steps": {"latency": {"status": "failed", "s": 5.0, "budget_s": 150.0,
                                   "results": 0, "failed": ["7b graphs 64x8"], "skipped": []},
                       "lossless": {"status": "failed", "s": 5.0, "budget_s": 60.0,
                                    "results": 1, "failed": ["session 1"], "skipped": []}}}
    md = gpu_check.summary(recs, final)
    assert md.startswith("# gpu-check: FAIL")
    assert "0/1 sessions identical" in md and "token 2: 5 vs 6, top-2 margin 1e-05" in md
    assert "- latency / 7b graphs 64x8: OutOfMemoryError" in md


def test_prompts_interleave_categories():
    qs = [{"category": c, "n": i} for i, c in enumerate("aabbbc")]
    assert [q["n"] for q in gpu_check.interleaved(qs)] == [0, 2, 5, 1, 3, 4]
