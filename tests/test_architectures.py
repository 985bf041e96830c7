"""The support matrix (tests/archs.py, the table in docs/models.md): every architecture whose attention
goes through transformers' attention interface generates exactly the target's own greedy
output through the edge's drafter and the verifier's engine, on both attention backends and
through the graph buckets' static path, with prompts far past its sliding window or chunk;
every other one is refused when it is loaded, in one line naming the model and the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from schemas import Sampling
from specedge.config import TreeShape
from specedge.edge.drafter import Drafter, TreeBuilder
from specedge.execution import PackedRunner, Segment
from specedge.execution.support import UnsupportedModel, reference_logits
from specedge.execution.tree import depths_of, path_to
from specedge.execution.walk import commit
from tests.archs import (
    ARCHS,
    BY_NAME,
    REFUSED,
    SUPPORTED,
    WINDOW,
    greedy_reference,
    noisy_copy,
)
from workers.verifier.engine import Engine
from workers.verifier.state import SessionState
from workers.verifier.validate import CheckedBlock

PROMPT = 40  # five windows
NEW = 40
SHAPE = TreeShape(budget=6, depth=4, width=2, topk=2)
# the static (CUDA-graph bucket) path needs flex and a pool of fixed size
BACKENDS = {"sdpa": dict(attention="sdpa"), "flex": dict(attention="flex"),
            "graphs": dict(attention="flex", kv_budget_tokens=2048, cuda_graphs=True)}
FEATURED = [a for a in SUPPORTED if a.kwargs.get("sliding_window") or "soft" in a.features
            or "chunk" in a.features or "sinks" in a.features or "KV shapes" in a.features]


def prompt_ids(seed: int, n: int = PROMPT) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n,), generator=g).tolist()


def speculative_greedy(target, draft, prompt: list[int], n: int, **backend):
    """The edge's drafter and the verifier's engine in one process (no broker: the math);
    returns the tokens and the draft tokens accepted."""
    eng = Engine(target, **backend)
    runner = PackedRunner(draft, **backend)
    st = SessionState("s", Sampling(), 0, n, frozenset(), len(prompt), list(prompt))
    dr = Drafter(runner)
    dr.catch_up(st.committed[:-1])
    accepted = 0
    while not st.finished:
        tree = TreeBuilder(dr, st.committed, SHAPE).run()
        (out,) = eng.verify([(st, CheckedBlock(st.round, tree.tokens, tree.parents,
                                               tree.depths))])
        new = [tree.tokens[i - 1] for i in out.walk.accepted] + [out.walk.next_token]
        toks, st.finished = commit(new, st.generated, n, frozenset())
        accepted += len(out.walk.accepted)
        dr.rollback(tree, out.walk.accepted)
        st.committed += toks
        st.round += 1
    st.kv.free()
    dr.close()
    return st.committed[len(prompt):], accepted


@pytest.mark.parametrize("arch", SUPPORTED, ids=lambda a: a.name)
def test_greedy_is_the_targets_own(arch, arch_pair):
    target, draft = arch_pair(arch)
    prompt = prompt_ids(3)
    got, accepted = speculative_greedy(target, draft, prompt, NEW, attention="sdpa")
    assert got == greedy_reference(target, prompt, NEW), f"{arch.name}: not the target's output"
    assert accepted >= 5, f"{arch.name}: the draft was hardly ever accepted ({accepted})"


@pytest.mark.parametrize("backend", ["flex", "graphs"])
@pytest.mark.parametrize("arch", FEATURED, ids=lambda a: a.name)
def test_windows_softcaps_sinks_and_chunks_on_every_backend(arch, backend, arch_pair):
    target, draft = arch_pair(arch)
    prompt = prompt_ids(4)
    got, _ = speculative_greedy(target, draft, prompt, NEW, **BACKENDS[backend])
    assert got == greedy_reference(target, prompt, NEW)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("arch", FEATURED, ids=lambda a: a.name)
def test_tree_rows_far_past_the_window_match_the_models_own_logits(arch, backend, arch_pair):
    """Rows of several sessions in one forward (a prefill of 5 windows, a cached prefix with
    a chain and a tree on it): each row's logits are the model's own on that row's path."""
    target, _ = arch_pair(arch)
    runner = PackedRunner(target, **BACKENDS[backend])
    long_p, short_p = prompt_ids(5, 5 * WINDOW), prompt_ids(6, 3 * WINDOW)
    a, b = runner.new_seq(), runner.new_seq()
    runner.forward([Segment.chain(b, short_p[:-3])])
    nodes, parents = [7, 9, 11, 13, 15, 17, 19, 21, 23, 25], [0, 0, 1, 3, 4, 5, 6, 7, 8, 2]
    out = runner.forward([Segment.chain(a, long_p, logits_at=list(range(len(long_p)))),
                          Segment.tree(b, short_p[-3:], nodes, parents, depths_of(parents))])
    ref = reference_logits(target, long_p)
    tol = 1e-5 * (1 + float(ref.abs().max()))
    assert float((out[0] - ref).abs().max()) <= tol
    for i in range(len(nodes) + 1):
        path = short_p + [nodes[j - 1] for j in path_to(i, parents)]
        want = reference_logits(target, path)[-1]
        assert float((out[1][i] - want).abs().max()) <= tol, f"row {i} of the tree"
    a.free()
    b.free()


