"""python -m bench.conversations [--conversations 3] [--turns 6] [--out DIR]: multi-turn chat
with the prefix cache and without, in one run, with the real pair (or --synthetic).

Each conversation re-sends its whole history every turn, as chat clients do: a user message
of about --user-tokens tokens (Spec-Bench text) and the model's reply per turn, growing to
about 2,000 tokens by turn 6. The edge is `edge serve`'s own service (its draft cache and
its routing of a follow-up to the partition that served the previous turn); the verifier
runs in its own process on its own cores, once with its prefix cache and once with
--prefix-cache-tokens 0 (and the edge's --draft-cache-tokens 0). Several conversations run
at once. Reported per turn: prompt tokens, time to first token, prompt tokens the verifier
computed and took from its cache; per conversation: the verifier's prefill tokens. Greedy,
so the replies must be the same in both phases (checked); in bf16, forwards of different
shapes differ in their last bits, so a reply may part at a near-tie of the target's own
logits: where a conversation's replies first part, the target alone's top-2 margin there is
reported (the float64 tests hold the cache to exact equality).

Writes DIR/results.json and DIR/table.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench import pair as pairs
from bench.machine import machine
from bench.stack import Stack, markdown_table, pin_edge
from bench.workload import load
from schemas import Sampling
from specedge import broker, logs
from specedge.edge.api import EdgeService, Finish, GenRequest, ServeConfig
from specedge.models import load_model


def user_messages(tok, turns: int, tokens: int, offset: int) -> list[str]:
    """`turns` messages of about `tokens` tokens each: Spec-Bench prompts run together."""
    qs = load()
    text, i, out = "", offset, []
    while len(out) < turns:
        text += qs[i % len(qs)]["prompt"] + "\n\n"
        i += 1
        ids = tok(text)["input_ids"]
        if len(ids) >= tokens:
            out.append(tok.decode(ids[:tokens]))
            text = ""
    return out


async def conversation(service: EdgeService, tok, msgs: list[str], reply_tokens: int,
                       bar: tqdm) -> list[dict]:
    history: list[dict] = []
    turns = []
    for k, content in enumerate(msgs):
        history.append({"role": "user", "content": content})
        ids = list(tok.apply_chat_template(history, add_generation_prompt=True,
                                           tokenize=True)["input_ids"])
        req = GenRequest(ids, reply_tokens, Sampling(), 0, [], False, False)
        t0 = time.perf_counter()
        ttft, text, fin = None, "", None
        async for item in service.generate(req, service.session_id(ids)):
            if isinstance(item, Finish):
                fin = item
            else:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text += item.text
        history.append({"role": "assistant", "content": text})
        turns.append({"turn": k + 1, "prompt": ids, "prompt_tokens": len(ids), "ttft_s": ttft,
                      "verifier_cached": fin.cached_tokens,
                      "verifier_computed": len(ids) - fin.cached_tokens, "reply": text})
        bar.update()
    return turns


async def phase(url: str, draft, tok, convs: list[list[str]], a, cache: bool) -> list[list]:
    nc = await broker.connect(url, "bench-conversations")
    cfg = ServeConfig(model_id="bench", max_sessions=len(convs), emulate_rtt_ms=a.rtt_ms,
                      draft_cache_tokens=a.draft_cache_tokens if cache else 0,
                      verdict_timeout_s=600, give_up_s=600)
    service = EdgeService(nc, draft, tok, cfg)
    try:
        with tqdm(total=len(convs) * a.turns, desc="cache" if cache else "no cache",
                  unit="turn") as bar:
            return await asyncio.gather(*(conversation(service, tok, m, a.reply_tokens, bar)
                                          for m in convs))
    finally:
        service.close()
        await nc.close()


@torch.inference_mode()
def first_split(target, tok, c: list[dict], n: list[dict]) -> dict | None:
    """Where a conversation's replies with and without the cache first part (None: never):
    the turn, the token, both tokens, and the target alone's top-2 logit margin there."""
    for x, y in zip(c, n, strict=True):
        if x["reply"] == y["reply"]:
            continue
        a, b = tok(x["reply"])["input_ids"], tok(y["reply"])["input_ids"]
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        logits = target(torch.tensor([x["prompt"] + a[:i]])).logits[0, -1].float()
        top = logits.topk(2)
        return {"turn": x["turn"], "token": i, "cache": a[i] if i < len(a) else None,
                "no_cache": b[i] if i < len(b) else None, "target_top2": top.indices.tolist(),
                "margin": round(float(top.values[0] - top.values[1]), 4)}
    return None


