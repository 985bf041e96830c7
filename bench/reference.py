"""The target alone: what every lossless check compares against."""

from __future__ import annotations

import torch


def reference_greedy(target, prompt: list[int], max_new_tokens: int,
                     eos_ids: tuple[int, ...] = ()) -> list[int]:
    """Plain greedy decoding with a KV cache (transformers' own generate()), on the target's
    device. With no eos_ids the model's generation config decides where it stops."""
    x = torch.tensor([prompt], device=target.device)
    with torch.no_grad():
        out = target.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
            min_new_tokens=0, do_sample=False, eos_token_id=list(eos_ids) or None,
            pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


def divergence(target, prompt: list[int], got: list[int], ref: list[int]) -> dict | None:
    """Where `got` leaves the reference, and the target's top-2 logit margin there (a margin
    near zero is a near-tie that numerical noise can flip); None when they are equal."""
    if got == ref:
        return None
    i = next((k for k, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b),
             min(len(got), len(ref)))
    x = torch.tensor([prompt + ref[:i]], device=target.device)
    with torch.no_grad():
        logits = target(input_ids=x, logits_to_keep=1).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return {"index": i, "got": got[i] if i < len(got) else None,
            "reference": ref[i] if i < len(ref) else None, "lengths": [len(got), len(ref)],
            "top2_margin": round(float(top.values[0] - top.values[1]), 6)}
