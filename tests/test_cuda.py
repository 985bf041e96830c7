"""The stack on the device the models are meant for. Marked `cuda`: they run on
$SPECEDGE_TEST_DEVICE (default cuda) and skip where there is no such device; `make gpu-check`
runs them on the GPU, and `SPECEDGE_TEST_DEVICE=cpu pytest -m cuda` runs them here."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys

import pytest
import torch

from bench.workload import load
from specedge.config import TreeShape
from specedge.edge.text import eos_ids, prompt_ids
from specedge.models import load_model, load_tokenizer
from tests.conftest import related_draft, tiny_model
from tests.procs import ROOT
from tests.stack import generate, reference_greedy, running_worker
from tests.test_e2e_tiny import prompts

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(600)]

SYNTHETIC = "synthetic:tiny"
SYNTHETIC_DRAFT = "synthetic:tiny:draft=0.05"  # agreement about 0.8 (tests/test_synthetic.py)


async def test_tiny_stack_greedy_lossless_and_replay_check(nats_server, test_device, tmp_path):
    """8 concurrent sessions through the broker, verifier and drafter all on the device, equal
    to generate() of the target alone there; then `replay --check --device` re-verifies one."""
    target_cpu = tiny_model(1)
    target_cpu.save_pretrained(tmp_path / "target")
    target = tiny_model(1).to(test_device)
    draft = related_draft(target_cpu, noise=0.3, seed=2).to(test_device)
    ps = prompts(8, seed=11)
    async with running_worker(target, nats_server.url, max_batch=8) as w:
        results = await generate(nats_server.url, draft, ps, max_new_tokens=24,
                                 shape=TreeShape(budget=8, depth=4, width=2, topk=2))
    for p, r in zip(ps, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 24)
    assert max(w.stats.batch_sizes) > 1
    assert sum(len(r.token_ids) for r in results) / sum(len(r.rounds) for r in results) > 1.2
    out = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "specedge.replay", results[0].session_id, "--check", "--model",
        str(tmp_path / "target"), "--dtype", "float64", "--device", test_device, "--nats",
        nats_server.url], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"all {len(results[0].rounds)} rounds match" in out.stdout


async def test_synthetic_pair_float32_lossless(nats_server, test_device):
    """The synthetic pair (real tokenizer and vocabulary, random weights) in float32 on the
    device: the output equals the target alone, and the noised draft is accepted often."""
    tok = load_tokenizer(SYNTHETIC)
    target = load_model(SYNTHETIC, dtype=torch.float32, device=test_device)
    draft = load_model(SYNTHETIC_DRAFT, dtype=torch.float32, device=test_device)
    eos = eos_ids(tok, target.config, target.generation_config)
    ps = [prompt_ids(tok, q["prompt"], chat=True)
          for q in load(per_category=1, categories=["coding", "qa", "writing", "rag"])]
    async with running_worker(target, nats_server.url, max_batch=4):
        results = await generate(nats_server.url, draft, ps, max_new_tokens=24, eos_ids=eos)
    for p, r in zip(ps, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 24, eos)
    tpr = sum(len(r.token_ids) for r in results) / sum(len(r.rounds) for r in results)
    assert tpr > 1.5, f"{tpr:.2f} tokens per round: the synthetic draft should agree often"


def weights_digest(ref: str, device: str) -> str:
    model = load_model(ref, dtype=torch.float32, device=device)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_synthetic_weights_identical_in_another_process(test_device):
    code = (f"from tests.test_cuda import weights_digest; "
            f"print(weights_digest({SYNTHETIC_DRAFT!r}, {test_device!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == weights_digest(SYNTHETIC_DRAFT, test_device)
