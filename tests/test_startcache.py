"""Start-up results remembered on disk (specedge/startcache.py). The model checks
(specedge/execution/checkcache.py): a warm start skips the layout's and the probe's reference
forwards and gives the same logits; any change of what the checks depend on runs them again;
a stale, foreign or corrupt entry never stands in for a check, and a refusal is never
remembered. The tokenizer identity (specedge.models.tokenizer_identity): remembered, and
recomputed when a tokenizer file changes."""

from __future__ import annotations

import json

import pytest
import torch

from specedge.execution import PackedRunner, Segment, checkcache
from specedge.execution.unsupported import UnsupportedModel
from specedge.models import load_model
from tests.archs import BY_NAME
from tests.conftest import tiny_model


@pytest.fixture
def checks(tmp_path, monkeypatch):
    d = tmp_path / "startup"
    monkeypatch.setenv("SPECEDGE_STARTUP_CACHE", str(d))
    return d


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "tiny"
    tiny_model(3).save_pretrained(d)
    return d


def forwards(model) -> list[int]:
    """A counter of the model's own forwards (every check's forward is one)."""
    n = [0]
    model.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def logits(runner) -> torch.Tensor:
    seq = runner.new_seq()
    try:
        return runner.forward([Segment.chain(seq, list(range(1, 30)))])[0]
    finally:
        seq.free()


def start(path, dtype="float64") -> tuple[PackedRunner, int]:
    model = load_model(str(path), dtype=dtype)
    n = forwards(model)
    runner = PackedRunner(model)
    return runner, n[0]


def test_a_warm_start_skips_the_checks_forwards_and_computes_the_same(checks, model_dir):
    cold, cold_forwards = start(model_dir)
    assert cold_forwards == 4  # the layout's, the probe's prompt and tree, its reference
    assert len(list(checks.glob("*.json"))) == 1
    warm, warm_forwards = start(model_dir)
    assert warm_forwards == 1  # the probe's prompt: the layers' attention is still read
    assert warm.pool.layout == cold.pool.layout
    seen = [{i: (a.mask, a.softcap, a.sinks) for i, a in r.layer_attention.items()}
            for r in (warm, cold)]
    assert seen[0] == seen[1] and len(seen[0]) == 2
    assert torch.equal(logits(warm), logits(cold))


def test_any_change_of_what_the_checks_depend_on_runs_them_again(checks, model_dir,
                                                                monkeypatch):
    start(model_dir)
    assert start(model_dir, "float32")[1] == 4  # another number format
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert start(model_dir)[1] == 4  # another config
    assert start(model_dir)[1] == 1
    monkeypatch.setattr(torch, "__version__", "0.0.0")  # an upgrade
    assert start(model_dir)[1] == 4
    monkeypatch.setattr(checkcache, "code_digest", lambda: "edited")  # our execution code
    assert start(model_dir)[1] == 4
    monkeypatch.setenv("SPECEDGE_STARTUP_CACHE", "off")
    assert start(model_dir)[1] == 4
    assert start(model_dir)[1] == 4


def test_a_stale_foreign_or_corrupt_entry_does_not_skip_the_checks(checks, model_dir):
    start(model_dir)
    entry = next(checks.glob("*.json"))
    data = json.loads(entry.read_text())
    data["material"]["dtype"] = "torch.float32"  # another model's entry under this name
    entry.write_text(json.dumps(data))
    assert start(model_dir)[1] == 4
    entry.write_text("{not json")
    assert start(model_dir)[1] == 4
    assert start(model_dir)[1] == 1  # the checks rewrote it


def test_a_refused_model_is_refused_again_whatever_the_cache_holds(checks, tmp_path):
    """A model whose attention bypasses the packed path: its refusal is not remembered, and
    an entry forged under its exact key (claiming a pass) does not let it through: the
    probe's prompt forward still counts the layers' attention calls."""
    d = tmp_path / "falcon"
    BY_NAME["falcon"].build(1).save_pretrained(d)
    with pytest.raises(UnsupportedModel, match="bypass"):
        start(d, "float32")
    assert not list(checks.glob("*.json"))
    model = load_model(str(d), dtype="float32")
    m = checkcache.material(model, model.get_input_embeddings().weight.shape[0])
    from specedge.execution.kvlayout import KVLayout, LayerKV

    checkcache.remember(m, KVLayout(2, {0: LayerKV(4, 16, 16, torch.float32),
                                        1: LayerKV(4, 16, 16, torch.float32)}),
                        "sdpa", {"max_abs_diff": 0.0, "tolerance": 1e-3})
    assert checkcache.lookup(m) is not None
    with pytest.raises(UnsupportedModel, match="bypass"):
        PackedRunner(model)


def test_the_tokenizer_identity_is_remembered_until_its_files_change(checks, model_dirs,
                                                                     monkeypatch, tmp_path):
    import shutil

    from specedge import models

    d = tmp_path / "target"
    shutil.copytree(model_dirs[0], d)
    first = models.tokenizer_identity(str(d))
    assert first[0] and first[1]
    loads = []
    real = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda ref: loads.append(ref) or real(ref))
    assert models.tokenizer_identity(str(d)) == first and not loads
    cfg = d / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data["added_tokens_decoder"] = {**data.get("added_tokens_decoder", {}), "300": {
        "content": "<extra>", "special": True, "lstrip": False, "rstrip": False,
        "normalized": False, "single_word": False}}
    cfg.write_text(json.dumps(data))
    changed = models.tokenizer_identity(str(d))
    assert loads and changed != first  # read again: one more id
    assert models.tokenizer_identity(str(d)) == changed and len(loads) == 1


def test_a_loaded_tokenizer_takes_its_remembered_identity(checks, model_dirs, monkeypatch):
    """The demo's draft tokenizer: on a warm machine its identity comes from the cache and is
    kept on it, so the session's open hashes no vocabulary."""
    from specedge import models
    from specedge.vocab import fingerprint, token_count

    ref = model_dirs[1]
    want = models.tokenizer_identity(ref)  # remembered
    tok = models.load_tokenizer(ref)
    calls = []
    real = type(tok).get_vocab
    monkeypatch.setattr(type(tok), "get_vocab", lambda self: calls.append(1) or real(self))
    assert models.tokenizer_identity(ref, tok) == want
    assert (fingerprint(tok), token_count(tok)) == want and not calls
