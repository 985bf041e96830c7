"""Converted weights remembered on disk (specedge/weightcache.py): a model loaded in a format
other than its checkpoint's is written once in that format and mapped from that copy later,
with the same weights and the same logits; a rewritten checkpoint, an upgrade or a damaged
entry is never used; the cache is bounded and can be turned off."""

from __future__ import annotations

import json
import os

import pytest
import torch

from specedge import weightcache
from specedge.models import load_model
from tests.conftest import tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "weights"
    monkeypatch.setenv("SPECEDGE_WEIGHT_CACHE", str(d))
    monkeypatch.delenv("SPECEDGE_WEIGHT_CACHE_GB", raising=False)
    return d


@pytest.fixture
def model_dir(tmp_path):
    """A checkpoint in bfloat16 (the format `specedge.models fetch` writes)."""
    d = tmp_path / "tiny"
    tiny_model(3).to(torch.bfloat16).save_pretrained(d)
    return d


def load(path, dtype="float32"):
    """load_model and its weight cache write, waited for."""
    model = load_model(str(path), dtype=dtype)
    weightcache.wait()
    return model


def from_cache(path, dtype=torch.float32):
    """The model as the weight cache alone gives it (None: no usable entry)."""
    from transformers import AutoModelForCausalLM

    return weightcache.load(path, dtype, lambda d: AutoModelForCausalLM.from_pretrained(
        d, dtype=dtype, output_loading_info=True))


def entries(cache) -> list:
    return sorted(d for d in cache.iterdir() if not d.name.startswith(".")) \
        if cache.exists() else []


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 20)[None]).logits


def same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_a_converted_model_is_remembered_and_mapped_with_the_same_weights(cache, model_dir):
    cold = load(model_dir)
    assert next(cold.parameters()).dtype == torch.float32
    (entry,) = entries(cache)
    stored = weightcache.header(entry / weightcache.WEIGHTS)
    assert {v["dtype"] for k, v in stored.items() if k != "__metadata__"} == {"F32"}
    warm = from_cache(model_dir)
    assert warm is not None and same(warm, cold)
    assert warm.name_or_path == warm.config.name_or_path == str(model_dir)  # not the entry
    again = load(model_dir)  # load_model takes the entry too
    assert same(again, cold) and torch.equal(logits(again), logits(cold))
    assert entries(cache) == [entry]


def test_a_load_in_the_checkpoints_own_format_writes_nothing(cache, model_dir, tmp_path):
    load(model_dir, "bfloat16")
    assert not entries(cache)
    d = tmp_path / "f64"
    tiny_model(4).save_pretrained(d)  # float64 checkpoint, loaded as float64
    load(d, "float64")
    assert not entries(cache)


def test_a_rewritten_checkpoint_or_an_upgrade_is_converted_again(cache, model_dir,
                                                                 monkeypatch):
    load(model_dir)
    (old,) = entries(cache)
    tiny_model(5).to(torch.bfloat16).save_pretrained(model_dir)  # new weights, same names
    assert from_cache(model_dir) is None  # the old entry is not this checkpoint's
    fresh = load(model_dir)
    reference = load_model(str(model_dir), dtype=torch.bfloat16).float()
    assert same(fresh, reference)
    assert old in entries(cache) and len(entries(cache)) == 2
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert from_cache(model_dir) is None


def test_a_damaged_entry_is_removed_and_never_used(cache, model_dir):
    reference = load(model_dir)
    (entry,) = entries(cache)
    weights = entry / weightcache.WEIGHTS
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # truncated: the recorded size no longer holds
        f.truncate(size - 4)
    assert from_cache(model_dir) is None and not entry.exists()
    assert same(load(model_dir), reference)
    (entry,) = entries(cache)
    with open(entry / weightcache.WEIGHTS, "r+b") as f:  # same size, an unreadable header
        f.write(b"\xff" * 16)
    assert from_cache(model_dir) is None and not entry.exists()
    assert same(load(model_dir), reference)
    (entry,) = entries(cache)
    rec = json.loads((entry / weightcache.MATERIAL).read_text())
    rec["material"]["dtype"] = "torch.float16"  # another format's record under this name
    (entry / weightcache.MATERIAL).write_text(json.dumps(rec))
    assert from_cache(model_dir) is None and not entry.exists()
    entry.mkdir()  # an entry without its record
    assert from_cache(model_dir) is None and not entry.exists()


def test_the_cache_can_be_turned_off(cache, model_dir, monkeypatch):
    monkeypatch.setenv("SPECEDGE_WEIGHT_CACHE", "off")
    load(model_dir)
    assert not entries(cache)
    monkeypatch.delenv("SPECEDGE_WEIGHT_CACHE")
    monkeypatch.setenv("SPECEDGE_STARTUP_CACHE", "off")  # the default follows it
    assert weightcache.root() is None
    load(model_dir)
    assert not entries(cache)


def test_the_cache_stays_within_its_bound_least_recently_used_first(cache, model_dir, tmp_path,
                                                                    monkeypatch):
    load(model_dir)
    (first,) = entries(cache)
    one = sum(f.stat().st_size for f in first.iterdir())
    monkeypatch.setenv("SPECEDGE_WEIGHT_CACHE_GB", str(1.5 * one / 2**30))  # room for one
    other = tmp_path / "other"
    tiny_model(6).to(torch.bfloat16).save_pretrained(other)
    load(other)
    (second,) = entries(cache)
    assert second != first  # the older went to make room
    monkeypatch.setenv("SPECEDGE_WEIGHT_CACHE_GB", str(0.5 * one / 2**30))  # room for none
    third = tmp_path / "third"
    tiny_model(7).to(torch.bfloat16).save_pretrained(third)
    load(third)
    assert entries(cache) == [second]  # nothing written, nothing evicted for it


def test_a_temporary_directory_of_a_dead_writer_is_cleared(cache, model_dir):
    cache.mkdir(parents=True)
    left = cache / ".tmp-999999999-abcd"  # no such process
    left.mkdir()
    (left / weightcache.WEIGHTS).write_bytes(b"partial")
    mine = cache / f".tmp-{os.getpid()}-abcd"  # a writer still running
    mine.mkdir()
    load(model_dir)
    assert not left.exists() and mine.exists() and len(entries(cache)) == 1


def test_a_model_that_renames_the_checkpoints_tensors_is_not_remembered(cache, model_dir):
    state = {"some.other.name": torch.zeros(3)}
    assert weightcache.store(model_dir, torch.float32, state) is None
    assert not entries(cache)
