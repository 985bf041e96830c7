"""The model-execution layer on the device it is built for. Marked `cuda`: on
$SPECEDGE_TEST_DEVICE (default cuda), skipped where there is none; `make gpu-check` runs them.
Capture and memory checks need CUDA itself and skip on other devices."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from specedge.execution import PackedRunner, Segment
from specedge.execution.tree import depths_of
from tests.conftest import tiny_model
from tests.test_runner import random_sessions

pytestmark = pytest.mark.cuda


def run_batch(runner: PackedRunner, sessions) -> list[torch.Tensor]:
    seqs = [runner.new_seq() for _ in sessions]
    runner.forward([Segment.chain(s, p[:-1]) for s, (p, _, _) in zip(seqs, sessions, strict=True)
                    if len(p) > 1])
    out = runner.forward([Segment.tree(s, p[s.length:], nodes, parents, depths_of(parents))
                          for s, (p, parents, nodes) in zip(seqs, sessions, strict=True)])
    for s in seqs:
        s.free()
    return [o.cpu() for o in out]


def test_backends_and_graphs_agree_on_the_device(test_device):
    model = tiny_model(31, dtype=torch.float32).to(test_device)
    ref = PackedRunner(model, attention="sdpa", cuda_graphs=False)
    flex = PackedRunner(model, attention="flex", kv_budget_tokens=8192, cuda_graphs=False)
    graphed = PackedRunner(model, attention="flex", kv_budget_tokens=8192, cuda_graphs=True)
    for seed, n in ((1, 5), (2, 9), (3, 3)):
        sessions = random_sessions(n, seed=seed)
        want = run_batch(ref, sessions)
        for runner in (flex, graphed):
            for a, b in zip(want, run_batch(runner, sessions), strict=True):
                assert torch.equal(a.argmax(-1), b.argmax(-1))
                assert torch.allclose(a, b, atol=1e-3)
    assert graphed.graphs.replays > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_takes_flex_and_captures_graphs():
    model = tiny_model(32, dtype=torch.bfloat16).to("cuda")
    runner = PackedRunner(model, kv_budget_tokens=16384)
    assert runner.attention == "flex"
    assert runner.graphs is not None and all(b.graph is not None for b in runner.graphs.buckets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_a_4k_prefill_in_a_batch_builds_no_score_matrix(attention):
    """12 query heads over 2 KV heads, as the 1.5B: a 4096-token prompt's prefill packed with
    eight draft trees must not allocate even a quarter of one layer's fp32 score matrix."""
    cfg = Qwen2Config(vocab_size=1024, hidden_size=768, intermediate_size=1536,
                      num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=2,
                      max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).to("cuda").eval()
    runner = PackedRunner(model, attention=attention, kv_budget_tokens=16384, cuda_graphs=False)
    long = torch.randint(0, 1024, (4096,)).tolist()
    sessions = random_sessions(8, seed=4, prefills=False)
    seqs = [runner.new_seq() for _ in sessions]
    runner.forward([Segment.chain(s, p) for s, (p, _, _) in zip(seqs, sessions, strict=True)])
    segs = [Segment.tree(s, [3], nodes, parents, depths_of(parents))
            for s, (_, parents, nodes) in zip(seqs, sessions, strict=True)]
    segs.append(Segment.chain(runner.new_seq(), long))
    runner.forward(segs[:1])  # warm-up (compiles, allocator)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.forward(segs[1:])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    scores = 12 * 4096 * 4096 * 4
    assert extra < scores / 4, f"{extra / 2**20:.0f} MiB for a forward; scores {scores >> 20} MiB"
