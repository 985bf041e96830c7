"""What an edge refuses before any work: the rule shared by `edge serve` and the CLI edge.

A session is admitted only if every verifier would accept it to the end, so a request the fleet
would refuse costs neither a draft forward nor a message. The limits are the strictest of

* the fleet's (specedge/fleet.py: the verifiers' effective limits, read from their board),
* this edge's own configuration (`--max-prompt-tokens`, `edge serve --max-tokens-limit`),
* the models' positions: the draft's `max_position_embeddings` and the fleet's max_positions.

With P prompt tokens, N new tokens and a draft tree D deep (0 for plain decoding):

1. 1 <= P <= max_prompt_tokens, and P + D <= positions (room for at least one new token);
2. N asked for: N <= max_new_tokens, and P + N - 1 + D <= positions
   (`config.positions_needed`: the last generated token is never forwarded);
   N left out: the edge's default, capped by max_new_tokens and by what fits;
3. the tree: depth <= max_depth and nodes <= max_nodes. The CLI refuses a shape beyond them;
   `edge serve` clamps its configured shape (a performance setting of the operator's, not
   something the request asked for), and adaptive budgets never exceed max_nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from specedge.config import Limits, TreeShape, positions_needed
from specedge.fleet import FleetLimits

DEFAULTS = Limits()  # the verifiers' defaults: the guess while no verifier has answered


class LimitError(ValueError):
    """A session the fleet would refuse. code/param follow OpenAI's error body; status is the
    HTTP status `edge serve` answers with."""

    def __init__(self, code: str, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.param, self.status = code, message, param, status


@dataclass(frozen=True)
class EdgeLimits:
    """This edge's own limits (its configuration). None: the fleet's."""

    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Plan:
    """What a session may run with once admitted."""

    max_new_tokens: int
    shape: TreeShape
    max_budget: int  # the most nodes an adaptive tree may grow to
    positions: int  # the context it must fit (0: unknown)


def _cap(own: int | None, own_flag: str, fleet: FleetLimits | None, field: str
         ) -> tuple[int, str]:
    """The smaller of this edge's limit and the fleet's, and who set it; the verifiers'
    default while neither is known."""
    caps = [(own, f"this edge's {own_flag}")] if own else []
    if fleet is not None:
        caps.append((getattr(fleet, field), f"the verifiers' {field}"))
    elif not caps:
        caps.append((getattr(DEFAULTS, field), f"the verifiers' default {field} (no verifier "
                     "has answered yet)"))
    return min(caps)


def _positions(draft_positions: int | None, fleet: FleetLimits | None) -> int:
    known = [p for p in (draft_positions, fleet.max_positions if fleet else 0) if p and p > 0]
    return min(known) if known else 0


def fit_shape(shape: TreeShape, max_budget: int, fleet: FleetLimits | None, *,
              clamp: bool) -> tuple[TreeShape, int]:
    """The tree shape and adaptive ceiling within the fleet's max_nodes/max_depth."""
    if fleet is None:
        return shape, max_budget
    if shape.budget > fleet.max_nodes or shape.depth > fleet.max_depth:
        if not clamp:
            raise LimitError("tree_too_large", f"the draft tree ({shape.budget} nodes, depth "
                             f"{shape.depth}) exceeds the verifiers' limits ({fleet.max_nodes} "
                             f"nodes, depth {fleet.max_depth}); pass --tree-budget <= "
                             f"{fleet.max_nodes} and --tree-depth <= {fleet.max_depth}",
                             param="tree")
        shape = TreeShape(min(shape.budget, fleet.max_nodes), min(shape.depth, fleet.max_depth),
                          shape.width, shape.topk)
    return shape, min(max_budget, fleet.max_nodes)


def check_pair(fleet: FleetLimits | None, tokenizer: str, draft_name: str) -> None:
    """The draft's tokenizer must be the verifiers' targets' (compared by fingerprint, where
    both are known): a mismatch would be garbage, refused before any work."""
    if fleet is None or not tokenizer or not fleet.tokenizers:
        return
    if set(fleet.tokenizers) != {tokenizer}:
        targets = ", ".join(fleet.models) or "the verifiers' target"
        raise LimitError("tokenizer_mismatch", f"{draft_name} has another tokenizer "
                         f"({tokenizer}) than {targets} ({', '.join(fleet.tokenizers)}); "
                         "draft and target must share one", param="model")


def plan(prompt_tokens: int, max_new_tokens: int | None, *, default_new_tokens: int,
         shape: TreeShape, max_budget: int, own: EdgeLimits, fleet: FleetLimits | None,
         draft_positions: int | None, draft_vocab: int | None = None, clamp_shape: bool = True,
         prompt_param: str = "prompt", new_param: str = "max_tokens",
         tokenizer: str = "", draft_name: str = "the draft") -> Plan:
    """Admit a session or raise LimitError (see the module's docstring for the rule)."""
    check_pair(fleet, tokenizer, draft_name)
    if fleet is not None and draft_vocab is not None and fleet.vocab_sizes and \
            set(fleet.vocab_sizes) != {draft_vocab}:
        raise LimitError("vocab_mismatch", f"the draft's vocabulary ({draft_vocab}) differs "
                         f"from the verifiers' {list(fleet.vocab_sizes)}", status=502)
    shape, max_budget = fit_shape(shape, max_budget, fleet, clamp=clamp_shape)
    depth = shape.depth if shape.budget > 0 else 0
    prompt_cap, prompt_by = _cap(own.max_prompt_tokens, "--max-prompt-tokens", fleet,
                                 "max_prompt_tokens")
    positions = _positions(draft_positions, fleet)
    if prompt_tokens < 1:
        raise LimitError("invalid_prompt", "the prompt is empty", param=prompt_param)
    if prompt_tokens > prompt_cap:
        raise LimitError("context_length_exceeded", f"the prompt has {prompt_tokens} tokens; "
                         f"{prompt_by} allows at most {prompt_cap}", param=prompt_param)
    lookahead = f" (the draft tree looks {depth} ahead)" if depth else ""
    if positions and positions_needed(prompt_tokens, 1, depth) > positions:
        raise LimitError("context_length_exceeded", f"This model's maximum context length is "
                         f"{positions} tokens; the prompt has {prompt_tokens}, which leaves no "
                         f"room for a completion{lookahead}", param=prompt_param)
    new_cap, new_by = _cap(own.max_new_tokens, "--max-tokens-limit", fleet, "max_new_tokens")
    room = positions - positions_needed(prompt_tokens, 0, depth) if positions else new_cap
    if max_new_tokens is None:
        n = max(1, min(default_new_tokens, new_cap, room))
    else:
        n = max_new_tokens
        if n < 1 or n > new_cap:
            raise LimitError("invalid_value", f"{new_param} is too large: {n}; {new_by} allows "
                             f"at most {new_cap} completion tokens" if n > new_cap else
                             f"{new_param} must be at least 1, got {n}", param=new_param)
        if n > room:
            raise LimitError("context_length_exceeded", f"This model's maximum context length "
                             f"is {positions} tokens. However, you requested "
                             f"{prompt_tokens + n} tokens ({prompt_tokens} in the prompt, {n} "
                             f"in the completion){lookahead}: at most {room} completion tokens "
                             f"fit. Please reduce the prompt or {new_param}.", param=new_param)
    return Plan(n, shape, max_budget, positions)
