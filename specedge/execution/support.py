"""Which models the packed execution runs exactly, decided when a model is loaded.

The packed forward replaces each attention layer through transformers' attention interface
and keeps one KV cache per layer in the pool. That is exact for any causal LM whose layers are
attention layers reaching that interface, whatever their windows, chunks, soft-caps or sinks
(plan.py, attention.py, flex.py), and layers with recurrent or convolution state that read
it through transformers' cache calls (gated delta rule, Mamba-2, short convolutions: run on
each row's path by their own code, recurrent.py). It cannot be exact for a stateful layer of
another kind, for attention that never calls the interface (its own mask, ALiBi, ...), or for
attention that depends on a row's place in the packed batch rather than its position. Those
are refused here, in one line naming the model and the reason, never run:

1. by the config, before anything is allocated (`check_config`);
2. by a start-up probe (`probe_model`): one prompt and a draft tree on it through the packed
   path, against the model's own eager forward of the same paths, counting the attention
   calls against the model's layers.
"""

from __future__ import annotations

import structlog
import torch

from specedge.execution.plan import LayerAttention, MaskKind, Segment
from specedge.execution.recurrent import RECURRENT_TYPES, STATELESS_TYPES

log = structlog.get_logger(__name__)
ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
PROBE_PROMPT = 10
PROBE_CHAIN = 5  # tree nodes on the prompt's own continuation (plus one decoy branch)
PROBE_ROWS = 3  # the prompt's last rows compared (logits cost a vocabulary-wide matmul each)
PROBE_FORWARDS = 3  # model forwards the probe runs: two packed, one reference (attention)
PROBE_CONTINUED = 4  # with stateful layers the prompt's last tokens run as a forward of their own
# |packed - eager| allowed, relative to the largest logit: eager attention takes its softmax
# in float32 whatever the dtype, and bf16 kernels of different batch shapes differ in the last
# bits; a wrong mask or position differs by much more
TOLERANCE = {torch.float64: 2e-6, torch.float32: 1e-3, torch.bfloat16: 6e-2,
             torch.float16: 2e-2}


class UnsupportedModel(ValueError):
    """A model the packed execution cannot run exactly; the message is one line."""

    exit_code = 2


def model_name(config) -> str:
    path = getattr(config, "_name_or_path", "") or ""
    kind = getattr(config, "model_type", "?")
    return f"{path} ({kind})" if path else kind


def refuse(config, why: str) -> UnsupportedModel:
    text = " ".join(why.split())  # one line, whatever the cause's text holds
    return UnsupportedModel(f"model {model_name(config)} is not supported: {text}")


def check_config(config) -> dict[int, MaskKind]:
    """Each layer's mask kind as the config declares it (layer types); raises
    UnsupportedModel for what the config shows cannot be run exactly."""
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_causal", True) is False:
        raise refuse(config, "not a causal decoder (bidirectional or encoder-decoder attention)")
    types = list(getattr(config, "layer_types", None) or [])
    other = sorted(set(types) - ATTENTION_LAYERS - RECURRENT_TYPES - STATELESS_TYPES)
    if other:
        raise refuse(config, f"it has {', '.join(other)} layers, whose recurrent or "
                             "convolution state the packed KV cache does not keep")
    if getattr(config, "alibi", False) or getattr(config, "model_type", "") in ("bloom", "mpt"):
        raise refuse(config, "ALiBi position biases are applied outside the attention interface")
    if getattr(config, "attn_temperature_tuning", False) and 0 in (
            getattr(config, "no_rope_layers", None) or []):
        raise refuse(config, "position-dependent attention scaling (attn_temperature_tuning on "
                             "its NoPE layers) is computed from the row's place in the batch")
    for params in _rope_parameters(config):
        kind = params.get("rope_type") or params.get("type")
        switch = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None)
        if kind in ("dynamic", "longrope") and switch and \
                switch < getattr(config, "max_position_embeddings", 0):
            raise refuse(config, f"its RoPE scaling '{kind}' takes its frequencies from the "
                                 f"longest sequence in a forward (past {switch} positions), so "
                                 "sessions packed together would change each other's")
    kinds: dict[int, MaskKind] = {}
    for i, t in enumerate(types):
        if t == "sliding_attention":
            kinds[i] = (getattr(config, "sliding_window", None), None)
        elif t == "chunked_attention":
            kinds[i] = (None, getattr(config, "attention_chunk_size", None))
    return kinds


def check_recurrent(model, stateful: list[int]) -> list[int]:
    """`stateful`: the layers whose modules keep state through the cache calls (recurrent.py);
    raises UnsupportedModel if a layer the config declares stateful has no such module (its
    state would be lost between forwards)."""
    cfg = model.config
    types = list(getattr(cfg, "layer_types", None) or [])
    lost = sorted({t for i, t in enumerate(types) if t in RECURRENT_TYPES and i not in stateful})
    if lost:
        raise refuse(cfg, f"it has {', '.join(lost)} layers, whose recurrent or convolution "
                          "state is kept outside transformers' cache calls")
    return stateful


def attention_layers(config) -> list[int]:
    """The layers that call the attention interface: all but recurrent-only and MLP-only
    layers (by the config's layer types)."""
    n = config.num_hidden_layers
    types = list(getattr(config, "layer_types", None) or [])
    if len(types) != n:
        return list(range(n))
    return [i for i, t in enumerate(types) if t not in STATELESS_TYPES
            and t not in RECURRENT_TYPES - {"hybrid"}]


