"""Synthetic-weights models (specedge.synthetic) with the tiny shape: reference syntax, the
vendored configs and tokenizer, deterministic weights, sharpened logits, and a draft whose
greedy agreement with the target is calibrated (and rebuilt bit for bit from its reference)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from specedge import models, synthetic
from specedge.synthetic import SyntheticRef, SyntheticRefError, parse
from tests.procs import ROOT

F32 = torch.float32


@pytest.fixture(scope="module")
def tiny_target():
    return synthetic.build("synthetic:tiny", dtype=F32)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("ref, want", [
    ("synthetic:1.5b", SyntheticRef("1.5b")),
    ("synthetic:tiny:seed=3", SyntheticRef("tiny", seed=3)),
    ("SYNTHETIC:7B:draft@0.8", SyntheticRef("7b", agreement=0.8)),
    ("synthetic:0.5b:seed=2:draft=0.0312", SyntheticRef("0.5b", seed=2, noise=0.0312)),
])
def test_parse_and_canonical_form(ref, want):
    r = parse(ref)
    assert r == want
    assert parse(str(r)) == r  # what a calibration prints parses back to the same thing
    assert r.target() == SyntheticRef(want.shape, want.seed)
    assert models.resolve(ref) == str(r)


@pytest.mark.parametrize("ref", ["synthetic:", "synthetic:3b", "synthetic:tiny:seed=x",
                                 "synthetic:tiny:draft@0", "synthetic:tiny:draft@0.8:draft=0.1",
                                 "synthetic:tiny:noise=0.1", "synthetic:tiny:draft=-1"])
def test_bad_references_are_refused(ref):
    with pytest.raises(SyntheticRefError):
        parse(ref)
    with pytest.raises(SyntheticRefError):
        models.resolve(ref)


@pytest.mark.parametrize("shape, params", [("0.5b", 630_167_424), ("1.5b", 1_777_088_000),
                                           ("7b", 7_615_616_512)])
def test_vendored_configs_have_the_real_shapes(shape, params):
    m = synthetic.empty_model(shape, torch.bfloat16, "cpu")  # meta parameters: no memory
    assert sum(p.numel() for p in m.parameters()) == params
    assert all(p.is_meta for p in m.parameters())


def test_vendored_tokenizer_is_the_family_one():
    tok = models.load_tokenizer("synthetic:tiny")
    raw = (synthetic.tokenizer_dir() / "tokenizer.json").read_bytes()
    source = (ROOT / "specedge/assets/qwen2.5-coder/SOURCE.md").read_text()
    assert hashlib.sha256(raw).hexdigest() in source
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) == [151645, 151643]
    text = "def add(a, b):\n    return a + b  # ünïcode"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_weights_are_deterministic_and_seeded(tiny_target):
    again = models.load_model("synthetic:tiny", dtype=F32)
    assert same_weights(tiny_target, again)
    other = synthetic.build("synthetic:tiny:seed=1", dtype=F32)
    emb = "model.embed_tokens.weight"
    assert not torch.equal(tiny_target.state_dict()[emb], other.state_dict()[emb])
    bf16 = synthetic.build("synthetic:tiny", dtype=torch.bfloat16)  # the same model, rounded
    assert torch.equal(bf16.state_dict()[emb], tiny_target.state_dict()[emb].bfloat16())
    cfg = tiny_target.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (256, 4, 151936)


def test_logits_are_sharp_and_continuations_diverse(tiny_target):
    stats = synthetic._stats(tiny_target, None)
    assert abs(stats["logit_std"] - synthetic.SHARPEN) < 0.5
    assert stats["top2_margin_p50"] > 0.3  # greedy is not a near-tie everywhere
    # the target's greedy continuations do not collapse onto a few tokens
    assert stats["distinct_tokens_in_continuations"] > 100


def test_calibrated_draft_agrees_as_asked_and_rebuilds_bit_for_bit(tiny_target):
    draft = synthetic.build("synthetic:tiny", dtype=F32)
    cal = synthetic.calibrate(tiny_target, draft, 0.8)
    assert abs(cal.agreement - 0.8) <= 0.03 and cal.forwards <= 16
    noises = [n for n, _ in cal.trace]
    assert 0 < cal.noise < 1 and len(set(noises)) >= 3  # it searched
    rebuilt = models.load_model(f"synthetic:tiny:draft={cal.noise:.4g}", dtype=F32)
    assert same_weights(rebuilt, draft)  # another process gets this draft without calibrating
    assert synthetic.agreement(rebuilt, synthetic.probe(tiny_target)) == pytest.approx(
        cal.agreement)
    assert not same_weights(rebuilt, tiny_target)


def test_cli_calibrate_prints_a_reusable_reference():
    out = subprocess.run([sys.executable, "-m", "specedge.synthetic", "--dtype", "float32",
                          "calibrate", "tiny", "--agreement", "0.6"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    r = parse(res["ref"])
    assert r.shape == "tiny" and r.noise == res["noise"] and abs(res["agreement"] - 0.6) <= 0.03
