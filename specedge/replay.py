"""python -m specedge.replay: debug any session after the fact, from the stream alone.

  --list                 recent sessions: start, models, tokens, rounds, state
  SESSION                the prompt, then per round: tree, accepted path, next token
                         (correction or bonus), proactive hit, timings, text so far; then
                         the session's speculation figures (specedge.edge.session.speculation)
  SESSION --json         the same as JSON lines
  SESSION --check --model TARGET
                         re-verify every round with the target from the log alone (same
                         seed, same rule, the verifier's own engine) and name the first
                         round whose verdict differs
  SESSION... --plot F    a timeline (.png or .html): a row per session and per verifier

Every timing comes from the messages (each side stamps what it did); edge and verifier
clocks are assumed synchronised (NTP), as they are on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import DraftBlock, SessionOpened, decode, unpack_ids
from specedge import broker, logs, subjects
from specedge.edge.session import speculation
from specedge.execution.tree import validate_parents
from specedge.sessionlog import SessionLog, read_session

ABANDONED_AFTER_S = 300.0


@dataclass
class RoundView:
    round: int
    nodes: int
    depth: int
    accepted: int
    next_token: int
    kind: str  # correction | bonus | cut (stopped at EOS or the token limit)
    tokens: list[int]
    proactive: bool  # this round's tree was drafted ahead, on a guess that came true
    guess: str  # the previous round's proactive guess: hit | miss | off
    draft_s: float
    proactive_s: float
    in_flight_s: float  # block published -> verdict published
    queued_s: float
    verify_s: float
    batch_size: int
    kv_hit: bool
    worker: str
    t_draft: float  # edge clock at publish
    t_verdict: float  # worker clock at publish
    text: str = ""
    # prompt tokens the verifier first took from its prefix cache in this round (a first
    # round, a rebuild that found more), instead of computing them (Verdict.cached_tokens)
    cached_tokens: int = 0
    dtype: str = ""  # the target's number format on the worker that judged it ("" unknown)
    # of nodes and accepted, those a suffix match proposed rather than the draft model
    suffix_nodes: int = 0
    suffix_accepted: int = 0


@dataclass
class SessionView:
    sid: str
    started: float
    target: str
    draft: str
    prompt: list[int]
    sampling: dict
    seed: int
    state: str
    rounds: list[RoundView] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rounds)

    @property
    def dtype(self) -> str:
        """The target's number format on the verifiers ("" where no verdict says)."""
        return next((r.dtype for r in self.rounds if r.dtype), "")

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens this session reused from a verifier's prefix cache (an earlier turn,
        a sibling choice, a shared system prompt) rather than prefilled."""
        return sum(r.cached_tokens for r in self.rounds)

    @property
    def speculation(self) -> dict:
        """The figures the API returns beside usage, from the log alone."""
        return speculation([(r.nodes, r.depth, r.accepted, len(r.tokens), r.suffix_nodes,
                             r.suffix_accepted) for r in self.rounds])


def _suffix_nodes(d: DraftBlock | None, n: int) -> set[int]:
    """The nodes a block marks as suffix-drafted (a malformed field or an id outside the
    tree marks nothing: the log is read, not trusted)."""
    if d is None:
        return set()
    try:
        return {i for i in unpack_ids(d.suffix) if 0 < i <= n}
    except ValueError:
        return set()


def view(slog: SessionLog, now: float | None = None) -> SessionView:
    o = slog.opened
    if o is None:
        raise SystemExit(f"session {slog.sid}: no SessionOpened in the log")
    drafts = slog.drafts()
    rounds = []
    for v in slog.verdicts():
        d = drafts.get(v.round)
        parents = unpack_ids(d.parents) if d else []
        toks = unpack_ids(v.tokens)
        acc = unpack_ids(v.accepted)
        cut = len(toks) < len(acc) + 1
        # nodes the edge marked as suffix-drafted (ids outside the tree are ignored)
        suffix = _suffix_nodes(d, len(parents))
        rounds.append(RoundView(
            round=v.round, nodes=len(parents), depth=max(validate_parents(parents), default=0),
            accepted=len(acc), next_token=v.next_token,
            kind="cut" if cut else ("bonus" if v.bonus else "correction"), tokens=toks,
            proactive=bool(d and d.timings.proactive), guess=d.timings.guess if d else "",
            draft_s=d.timings.draft_s if d else 0.0,
            proactive_s=d.timings.proactive_s if d else 0.0,
            in_flight_s=(v.t - d.t) if d else 0.0, queued_s=v.timings.queued_s,
            verify_s=v.timings.verify_s, batch_size=v.timings.batch_size,
            kv_hit=v.timings.kv_hit, worker=v.worker, t_draft=d.t if d else 0.0,
            t_verdict=v.t, cached_tokens=v.cached_tokens, dtype=v.dtype,
            suffix_nodes=len(suffix), suffix_accepted=sum(i in suffix for i in acc)))
    now = now or time.time()
    last = max([o.t] + [r.t_verdict for r in rounds])
    if slog.closed is not None or (rounds and slog.verdicts()[-1].finished):
        state = "closed"
    elif now - last > ABANDONED_AFTER_S:
        state = "abandoned"
    else:
        state = "open"
    return SessionView(slog.sid, o.t, o.target, o.draft, unpack_ids(o.prompt),
                       {"temperature": o.sampling.temperature, "top_p": o.sampling.top_p,
                        "top_k": o.sampling.top_k} | msgspec.to_builtins(o.sampling), o.seed,
                       state, rounds)


def attach_text(sv: SessionView, tokenizer) -> None:
    ids: list[int] = []
    for r in sv.rounds:
        ids += r.tokens
        r.text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer else ""


def load_tokenizer_for(sv: SessionView, ref: str | None):
    from specedge.models import load_tokenizer

    for cand in [ref, sv.draft, sv.target]:
        if not cand:
            continue
        try:
            return load_tokenizer(cand)
        except Exception:
            continue
    return None


# -- listing ----------------------------------------------------------------------------


async def list_sessions(js, limit: int = 50) -> list[SessionView]:
    """Sessions opened most recently (by their SessionOpened), newest first."""
    sub = await js.pull_subscribe("", stream=subjects.STREAM, config=ConsumerConfig(
        filter_subject=subjects.all_sessions(), ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0, mem_storage=True))
    sids: list[str] = []
    try:
        pending = (await sub.consumer_info()).num_pending
        while pending > 0:
            for m in await sub.fetch(batch=min(pending, 512), timeout=5):
                pending = m.metadata.num_pending
                try:
                    if isinstance(decode(m.data), SessionOpened):
                        sids.append(subjects.sid_of(m.subject))
                except Exception:
                    continue
    finally:
        await sub.unsubscribe()
    out = []
    for sid in reversed(sids[-limit:]):
        out.append(view(await read_session(js, sid)))
    return out


# -- re-verification --------------------------------------------------------------------


@dataclass
class CheckResult:
    rounds: int
    first_mismatch: int | None
    detail: str


def check(slog: SessionLog, model) -> CheckResult:
    """Re-verify each logged round with the verifier's engine, from the log alone."""
    from workers.verifier.engine import Engine
    from workers.verifier.state import SessionState
    from workers.verifier.validate import CheckedBlock

    o = slog.opened
    eng = Engine(model, prefix_cache_tokens=0)  # one session: nothing to share
    st = SessionState.from_opened(slog.sid, o)  # its sampling, penalties and bias included
    drafts = slog.drafts()
    from specedge.execution.walk import commit

    verdicts = slog.verdicts()
    for v in verdicts:
        d: DraftBlock | None = drafts.get(v.round)
        if d is None:
            return CheckResult(len(verdicts), v.round, "no draft block logged for this round")
        toks, parents = unpack_ids(d.tokens), unpack_ids(d.parents)
        blk = CheckedBlock(v.round, toks, parents, validate_parents(parents))
        (out,) = eng.verify([(st, blk)])
        new = [toks[i - 1] for i in out.walk.accepted] + [out.walk.next_token]
        mine, finished = commit(new, st.generated, st.max_new_tokens, st.eos_ids)
        logged = unpack_ids(v.tokens)
        if (out.walk.accepted != unpack_ids(v.accepted) or mine != logged
                or out.walk.next_token != v.next_token):
            return CheckResult(len(verdicts), v.round,
                               f"round {v.round}: logged accepted {unpack_ids(v.accepted)} "
                               f"tokens {logged}; re-verified accepted {out.walk.accepted} "
                               f"tokens {mine}")
        st.committed += logged
        st.round += 1
    return CheckResult(len(verdicts), None, f"all {len(verdicts)} rounds match")


