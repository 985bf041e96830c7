"""The graph buckets' path, as far as the CPU can run it (the capture itself is CUDA's): the
warm-up runs without autograd (weights from from_pretrained require grad), a forward of prefill
chunks only (no logits wanted) goes through a bucket, and every stream, graph and pool handle
is made on the runner's device, not the current one."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from specedge.execution import PackedRunner, Segment
from tests.conftest import tiny_model


def static_runner(seed: int = 5) -> PackedRunner:
    """The bucket path on the CPU: flex, a fixed pool, graphs without capture."""
    return PackedRunner(tiny_model(seed), attention="flex", kv_budget_tokens=2048,
                        cuda_graphs=True)


def test_warm_up_runs_without_autograd_on_weights_that_require_grad():
    runner = static_runner()
    assert all(p.requires_grad for p in runner.model.parameters())
    bk = runner.graphs.buckets[0]
    runner.graphs._dummy(bk)
    with torch.enable_grad():
        bk.warm_up()  # with autograd on, flex asks for q_indices the BlockMask lacks
    assert runner.pool.kv.grad_fn is None and not runner.pool.kv.requires_grad


def test_a_forward_of_prefill_chunks_only_goes_through_a_bucket():
    runner = static_runner()
    model = runner.model
    prompt = list(range(3, 40))
    seq = runner.new_seq()
    logits, offsets = runner.forward_flat([Segment.chain(seq, prompt[:20], logits_at=[])])
    assert runner.graphs.replays == 1 and logits.shape == (0, runner.vocab_size)
    assert offsets == [0, 0] and seq.length == 20
    (rest,) = runner.forward([Segment.chain(seq, prompt[20:])])
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(rest[0], want, atol=1e-9)
    seq.free()


def test_capture_happens_on_the_runners_device(monkeypatch):
    """On a machine whose current device is cuda:0, a runner on cuda:1 must create its side
    stream, graph and memory pool there (recorded through stand-ins for torch.cuda's calls:
    this machine has no GPU)."""
    dev = torch.device("cuda", 1)
    seen: list[tuple[str, object]] = []

    class Stream:
        def __init__(self, device=None):
            seen.append(("Stream", device))

        def wait_stream(self, other) -> None:
            pass

    @contextlib.contextmanager
    def device(d):
        seen.append(("device", d))
        yield

    @contextlib.contextmanager
    def stream(s):
        yield

    @contextlib.contextmanager
    def graph(g, pool=None):
        yield

    def current_stream(d=None):
        seen.append(("current_stream", d))
        return Stream.__new__(Stream)

    for name, fake in (("Stream", Stream), ("device", device), ("stream", stream),
                       ("graph", graph), ("current_stream", current_stream),
                       ("CUDAGraph", lambda: SimpleNamespace(replay=lambda: None))):
        monkeypatch.setattr(torch.cuda, name, fake)
    runner = static_runner()
    bk = runner.graphs.buckets[0]
    bk.runner = SimpleNamespace(device=dev)
    bk._model = lambda: torch.zeros(1)
    bk.capture(pool_handle=None)
    assert seen and all(d == dev for _, d in seen), seen
    assert {"Stream", "device", "current_stream"} <= {k for k, _ in seen}
