"""The flags `python -m specedge.edge` and `python -m specedge.edge serve` share: the
generation defaults and the draft tree's shape. Both entry points import them from here, so
neither imports the other."""

from __future__ import annotations

import argparse
import os

from specedge import subjects
from specedge.config import SUFFIX, SuffixConfig, TreeShape, is_suffix, suffix_shape
from specedge.edge.corpus import BUILTIN, corpus_ref

# specedge.edge.proactive.Mode's values (a test keeps them equal): that module pulls in the
# model code, and the demo parses these flags before it starts its verifier, whose own imports
# then run beside the demo's
PROACTIVE_MODES = ("off", "single", "multi")

# A lone session's prefill chunk: nobody shares its draft model, so chunks only bound how long
# a stop signal waits for the forward in progress.
LONE_PREFILL_CHUNK = 512


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edge-name", default=os.environ.get("SPECEDGE_EDGE", subjects.ANON),
                   help="this edge's name: its broker user's subjects are specedge.*.<name>.* "
                        "($SPECEDGE_EDGE; default anon, for an unauthenticated broker)")
    p.add_argument("--prompt", default="Write a Python function that checks whether a number "
                   "is prime, with a short docstring.")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the model's chat template (default on)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="refuse longer prompts (default: the verifier fleet's limit, read from "
                        "its limits board; the models' positions always apply)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line with the result")
    d = TreeShape()
    p.add_argument("--tree-budget", type=int, default=d.budget,
                   help="draft tree nodes (0: plain decoding, no draft model forwards)")
    p.add_argument("--tree-depth", type=int, default=d.depth, help="deepest draft node")
    p.add_argument("--tree-width", type=int, default=d.width, help="nodes added per draft step")
    p.add_argument("--tree-topk", type=int, default=d.topk, help="children considered per node")
    p.add_argument("--chain", type=int, default=None,
                   help="draft a chain of this length instead of a tree")
    p.add_argument("--proactive", choices=PROACTIVE_MODES, default="single",
                   help="draft the next round while this one is verified: off, single guess, "
                        "or multi (the top few guesses)")
    p.add_argument("--first-tree", action=argparse.BooleanOptionalAction, default=True,
                   help="draft a tree in the first round too (default on); --no-first-tree "
                        "sends the prompt alone first: the first token comes after the "
                        "target's prefill only, and the draft prefills while the verifier "
                        "works (after it, with --proactive off)")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="resize the tree to the budget the verifiers suggest from their load "
                        "(default on); --no-adaptive keeps --tree-budget fixed")
    p.add_argument("--max-tree-budget", type=int, default=16,
                   help="the most nodes an adaptive tree may grow to")
    p.add_argument("--emulate-rtt-ms", type=float, default=0.0,
                   help="add this round trip (half each way) to publishes and verdicts")
    p.add_argument("--give-up-s", type=float, default=60.0,
                   help="give up once the broker has been out of reach this long (publishes "
                        "unacknowledged, the connection down; a silent link is noticed within "
                        "about 6 s): the CLI exits 5, `edge serve` fails the request with a 503")
    p.add_argument("--verdict-timeout-s", type=float, default=30.0,
                   help="the longest wait for a verdict before the edge looks for it in the "
                        "stream and re-publishes its block (the wait is 5 measured round "
                        "times, at least 3 s; this long for the first round)")
    p.add_argument("--suffix-draft", type=suffix_min_match, default=SuffixConfig().min_match,
                   metavar="N|off",
                   help="with a draft model: add branches continuing the longest match of the "
                        "context's tail in the prompt, the answer so far and this tenant's "
                        "earlier requests when it is at least N tokens long, under the same "
                        "tree budget (default %(default)s; off or 0: the model's tree alone). "
                        f"`--model {SUFFIX}` drafts from such matches alone, with no model")
    p.add_argument("--suffix-corpus", type=corpus_ref, default=BUILTIN, metavar="builtin|off|FILE",
                   help=f"with `--model {SUFFIX}`: public text the drafts also match, shared "
                        "by every tenant: `builtin` (default), the prose the default target "
                        "wraps its code in, from its answers to public code-editing requests; "
                        'a file (JSON {"texts": [...]} or plain text); or off. A draft model '
                        "writes such phrases itself: merged drafts do not use it")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prompt tokens per draft forward while prefilling: other sessions "
                        "sharing the draft model wait at most one such forward, and a "
                        "cancelled session stops between them (0: edge serve measures its "
                        "draft model's knee at start-up; a lone session uses "
                        f"{LONE_PREFILL_CHUNK})")


def suffix_min_match(value: str) -> int:
    """--suffix-draft: a match length, or off."""
    if value.strip().lower() in ("off", "no", "false"):
        return 0
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a match length or off, got {value!r}") \
            from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a match length is >= 0 (0: off), got {n}")
    return n


def draft_ref(a: argparse.Namespace) -> str:
    """The draft model flag's value (--model; the demo's --draft)."""
    return getattr(a, "model", None) or getattr(a, "draft", "")


def shape_from(a: argparse.Namespace) -> TreeShape:
    if a.chain:
        shape = TreeShape.chain(a.chain)
    else:
        shape = TreeShape(a.tree_budget, a.tree_depth, a.tree_width, a.tree_topk).check()
    if is_suffix(draft_ref(a)):  # no model: a copied span is a chain, as deep as allowed
        return suffix_shape(shape, a.max_tree_budget)
    return shape
