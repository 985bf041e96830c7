"""The packed forward must give the same logits as the stock model run on each path alone."""

import torch

from specedge.kvstore import new_store
from specedge.runner import PackedRunner, Segment
from specedge.tree import chain_then_tree_mask, depths_of, path_to
from tests.conftest import tiny_model


def plain_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def test_packed_batch_matches_plain_forward():
    model = tiny_model(11)
    runner = PackedRunner(model)
    g = torch.Generator().manual_seed(0)
    sessions = []
    for length, parents in [(5, [0, 0, 1, 1, 3]), (17, []), (1, [0, 1, 2]), (9, [0, 0, 0, 2])]:
        prompt = torch.randint(0, 256, (length,), generator=g).tolist()
        nodes = torch.randint(0, 256, (len(parents),), generator=g).tolist()
        sessions.append((prompt, parents, nodes))
    segs = []
    for prompt, parents, nodes in sessions:
        c = len(prompt)
        pos = list(range(c)) + [c - 1 + d for d in depths_of(parents)]
        segs.append(Segment(new_store(model), torch.tensor(prompt + nodes), torch.tensor(pos),
                            chain_then_tree_mask(c, parents), 0,
                            [c - 1] + [c + i for i in range(len(nodes))]))
    out = runner.forward(segs)
    assert runner.forward_calls == 1
    for (prompt, parents, nodes), logits in zip(sessions, out, strict=True):
        assert torch.allclose(logits[0], plain_logits(model, prompt), atol=1e-10)
        for i in range(1, len(nodes) + 1):
            path = [nodes[j - 1] for j in path_to(i, parents)]
            assert torch.allclose(logits[i], plain_logits(model, prompt + path), atol=1e-10)


def test_keep_rolls_back_to_the_accepted_path():
    model = tiny_model(12)
    runner = PackedRunner(model)
    prompt, parents, nodes = [3, 1, 4, 1, 5], [0, 0, 2, 1], [9, 2, 6, 5]
    kv = new_store(model)
    pos = list(range(5)) + [4 + d for d in depths_of(parents)]
    runner.forward([Segment(kv, torch.tensor(prompt + nodes), torch.tensor(pos),
                            chain_then_tree_mask(5, parents), 0, [4])])
    kv.keep(0, list(range(5)) + [5 + 1, 5 + 2])  # accept node 2 then node 3
    assert kv.length == 7
    seq = prompt + [2, 6]
    (logits,) = runner.forward([Segment(kv, torch.tensor([8]), torch.tensor([7]),
                                        torch.ones(1, 1, dtype=torch.bool), 7, [0])])
    assert torch.allclose(logits[0], plain_logits(model, seq + [8]), atol=1e-10)
    fresh = new_store(model)
    runner.forward([Segment(fresh, torch.tensor(seq + [8]), torch.arange(8),
                            torch.ones(8, 8, dtype=torch.bool).tril(), 0, [7])])
    assert torch.allclose(kv.view()[0], fresh.view()[0], atol=1e-12)
    assert torch.allclose(kv.view()[1], fresh.view()[1], atol=1e-12)
