"""The flags every benchmark shares: where the models run, which pair, and the record of it."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench import pair as pair_mod
from bench.machine import machine
from specedge import devices


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    pair_mod.add_args(p)
    return p.parse_args(argv)


def test_synthetic_pair_is_calibrated_once_and_passed_on_explicitly():
    pair, draft, tok = pair_mod.resolve(args("--synthetic", "tiny", "--dtype", "float32",
                                             "--draft-agreement", "0.7"))
    assert pair.target == "synthetic:tiny" and pair.draft.startswith("synthetic:tiny:draft=")
    assert abs(pair.calibration["agreement"] - 0.7) <= 0.03
    assert draft.dtype == torch.float32 and draft.device.type == "cpu"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert pair.verifier_args() == ["--model", "synthetic:tiny", "--device", "cpu",
                                    "--dtype", "float32"]
    rec = pair.record()
    assert rec["synthetic"] and rec["device"] == "cpu" and rec["dtype"] == "float32"
    assert rec["device_name"] == devices.cpu_model() and rec["calibration"] == pair.calibration


def test_synthetic_refuses_an_explicit_pair():
    with pytest.raises(SystemExit, match="--synthetic chooses the pair"):
        pair_mod.resolve(args("--synthetic", "tiny", "--target", "synthetic:tiny"))


def test_device_choice_is_checked_and_recorded():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
            devices.pick("cuda")
        assert devices.pick("auto") == "cpu"
        m = machine("cpu", "bfloat16")
        assert m["gpu"] is None and m["device_name"] == devices.cpu_model()
    else:
        assert devices.pick("auto") == "cuda"
        m = machine("cuda", "bfloat16")
        assert m["gpu"] == torch.cuda.get_device_name(0) == m["device_name"]
    assert m["dtype"] == "bfloat16" and m["versions"]["torch"]
