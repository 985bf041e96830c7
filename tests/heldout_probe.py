"""Held-out probe: tiny random models of any transformers model types, greedy through the edge's
drafter and the verifier's engine against the model's own eager greedy. Prints EXACT, REFUSED
(with the one-line reason) or DIVERGED (a silent divergence: a bug to fix).

    python -m tests.heldout_probe glm4,exaone4,jamba,...   # transformers' model type names

Not a test (the matrix is tests/archs.py): a way to try architectures nobody listed."""

from __future__ import annotations

import inspect
import sys
import time
import warnings

import torch
import transformers as tf

from specedge.execution.support import UnsupportedModel
from specedge.logs import configure
from tests.archs import greedy_reference, noisy_copy, sharpen
from tests.test_architectures import prompt_ids, speculative_greedy

# every name a config class may use for these sizes; each class takes the ones it knows
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
             n_embd=64, n_layer=2, n_head=4, n_positions=512, d_model=64, n_heads=4, n_layers=2,
             ffn_dim=128, head_dim=16, sliding_window=8, window_size=8, moe_intermediate_size=32,
             num_experts=4, num_local_experts=4, num_experts_per_tok=2, n_routed_experts=4,
             attention_chunk_size=8, d_ff=128, hidden_dim=128, local_window_size=8)


def build(model_type: str) -> torch.nn.Module:
    cls = tf.CONFIG_MAPPING[model_type]
    params = set(inspect.signature(cls.__init__).parameters)
    default = cls()
    cfg = cls(**{k: v for k, v in SMALL.items() if k in params or hasattr(default, k)})
    torch.manual_seed(1)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    try:  # float64 where its kernels take it
        model = model.to(torch.float64)
        model(torch.tensor([[1, 2, 3]]))
    except Exception:
        model = model.to(torch.float32)
    model.eval()
    sharpen(model)
    return model


def probe(model_type: str, new: int = 30) -> str:
    try:
        target = build(model_type)
        draft = noisy_copy(target, 0.2, seed=2)
    except Exception as exc:
        return f"BUILD-FAIL {type(exc).__name__}: {str(exc)[:120]}"
    prompt = prompt_ids(3)
    try:
        got, accepted = speculative_greedy(target, draft, prompt, new, attention="sdpa")
    except UnsupportedModel as exc:
        return f"REFUSED {exc}"
    ref = greedy_reference(target, prompt, new)
    if got == ref:
        return f"EXACT (draft tokens accepted: {accepted})"
    at = next(i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b)
    return f"DIVERGED at token {at}"


def main() -> int:
    warnings.filterwarnings("ignore")
    configure(level="error", json=False)
    bad = 0
    for model_type in sys.argv[1].split(","):
        t0 = time.perf_counter()
        outcome = probe(model_type)
        bad += outcome.startswith("DIVERGED")
        print(f"{model_type:20s} {outcome} [{time.perf_counter() - t0:.1f} s]", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