# -- plotting ---------------------------------------------------------------------------

COLORS = {"drafting": "#4C72B0", "proactive": "#8FB8E0", "in flight": "#DDDDDD",
          "queued": "#F2B134", "verifying": "#C44E52"}


def segments(views: list[SessionView]) -> tuple[list[str], list[tuple[int, float, float, str]]]:
    """Rows (sessions, then verifiers) and (row, start, end, kind) bars in seconds from t0."""
    t0 = min(v.started for v in views)
    workers = sorted({r.worker for v in views for r in v.rounds if r.worker})
    rows = [f"session {v.sid[:8]}" for v in views] + [f"verifier {w}" for w in workers]
    bars: list[tuple[int, float, float, str]] = []
    batches: set[tuple[str, float]] = set()
    for i, v in enumerate(views):
        prev_verdict = v.started
        for r in v.rounds:
            td = r.t_draft - t0
            if r.proactive_s:
                bars.append((i, prev_verdict - t0 - r.proactive_s, prev_verdict - t0, "proactive"))
            bars.append((i, td - r.draft_s, td, "drafting"))
            v_start = r.t_verdict - r.verify_s - t0
            q_start = max(td, v_start - r.queued_s)
            bars.append((i, td, q_start, "in flight"))
            bars.append((i, q_start, v_start, "queued"))
            bars.append((i, v_start, r.t_verdict - t0, "verifying"))
            batches.add((r.worker, round(v_start, 4), round(r.t_verdict - t0, 4)))
            prev_verdict = r.t_verdict
    for w, s, e in batches:
        if w:
            bars.append((len(views) + workers.index(w), s, e, "verifying"))
    return rows, bars


