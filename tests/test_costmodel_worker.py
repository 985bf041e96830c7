"""A verifier that measured its forward's cost on a busy machine recovers its budget once the
load is gone: its cost model follows the forwards it runs (and a few idle-time probes)."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import generate, reference_greedy, running_worker
from tests.test_e2e_tiny import prompts

pytestmark = pytest.mark.asyncio

# The load: each target forward during start-up takes this much longer per token it carries
# (real elapsed time, as on a machine whose cores are busy: bigger forwards lose more).
LOAD_S_PER_TOKEN = 0.02
RECOVERY_FORWARDS = 32  # forwards (probes included) within which the knee must be back


def _gauge(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


def _share_at_least(changes: list[tuple[int, int, int, int]], forwards: int, least: int) -> float:
    """Of the forwards after the knee first reached `least`, the share run with knee >= least."""
    first = next(f for f, _, k, _ in changes if k >= least)
    ok, at, knee = 0, first, least
    for f, _, k, _ in [c for c in changes if c[0] >= first] + [(forwards, 0, 0, 0)]:
        ok += (f - at) * (knee >= least)
        at, knee = f, k
    return ok / max(1, forwards - first)


async def test_budget_recovers_after_a_loaded_start(nats_server, tiny_pair):
    target, draft = tiny_pair

    def busy(_module, _args, kwargs):
        time.sleep(LOAD_S_PER_TOKEN * kwargs["input_ids"].numel())

    hook = target.register_forward_pre_hook(busy, with_kwargs=True)
    try:
        async with running_worker(target, nats_server.url, metrics_port=0,
                                  metrics_host="127.0.0.1") as w:
            hook.remove()  # the load is gone once the verifier serves
            url = w.http.url
            loaded = await asyncio.to_thread(_gauge, url, "specedge_verifier_knee_tokens")
            assert loaded == w.cfg.adaptive.batch_tokens == 1  # the collapsed budget
            ps = prompts(1, seed=11)
            res = await generate(nats_server.url, draft, ps, max_new_tokens=60, adaptive=True)
            now = await asyncio.to_thread(_gauge, url, "specedge_verifier_knee_tokens")
    finally:
        hook.remove()
    changes = w.stats.cost_changes  # (forwards, probes, knee, chunk) at each move
    back = [f + p for f, p, k, _ in changes if k >= 8]
    assert back, f"the knee never came back: {changes}"
    assert back[0] <= RECOVERY_FORWARDS, changes  # served and probes
    # ... and stayed back for most of the session (a noisy sample may move it a while)
    assert _share_at_least(changes, w.stats.batches, 8) >= 0.7, changes
    assert now == w.cfg.adaptive.batch_tokens  # /metrics shows the current knee
    r = res[0]
    assert r.token_ids == reference_greedy(target, ps[0], 60)
    # the edge followed: trees grew past the collapsed budget's single node
    assert max(rec.nodes for rec in r.rounds) > 2
