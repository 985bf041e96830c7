"""python -m bench.transforms [--shape tiny|0.5b|1.5b] [--sessions 8] [--nodes 8] [--context 512]
[--reps 9] [--out DIR]: what the verifier-side logit transforms (repetition, presence and
frequency penalties, a logit bias) cost at one verification batch, on this machine's CPU.

A real `Engine` with random weights of the shape's real config (`synthetic:<shape>`, the real
vocabulary) serves `--sessions` sessions of `--context` committed tokens (half of them
generated), each verifying a bushy tree of `--nodes` nodes per forward with its KV cached, as
a verifier does round after round (accepted tokens are committed). Each rep verifies the same
batch once per mode, in turn (a different mode first each rep) (greedy and T 0.7/top-p 0.9, each with transforms off and on),
so the modes share the machine's noise. Also timed alone, on that batch's logits: the
transform itself (`transforms.apply_` on every row, History counted included) and the forward (`forward_flat`).
Medians of --reps after a warm-up. Writes DIR/results.json and DIR/table.md."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench.machine import machine
from bench.stack import markdown_table
from schemas import Sampling
from specedge.execution import Segment
from specedge.execution.transforms import History, Rows, apply_
from specedge.execution.walk import commit
from specedge.synthetic import build
from workers.verifier.engine import Engine
from workers.verifier.state import SessionState
from workers.verifier.validate import CheckedBlock

HERE = Path(__file__).resolve().parent
PENALTIES = {"repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5}
MODES = {  # name: (temperature, top_p, transforms on)
    "greedy": (0.0, 1.0, False), "greedy+transforms": (0.0, 1.0, True),
    "T0.7 p0.9": (0.7, 0.9, False), "T0.7 p0.9+transforms": (0.7, 0.9, True),
}


def sampling(mode: str, vocab: int) -> Sampling:
    t, p, on = MODES[mode]
    if not on:
        return Sampling(temperature=t, top_p=p)
    rng = random.Random(1)
    bias = tuple(sorted({rng.randrange(vocab): rng.uniform(-5, 5) for _ in range(20)}.items()))
    return Sampling(temperature=t, top_p=p, logit_bias=bias, **PENALTIES)


def tree(rng: random.Random, n: int, vocab: int, round_no: int) -> CheckedBlock:
    parents = [0 if i < 3 else i // 2 for i in range(1, n + 1)]  # bushy, as bench.kernels
    depths = [0] * n
    for i, p in enumerate(parents):
        depths[i] = 1 + (depths[p - 1] if p else 0)
    return CheckedBlock(round_no, [rng.randrange(vocab) for _ in range(n)], parents, depths)


def groups_of(work, off) -> list[Rows]:
    return [Rows(a, st.sampling, History.of(st.committed, st.prompt_len), b.tokens, b.parents)
            for (st, b), a in zip(work, off, strict=False)]


def run(args) -> dict:
    torch.manual_seed(0)
    model = build(f"synthetic:{args.shape}", dtype=torch.float32)
    eng = Engine(model, attention="sdpa")
    vocab = eng.vocab_size
    rng = random.Random(0)
    states = []
    for i in range(args.sessions):
        c = [rng.randrange(vocab) for _ in range(args.context)]
        # a generated half that repeats itself, as text does: the counts are not all ones
        c[args.context // 2 :] = [c[rng.randrange(args.context)] for _ in c[args.context // 2 :]]
        states.append(SessionState(f"s{i}", Sampling(), i, 1 << 20, frozenset(),
                                   args.context // 2, c))
    times: dict[str, list[float]] = {m: [] for m in MODES}
    alone = {"transform_ms": [], "forward_ms": []}
    for rep in range(args.reps + 1):
        names = list(MODES)
        for mode in names[rep % 4 :] + names[: rep % 4]:  # each mode first in turn
            work = []
            for st in states:
                st.sampling = sampling(mode, vocab)
                work.append((st, tree(rng, args.nodes, vocab, st.round)))
            t0 = time.perf_counter()
            outs = eng.verify(work)
            dt = (time.perf_counter() - t0) * 1000
            if rep:
                times[mode].append(dt)
            for (st, b), o in zip(work, outs, strict=True):
                new = [b.tokens[i - 1] for i in o.walk.accepted] + [o.walk.next_token]
                toks, _ = commit(new, st.generated, st.max_new_tokens, ())
                st.committed += toks
                st.round += 1
        # the transform and the forward alone, on one batch (its KV rolled back after)
        work = [(st, tree(rng, args.nodes, vocab, st.round)) for st in states]
        for st in states:
            st.sampling = sampling("greedy+transforms", vocab)
        segs = [Segment.tree(st.kv, st.committed[st.kv.length :], b.tokens, b.parents, b.depths)
                for st, b in work]
        have = [st.kv.length for st in states]
        t0 = time.perf_counter()
        logits, off = eng.runner.forward_flat(segs)
        f_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        flat, _ = apply_(logits, groups_of(work, off))
        x_ms = (time.perf_counter() - t0) * 1000
        for st, h in zip(states, have, strict=True):
            st.kv.keep(h, [])  # back to all of C but the root, as the engine keeps it
        if rep:
            alone["forward_ms"].append(f_ms)
            alone["transform_ms"].append(x_ms)
            alone.setdefault("entries", []).append(len(flat))
    med = {m: statistics.median(v) for m, v in times.items()}
    rows = []
    for m in MODES:
        base = m.replace("+transforms", "")
        rows.append({"mode": m, "verify_ms": med[m],
                     "overhead_%": None if base == m else 100 * (med[m] / med[base] - 1)})
    fwd, xf = statistics.median(alone["forward_ms"]), statistics.median(alone["transform_ms"])
    return {"settings": vars(args) | {"out": str(args.out), "vocab": vocab,
                                      "threads": torch.get_num_threads(),
                                      "penalties": PENALTIES, "bias_entries": 20},
            "verify_ms": times, "medians": rows,
            "alone": {"forward_ms": fwd, "transform_ms": xf,
                      "transform_%_of_forward": 100 * xf / fwd,
                      "entries": statistics.median(alone["entries"]), "raw": alone},
            "machine": machine("cpu", "float32")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=("tiny", "0.5b", "1.5b"))
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.out = args.out or HERE / "results" / f"transforms-{args.shape}"
    res = run(args)
    a = res["alone"]
    lines = [f"verifier batch: {args.sessions} sessions x {args.nodes} nodes, {args.context} "
             f"committed tokens each, synthetic:{args.shape} (vocab {res['settings']['vocab']}), "
             f"CPU, {res['settings']['threads']} threads, median of {args.reps}",
             "", markdown_table(res["medians"], ["mode", "verify_ms", "overhead_%"]), "",
             f"alone: forward {a['forward_ms']:.1f} ms, transform {a['transform_ms']:.2f} ms "
             f"({a['transform_%_of_forward']:.1f}% of the forward; {a['entries']:.0f} entries)"]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
