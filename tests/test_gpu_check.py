"""`python -m bench.gpu_check` end to end on the CPU with the tiny synthetic shape and a small
profile: calibrated draft, float32 losslessness through a real broker and verifier process,
throughput rows for plain, budget 8 and adaptive, one results directory."""

from __future__ import annotations

import json
import subprocess
import sys

from bench import gpu_check
from tests.procs import ROOT


def test_cpu_run_writes_one_results_directory(tmp_path):
    out = tmp_path / "gc"
    r = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--out", str(out),
         "--skip", "kernels", "tests", "--edges", "3", "--new-tokens", "6",
         "--lossless-sessions", "3", "--lossless-tokens", "8", "--dtype", "float32"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["ok"] and set(res["steps"]) == {"synthetic", "lossless", "throughput"}
    assert res["device"]["device"] == "cpu" and res["machine"]["gpu"] is None
    assert res["models"]["synthetic"] and res["models"]["device_name"]
    cal = res["steps"]["synthetic"]["calibration"]
    assert abs(cal["agreement"] - 0.8) <= gpu_check.AGREEMENT_TOL
    assert res["models"]["draft"] == res["steps"]["synthetic"]["draft"]
    ll = res["steps"]["lossless"]
    assert [s["identical"] for s in ll["sessions"]] == [True] * 3 and ll["dtype"] == "float32"
    # the flags reached the verifier processes: each says what it loaded, where, in what
    target = res["models"]["target"]
    assert ll["verifier"] == {"model": target, "device": "cpu", "dtype": "float32",
                              "max_batch": 3}
    assert res["steps"]["throughput"]["verifier"]["dtype"] == "float32"
    rows = res["steps"]["throughput"]["rows"]
    assert [x["config"] for x in rows] == ["plain", "specedge-8", "adaptive"]
    assert all(x["tokens"] == 3 * 6 and x["server_busy_s"] > 0 for x in rows)
    assert rows[0]["tokens_per_round"] == 1.0 and rows[1]["tokens_per_round"] > 1.0
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# gpu-check: PASS") and "| kernels | skipped |" in summary
    assert summary in r.stdout


def test_failures_are_reported_not_hidden():
    res = {"ok": False, "wall_s": 12.0, "device": {"device_name": "X", "device": "cuda:0",
                                                    "torch": "2.11", "cuda": "12.8"},
           "settings": {"shape": "1.5b", "budget_s": 480},
           "steps": {"kernels": {"ok": False, "s": 1.0, "runs": [
               {"shape": "1.5b", "status": "missing"}]},
               "lossless": {"ok": False, "s": 5.0, "identical": 1, "dtype": "float32",
                            "tokens_per_round": 2.0, "sessions": [
                                {"category": "qa", "prompt_tokens": 9, "tokens": 4,
                                 "rounds": 2, "identical": True, "divergence": None},
                                {"category": "rag", "prompt_tokens": 9, "tokens": 4,
                                 "rounds": 2, "identical": False, "divergence": {
                                     "index": 2, "got": 5, "reference": 6,
                                     "top2_margin": 1e-5}}]}}}
    md = gpu_check.summary(res)
    assert md.startswith("# gpu-check: FAIL")
    assert "| kernels | FAILED | 1 | 1.5b: missing |" in md
    assert "1/2 sessions identical" in md and "token 2: 5 vs 6, top-2 margin 1e-05" in md


def test_only_modules_with_cuda_tests_are_collected():
    files = gpu_check.cuda_test_files()
    assert "tests/test_cuda.py" in files and "tests/test_fuzz.py" not in files
    assert all((ROOT / f).is_file() for f in files)


def test_prompts_interleave_categories():
    qs = [{"category": c, "n": i} for i, c in enumerate("aabbbc")]
    assert [q["n"] for q in gpu_check.interleaved(qs)] == [0, 2, 5, 1, 3, 4]
