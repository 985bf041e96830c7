"""Fixtures: a real nats-server with JetStream (the embedded-broker code) and tiny random
transformers models built in the test (float64 where exact equality is asserted)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from specedge import broker
from specedge.logs import configure

configure(level="warning", json=False)

TINY_VOCAB = 256


def tiny_config(vocab: int = TINY_VOCAB, layers: int = 2, hidden: int = 64) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=None,
        bos_token_id=None, pad_token_id=None,
    )


def tiny_model(seed: int, vocab: int = TINY_VOCAB, dtype=torch.float64, **kw) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(tiny_config(vocab, **kw)).to(dtype).eval()
    # A sharper distribution than the default init, so greedy paths are not near-ties and
    # a related draft agrees often enough to exercise multi-token acceptance.
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    return m


def related_draft(target: Qwen2ForCausalLM, noise: float, seed: int) -> Qwen2ForCausalLM:
    """A draft that agrees with the target often: its weights plus noise."""
    from tests.archs import noisy_copy

    return noisy_copy(target, noise, seed)


FAST_CONSUMER = broker.ConsumerSettings(ack_wait_s=2.0, max_deliver=10)


@pytest.fixture(scope="session", autouse=True)
def check_cache(tmp_path_factory):
    """The remembered start-up checks (specedge/execution/checkcache.py) of this run's
    models, commands started by the tests included, kept out of the user's cache."""
    old = os.environ.get("SPECEDGE_STARTUP_CACHE")
    os.environ["SPECEDGE_STARTUP_CACHE"] = str(tmp_path_factory.mktemp("startup"))
    yield
    if old is None:
        os.environ.pop("SPECEDGE_STARTUP_CACHE", None)
    else:
        os.environ["SPECEDGE_STARTUP_CACHE"] = old


@pytest.fixture(scope="session")
def test_device() -> str:
    """The device of the `cuda`-marked tests: $SPECEDGE_TEST_DEVICE, default cuda; they skip
    when it is CUDA and there is none (`SPECEDGE_TEST_DEVICE=cpu` runs them on the CPU)."""
    dev = os.environ.get("SPECEDGE_TEST_DEVICE", "cuda")
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"no CUDA device here (SPECEDGE_TEST_DEVICE={dev})")
    return dev


@pytest.fixture
def nats_server(tmp_path):
    srv = broker.EmbeddedNats(store_dir=tmp_path / "nats").start()
    broker.run_setup(srv.url, consumer=FAST_CONSUMER)
    yield srv
    srv.cleanup()


@pytest.fixture(scope="session")
def target_dir(tiny_pair, tmp_path_factory) -> str:
    """The tiny target saved to disk, for verifier processes started through their CLI."""
    d = tmp_path_factory.mktemp("tiny-target")
    tiny_pair[0].save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_pair():
    target = tiny_model(1)
    draft = related_draft(target, noise=0.3, seed=2)
    return target, draft


@pytest.fixture(scope="session")
def model_dirs(tiny_pair, tmp_path_factory) -> tuple[str, str]:
    """(target, draft) on disk with the one-character tokenizer, for the commands'
    --target/--draft/--model (demo, edge and verifier processes)."""
    from tests.tokens import char_tokenizer

    tok = char_tokenizer()
    out = []
    for model, name in zip(tiny_pair, ("target", "draft"), strict=True):
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out.append(str(d))
    return out[0], out[1]


@pytest.fixture(scope="module")
def arch_pair():
    """A support-matrix model (tests/archs.py) and its noisy-copy draft, built once per module:
    `arch_pair(arch)`."""
    from tests.archs import noisy_copy

    cache: dict[str, tuple] = {}

    def get(arch):
        if arch.name not in cache:
            target = arch.build(1)
            cache[arch.name] = (target, noisy_copy(target, 0.2, seed=2))
        return cache[arch.name]

    return get
