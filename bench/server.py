"""Server-only baselines, run in one process on the verifier's cores.

- `ar`: autoregressive decoding with continuous batching, through the verifier's own Engine
  (one packed forward per step; a session's block is its root alone, so a step commits one
  token per session; prompts are prefilled inside the same forwards as other sessions' steps).
- `server-spec`: draft and target on the server: a draft chain for every live session in
  batched draft forwards, then the same Engine verifies all of them in one forward.
- `hf-assisted`: transformers' `generate(assistant_model=...)`, one prompt at a time.

No network is crossed per token here (that is the point of server-only serving); the emulated
round trip is charged once, to the time to first token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from schemas import Sampling
from specedge.devices import synchronize
from specedge.edge.drafter import Drafter, DraftTree
from specedge.execution import PackedRunner
from specedge.execution.walk import commit
from workers.verifier.engine import Engine
from workers.verifier.state import SessionState
from workers.verifier.validate import CheckedBlock


@dataclass
class Live:
    q: dict
    st: SessionState
    t_arrive: float
    drafter: Drafter | None = None
    t_first: float | None = None
    t_last: float = 0.0
    itl: list[float] = field(default_factory=list)
    rounds: int = 0
    accepted: int = 0
    drafted: int = 0
    index: int = 0  # position in the job list: results come back in job order


@dataclass
class ServerRun:
    sessions: list[dict]
    busy_s: float
    wall_s: float
    batch_sizes: list[int]


def _record(lv: Live, rtt_s: float) -> dict:
    return {"category": lv.q["category"], "tokens": lv.st.generated, "rounds": lv.rounds,
            "accepted": lv.accepted, "drafted": lv.drafted, "itl": lv.itl,
            "ttft_s": (lv.t_first or lv.t_last) - lv.t_arrive + rtt_s, "hits": 0, "judged": 0,
            "token_ids": lv.st.committed[lv.st.prompt_len:]}


def _draft_chains(runner: PackedRunner, live: list[Live], length: int) -> list[DraftTree]:
    """A greedy draft chain per session, `length` batched draft forwards for all of them."""
    trees = [DraftTree(root=lv.st.committed[-1], committed_len=len(lv.st.committed))
             for lv in live]
    logits = runner.forward([lv.drafter.catch_up_segment(lv.st.committed) for lv in live])
    for k in range(1, length + 1):
        for tr, lg in zip(trees, logits, strict=True):
            tr.tokens.append(int(lg[-1].argmax()))
            tr.parents.append(k - 1)
            tr.depths.append(k)
        if k == length:
            break
        segs = []
        for lv, tr in zip(live, trees, strict=True):
            tr.forwarded = k - 1
            segs.append(lv.drafter.nodes_segment(tr, [k]))
        logits = runner.forward(segs)
        for tr in trees:
            tr.forwarded = k
    return trees


def run_batched(kind: str, target, draft, jobs: list[tuple[dict, list[int]]], edges: int,
                sampling: Sampling, max_new_tokens: int, eos: tuple[int, ...],
                chain: int = 4, rtt_s: float = 0.0, progress=None) -> ServerRun:
    """`edges` sessions live at a time, each new one admitted as one finishes."""
    engine = Engine(target)
    druns = PackedRunner(draft) if kind == "server-spec" else None
    queue, live, done, sizes = list(jobs), [], [], []
    t0 = time.perf_counter()
    busy = 0.0
    n = 0
    with torch.inference_mode():
        while queue or live:
            while queue and len(live) < edges:
                q, ids = queue.pop(0)
                n += 1
                st = SessionState(f"s{n}", sampling, n, max_new_tokens, frozenset(eos), len(ids),
                                  list(ids))
                live.append(Live(q, st, time.perf_counter(),
                                 Drafter(druns) if druns else None, index=n))
            t_step = time.perf_counter()
            if druns:
                trees = _draft_chains(druns, live, chain)
                blocks = [CheckedBlock(lv.st.round, tr.tokens, tr.parents, tr.depths)
                          for lv, tr in zip(live, trees, strict=True)]
            else:
                trees = [None] * len(live)
                blocks = [CheckedBlock(lv.st.round, [], [], []) for lv in live]
            outs = engine.verify([(lv.st, b) for lv, b in zip(live, blocks, strict=True)])
            synchronize(target.device)
            sizes.append(len(live))
            now = time.perf_counter()
            busy += now - t_step
            keep = []
            for lv, b, tr, out in zip(live, blocks, trees, outs, strict=True):
                res = out.walk
                new = [b.tokens[i - 1] for i in res.accepted] + [res.next_token]
                toks, finished = commit(new, lv.st.generated, lv.st.max_new_tokens,
                                        lv.st.eos_ids)
                lv.st.committed.extend(toks)
                lv.st.round += 1
                lv.rounds += 1
                lv.accepted += len(res.accepted)
                lv.drafted += len(b.tokens)
                if tr is not None:
                    lv.drafter.rollback(tr, res.accepted)
                if lv.t_first is None:
                    lv.t_first = now
                    lv.itl += [(now - lv.t_arrive) / max(len(toks) - 1, 1)] * (len(toks) - 1)
                else:
                    lv.itl += [(now - lv.t_last) / max(len(toks), 1)] * len(toks)
                lv.t_last = now
                if finished:
                    lv.st.kv.free()
                    if lv.drafter is not None:
                        lv.drafter.close()
                    done.append((lv.index, _record(lv, rtt_s)))
                    if progress:
                        progress.update()
                else:
                    keep.append(lv)
            live = keep
    done.sort(key=lambda x: x[0])
    return ServerRun([r for _, r in done], busy, time.perf_counter() - t0, sizes)


class _Clock:
    """A generate() streamer that timestamps each burst of new tokens."""

    def __init__(self):
        self.times: list[tuple[float, int]] = []
        self._prompt = True

    def put(self, value) -> None:
        if self._prompt:  # the first put is the prompt
            self._prompt = False
            return
        self.times.append((time.perf_counter(), int(value.numel())))

    def end(self) -> None:
        pass


def run_hf_assisted(target, draft, jobs: list[tuple[dict, list[int]]], sampling: Sampling,
                    max_new_tokens: int, eos: tuple[int, ...], rtt_s: float = 0.0,
                    progress=None) -> ServerRun:
    done = []
    t0 = time.perf_counter()
    for i, (q, ids) in enumerate(jobs):
        clock = _Clock()
        torch.manual_seed(i)
        kw = {"do_sample": True, "temperature": sampling.temperature,
              "top_p": sampling.top_p} if sampling.temperature > 0 else {"do_sample": False}
        t_start = time.perf_counter()
        x = torch.tensor([ids], device=target.device)
        with torch.inference_mode():
            out = target.generate(x, attention_mask=torch.ones_like(x), assistant_model=draft,
                                  max_new_tokens=max_new_tokens, eos_token_id=list(eos),
                                  pad_token_id=eos[0], streamer=clock, **kw)
        gen = out[0, len(ids):].tolist()
        itl, prev = [], None
        for t, k in clock.times:
            if prev is None:
                itl += [(t - t_start) / max(k - 1, 1)] * (k - 1)
            else:
                itl += [(t - prev) / k] * k
            prev = t
        first = clock.times[0][0] if clock.times else time.perf_counter()
        done.append({"category": q["category"], "tokens": len(gen), "rounds": len(clock.times),
                     "accepted": None, "drafted": None, "itl": itl,
                     "ttft_s": first - t_start + rtt_s, "hits": 0, "judged": 0,
                     "token_ids": gen})
        if progress:
            progress.update()
    wall = time.perf_counter() - t0
    return ServerRun(done, wall, wall, [1] * sum(s["rounds"] for s in done))


def main(argv=None) -> int:
    """python -m bench.server SPEC.json OUT.json: run the server-only jobs of a benchmark in
    this process (the caller pins it to the verifier's cores)."""
    import json
    import sys

    from tqdm import tqdm

    from bench.report import summarize
    from specedge import logs
    from specedge.models import load_model

    spec_path, out_path = (argv or sys.argv[1:])[:2]
    spec = json.loads(open(spec_path).read())
    logs.configure("warning")
    torch.set_num_threads(spec["threads"])
    kw = {"dtype": spec.get("dtype", "auto"), "device": spec.get("device", "cpu")}
    target, draft = load_model(spec["target"], **kw), load_model(spec["draft"], **kw)
    eos = tuple(spec["eos"])
    # warm-up, excluded: a short run of each kind
    warm = [tuple(spec["jobs"][0]["jobs"][0])]
    for kind in ("ar", "server-spec"):
        run_batched(kind, target, draft, warm, 1, Sampling(), 4, eos, spec["chain"])
    rows = []
    bar = tqdm(total=sum(len(j["jobs"]) for j in spec["jobs"]), desc="server-only sessions",
               file=sys.stderr)
    for j in spec["jobs"]:
        jobs = [(q, ids) for q, ids in j["jobs"]]
        sampling = Sampling(temperature=j["temperature"], top_p=spec["top_p"])
        rtt_s = spec["rtt_ms"] / 1000
        if j["config"] == "hf-assisted":
            run = run_hf_assisted(target, draft, jobs, sampling, spec["max_new_tokens"], eos,
                                  rtt_s, bar)
        else:
            run = run_batched(j["config"], target, draft, jobs, j["edges"], sampling,
                              spec["max_new_tokens"], eos, spec["chain"], rtt_s, bar)
        row = summarize(j["config"], j["edges"], j["temperature"], run.sessions, run.busy_s,
                        run.wall_s, run.batch_sizes, spec["max_batch"], prices=spec["prices"],
                        budget=None)
        row["outputs"] = [s["token_ids"] for s in run.sessions]
        rows.append(row)
    bar.close()
    open(out_path, "w").write(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