def _rope_parameters(config) -> list[dict]:
    """The config's RoPE parameter sets (one, or one per layer type)."""
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rp, dict):
        return []
    if "rope_type" in rp or "type" in rp:
        return [rp]
    return [v for v in rp.values() if isinstance(v, dict)]


def _probe_ids(vocab: int) -> tuple[list[int], int]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (PROBE_PROMPT + PROBE_CHAIN + 1,), generator=g).tolist()
    decoy = (ids[PROBE_PROMPT + 1] + 1) % vocab
    return ids, decoy


@torch.no_grad()
def reference_logits(model, ids: list[int], attention: str = "eager",
                     last: int = 0) -> torch.Tensor:
    """The model's own forward of `ids` with its own `attention` implementation (eager has
    every feature; sdpa is closer to the packed kernels in bf16, whose eager scores round
    where massive activations make that visible); `last`: only the last rows' (0: all)."""
    before = model.config._attn_implementation  # the runner's packed attention, as a rule
    model.set_attn_implementation(attention)
    try:
        dev = next(model.parameters()).device
        out = model(input_ids=torch.tensor([ids], device=dev), use_cache=False,
                    logits_to_keep=last).logits[0]
        return out[-last:] if last else out
    finally:
        model.set_attn_implementation(before)


def probe_model(runner) -> dict[int, LayerAttention]:
    """Run the probe through `runner` (see the module doc); each layer's attention as its
    calls asked for it. Raises UnsupportedModel."""
    cfg = runner.model.config
    expected = attention_layers(cfg)
    ids, decoy = _probe_ids(runner.vocab_size)
    p = PROBE_PROMPT
    runner._seen = seen = []
    counters = runner.forward_calls, runner.attention_calls  # the probe is not the caller's
    seq = runner.new_seq()
    try:
        if getattr(runner, "recurrent_layers", None):
            # stateful layers: the prompt's end as a second causal run, which must start from
            # the state the first one left (a chunked prefill, a catch-up)
            runner.forward([Segment.chain(seq, ids[: p - PROBE_CONTINUED], logits_at=[])])
        before = runner.attention_calls
        first = runner.forward([Segment.chain(seq, ids[seq.length : p],
                                              logits_at=list(range(p - PROBE_ROWS - seq.length,
                                                                   p - seq.length)))])[0]
        calls = runner.attention_calls - before
        # the rest as a verifier sees it: the root, then a tree of a decoy branch and the
        # prompt's own continuation
        nodes = [decoy] + ids[p + 1 :]
        parents = [0, 0] + list(range(2, len(nodes)))
        depths = [1] + list(range(1, len(nodes)))
        tree = runner.forward([Segment.tree(seq, [ids[p]], nodes, parents, depths)])[0]
        plain = all(a.plain_scores for _, a, _, _ in seen)
        sdpa = plain and getattr(runner.model, "_supports_sdpa", False)
        ref = reference_logits(runner.model, ids, "sdpa" if sdpa else "eager",
                               PROBE_ROWS + 1 + PROBE_CHAIN)
    except UnsupportedModel:
        raise
    except Exception as exc:  # whatever breaks, it is this model on this path
        raise refuse(cfg, f"the packed forward fails on it ({type(exc).__name__}: "
                          f"{str(exc)[:200]})") from exc
    finally:
        runner._seen = None
        runner.forward_calls, runner.attention_calls = counters
        seq.free()
    if calls != len(expected):
        raise refuse(cfg, f"{calls} of its {len(expected)} attention layers call transformers' "
                          "attention interface with the packed batch; the others bypass it")
    layers = {layer: attn for layer, attn, _, _ in seen}
    if sorted(layers) != expected:
        raise refuse(cfg, f"its attention layers report indices {sorted(layers)[:8]}..., not "
                          f"{expected[:8]}...")
    dims = runner.pool.dims
    for layer, _, kshape, vshape in seen:
        if kshape[0] != dims[2] or kshape[2] != dims[3] or vshape != kshape:
            raise refuse(cfg, f"layer {layer}'s keys/values {kshape}/{vshape} do not fit the KV "
                              f"pool's {dims[2]} heads x {dims[3]} (per-layer shapes differ)")
    if not bool(torch.isfinite(ref).all()):
        raise refuse(cfg, "its own forward gives non-finite logits on the start-up probe")
    v = runner.vocab_size  # past it (embedding padding) the packed rows are -inf by design
    got = torch.cat([first, tree[:1], tree[2:]])[:, :v].double()  # the decoy row: no reference
    want = ref[:, :v].double()
    err = float((got - want).abs().max())
    tol = TOLERANCE.get(ref.dtype, 1e-3) * (1.0 + float(want.abs().max()))
    if not err <= tol:
        what = ("attention or recurrent-state" if getattr(runner, "recurrent_layers", None)
                else "attention")
        raise refuse(cfg, f"its packed forward differs from its own by {err:.3g} (tolerance "
                          f"{tol:.3g}): some {what} feature is not supported")
    kinds = sorted({(a.mask, a.softcap is not None, a.sinks is not None)
                    for a in layers.values()}, key=str)
    log.info("model checked against its own attention", model=model_name(cfg),
             max_abs_diff=round(err, 6), tolerance=round(tol, 6),
             layer_kinds=[f"window={w} chunk={c} softcap={s} sinks={k}"
                          for (w, c), s, k in kinds])
    return layers
