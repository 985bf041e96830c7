"""python -m bench.grammar [--part masks|pair|all] [--sessions 8] [--nodes 8] [--reps 9]
[--new 96] [--out DIR]: what structured output costs and gains, on this machine's CPU.

masks: the verifier's grammar work for one batch of --sessions sessions x --nodes nodes under
a JSON schema, with the real Qwen2.5 vocabulary (151,936 ids): each session's matcher synced
to its committed JSON so far, its tree's per-node masks from one walk with rollback, and the
masked rows written into the batch's logits (then restored). Median of --reps.

pair: the real Qwen2.5-Coder 1.5B/0.5B pair (float32, no broker: the verifier's Engine and the
edge's TreeBuilder in one process), greedy, the same schema, with the grammar's forced tokens
drafted without a forward and without (every token drafted by the model): tokens per round,
draft forwards per round, and whether the output equals transformers' generate() of the
target alone with xgrammar's HF logits processor (an honest float32 near-tie is reported with
its margin). Writes DIR/results.json and DIR/table.md."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from bench.machine import machine
from bench.stack import markdown_table
from schemas import Sampling
from schemas.wire import GrammarSpec
from specedge.config import TreeShape
from specedge.execution.grammar import Grammars, masked

HERE = Path(__file__).resolve().parent
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "email": {"type": "string"}, "languages": {"type": "array", "items": {"type": "string"}},
    "employed": {"type": "boolean"}},
    "required": ["name", "age", "email", "languages", "employed"]}
SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA))
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
       "languages": ["English", "French", "Italian"], "employed": False}
PROMPTS = ["Describe a fictional software engineer as a JSON record with name, age, email, "
           "the languages they speak and whether they are employed.",
           "Give me a JSON object for a retired teacher from Lyon: name, age, email, languages "
           "spoken, employed."]


def masks(args, tok) -> dict:
    vocab = 151936
    g = Grammars(tok, vocab)
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    t0 = time.perf_counter()
    g.compile(SPEC, eos)
    compile_s = time.perf_counter() - t0
    doc = tok(json.dumps(DOC))["input_ids"]  # compact separators as the grammar writes them
    rng = random.Random(1)
    sessions = []
    for _ in range(args.sessions):
        c = g.constraint(SPEC, eos)
        at = rng.randrange(4, len(doc) - args.nodes)
        # the true continuation as a chain (half the nodes), a random sibling beside each
        h = (args.nodes + 1) // 2
        parents = [i for i in range(h)] + [j for j in range(args.nodes - h)]
        tokens = doc[at : at + h] + [rng.randrange(vocab) for _ in range(args.nodes - h)]
        sessions.append((c, doc[:at], tokens, parents))
    logits = torch.randn(args.sessions * (args.nodes + 1), vocab)
    t0 = time.perf_counter()
    for c, committed, _, _ in sessions:  # each matcher to its session's committed state
        c.sync(committed)
    replay_s = time.perf_counter() - t0
    walk, apply = [], []
    for rep in range(args.reps + 1):  # a round: per-node masks of every tree, then applied
        t0 = time.perf_counter()
        bms = [c.tree_bitmask(tokens, parents) for c, _, tokens, parents in sessions]
        t1 = time.perf_counter()
        with masked(logits, [(i * (args.nodes + 1), bm) for i, bm in enumerate(bms)]) as x:
            x[0, 0].item()
        t2 = time.perf_counter()
        if rep:  # the first is a warm-up
            walk.append(t1 - t0)
            apply.append(t2 - t1)
    return {"sessions": args.sessions, "nodes": args.nodes, "vocab": vocab,
            "compile_ms": compile_s * 1e3,
            "walk_ms_round": statistics.median(walk) * 1e3,
            "apply_ms": statistics.median(apply) * 1e3,
            "round_ms": (statistics.median(walk) + statistics.median(apply)) * 1e3,
            "replay_from_start_ms": replay_s * 1e3}


def _reference(target, ids, compiled, new, eos) -> list[int]:
    from xgrammar.contrib.hf import LogitsProcessor

    x = torch.tensor([ids])
    with torch.no_grad():
        out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                              do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0],
                              logits_processor=[LogitsProcessor(compiled)])
    return out[0, len(ids):].tolist()


def _margin(target, ids, compiled, prefix) -> float:
    """The target's top-2 logit margin (masked) where the two outputs part."""
    import xgrammar as xgr

    from specedge.execution.grammar import allowed

    m = xgr.GrammarMatcher(compiled)
    for t in prefix:
        m.accept_token(t)
    bm = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    m.fill_next_token_bitmask(bm)
    with torch.no_grad():
        row = target(torch.tensor([ids + prefix])).logits[0, -1].float()
    row = row.masked_fill(~allowed(bm, len(row))[0], float("-inf"))
    top = torch.topk(row, 2).values
    return float(top[0] - top[1])


