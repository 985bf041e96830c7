"""Per-layer KV shapes (kvlayout.py, pool.py): each layer stores what its attention call
receives (Gemma 4's wider global heads, MLA's keys and values of different widths), a layer
that reuses another's KV stores nothing, and the pool's accounting, sizing, copies, shrinking,
forks and prefix cache hold for every group of layers."""

from __future__ import annotations

import pytest
import torch

from specedge.execution import KVPool, PackedRunner, Segment
from specedge.execution.kvlayout import KVLayout, LayerKV, discover
from specedge.execution.prefix import block_hashes
from specedge.execution.support import UnsupportedModel
from specedge.execution.tree import depths_of
from tests.archs import BY_NAME
from workers.verifier.state import kv_budget
from workers.verifier.worker import WorkerConfig

F64 = torch.float64


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = BY_NAME[name].build(1)
        return cache[name]

    return get


def expected_bytes_per_token(model) -> int:
    """Every layer's KV from its own modules, independently of the discovery: Gemma 4 from
    its per-layer config (layers reusing KV add nothing), MLA from its head widths."""
    cfg = model.config
    if cfg.model_type == "gemma4_text":
        modes = cfg.kv_sharing_modes
        return sum(2 * c.num_key_value_heads * c.head_dim * 8
                   for c, mode in zip(cfg.per_layer_config, modes, strict=True)
                   if mode != "reuse")
    width = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    return cfg.num_hidden_layers * cfg.num_attention_heads * width * 8


@pytest.mark.parametrize("name", ["gemma4", "gemma4-shared-kv", "deepseek-v3", "glm4-moe-lite"])
def test_memory_accounting_is_the_sum_of_the_layers_sizes(name, models):
    model = models(name)
    want = expected_bytes_per_token(model)
    layout = discover(model)
    assert layout.bytes_per_token == want
    runner = PackedRunner(model, kv_budget_tokens=160, block_size=16)
    pool = runner.pool
    assert pool.bytes_per_token == want
    assert pool.nbytes == want * pool.capacity_tokens == want * 160
    seq = runner.new_seq()
    runner.forward([Segment.chain(seq, list(range(20)))])
    assert seq.nbytes == 32 * want  # two blocks
    budget = kv_budget(model, WorkerConfig(kv_budget_bytes=want * 1000))
    assert budget == 1000


def test_gemma4_layers_get_their_own_widths_and_shared_layers_none(models):
    shared = discover(models("gemma4-shared-kv"))
    assert shared.shares == {2: 0, 3: 1}  # the last sliding and full layers before sharing
    assert shared.shapes == {0: LayerKV(2, 16, 16, F64), 1: LayerKV(2, 32, 32, F64)}
    kv_eq = discover(models("gemma4"))  # global layer: keys as values, one KV head, 32 wide
    assert kv_eq.shapes == {0: LayerKV(2, 16, 16, F64), 1: LayerKV(2, 16, 16, F64),
                            2: LayerKV(1, 32, 32, F64)}
    mla = discover(models("deepseek-v3"))
    assert set(mla.shapes.values()) == {LayerKV(4, 24, 12, F64)}


def _filled_pool(**kw) -> tuple[KVPool, KVLayout]:
    layout = KVLayout(4, {0: LayerKV(2, 4, 4, F64), 1: LayerKV(1, 6, 3, F64),
                          3: LayerKV(1, 6, 3, F64)}, {2: 0})
    return KVPool(layout, block_size=4, **kw), layout


def _write(pool: KVPool, seq, g: torch.Generator) -> None:
    idx = torch.tensor(seq.slots(0, seq.length))
    for layer, s in pool.layout.shapes.items():
        pool.keys(layer)[:, idx] = torch.rand(s.heads, len(idx), s.key_dim, generator=g,
                                              dtype=F64)
        pool.values(layer)[:, idx] = torch.rand(s.heads, len(idx), s.value_dim, generator=g,
                                                dtype=F64)


def per_layer(view) -> list[torch.Tensor]:
    """A sequence's keys then values, one tensor per storing layer (view() stacks them when
    the layers have one shape)."""
    return [*view[0], *view[1]]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(per_layer(a), per_layer(b), strict=True))