def plot(views: list[SessionView], path: str) -> None:
    rows, bars = segments(views)
    if path.endswith(".html"):
        end = max(e for _, _, e, _ in bars) or 1.0
        scale = 1000.0 / end
        parts = ["<!doctype html><meta charset=utf-8><title>specedge timeline</title>",
                 "<style>body{font:13px sans-serif}.row{position:relative;height:22px;"
                 "border-bottom:1px solid #eee;margin-left:170px}.lab{position:absolute;"
                 "left:-170px;width:165px;text-align:right}.b{position:absolute;top:3px;"
                 "height:16px}</style><h3>specedge timeline (seconds)</h3>"]
        for i, name in enumerate(rows):
            parts.append(f"<div class=row><span class=lab>{html.escape(name)}</span>")
            for r, s, e, kind in bars:
                if r == i and e > s:
                    parts.append(f"<div class=b title='{kind} {s:.3f}-{e:.3f}s' style='left:"
                                 f"{s * scale:.1f}px;width:{max(1.0, (e - s) * scale):.1f}px;"
                                 f"background:{COLORS[kind]}'></div>")
            parts.append("</div>")
        parts.append("<p>" + " ".join(f"<span style='background:{c}'>&nbsp;&nbsp;&nbsp;</span> "
                                      f"{k}" for k, c in COLORS.items()) + "</p>")
        with open(path, "w") as f:
            f.write("\n".join(parts))
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(12, 0.5 * len(rows) + 1.5))
    for r, s, e, kind in bars:
        if e > s:
            ax.barh(len(rows) - 1 - r, e - s, left=s, height=0.7, color=COLORS[kind])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(reversed(rows)))
    ax.set_xlabel("seconds since the first session opened")
    ax.set_title("specedge timeline: gaps on a verifier row are server bubbles")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(COLORS), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- CLI --------------------------------------------------------------------------------


