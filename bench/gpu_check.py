"""python -m bench.gpu_check [--device auto|cuda|cpu] [--out DIR] [--shape SHAPE]: every check
that needs a GPU, in one run that needs nothing but the installed packages (synthetic weights,
the project's own prompts and tokenizer), written to one results directory (results.json,
summary.md, and what the sub-steps write):

  a. synthetic: the target of --shape with random weights and a draft calibrated to
     --agreement (specedge/synthetic.py);
  b. kernels: `python -m bench.kernels --device D --shape S --out DIR/kernels-S` for each of
     --kernel-shapes, as subprocesses (a failure or its absence is recorded, not fatal);
  c. lossless: greedy, float32, through the real broker (embedded nats-server) and a real
     verifier process; --lossless-sessions concurrent edge sessions in this process, each
     compared token for token with transformers' generate() of the target alone;
  d. tests: the `cuda`-marked tests (sampled distribution, the stack on the device) with
     SPECEDGE_TEST_DEVICE set to the device;
  e. throughput at --edges concurrent edges through a verifier process: plain decoding (tree
     budget 0), SpecEdge with budget 8, and adaptive (the verifier's budget hints).

Profiles: on CUDA the 1.5b shape, 32 edges, 64 new tokens (`make gpu-check`, within 8 minutes
on one H100); on the CPU the tiny shape and a small profile. Exit status 0 when every check
passed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from tqdm import tqdm

from bench import report
from bench.edges import run_edges
from bench.machine import machine
from bench.pair import Pair, synthetic_pair
from bench.reference import divergence, reference_greedy
from bench.stack import Stack, delta, pin_edge
from bench.workload import load
from schemas import Sampling
from specedge import devices, logs, synthetic
from specedge.config import TreeShape
from specedge.edge.coalesce import CoalescingRunner
from specedge.edge.proactive import Mode
from specedge.edge.text import eos_ids, prompt_ids
from specedge.execution import PackedRunner
from specedge.models import load_model, load_tokenizer

log = structlog.get_logger("bench.gpu_check")

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("synthetic", "kernels", "lossless", "tests", "throughput", "proactive")
# bench.kernels per shape on CUDA: the issues' yardsticks, not the whole grid (each mode, size
# and bucket compiles FlexAttention once, which costs more than the timings): the 1.5B at 1, 16,
# 32 and 64 sessions x 1 and 8 tokens; the 7B at 64 x 8; the 0.5B draft step (one session, a
# root and one node). With its share of --kernels-budget-s.
KERNEL_ARGS = {"1.5b": (["--sessions", "1", "16", "32", "64", "--tokens", "1", "8"], 0.5),
               "7b": (["--sessions", "64", "--tokens", "8"], 0.3),
               "0.5b": (["--sessions", "1", "--tokens", "2", "--reps", "20"], 0.2)}
PROFILES = {  # per device type: what fits 8 minutes on one H100 / a few minutes on 2 cores
    "cuda": {"shape": "1.5b", "kernel_shapes": ["1.5b", "7b", "0.5b"], "edges": 32,
             "new_tokens": 64, "lossless_tokens": 32, "kernels_budget_s": 300,
             "tests_timeout": 240},
    "cpu": {"shape": "tiny", "kernel_shapes": ["tiny"], "edges": 32, "new_tokens": 12,
            "lossless_tokens": 16, "kernels_budget_s": 180, "tests_timeout": 300},
}
# (name, tree budget or None for the verifier's hints, proactive drafting)
THROUGHPUT = (("plain", 0, Mode.OFF), ("specedge-8", 8, Mode.SINGLE),
              ("adaptive", None, Mode.SINGLE))
AGREEMENT_TOL = 0.03


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto")
    p.add_argument("--out", default=None, help="results directory "
                                               "(default bench/results/gpu-check-<device type>)")
    p.add_argument("--shape", default=None, choices=synthetic.SHAPES,
                   help="synthetic model shape (default: 1.5b on CUDA, tiny on the CPU)")
    p.add_argument("--kernel-shapes", nargs="*", default=None,
                   help="shapes for bench.kernels (default: 1.5b 7b on CUDA, tiny on the CPU)")
    p.add_argument("--kernels-budget-s", type=float, default=None,
                   help="seconds for all bench.kernels runs together, shared equally (180)")
    p.add_argument("--tests-timeout", type=float, default=None,
                   help="seconds for the cuda-marked tests (240 on CUDA, 300 on the CPU)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the throughput runs")
    p.add_argument("--agreement", type=float, default=0.8,
                   help="the synthetic draft's greedy agreement with the target")
    p.add_argument("--edges", type=int, default=None, help="concurrent edges for throughput")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per throughput session")
    p.add_argument("--lossless-sessions", type=int, default=8)
    p.add_argument("--lossless-tokens", type=int, default=None)
    p.add_argument("--rtt-ms", type=float, default=0.0, help="emulated edge round trip")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    p.add_argument("--proactive", action="store_true",
                   help="also measure proactive drafting off/single/multi at one edge with a "
                        "15 ms round trip (bench.proactive; a verifier start per mode, so it "
                        "is outside the 8-minute budget)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="the wall time the run should fit in (reported, not enforced)")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    a.device = devices.pick(a.device)
    prof = PROFILES["cuda" if torch.device(a.device).type == "cuda" else "cpu"]
    for k, v in prof.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.out = Path(a.out or ROOT / "bench" / "results" / f"gpu-check-{torch.device(a.device).type}")
    return a


@dataclass
class Ctx:
    a: argparse.Namespace
    results: dict
    pair: Pair | None = None
    draft: torch.nn.Module | None = None  # the calibrated draft, in --dtype
    tok: object = None
    eos: tuple[int, ...] = ()
    jobs: list[tuple[dict, list[int]]] = field(default_factory=list)

    def kv_tokens(self, sessions: int, new_tokens: int) -> int:
        """A verifier KV budget that holds every session of a run (prompt, answer, a tree)."""
        longest = max(len(ids) for _, ids in self.jobs[:sessions])
        return int(1.5 * sessions * (longest + new_tokens + 64))


@contextlib.contextmanager
def edges_pinned() -> Iterator[list[int]]:
    """This process on the edge cores and the verifier on the others, as in every benchmark;
    the whole machine again afterwards (for the subprocess steps)."""
    saved, threads = os.sched_getaffinity(0), torch.get_num_threads()
    vcores, _ = pin_edge()
    try:
        yield vcores
    finally:
        os.sched_setaffinity(0, saved)
        torch.set_num_threads(threads)


@contextlib.contextmanager
def verifier(ctx: Ctx, name: str, vcores: list[int], sessions: int, new_tokens: int,
             dtype: str) -> Iterator[Stack]:
    """The broker and a verifier process for one step; its log is kept as DIR/verifier-NAME.log
    (what to read when a step fails on a machine one cannot log in to)."""
    stack = Stack(vcores, ["--max-batch", str(sessions),
                           "--kv-budget", str(ctx.kv_tokens(sessions, new_tokens))],
                  model=ctx.pair.target, device=ctx.a.device, dtype=dtype)
    try:
        yield stack.start()
    finally:
        stack.stop()
        if stack.log_path and stack.log_path.is_file():
            shutil.copy(stack.log_path, ctx.a.out / f"verifier-{name}.log")


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def interleaved(qs: list[dict]) -> list[dict]:
    """The prompts one category at a time in turn (the first of each, then the second...), so
    any prefix mixes every kind of Spec-Bench prompt."""
    seen: dict[str, int] = {}
    ranked = []
    for q in qs:
        ranked.append((seen.get(q["category"], 0), q))
        seen[q["category"]] = ranked[-1][0] + 1
    return [q for _, q in sorted(ranked, key=lambda t: t[0])]


# ---------------------------------------------------------------- the steps


def step_synthetic(ctx: Ctx) -> dict:
    a = ctx.a
    ctx.pair, ctx.draft = synthetic_pair(a.shape, a.agreement, a.device, a.dtype)
    ctx.tok = load_tokenizer(ctx.pair.target)
    ctx.eos = eos_ids(ctx.tok, ctx.draft.config, ctx.draft.generation_config)
    qs = interleaved(load())[:max(a.edges, a.lossless_sessions)]
    ctx.jobs = [(q, prompt_ids(ctx.tok, q["prompt"], True)) for q in qs]
    cal = ctx.pair.calibration
    return {"ok": abs(cal["agreement"] - a.agreement) <= AGREEMENT_TOL,
            "target": ctx.pair.target, "draft": ctx.pair.draft, "calibration": cal,
            "params": sum(p.numel() for p in ctx.draft.parameters())}


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def step_kernels(ctx: Ctx) -> dict:
    runs = []
    for shape in ctx.a.kernel_shapes:
        out = ctx.a.out / f"kernels-{shape}"
        extra, share = KERNEL_ARGS.get(shape, ([], 1 / max(1, len(ctx.a.kernel_shapes))))
        if torch.device(ctx.a.device).type != "cuda":
            extra = []  # the CPU profile: the tiny shape's whole grid
        timeout = ctx.a.kernels_budget_s * share
        cmd = [sys.executable, "-m", "bench.kernels", "--device", ctx.a.device, "--shape", shape,
               "--out", str(out), *extra]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
            rc, text = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = None, f"timed out after {timeout:.0f} s\n{_text(e.stderr)}"
        missing = rc not in (0, None) and "No module named bench.kernels" in text
        status = {0: "ok", None: "timeout"}.get(rc, "missing" if missing else "failed")
        runs.append({"shape": shape, "status": status, "rc": rc, "out": str(out),
                     "s": round(time.perf_counter() - t0, 1), "tail": text[-1500:]})
    return {"ok": all(r["status"] == "ok" for r in runs), "runs": runs}


def step_lossless(ctx: Ctx) -> dict:
    """Greedy float32 sessions through the broker and a verifier process, against generate()."""
    a, pair = ctx.a, ctx.pair
    n, new = a.lossless_sessions, a.lossless_tokens
    jobs = ctx.jobs[:n]
    target = load_model(pair.target, dtype=torch.float32, device=a.device)
    draft = load_model(pair.draft, dtype=torch.float32, device=a.device)
    bar = tqdm(total=n, desc="lossless sessions", file=sys.stderr, leave=False)
    with edges_pinned() as vcores, verifier(ctx, "lossless", vcores, n, new, "float32") as stack:
        recs = asyncio.run(run_edges(
            stack.url, CoalescingRunner(PackedRunner(draft)), jobs, n, sampling=Sampling(),
            max_new_tokens=new, eos=ctx.eos, shape=TreeShape(), proactive=Mode.SINGLE,
            adaptive=False, rtt_ms=0.0, progress=bar))
        loaded = stack.verifier_config()
    bar.close()
    sessions = []
    for (q, ids), r in zip(jobs, recs, strict=True):
        div = divergence(target, ids, r["token_ids"],
                         reference_greedy(target, ids, new, ctx.eos))
        sessions.append({"category": q["category"], "prompt_tokens": len(ids),
                         "tokens": r["tokens"], "rounds": r["rounds"],
                         "identical": div is None, "divergence": div})
    del target, draft
    free_device_memory()
    tokens = sum(s["tokens"] for s in sessions)
    return {"ok": all(s["identical"] for s in sessions), "dtype": "float32", "verifier": loaded,
            "identical": sum(s["identical"] for s in sessions), "sessions": sessions,
            "tokens_per_round": tokens / max(1, sum(s["rounds"] for s in sessions))}


def cuda_test_files() -> list[str]:
    """Test modules with `cuda`-marked tests: only those are collected, so modules that need
    packages a GPU machine may lack (fuzzing, deploy schemas) are never imported."""
    return sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                  if "mark.cuda" in f.read_text())


def step_tests(ctx: Ctx) -> dict:
    xml = ctx.a.out / "pytest-cuda.xml"
    files = cuda_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *files]
    env = dict(os.environ, SPECEDGE_TEST_DEVICE=ctx.a.device)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=ctx.a.tests_timeout)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = None, f"timed out after {ctx.a.tests_timeout:.0f} s\n{_text(e.stdout)}"
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    if xml.is_file():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        failed = [f"{c.get('classname')}::{c.get('name')}"
                  for c in ET.parse(xml).getroot().iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
    ran = counts["tests"] - counts["skipped"]
    # every marked test skipped on the device it was meant for is a failure, not a pass
    return {"ok": rc == 0 and ran > 0, "rc": rc, "files": files, "ran": ran, **counts,
            "failed": failed, "tail": text[-2000:]}


def step_throughput(ctx: Ctx) -> dict:
    a = ctx.a
    jobs = ctx.jobs[:a.edges]
    base = TreeShape()
    rows = []
    runner = CoalescingRunner(PackedRunner(ctx.draft))
    bar = tqdm(total=len(THROUGHPUT) * len(jobs), desc="throughput sessions", file=sys.stderr,
               leave=False)
    with (edges_pinned() as vcores,
          verifier(ctx, "throughput", vcores, a.edges, a.new_tokens, a.dtype) as stack):
        # warm-up, excluded: a short session of each kind of round
        for budget in (0, base.budget):
            asyncio.run(run_edges(stack.url, runner, jobs[:2], 2, sampling=Sampling(),
                                  max_new_tokens=4, eos=ctx.eos, shape=base.with_budget(budget),
                                  proactive=Mode.SINGLE, adaptive=False, rtt_ms=a.rtt_ms))
        for name, budget, proactive in THROUGHPUT:
            adaptive = budget is None
            before = stack.snapshot()
            t0 = time.perf_counter()
            recs = asyncio.run(run_edges(
                stack.url, runner, jobs, a.edges, sampling=Sampling(),
                max_new_tokens=a.new_tokens, eos=ctx.eos,
                shape=base if adaptive else base.with_budget(budget), proactive=proactive,
                adaptive=adaptive, rtt_ms=a.rtt_ms, progress=bar))
            wall = time.perf_counter() - t0
            v = delta(stack.snapshot(), before)
            rows.append(report.summarize(
                name, a.edges, 0.0, recs, v["busy_s"], wall,
                [v["mean_batch"]] if v["batches"] else [], a.edges, budget=budget,
                adaptive=adaptive, verifier_batches=v["batches"],
                mean_nodes=sum(r["nodes"] for r in recs) / max(
                    1, sum(r["rounds"] for r in recs))))
            rows[-1]["wall_s"] = wall
            rows[-1]["outside_per_batch_ms"] = v["outside_per_batch_ms"]
            rows[-1]["outside_x_forward"] = v["outside_x_forward"]
            rows[-1]["forward_ms"] = 1000 * v["busy_s"] / max(1, v["batches"])
        loaded = stack.verifier_config()
    bar.close()
    plain = rows[0]["server_tokens_per_busy_s"] or 0.0
    for r in rows:
        r["busy_tput_x_plain"] = (r["server_tokens_per_busy_s"] / plain) if plain else None
    ok = all(r["tokens"] > 0 for r in rows) and rows[1]["tokens_per_round"] > 1.0
    return {"ok": ok, "edges": a.edges, "new_tokens": a.new_tokens, "dtype": a.dtype,
            "verifier": loaded, "rows": rows}


def step_proactive(ctx: Ctx) -> dict:
    """Proactive drafting where a draft forward takes milliseconds: bench.proactive on the
    synthetic pair, one edge, 15 ms emulated round trip."""
    out = ctx.a.out / "proactive"
    cmd = [sys.executable, "-m", "bench.proactive", "--synthetic", ctx.a.shape, "--device",
           ctx.a.device, "--draft-agreement", str(ctx.a.agreement), "--edges", "1",
           "--prompts", "2", "--max-new-tokens", "48", "--rtt-ms", "15", "--out", str(out)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = None, f"timed out\n{_text(e.stderr)}"
    res = {"ok": rc == 0, "rc": rc, "out": str(out), "tail": text[-1500:]}
    if (out / "results.json").is_file():
        res["rows"] = json.loads((out / "results.json").read_text()).get("rows")
    return res


STEP_FUNCS: dict[str, Callable[[Ctx], dict]] = {
    "synthetic": step_synthetic, "kernels": step_kernels, "lossless": step_lossless,
    "tests": step_tests, "throughput": step_throughput, "proactive": step_proactive}
NEEDS_MODELS = ("lossless", "throughput")


# ---------------------------------------------------------------- report


def _f(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def summary(res: dict) -> str:
    d, st = res["device"], res["steps"]
    lines = [f"# gpu-check: {'PASS' if res['ok'] else 'FAIL'}", "",
             f"{d['device_name']} ({d['device']}), torch {d['torch']}, CUDA {d['cuda']}; "
             f"shape {res['settings']['shape']}; {res['wall_s']:.0f} s "
             f"(budget {res['settings']['budget_s']:.0f} s)", "",
             "| step | result | seconds | detail |", "|---|---|---|---|"]
    for name in STEPS:
        s = st.get(name)
        if s is None:
            lines.append(f"| {name} | skipped | - | |")
            continue
        detail = s.get("error", "")
        if name == "synthetic" and "calibration" in s:
            c = s["calibration"]
            detail = (f"{s['draft']}: agreement {c['agreement']:.3f} (asked "
                      f"{c['requested_agreement']}) after {c['forwards']} draft forwards")
        elif name == "kernels" and "runs" in s:
            detail = ", ".join(f"{r['shape']}: {r['status']}" for r in s["runs"])
        elif name == "lossless" and "sessions" in s:
            detail = (f"{s['identical']}/{len(s['sessions'])} sessions identical to "
                      f"generate() ({s['dtype']}), {s['tokens_per_round']:.2f} tokens/round")
        elif name == "tests" and "ran" in s:
            detail = (f"{s['ran']} ran, {s['failures']} failed, {s['errors']} errors, "
                      f"{s['skipped']} skipped")
        elif name == "throughput" and "rows" in s:
            detail = f"{s['edges']} edges x {s['new_tokens']} tokens, {s['dtype']}"
        lines.append(f"| {name} | {'ok' if s['ok'] else 'FAILED'} | {s['s']:.0f} | {detail} |")
    thr = st.get("throughput", {}).get("rows")
    if thr:
        lines += ["", "## Throughput", "",
                  "| config | tok/busy s | x plain | tok/wall s | tok/round | accept. | "
                  "ITL p50 s | TTFT p50 s | batch fill | forward ms | outside ms | "
                  "outside x fwd | wall s |", "|" + "---|" * 13]
        for r in thr:
            lines.append(
                f"| {r['config']} | {_f(r['server_tokens_per_busy_s'], 1)} | "
                f"{_f(r['busy_tput_x_plain'])} | {_f(r['server_tokens_per_wall_s'], 1)} | "
                f"{_f(r['tokens_per_round'])} | {_f(r['acceptance'])} | {_f(r['itl_p50_s'], 4)} "
                f"| {_f(r['ttft_p50_s'], 3)} | {_f(r['batch_fill'])} | "
                f"{_f(r.get('forward_ms'), 2)} | {_f(r.get('outside_per_batch_ms'), 2)} | "
                f"{_f(r.get('outside_x_forward'), 2)} | {_f(r.get('wall_s'), 1)} |")
    ll = st.get("lossless", {}).get("sessions")
    if ll:
        lines += ["", "## Lossless sessions", "",
                  "| # | category | prompt tokens | tokens | rounds | identical | divergence |",
                  "|---|---|---|---|---|---|---|"]
        for i, s in enumerate(ll):
            dv = s["divergence"]
            where = "" if dv is None else (f"token {dv['index']}: {dv['got']} vs "
                                           f"{dv['reference']}, top-2 margin "
                                           f"{dv['top2_margin']}")
            lines.append(f"| {i} | {s['category']} | {s['prompt_tokens']} | {s['tokens']} | "
                         f"{s['rounds']} | {'yes' if s['identical'] else 'NO'} | {where} |")
    return "\n".join(lines) + "\n"


def write(res: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "summary.md").write_text(summary(res))


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    logs.configure(a.log_level)
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    res = {"ok": False, "device": devices.describe(a.device, a.dtype),
           "machine": machine(a.device, a.dtype), "settings": settings, "steps": {},
           "wall_s": 0.0}
    ctx = Ctx(a, res)
    for name in tqdm(STEPS, desc="gpu-check", file=sys.stderr):
        if name in a.skip or (name in NEEDS_MODELS and ctx.pair is None) or (
                name == "proactive" and not a.proactive):
            continue
        t0 = time.perf_counter()
        try:
            out = STEP_FUNCS[name](ctx)
        except Exception as e:  # one broken step must not hide the others' results
            log.exception("step failed", step=name)
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out["s"] = round(time.perf_counter() - t0, 1)
        res["steps"][name] = out
        res["wall_s"] = time.perf_counter() - t_start
        log.info("step done", step=name, ok=out["ok"], s=out["s"])
        write(res, a.out)  # after every step: a run cut short still leaves its results
    if ctx.pair is not None:
        res["models"] = ctx.pair.record()
    res["ok"] = bool(res["steps"]) and all(s["ok"] for s in res["steps"].values())
    res["wall_s"] = time.perf_counter() - t_start
    res["within_budget"] = res["wall_s"] <= a.budget_s
    write(res, a.out)
    print(summary(res))
    print(f"wrote {a.out}/results.json and summary.md in {res['wall_s']:.0f} s", file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