def test_every_group_survives_copies_forks_growth_and_shrinking():
    pool, layout = _filled_pool(initial_tokens=8)
    assert len(pool.store) == 3  # one tensor for the square group, two for k != v
    assert pool.bytes_per_token == (2 * 8 + 1 * 9 + 1 * 9) * 8 == layout.bytes_per_token
    assert pool.keys(2).data_ptr() == pool.keys(0).data_ptr()  # layer 2 reads layer 0's
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in (30, 9, 50, 3, 64):
        s = pool.new_seq()
        s.prepare_write(0, n)
        s.length = n
        _write(pool, s, g)
        seqs.append(s)
    assert pool.blocks == 64  # grew from 2
    want = seqs[2].view()
    fork = seqs[2].fork(48, keep=[1])  # full blocks shared, the rest queued copies
    fk, fv = fork.view()
    assert all(torch.equal(a[:, :48], b[:, :48]) for a, b in zip(fk, want[0], strict=True))
    assert all(torch.equal(a[:, 48], b[:, 49]) for a, b in zip(fv, want[1], strict=True))
    seqs[2].keep(40, [5, 7])  # rollback: positions 45 and 47 move to 40, 41
    kept = seqs[2].view()
    assert all(torch.equal(a[:, 40:42], b[:, [45, 47]]) for a, b in zip(kept[0], want[0],
                                                                        strict=True))
    before = [s.view() for s in (seqs[2], seqs[3], fork)]
    for s in (seqs[0], seqs[1], seqs[4]):
        s.free()
    assert pool.shrink() and pool.blocks == 32
    for s, old in zip((seqs[2], seqs[3], fork), before, strict=True):
        assert _same(s.view(), old)
    assert pool.nbytes == pool.bytes_per_token * pool.capacity_tokens
    assert all(torch.count_nonzero(t[:, :, :, pool.used_blocks * 4:]) == 0 for t in pool.store)


def test_the_prefix_cache_adopts_every_groups_blocks():
    pool, _ = _filled_pool(initial_tokens=64, cache_blocks=None)
    a = pool.new_seq()
    a.prepare_write(0, 8)
    a.length = 8
    _write(pool, a, torch.Generator().manual_seed(1))
    hs = block_hashes(list(range(8)), 4)
    a.publish(hs)
    want = a.view()
    a.free()
    b = pool.new_seq()
    assert b.adopt(hs) == 8
    assert _same(b.view(), want)


@pytest.mark.parametrize("name", ["gemma4-shared-kv", "deepseek-v3"])
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_trees_rollback_and_adoption_match_a_fresh_prefill(name, attention, models):
    """A prompt in pieces, a tree whose accepted path is kept, a prefix adopted from the
    cache: every layer group's KV and the next logits equal those of one fresh forward."""
    model = models(name)
    runner = PackedRunner(model, attention=attention, block_size=4)
    runner.pool.enable_cache(None)
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    seq = runner.new_seq()
    for i in range(0, 30, 7):
        runner.forward([Segment.chain(seq, ids[i : i + 7])])
    nodes, parents = [5, 6, 7, 8], [0, 0, 1, 2]
    runner.forward([Segment.tree(seq, [9], nodes, parents, depths_of(parents))])
    seq.keep(30, [0, 2, 4])  # the root, node 2 (6), node 4 (8)
    path = ids + [9, 6, 8]
    fresh = runner.new_seq()
    (want,) = runner.forward([Segment.chain(fresh, path + [1])])
    (got,) = runner.forward([Segment.chain(seq, [1])])
    assert torch.allclose(got, want, atol=1e-10)
    assert all(torch.allclose(x, y, atol=1e-12)
               for x, y in zip(per_layer(seq.view()), per_layer(fresh.view()), strict=True))
    hs = block_hashes(path + [1], 4)
    fresh.publish(hs)
    adopted = runner.new_seq()
    n = adopted.adopt(hs)
    assert n == 32
    (tail,) = runner.forward([Segment.chain(adopted, (path + [1])[n:] + [3])])
    (ref,) = runner.forward([Segment.chain(runner.new_seq(), path + [1, 3])])
    assert torch.allclose(tail[-1], ref[-1], atol=1e-10)


def test_a_model_whose_discovery_forward_fails_is_refused_in_one_line(models):
    model = BY_NAME["deepseek-v3"].build(1)
    model.model.layers[0].self_attn.kv_b_proj = torch.nn.Linear(16, 3, dtype=F64)  # broken
    with pytest.raises(UnsupportedModel, match="key/value shapes") as exc:
        discover(model)
    assert "\n" not in str(exc.value)


@pytest.mark.timeout(300)
async def test_a_checkpoint_transformers_cannot_build_is_refused_at_load(nats_server, tmp_path):
    """A config with no causal-LM class (a multimodal model's): load_model refuses it in one
    line, and the verifier exits 2 with that line, no traceback (it used to exit 1)."""
    import asyncio
    import os
    import sys

    import transformers as tf

    from specedge.models import load_model
    from tests.procs import ROOT
    from tests.tokens import char_tokenizer

    d = tmp_path / "neomme"
    tf.NeoMMEConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    with pytest.raises(UnsupportedModel, match="cannot build it as a causal LM") as exc:
        load_model(str(d))
    assert "\n" not in str(exc.value) and str(d) in str(exc.value)
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers.verifier", "--model", str(d), "--nats", nats_server.url,
        "--threads", "1", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), SPECEDGE_LOG="error"))
    _, err = await asyncio.wait_for(p.communicate(), 240)
    text = err.decode()
    assert p.returncode == 2, text
    assert [ln for ln in text.splitlines() if "not supported" in ln] and "Traceback" not in text