@pytest.mark.parametrize("arch", REFUSED, ids=lambda a: a.name)
def test_what_cannot_be_exact_is_refused_in_one_line(arch):
    model = arch.build(1)
    with pytest.raises(UnsupportedModel, match=arch.refused) as exc:
        PackedRunner(model)
    text = str(exc.value)
    assert "\n" not in text and model.config.model_type in text


def test_matrix_covers_what_the_issue_names():
    names = {a.name for a in ARCHS}
    assert len(SUPPORTED) >= 20
    for need in ("llama", "mistral-window", "mixtral", "qwen2-window", "qwen3", "qwen3-moe",
                 "gemma", "gemma2", "gemma3", "cohere2", "phi3", "olmo2", "gpt2", "gpt-neox",
                 "granite", "starcoder2", "gpt-oss", "qwen3-next", "gemma4", "gemma4-shared-kv",
                 "deepseek-v3", "minicpm3", "glm4-moe-lite", "deepseek-v3.2"):
        assert need in names


@pytest.mark.parametrize("name", ["gemma2", "gemma4-shared-kv"])
async def test_windowed_models_end_to_end_through_the_broker(name, nats_server):
    """Gemma 2's shape (sliding-window and full layers, soft-capped attention) and Gemma 4's
    (per-layer KV shapes, layers reusing others' KV) through a real nats-server: edge sessions
    and a verifier worker, prompts four windows long."""
    from tests.stack import generate, running_worker

    target = BY_NAME[name].build(1)
    draft = noisy_copy(target, 0.2, seed=2)
    prompts = [prompt_ids(10 + i, 4 * WINDOW + 3 * i) for i in range(3)]
    async with running_worker(target, nats_server.url, max_batch=4):
        results = await generate(nats_server.url, draft, prompts, max_new_tokens=24)
    for p, r in zip(prompts, results, strict=True):
        assert r.token_ids == greedy_reference(target, p, 24)
    assert sum(len(r.token_ids) for r in results) > sum(len(r.rounds) for r in results)


def sampled_pair(name: str, dtype: torch.dtype | None = None, **changes):
    """A tiny model of `name`'s architecture with 8 ids and a window of 2 (shorter than the
    sampling test's prompt), softened so that several tokens carry real mass; in `dtype`
    where given (a law, not a bit pattern, is tested: float32 where float64 convolutions
    crawl on a CPU)."""
    from tests.test_sampled_lossless import V

    arch = BY_NAME[name]
    kw = dict(arch.kwargs, vocab_size=V, hidden_size=32, intermediate_size=64, **changes)
    if "sliding_window" in kw:
        kw["sliding_window"] = 2
    target = dataclasses.replace(arch, kwargs=kw, dtype=dtype or arch.dtype).build(21)
    with torch.no_grad():
        target.get_output_embeddings().weight.mul_(0.02)
    return target, noisy_copy(target, 0.5, seed=3)