def pair(args, tok) -> list[dict]:
    from specedge.edge.drafter import Drafter, TreeBuilder
    from specedge.edge.text import eos_ids, prompt_ids
    from specedge.execution import PackedRunner
    from specedge.execution.walk import commit
    from specedge.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_model
    from workers.verifier.engine import Engine
    from workers.verifier.state import SessionState
    from workers.verifier.validate import CheckedBlock

    target = load_model(DEFAULT_TARGET, dtype=torch.float32)
    draft = load_model(DEFAULT_DRAFT, dtype=torch.float32)
    eos = eos_ids(tok, target.config, getattr(target, "generation_config", None))
    eng = Engine(target)
    g = eng.grammars = Grammars(tok, eng.vocab_size)
    compiled = g.compile(SPEC, eos)
    runner = PackedRunner(draft)
    shape = TreeShape(budget=args.budget, depth=args.depth, width=args.width, topk=2)
    rows = []
    for pi, text in enumerate(PROMPTS):
        ids = prompt_ids(tok, text, chat=True)
        ref = _reference(target, ids, compiled, args.new, eos)
        for forced in (True, False):
            st = SessionState(f"s{pi}", Sampling(), 0, args.new, frozenset(eos), len(ids),
                              list(ids), grammar=SPEC)
            c = g.constraint(SPEC, eos)
            d = Drafter(runner)
            d.catch_up(ids[:-1])
            steps = rounds = 0
            t0 = time.perf_counter()
            while not st.finished:
                b = TreeBuilder(d, st.committed, shape, Sampling(), len(ids), c, forced=forced)
                tree = b.run()
                steps += b.steps
                blk = CheckedBlock(st.round, tree.tokens, tree.parents, tree.depths)
                (out,) = eng.verify([(st, blk)])
                new = [tree.tokens[i - 1] for i in out.walk.accepted] + [out.walk.next_token]
                toks, st.finished = commit(new, st.generated, args.new, frozenset(eos))
                d.rollback(tree, out.walk.accepted)
                st.committed += toks
                st.round += 1
                rounds += 1
            wall = time.perf_counter() - t0
            got = st.committed[len(ids):]
            n = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b),
                     min(len(got), len(ref)))
            same = got == ref
            body = tok.decode([t for t in got if t not in eos])
            try:
                json.loads(body)
                parsed = True
            except ValueError:
                parsed = False
            rows.append({"prompt": pi, "forced": forced, "tokens": len(got), "rounds": rounds,
                         "tokens_per_round": len(got) / rounds,
                         "draft_forwards_per_round": steps / rounds,
                         "wall_s": wall, "equals_generate": same,
                         "first_divergence": None if same else n,
                         "margin_there": None if same else _margin(target, ids, compiled,
                                                                   ref[:n]),
                         "complete_json": parsed, "text": body})
            st.kv.free()
            d.close()
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "text"}), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=("masks", "pair", "all"))
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "grammar")
    args = ap.parse_args()
    from specedge.models import DEFAULT_TARGET, load_tokenizer

    torch.set_num_threads(os.cpu_count() or 2)
    tok = load_tokenizer(DEFAULT_TARGET)
    res: dict = {"machine": machine("cpu", "float32"), "settings": vars(args) | {
        "out": str(args.out)}}
    lines = []
    if args.part in ("masks", "all"):
        m = res["masks"] = masks(args, tok)
        lines += [f"verifier grammar masks, {m['sessions']} sessions x {m['nodes']} nodes, "
                  f"vocab {m['vocab']}, median of {args.reps}", "",
                  markdown_table([m], ["walk_ms_round", "apply_ms", "round_ms",
                                       "replay_from_start_ms", "compile_ms"]), ""]
    if args.part in ("pair", "all"):
        rows = res["pair"] = pair(args, tok)
        lines += [f"real pair (1.5B/0.5B float32), greedy, JSON schema, tree budget "
                  f"{args.budget} depth {args.depth} width {args.width}", "",
                  markdown_table(rows, ["prompt", "forced", "tokens", "rounds",
                                        "tokens_per_round", "draft_forwards_per_round",
                                        "wall_s", "equals_generate", "complete_json"])]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