def print_session(sv: SessionView, tokenizer, out=sys.stdout) -> None:
    prompt = tokenizer.decode(sv.prompt) if tokenizer else str(sv.prompt)
    dtype = f" ({sv.dtype})" if sv.dtype else ""
    print(f"session {sv.sid} ({sv.state}) target={sv.target}{dtype} draft={sv.draft} "
          f"sampling={sv.sampling} seed={sv.seed}", file=out)
    print(f"prompt ({len(sv.prompt)} tokens, {sv.cached_tokens} reused from the verifier's "
          f"prefix cache):\n{prompt}\n", file=out)
    print(" rnd nodes depth acc next       kind  pro  draft_ms in_flight queued verify batch "
          "worker", file=out)
    for r in sv.rounds:
        print(f"{r.round:4d} {r.nodes:5d} {r.depth:5d} {r.accepted:3d} {r.next_token:7d} "
              f"{r.kind:>10} {r.guess or '-':>4} {r.draft_s * 1000:8.1f} "
              f"{r.in_flight_s * 1000:9.1f} {r.queued_s * 1000:6.1f} {r.verify_s * 1000:6.1f} "
              f"{r.batch_size:5d} {r.worker}", file=out)
        if r.text:
            print(f"      | {r.text[-100:]!r}", file=out)
    sp = sv.speculation
    print(f"\n{sv.tokens} tokens in {sp['rounds']} rounds: {sp['tokens_per_round']:.2f} "
          f"tokens/round, {sp['accepted_tokens']} of {sp['draft_tokens']} drafted tokens "
          f"accepted, acceptance {sp['acceptance']:.3f}", file=out)
    by = sp["accepted_by_source"]
    if sp["draft_tokens_by_source"]["suffix"]:
        print(f"accepted by source: draft model {by['model']} of "
              f"{sp['draft_tokens_by_source']['model']}, suffix match {by['suffix']} of "
              f"{sp['draft_tokens_by_source']['suffix']}", file=out)


async def amain(a: argparse.Namespace) -> int:
    nc = await broker.connect(a.nats, "replay")
    js = nc.jetstream()
    try:
        if a.list:
            for sv in await list_sessions(js, a.limit):
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sv.started))
                print(f"{sv.sid}  {started}  {sv.state:9}  {sv.tokens:5d} tokens "
                      f"{len(sv.rounds):4d} rounds  {sv.cached_tokens:5d} cached  "
                      f"{sv.target} / {sv.draft}")
            return 0
        if not a.sessions:
            print("give a SESSION id, or --list", file=sys.stderr)
            return 2
        logs_ = [await read_session(js, sid) for sid in a.sessions]
    finally:
        await nc.close()
    views = [view(sl) for sl in logs_]
    if a.plot:
        plot(views, a.plot)
        print(f"timeline written to {a.plot}", file=sys.stderr)
    if a.check:
        from specedge.cli import DTYPES
        from specedge.devices import pick
        from specedge.models import load_model

        dtype = a.dtype if a.dtype != "logged" else views[0].dtype or "bfloat16"
        model = load_model(a.model or views[0].target, dtype=DTYPES[dtype],
                           device=pick(a.device))
        rc = 0
        for sl in logs_:
            res = check(sl, model)
            print(f"{sl.sid}: {res.detail}")
            rc |= res.first_mismatch is not None
        return rc
    if a.plot:
        return 0
    for sv in views:
        tok = None if a.no_text else load_tokenizer_for(sv, a.tokenizer)
        attach_text(sv, tok)
        if a.json:
            head = {k: val for k, val in asdict(sv).items() if k != "rounds"}
            print(json.dumps({"session": head | {"dtype": sv.dtype}} | {"tokens": sv.tokens,
                                                  "cached_tokens": sv.cached_tokens,
                                                  "speculation": sv.speculation}))
            for r in sv.rounds:
                print(json.dumps(asdict(r)))
        else:
            print_session(sv, tok)
    return 0


def parse(argv=None) -> argparse.Namespace:
    import os

    p = argparse.ArgumentParser(prog="python -m specedge.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sessions", nargs="*", metavar="SESSION")
    p.add_argument("--nats", default=os.environ.get("SPECEDGE_NATS"), required=False)
    p.add_argument("--list", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.add_argument("--check", action="store_true")
    p.add_argument("--model", default=None, help="target for --check (default: the logged one)")
    from specedge.cli import DTYPES

    p.add_argument("--device", default="cpu", help="where --check runs the target: cpu, cuda")
    p.add_argument("--dtype", default="logged", choices=["logged", *sorted(DTYPES)],
                   help="the target's dtype for --check (logged: the verifiers' own, which "
                        "their verdicts carry, to compare bits; bfloat16 for older logs)")
    p.add_argument("--tokenizer", default=None, help="for the text (default: the logged draft)")
    p.add_argument("--no-text", action="store_true", help="skip decoding text")
    p.add_argument("--plot", default=None, metavar="FILE", help="timeline: .png or .html")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    if not a.nats:
        p.error("no broker: pass --nats URL or set SPECEDGE_NATS")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    logs.configure(a.log_level)
    return asyncio.run(amain(a))


if __name__ == "__main__":
    sys.exit(main())