# Gemma 4 on two layers (a sliding one, a global one of its own KV shape): 2000 trials of three
# are slow on a shared CPU
SAMPLED = {"gpt-oss": {}, "gemma2": {}, "qwen3.5": {},
           "gemma4": dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])}
# Qwen3.5's recurrent state on the draft tree: float32 (float64 depthwise convolutions crawl on
# a CPU) and fewer trials
SLOW = {"qwen3.5": (torch.float32, 800)}


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_sampled_output_follows_the_targets_distribution(name):
    """At T=1 with top-p 0.9, the joint law of the first two tokens is the target's own (its
    eager attention: window, sinks, soft-capping or Gemma 4's per-layer KV shapes; Qwen3.5's
    recurrent state on the draft tree), by chi-square."""
    from specedge.execution.sampling import probs
    from tests.test_sampled_lossless import PROMPT, TRIALS, S, V, chi2_p, run_trials

    dtype, trials = SLOW.get(name, (None, TRIALS))
    target, draft = sampled_pair(name, dtype, **SAMPLED[name])
    counts = run_trials(target, draft, trials=trials)
    p1 = probs(reference_logits(target, PROMPT)[-1], S)
    p2 = torch.stack([probs(reference_logits(target, PROMPT + [t])[-1], S) for t in range(V)])
    joint = (p1[:, None] * p2).double()
    joint = (joint / joint.sum()).numpy()
    p = chi2_p(counts, joint)
    assert p > 1e-3, f"{name}: chi-square p={p:.2e}: generated tokens do not follow the target"


def test_the_readmes_table_is_the_matrix():
    """docs/models.md lists exactly the architectures this file runs, with their outcome."""
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "models.md").read_text()
    section = page.split("## Any model pair", 1)[1].split("\n#", 1)[0]  # its own table
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows[cells[0].strip("`")] = cells[3]
    assert set(rows) == {a.name for a in ARCHS}
    for a in ARCHS:
        assert rows[a.name].startswith("exact" if a.refused is None else "refused"), a.name


@pytest.mark.timeout(300)
async def test_commands_refuse_an_unsupported_model_in_one_line(nats_server, tmp_path):
    """A hybrid checkpoint on disk: the verifier, the edge, `edge serve` and the demo each exit 2
    with one line naming the model and the reason, no traceback, before serving anything."""
    import asyncio
    import os
    import sys

    from tests.procs import ROOT
    from tests.tokens import char_tokenizer

    arch = BY_NAME["jamba"]
    d = tmp_path / "hybrid"
    arch.build(1).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    common = ["--nats", nats_server.url, "--dtype", "float64", "--threads", "1"]
    commands = {
        "verifier": ["-m", "workers.verifier", "--model", str(d), *common],
        "edge": ["-m", "specedge.edge", "--model", str(d), "--no-chat", "--prompt", "hi",
                 *common],
        "serve": ["-m", "specedge.edge", "serve", "--model", str(d), "--port", "0", *common],
        "demo": ["-m", "specedge.demo", "--target", str(d), "--draft", str(d), "--dtype",
                 "float64", "--prompt", "hi"],
    }

    async def run(args: list[str]) -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT), SPECEDGE_LOG="error"))
        _, err = await asyncio.wait_for(p.communicate(), 240)
        return p.returncode, err.decode()

    for name, args in commands.items():
        rc, err = await run(args)
        lines = [ln for ln in err.splitlines() if "not supported" in ln]
        assert rc == 2, (name, err)
        assert len(lines) == 1 and str(d) in lines[0] and "recurrent-state" in lines[0], err
        assert "Traceback" not in err, (name, err)