def summary(results: list[list[dict]], turns: int) -> tuple[list[dict], dict]:
    per_turn = []
    for k in range(turns):
        rows = [c[k] for c in results]
        per_turn.append({"turn": k + 1,
                         "prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in rows)),
                         "ttft_s": statistics.mean(r["ttft_s"] for r in rows),
                         "verifier_computed": round(statistics.mean(
                             r["verifier_computed"] for r in rows)),
                         "verifier_cached": round(statistics.mean(
                             r["verifier_cached"] for r in rows))})
    prefill = [sum(t["verifier_computed"] for t in c) for c in results]
    return per_turn, {"verifier_prefill_tokens_per_conversation": statistics.mean(prefill),
                      "ttft_last_over_first": per_turn[-1]["ttft_s"] / per_turn[0]["ttft_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.conversations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    pairs.add_args(p)
    p.add_argument("--conversations", type=int, default=3)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--user-tokens", type=int, default=300)
    p.add_argument("--reply-tokens", type=int, default=24)
    p.add_argument("--draft-cache-tokens", type=int, default=32768)
    p.add_argument("--rtt-ms", type=float, default=15.0)
    p.add_argument("--out", default="bench/results/conversations")
    a = p.parse_args(argv)
    logs.configure("warning")
    vcores, _ = pin_edge()
    pair, draft, tok = pairs.resolve(a)
    convs = [user_messages(tok, a.turns, a.user_tokens, 7 * i) for i in range(a.conversations)]
    res: dict = {"machine": machine(pair.device, pair.dtype), "models": pair.record(),
                 "settings": vars(a)}
    for name, cache in (("cache", True), ("no_cache", False)):
        stack = Stack(vcores, ["--max-batch", "8"] + ([] if cache else
                                                      ["--prefix-cache-tokens", "0"]),
                      model=pair.target, device=pair.device, dtype=pair.dtype).start()
        try:
            results = asyncio.run(phase(stack.url, draft, tok, convs, a, cache))
        finally:
            stack.stop()
        per_turn, tot = summary(results, a.turns)
        res[name] = {"turns": per_turn, **tot, "conversations": results}
    c, n = res["cache"], res["no_cache"]
    res["same_replies"] = all(x["reply"] == y["reply"] for cx, cy in
                              zip(c["conversations"], n["conversations"], strict=True)
                              for x, y in zip(cx, cy, strict=True))
    splits = []
    if not res["same_replies"]:
        target = load_model(pair.target, dtype=pair.torch_dtype, device=pair.device)
        splits = [first_split(target, tok, cx, cy) for cx, cy in
                  zip(c["conversations"], n["conversations"], strict=True)]
    res["first_splits"] = splits
    for k in ("cache", "no_cache"):
        for conv in res[k]["conversations"]:
            for t in conv:
                del t["prompt"]
    res["prefill_saved"] = 1 - (c["verifier_prefill_tokens_per_conversation"]
                                / n["verifier_prefill_tokens_per_conversation"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    rows = [{"turn": t["turn"], "prompt_tokens": t["prompt_tokens"],
             "ttft_cache_s": t["ttft_s"], "ttft_no_cache_s": u["ttft_s"],
             "computed_cache": t["verifier_computed"], "cached": t["verifier_cached"],
             "computed_no_cache": u["verifier_computed"]}
            for t, u in zip(c["turns"], n["turns"], strict=True)]
    lines = [f"# bench.conversations ({pair.target} / {pair.draft}, {pair.device}, "
             f"{pair.dtype}; {a.conversations} conversations at once)", "",
             markdown_table(rows, list(rows[0])), "",
             markdown_table([{
                 "phase": k, "verifier_prefill_per_conversation":
                 res[k]["verifier_prefill_tokens_per_conversation"],
                 "ttft_last_over_first": res[k]["ttft_last_over_first"]}
                 for k in ("cache", "no_cache")],
                 ["phase", "verifier_prefill_per_conversation", "ttft_last_over_first"]),
             "", f"prefill saved by the cache: {res['prefill_saved']:.1%}; "
             f"same replies: {res['same_replies']}"]
    lines += [f"conversation {i}: the replies part at turn {s['turn']}, token {s['token']} "
              f"({s['cache']} vs {s['no_cache']}); the target alone's top-2 there: "
              f"{s['target_top2']}, margin {s['margin']}" for i, s in enumerate(splits) if s]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
