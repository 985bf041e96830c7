"""python -m bench.gpu_check [--device auto|cuda|cpu] [--out DIR] [--budget-s S]: every check
that needs a GPU, in one run that fits a time budget by construction and needs nothing but the
installed packages (synthetic weights of the real configs, the project's prompts and
tokenizer). Steps, each a subprocess with its own share of the budget:

  calibrate    the synthetic draft calibrated to --agreement against the target (d and e
               use it);
  correctness  a. graphs (bucket path) vs eager flex vs sdpa, same inputs: 1x1, 32x9, 64x9
               sessions x tokens and a lone 512-token chunk, weights with and without grad,
               two replays with different inputs;
  latency      b. CUDA-event latency: the 1.5B at 1x1, 32x1, 32x9, 64x9 over 512 and 2048
               cached tokens (graphs, eager flex, sdpa); the 7B at 64x8 (graphs); the 0.5B
               draft step alone and through the coalescer; the sampled pick at 288 rows;
  profile      c. torch.profiler over graphed (and eager) 32x9 forwards: kernels per forward,
               GPU idle time;
  lossless     d. float32 sessions through the broker and a real verifier process, each
               compared token for token with transformers' generate();
  throughput   e. edges through a verifier process: plain vs speculative decoding, server
               tokens per busy second, the share of a batch spent outside the forward.

Every result is appended to DIR/results.jsonl (one JSON line, fsynced) the moment it is
measured; a step that reaches its budget stops (what it did not reach: `skipped` lines, with
the reason), a step past its budget plus grace is killed. DIR/summary.md and a final `summary`
line say what passed, what failed and what was skipped. Profiles: CUDA (480 s on one H100)
and the CPU (tiny shapes, the same code paths; CUDA events -> perf_counter, graph capture ->
the static bucket path). `--set KEY=JSON` overrides a profile entry. Exit status 0 when no
check failed (skipped items are reported, not failures)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import torch

from bench.kernels import (
    Budget,
    Item,
    Journal,
    correctness_items,
    kv_tokens,
    latency_items,
    profile_items,
    read_journal,
    run_items,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("calibrate", "correctness", "latency", "profile", "lossless", "throughput")
NEEDS_PAIR = ("lossless", "throughput")
GRACE_S = 15.0  # past its budget a step gets this long to finish its item, then is killed
MIN_STEP_S = 5.0  # a step with less left than this is not started
AGREEMENT_TOL = 0.03
# Shares of the budget; what a step leaves unused goes to the ones after it, in proportion.
SHARES = {"calibrate": 0.07, "correctness": 0.19, "latency": 0.30, "profile": 0.08,
          "lossless": 0.14, "throughput": 0.22}
PROFILES = {
    # one H100: 480 s. setup_s / big_s: the least time left for a model build with captures.
    "cuda": {"shape": "1.5b", "dtype": "bfloat16", "budget_s": 480.0, "reps": 10,
             "setup_s": 20.0, "agreement": 0.8, "warm_compile": True,
             "cases": [["1x1", 1, 1, 128], ["32x9", 32, 9, 128], ["64x9", 64, 9, 128],
                       ["chunk512", 1, 512, 0]],
             "grid": [[1, 1], [32, 1], [32, 9], [64, 9]], "cached": [512, 2048],
             "big": "7b", "big_cell": [64, 8], "big_cached": 512, "big_s": 40.0,
             "draft": "0.5b", "draft_cached": 512, "coalesce": 8, "pick_rows": 288,
             "cell": [32, 9], "profile_cached": 512, "profile_forwards": 5,
             "lossless_sessions": 8, "lossless_tokens": 32,
             "edges": 32, "new_tokens": 64, "rtt_ms": 0.0},
    # the CPU: tiny shapes, every code path, a few minutes on 2 cores
    "cpu": {"shape": "tiny", "dtype": "float32", "budget_s": 900.0, "reps": 2,
            "setup_s": 2.0, "agreement": 0.8, "warm_compile": False,
            "cases": [["1x1", 1, 1, 32], ["4x9", 4, 9, 32], ["chunk64", 1, 64, 0]],
            "grid": [[1, 1], [4, 9]], "cached": [32, 64],
            "big": "tiny", "big_cell": [8, 8], "big_cached": 32, "big_s": 2.0,
            "draft": "tiny", "draft_cached": 32, "coalesce": 4, "pick_rows": 36,
            "cell": [4, 9], "profile_cached": 32, "profile_forwards": 2,
            "lossless_sessions": 4, "lossless_tokens": 12,
            "edges": 6, "new_tokens": 8, "rtt_ms": 0.0,
            # calibration costs more here, relative to the rest, than on a GPU
            "shares": SHARES | {"calibrate": 0.12, "latency": 0.25}},
}
# (name, tree budget: 0 is plain decoding)
THROUGHPUT = (("plain", 0), ("specedge-8", 8))
CLEANUP = contextlib.ExitStack()  # what a child step holds open across items (a verifier)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto")
    p.add_argument("--out", default=None,
                   help="results directory (default bench/results/gpu-check-<device type>)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall seconds for the whole run (480 on CUDA, 900 on the CPU)")
    p.add_argument("--steps", nargs="*", default=list(STEPS), choices=STEPS,
                   help="the steps to run, in this order (default: all)")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                   help="override a profile entry, e.g. --set edges=8 'grid=[[1,1]]'")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one step
    a = p.parse_args(argv)
    from specedge import devices

    a.device = devices.pick(a.device)
    a.kind = torch.device(a.device).type if torch.device(a.device).type == "cuda" else "cpu"
    a.out = Path(a.out or ROOT / "bench" / "results" / f"gpu-check-{a.kind}")
    return a


def profile_for(a: argparse.Namespace) -> dict:
    prof = dict(PROFILES[a.kind], device=a.device)
    for kv in a.set:
        k, _, v = kv.partition("=")
        if k not in prof:
            raise SystemExit(f"--set {k}: no such profile entry ({', '.join(sorted(prof))})")
        prof[k] = json.loads(v)
    if a.budget_s is not None:
        prof["budget_s"] = a.budget_s
    if prof.get("kv_tokens") is None:  # the main shape's pool in every step: one size
        trees = [(s, t, c) for n, s, t, c in prof["cases"] if not n.startswith("chunk")]
        trees += [(s, t, c) for s, t in prof["grid"] for c in prof["cached"]]
        trees.append((*prof["cell"], prof["profile_cached"]))
        prof["kv_tokens"] = kv_tokens(max(x[0] for x in trees), max(x[2] for x in trees),
                                      max(x[1] for x in trees))
    return prof


# ---------------------------------------------------------------- the steps (child processes)


def _pair(out: Path) -> dict:
    """The calibrated pair the calibrate step recorded."""
    for rec in read_journal(out / "results.jsonl"):
        if rec.get("step") == "calibrate" and rec.get("kind") == "result" and rec.get("ok"):
            return rec
    raise RuntimeError("no calibrated pair in results.jsonl (the calibrate step failed)")


def _has_pair(jpath: Path) -> bool:
    return any(r.get("step") == "calibrate" and r.get("kind") == "result" and r.get("ok")
               for r in read_journal(jpath))


def calibrate_items(prof: dict, journal: Journal, out: Path) -> list[Item]:
    from bench.pair import synthetic_pair

    def calibrate() -> dict:
        pair, _ = synthetic_pair(prof["shape"], prof["agreement"], prof["device"],
                                 prof["dtype"])
        cal = pair.calibration
        return {"ok": abs(cal["agreement"] - prof["agreement"]) <= AGREEMENT_TOL,
                "target": pair.target, "draft": pair.draft, "calibration": cal}

    return [Item(f"calibrate {prof['shape']}", calibrate, 5.0)]


def interleaved(qs: list[dict]) -> list[dict]:
    """The prompts one category at a time in turn (the first of each, then the second...), so
    any prefix mixes every kind of Spec-Bench prompt."""
    seen: dict[str, int] = {}
    ranked = []
    for q in qs:
        ranked.append((seen.get(q["category"], 0), q))
        seen[q["category"]] = ranked[-1][0] + 1
    return [q for _, q in sorted(ranked, key=lambda t: t[0])]


def _jobs(draft, target_ref: str, n: int) -> tuple[list, tuple[int, ...]]:
    from bench.workload import load
    from specedge.edge.text import eos_ids, prompt_ids
    from specedge.models import load_tokenizer

    tok = load_tokenizer(target_ref)
    eos = eos_ids(tok, draft.config, draft.generation_config)
    return [(q, prompt_ids(tok, q["prompt"], True)) for q in interleaved(load())[:n]], eos


@contextlib.contextmanager
def _verifier(prof: dict, out: Path, name: str, target: str, sessions: int, kv: int,
              dtype: str) -> Iterator:
    """The broker and a verifier process on the verifier cores (this process on the edge
    cores); its log kept as DIR/verifier-NAME.log."""
    import shutil

    from bench.stack import Stack, pin_edge

    vcores, _ = pin_edge()
    stack = Stack(vcores, ["--max-batch", str(sessions), "--kv-budget", str(kv)], model=target,
                  device=prof["device"], dtype=dtype)
    try:
        yield stack.start()
    finally:
        stack.stop()
        if stack.log_path and stack.log_path.is_file():
            shutil.copy(stack.log_path, out / f"verifier-{name}.log")


def _kv(prof: dict, jobs: list, sessions: int, new_tokens: int) -> int:
    """A KV budget that holds every session of a run (prompt, answer, a tree); at least the
    main shape's pool of the kernel steps, so that the verifier's and the edge's compiles of
    the same shapes (the synthetic draft has the target's) hit the inductor cache."""
    longest = max(len(ids) for _, ids in jobs[:sessions])
    return max(int(1.5 * sessions * (longest + new_tokens + 64)), prof["kv_tokens"])


def lossless_items(prof: dict, journal: Journal, out: Path) -> list[Item]:
    """Step d: float32 greedy sessions through the broker and a verifier process, each then
    compared with generate() of the target alone (one line per session)."""
    from bench.edges import run_edges
    from bench.reference import divergence, reference_greedy
    from schemas import Sampling
    from specedge.config import TreeShape
    from specedge.edge.coalesce import CoalescingRunner
    from specedge.edge.proactive import Mode
    from specedge.execution import PackedRunner
    from specedge.models import load_model

    st: dict = {}
    n, new, dev = prof["lossless_sessions"], prof["lossless_tokens"], prof["device"]

    def setup() -> dict:
        pair = _pair(out)
        st["target_ref"] = pair["target"]
        st["target"] = load_model(pair["target"], dtype=torch.float32, device=dev)
        st["draft"] = load_model(pair["draft"], dtype=torch.float32, device=dev)
        st["jobs"], st["eos"] = _jobs(st["draft"], pair["target"], n)
        return {"target": pair["target"], "draft": pair["draft"], "dtype": "float32"}

    def sessions() -> dict:
        jobs = st["jobs"]
        kv = _kv(prof, jobs, n, new)
        with _verifier(prof, out, "lossless", st["target_ref"], n, kv, "float32") as stack:
            edge = PackedRunner(st["draft"], kv_budget_tokens=kv)
            st["recs"] = asyncio.run(run_edges(
                stack.url, CoalescingRunner(edge), jobs, n,
                sampling=Sampling(), max_new_tokens=new, eos=st["eos"], shape=TreeShape(),
                proactive=Mode.SINGLE, adaptive=False, rtt_ms=0.0))
            loaded = stack.verifier_config()
        recs = st["recs"]
        return {"verifier": loaded, "sessions": n, "tokens": sum(r["tokens"] for r in recs),
                "tokens_per_round": round(sum(r["tokens"] for r in recs)
                                          / max(1, sum(r["rounds"] for r in recs)), 3)}

    def compare(i: int) -> dict:
        (q, ids), r = st["jobs"][i], st["recs"][i]
        div = divergence(st["target"], ids, r["token_ids"],
                         reference_greedy(st["target"], ids, new, st["eos"]))
        return {"session": i, "category": q["category"], "prompt_tokens": len(ids),
                "tokens": r["tokens"], "rounds": r["rounds"], "identical": div is None,
                "divergence": div, "ok": div is None}

    return [Item("setup float32 pair", setup, prof["setup_s"]),
            Item(f"{n} sessions through the verifier", sessions, prof["setup_s"],
                 needs="setup float32 pair"),
            *[Item(f"session {i} vs generate()", lambda i=i: compare(i),
                   needs=f"{n} sessions through the verifier") for i in range(n)]]


def throughput_items(prof: dict, journal: Journal, out: Path) -> list[Item]:
    """Step e: prof["edges"] concurrent edges through one verifier process, plain decoding
    (tree budget 0) then speculative (budget 8): one row each."""
    from bench import report
    from bench.edges import run_edges
    from bench.stack import delta
    from schemas import Sampling
    from specedge.config import TreeShape
    from specedge.edge.coalesce import CoalescingRunner
    from specedge.edge.proactive import Mode
    from specedge.execution import PackedRunner
    from specedge.models import load_model

    st: dict = {}
    edges, new, dev, dtype = prof["edges"], prof["new_tokens"], prof["device"], prof["dtype"]
    base = TreeShape()

    def run(stack, budget: int, jobs: list, n: int, tokens: int) -> list[dict]:
        return asyncio.run(run_edges(
            stack.url, st["runner"], jobs, n, sampling=Sampling(), max_new_tokens=tokens,
            eos=st["eos"], shape=base.with_budget(budget), proactive=Mode.SINGLE if budget
            else Mode.OFF, adaptive=False, rtt_ms=prof["rtt_ms"]))

    def setup() -> dict:
        pair = _pair(out)
        draft = load_model(pair["draft"], dtype=getattr(torch, dtype), device=dev)
        st["jobs"], st["eos"] = _jobs(draft, pair["target"], edges)
        kv = _kv(prof, st["jobs"], edges, new)
        stack = CLEANUP.enter_context(_verifier(prof, out, "throughput", pair["target"], edges,
                                                kv, dtype))
        st["runner"] = CoalescingRunner(PackedRunner(draft, kv_budget_tokens=kv))
        st["stack"] = stack
        for budget in (0, base.budget):  # warm-up, not measured: each kind of round
            run(stack, budget, st["jobs"][:2], 2, 4)
        return {"verifier": stack.verifier_config(), "edges": edges}

    def row(name: str, budget: int) -> dict:
        stack = st["stack"]
        before = stack.snapshot()
        t0 = time.perf_counter()
        recs = run(stack, budget, st["jobs"], edges, new)
        wall = time.perf_counter() - t0
        v = delta(stack.snapshot(), before)
        r = report.summarize(name, edges, 0.0, recs, v["busy_s"], wall,
                             [v["mean_batch"]] if v["batches"] else [], edges, budget=budget,
                             verifier_batches=v["batches"])
        fwd_ms = 1000 * v["busy_s"] / max(1, v["batches"])
        out_ms = v["outside_per_batch_ms"]
        st.setdefault("plain", r["server_tokens_per_busy_s"])
        plain = st["plain"]
        return r | {"wall_s": round(wall, 2), "forward_ms": round(fwd_ms, 3),
                    "outside_per_batch_ms": round(out_ms, 3),
                    "outside_share": round(out_ms / (out_ms + fwd_ms), 3)
                    if out_ms + fwd_ms else None,
                    "busy_tput_x_plain": round(r["server_tokens_per_busy_s"] / plain, 3)
                    if plain else None,
                    "ok": r["tokens"] > 0 and (budget == 0 or r["tokens_per_round"] > 1.0)}

    items = [Item("setup draft and verifier", setup, prof["setup_s"])]
    items += [Item(name, lambda name=name, b=b: row(name, b), 2.0,
                   needs="setup draft and verifier") for name, b in THROUGHPUT]
    return items


STEP_ITEMS: dict[str, Callable[[dict, Journal, Path], list[Item]]] = {
    "calibrate": calibrate_items,
    "correctness": lambda p, j, o: correctness_items(p, j),
    "latency": lambda p, j, o: latency_items(p, j),
    "profile": profile_items,
    "lossless": lossless_items,
    "throughput": throughput_items,
}


def child(a: argparse.Namespace) -> NoReturn:
    """One step in this process: its items against the deadline the parent set."""
    from specedge import logs

    def stop(*_):  # the parent's SIGTERM at the step's limit: unwind (stop the verifier)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)
    logs.configure("warning")
    settings = json.loads((a.out / "settings.json").read_text())
    prof = settings["profile"]
    spawned, budget_s = float(os.environ["GPUCHECK_SPAWNED"]), float(os.environ["GPUCHECK_BUDGET"])
    journal = Journal(a.out / "results.jsonl", a.child)
    journal.write("step-start", startup_s=round(time.time() - spawned, 2),
                  budget_s=round(budget_s, 1))
    budget = Budget(budget_s, start=spawned)
    items = STEP_ITEMS[a.child](prof, journal, a.out)
    try:
        ok = run_items(journal, budget, items)
    finally:
        CLEANUP.close()  # a verifier a step held open across its items
    journal.write("step-end", ok=ok)
    # done: skip the interpreter's teardown (seconds with a model loaded), which would count
    # against the step's limit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


# ---------------------------------------------------------------- the parent


def step_budget(name: str, left: float, todo: list[str], shares: dict | None = None) -> float:
    """This step's share of what is left, in proportion to the shares of the steps to come."""
    shares = shares or SHARES
    return left * shares[name] / sum(shares[s] for s in todo)


def run_step(a: argparse.Namespace, name: str, budget_s: float, journal: Journal) -> dict:
    """The step as a subprocess (its own process group: the verifier and broker it starts
    go with it), killed GRACE_S after its budget; its log in DIR/NAME.log."""
    env = dict(os.environ, GPUCHECK_SPAWNED=repr(time.time()), GPUCHECK_BUDGET=repr(budget_s),
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "bench.gpu_check", "--child", name, "--device", a.device,
           "--out", str(a.out)]
    t0 = time.perf_counter()
    with open(a.out / f"{name}.log", "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(budget_s + GRACE_S)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    recs = [r for r in read_journal(a.out / "results.jsonl") if r.get("step") == name]
    plan = next((r["items"] for r in recs if r["kind"] == "plan"), [])
    seen = {r["name"] for r in recs if r["kind"] in ("result", "error", "skipped")}
    never = [n for n in plan if n not in seen]
    for n in never:  # killed before it reached them
        journal.write("skipped", step=name, name=n,
                      reason=f"killed at the step's limit ({budget_s + GRACE_S:.0f} s)")
    failed = [r["name"] for r in recs if r["kind"] == "error"
              or (r["kind"] == "result" and r.get("ok") is False)]
    skipped = [r["name"] for r in recs if r["kind"] == "skipped"] + never
    ended = any(r["kind"] == "step-end" for r in recs)  # a kill after that cost nothing
    status = ("killed" if rc is None and not ended
              else "failed" if (rc not in (0, None)) or failed or not plan else "ok")
    res = {"status": status, "rc": rc, "s": round(time.perf_counter() - t0, 1),
           "budget_s": round(budget_s, 1),
           "results": sum(r["kind"] == "result" for r in recs), "failed": failed,
           "skipped": skipped}
    if status != "ok":
        res["log_tail"] = (a.out / f"{name}.log").read_text(errors="replace")[-1500:]
    return res


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.child:
        child(a)  # exits
        return 1
    from bench.machine import machine
    from specedge import devices, logs

    logs.configure("warning")
    prof = profile_for(a)
    jpath = a.out / "results.jsonl"
    if jpath.exists():  # an earlier run's lines stay readable beside this one's
        jpath.replace(a.out / "results.prev.jsonl")
    (a.out / "settings.json").write_text(json.dumps({"profile": prof}, indent=1))
    journal = Journal(jpath, echo=False)
    t0 = time.time()
    journal.write("run", device=devices.describe(a.device, prof["dtype"]),
                  machine=machine(a.device, prof["dtype"]), profile=prof, out=str(a.out))
    todo = [s for s in a.steps if s not in a.skip]
    steps: dict[str, dict] = {s: {"status": "skipped", "reason": "--skip"} for s in a.skip
                              if s in a.steps}
    while todo:
        name = todo[0]
        left = prof["budget_s"] - (time.time() - t0)
        budget = step_budget(name, left, todo, prof.get("shares"))
        todo.pop(0)
        reason = None
        if budget < MIN_STEP_S:
            reason = f"budget: {max(0.0, left):.0f} s of {prof['budget_s']:.0f} s left"
        elif name in NEEDS_PAIR and not _has_pair(jpath):
            reason = "needs calibrate (no calibrated pair)"
        if reason:
            steps[name] = {"status": "skipped", "reason": reason}
        else:
            print(f"gpu-check: {name} ({budget:.0f} s)", file=sys.stderr, flush=True)
            steps[name] = run_step(a, name, budget, journal)
        journal.write("step", step=name, **steps[name])
    recs = read_journal(jpath)
    wall = time.time() - t0
    ok = all(s["status"] in ("ok", "skipped") for s in steps.values()) and any(
        s["status"] == "ok" for s in steps.values())
    skipped = [{"step": r["step"], "name": r["name"], "reason": r["reason"]} for r in recs
               if r["kind"] == "skipped"] + [{"step": k, "name": "(whole step)",
                                              "reason": v["reason"]}
                                             for k, v in steps.items()
                                             if v["status"] == "skipped"]
    final = journal.write("summary", ok=ok, wall_s=round(wall, 1), budget_s=prof["budget_s"],
                          within_budget=wall <= prof["budget_s"] + GRACE_S, steps=steps,
                          skipped=skipped)
    md = summary(read_journal(jpath), final)
    (a.out / "summary.md").write_text(md)
    print(md)
    print(f"wrote {jpath} and summary.md in {wall:.0f} s", file=sys.stderr)
    return 0 if ok else 1


# ---------------------------------------------------------------- report


def _f(v, nd: int = 2) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if v and abs(v) < 0.01 else f"{v:.{nd}f}"
    return "-" if v is None else str(v)


def _table(head: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(_f(x) for x in r) + " |" for r in rows] + [""])


def summary(recs: list[dict], final: dict) -> str:
    """summary.md from the journal: the steps, then each step's results, then what was
    skipped and why."""
    run = next((r for r in recs if r["kind"] == "run"), {})
    d = run.get("device", {})
    res = [r for r in recs if r["kind"] == "result"]
    by = {s: [r for r in res if r.get("step") == s] for s in STEPS}
    n_skip = len(final["skipped"])
    head = "PASS" if final["ok"] else "FAIL"
    lines = [f"# gpu-check: {head}" + (f", {n_skip} skipped" if n_skip else ""), "",
             f"{d.get('device_name')} ({d.get('device')}), torch {d.get('torch')}, "
             f"CUDA {d.get('cuda')}; {final['wall_s']:.0f} s (budget {final['budget_s']:.0f} s)",
             ""]
    comp: dict[str, list[float]] = {}
    for r in recs:
        if r["kind"] == "compile":
            c = comp.setdefault(r["step"], [0, 0.0])
            c[0] += r.get("compiles") or 0
            c[1] += r.get("s") or 0.0
    lines += _table(["step", "status", "seconds", "budget s", "results", "failed", "skipped",
                     "compiles (s)"],
                    [[k, v["status"], v.get("s"), v.get("budget_s"), v.get("results"),
                      len(v.get("failed", [])), len(v.get("skipped", [])) or v.get("reason"),
                      f"{comp[k][0]} ({comp[k][1]:.0f})" if k in comp else "-"]
                     for k, v in final["steps"].items()])
    if by["calibrate"]:
        c = by["calibrate"][0]
        lines += [f"Calibrated draft {c['draft']}: agreement "
                  f"{c['calibration']['agreement']:.3f}.", ""]
    if by["correctness"]:
        lines += ["## a. Correctness (max |logit diff| vs sdpa)", ""]
        lines += _table(["case", "grad", "replay", "graphed", "graphs", "flex", "tol",
                         "argmax graphs", "ok"],
                        [[r["case"], r["grad"], r["replay"], r["graphed"],
                          r["graphs_vs_sdpa"]["max_abs_diff"], r["flex_vs_sdpa"]["max_abs_diff"],
                          r["graphs_vs_sdpa"]["tol"], r["graphs_vs_sdpa"]["argmax_agree"],
                          r["ok"]] for r in by["correctness"] if "case" in r])
    lat = [r for r in by["latency"] if "ms" in r]
    if lat:
        lines += ["## b. Latency (ms, median)", ""]
        lines += _table(["item", "graphed", "ms", "min ms", "timer", "detail"],
                        [[r["name"], r.get("graphed", "-"), r["ms"], r["ms_min"], r["timer"],
                          f"{r['sessions_per_forward']} sessions/forward"
                          if "sessions_per_forward" in r else
                          f"greedy {r['greedy_ms']} ms" if "greedy_ms" in r else ""]
                         for r in lat])
    if by["profile"]:
        lines += ["## c. Profile", ""]
        lines += _table(["item", "kernels/forward", "aten ops/forward", "wall ms/forward",
                         "GPU idle ms/forward", "idle share"],
                        [[r["name"], r.get("kernels_per_forward"),
                          r.get("aten_ops_per_forward"), r.get("wall_ms_per_forward"),
                          r.get("gpu_idle_ms_per_forward"), r.get("gpu_idle_share")]
                         for r in by["profile"] if "forwards" in r])
    sess = [r for r in by["lossless"] if "identical" in r]
    if sess:
        same = sum(r["identical"] for r in sess)
        lines += ["## d. Lossless (float32)", "", f"{same}/{len(sess)} sessions identical to "
                  "generate().", ""]
        lines += [f"- session {r['session']} ({r['category']}): token "
                  f"{r['divergence']['index']}: {r['divergence']['got']} vs "
                  f"{r['divergence']['reference']}, top-2 margin "
                  f"{r['divergence']['top2_margin']}" for r in sess if not r["identical"]]
    thr = [r for r in by["throughput"] if "server_tokens_per_busy_s" in r]
    if thr:
        lines += ["## e. Throughput", ""]
        lines += _table(["config", "tok/busy s", "x plain", "tok/wall s", "tok/round",
                         "forward ms", "outside ms", "outside share", "wall s"],
                        [[r["config"], r["server_tokens_per_busy_s"], r["busy_tput_x_plain"],
                          r["server_tokens_per_wall_s"], r["tokens_per_round"],
                          r["forward_ms"], r["outside_per_batch_ms"], r["outside_share"],
                          r["wall_s"]] for r in thr])
    errs = [r for r in recs if r["kind"] == "error"]
    if errs:
        lines += ["## Errors", ""] + [f"- {r['step']} / {r['name']}: {r['error'][:300]}"
                                      for r in errs] + [""]
    if final["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s['step']} / {s['name']}: {s['reason']}"
                                       for s in final["skipped"]] + [""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
