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
   calls against the model's layers. A model that passed it before under the same files,
   dtype, device and versions (checkcache.py) runs only the prompt's forward: the layers'
   calls are still counted and read, the comparison is remembered.
"""

from __future__ import annotations

import structlog
import torch

from specedge.execution.plan import LayerAttention, MaskKind, Segment
from specedge.execution.recurrent import RECURRENT_TYPES, STATELESS_TYPES
from specedge.execution.unsupported import UnsupportedModel, model_name, refuse

log = structlog.get_logger(__name__)
ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# attention whose keys an indexer or compressor picks per query, from state of its own
SPARSE_LAYERS = frozenset({"indexed_attention", "compressed_sparse_attention",
                           "heavily_compressed_attention"})
SPARSE_WHY = ("an indexer picks each query's keys from a key cache of its own (sparse "
              "attention such as DeepSeek V3.2's DSA), which the packed KV cache does not keep")
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


def check_config(config) -> dict[int, MaskKind]:
    """Each layer's mask kind as the config declares it (layer types); raises
    UnsupportedModel for what the config shows cannot be run exactly. A multimodal model's
    text config is what its layers read."""
    outer, config = config, text_config(config)  # (refusals name the text model)
    if any(getattr(c, "is_encoder_decoder", False) or getattr(c, "is_causal", True) is False
           for c in (outer, config)):
        raise refuse(config, "not a causal decoder (bidirectional or encoder-decoder attention)")
    types = list(getattr(config, "layer_types", None) or [])
    sparse = sorted(set(types) & SPARSE_LAYERS)
    if sparse:
        raise refuse(config, f"its {', '.join(sparse)} layers: {SPARSE_WHY}")
    other = sorted(set(types) - ATTENTION_LAYERS - RECURRENT_TYPES - STATELESS_TYPES)
    if other:
        raise refuse(config, f"it has {', '.join(other)} layers, whose recurrent or "
                             "convolution state the packed KV cache does not keep")
    layers = layer_configs(config)  # what transformers keeps per layer is read per layer
    if getattr(config, "model_type", "") in ("bloom", "mpt") or any(
            getattr(c, "alibi", False) for c in layers):
        raise refuse(config, "ALiBi position biases are applied outside the attention interface")
    if any(getattr(c, "attn_temperature_tuning", False) and 0 in (
            getattr(c, "no_rope_layers", None) or []) for c in layers):
        raise refuse(config, "position-dependent attention scaling (attn_temperature_tuning on "
                             "its NoPE layers) is computed from the row's place in the batch")
    for c in {id(c): c for c in layers}.values():  # each distinct config once
        for params in _rope_parameters(c):
            kind = params.get("rope_type") or params.get("type")
            switch = params.get("original_max_position_embeddings") or getattr(
                c, "original_max_position_embeddings", None)
            if kind in ("dynamic", "longrope") and switch and \
                    switch < (getattr(c, "max_position_embeddings", 0) or 0):
                raise refuse(config, f"its RoPE scaling '{kind}' takes its frequencies from the "
                                     f"longest sequence in a forward (past {switch} positions), "
                                     "so sessions packed together would change each other's")
    kinds: dict[int, MaskKind] = {}
    for i, t in enumerate(types):
        c = layers[i] if i < len(layers) else config
        if t == "sliding_attention":
            kinds[i] = (getattr(c, "sliding_window", None), None)
        elif t == "chunked_attention":
            kinds[i] = (None, getattr(c, "attention_chunk_size", None))
    return kinds


def text_config(config):
    """The config a causal LM's layers read (a multimodal model's text config)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def layer_configs(config) -> list:
    """Each layer's config. transformers keeps some attributes per layer (a heterogeneous
    config: Gemma 4's head sizes, per-layer windows) and refuses a read of those on the
    global config; elsewhere every layer's config is the global one."""
    if getattr(config, "is_heterogeneous", False):
        return list(config.per_layer_config)
    return [config] * (getattr(config, "num_hidden_layers", None) or 1)


def check_modules(model) -> None:
    """Raises UnsupportedModel for a model with a module the config does not declare but
    the packed forward cannot keep exact: a sparse-attention indexer (it picks keys from its
    own cache; a short probe, where it picks every key, would not see it)."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Indexer"):
            raise refuse(model.config, f"{type(module).__name__} at {name}: {SPARSE_WHY}")


def check_recurrent(model, stateful: list[int]) -> list[int]:
    """`stateful`: the layers whose modules keep state through the cache calls (recurrent.py);
    raises UnsupportedModel if a layer the config declares stateful has no such module (its
    state would be lost between forwards)."""
    cfg = text_config(model.config)
    types = list(getattr(cfg, "layer_types", None) or [])
    lost = sorted({t for i, t in enumerate(types) if t in RECURRENT_TYPES and i not in stateful})
    if lost:
        raise refuse(cfg, f"it has {', '.join(lost)} layers, whose recurrent or convolution "
                          "state is kept outside transformers' cache calls")
    return stateful


def attention_layers(config) -> list[int]:
    """The layers that call the attention interface: all but recurrent-only and MLP-only
    layers (by the config's layer types)."""
    config = text_config(config)
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


def probe_model(runner, known: dict | None = None) -> tuple[dict[int, LayerAttention], dict]:
    """Run the probe through `runner` (see the module doc): each layer's attention as its
    calls asked for it, and the comparison's figures. `known`: those figures from a pass
    under the same key (checkcache.py): the tree and the reference forward are skipped.
    Raises UnsupportedModel."""
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
        if known is None:
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
    layout = runner.pool.layout
    for layer, _, kshape, vshape in seen:
        want = layout.shape_of(layer)
        if want is None or (kshape[0], kshape[2], vshape[0], vshape[2]) != (
                want.heads, want.key_dim, want.heads, want.value_dim):
            raise refuse(cfg, f"layer {layer}'s keys/values {kshape}/{vshape} are not the "
                              f"shapes its first forward showed ({want}): they change from "
                              "one forward to the next")
    kinds = sorted({(a.mask, a.softcap is not None, a.sinks is not None)
                    for a in layers.values()}, key=str)
    kinds_text = [f"window={w} chunk={c} softcap={s} sinks={k}" for (w, c), s, k in kinds]
    if known is not None:
        log.info("model checked against its own attention", model=model_name(cfg),
                 remembered=True, layer_kinds=kinds_text, **known)
        return layers, known
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
    figures = {"max_abs_diff": round(err, 6), "tolerance": round(tol, 6)}
    log.info("model checked against its own attention", model=model_name(cfg),
             layer_kinds=kinds_text, **figures)
    return layers, figures
