import pytest
import torch

from specedge.execution.tree import (
    TreeError,
    ancestor_bits,
    ancestor_mask,
    children_map,
    depths_of,
    path_to,
    unpack_rows,
    validate_parents,
)


def test_depths_and_validation():
    assert validate_parents([0, 0, 1, 3]) == [1, 1, 2, 3]
    with pytest.raises(TreeError):
        validate_parents([0, 2])  # parent not earlier
    with pytest.raises(TreeError):
        validate_parents([1])  # self-reference
    with pytest.raises(TreeError):
        validate_parents([0, -1])
    with pytest.raises(TreeError, match="deeper"):
        validate_parents([0, 1, 2], max_depth=2)


def test_ancestor_mask():
    m = ancestor_mask([0, 0, 1])  # root -> 1 -> 3, root -> 2
    expect = torch.tensor([
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expect)
    assert torch.equal(ancestor_mask([0, 0, 1], include_root=False), expect[1:, 1:])


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 200])
def test_ancestor_mask_is_the_paths_to_the_root(n):
    """Against the definition (a node sees exactly the nodes on its path from the root), for
    trees whose bitmasks span one byte, a byte boundary, and many bytes."""
    import random

    rng = random.Random(n)
    parents = [rng.randrange(i) for i in range(1, n + 1)]
    full = ancestor_mask(parents)
    assert full.dtype == torch.bool and full.shape == (n + 1, n + 1)
    for i in range(n + 1):
        assert set(torch.nonzero(full[i]).flatten().tolist()) == {0, *path_to(i, parents)}
    assert torch.equal(ancestor_mask(parents, include_root=False), full[1:, 1:])
    assert ancestor_bits(parents) == [sum(1 << (j - 1) for j in path_to(i, parents))
                                      for i in range(1, n + 1)]


def test_unpack_rows():
    rows = unpack_rows([0b101, 0b1], 3, lead=2)
    assert rows.tolist() == [[False] * 3, [False] * 3, [True, False, True], [True, False, False]]
    assert unpack_rows([0, 0], 0).shape == (2, 0)
    assert ancestor_mask([]).tolist() == [[True]] and ancestor_mask([], include_root=False).shape == (0, 0)


def chain_then_tree_mask(chain_len: int, parents: list[int]) -> torch.Tensor:
    """What a verifier segment's rows see (a chain ending at the root, then the tree), as
    the packed forward's plan computes it."""
    from specedge.execution import KVPool, Segment
    from specedge.execution.plan import build_plan

    pool = KVPool(1, 1, 1, torch.float32, "cpu", block_size=4)
    seq = pool.new_seq()
    seg = Segment.tree(seq, list(range(chain_len)), [9] * len(parents), parents,
                       depths_of(parents))
    seq.prepare_write(0, len(seg.tokens))
    plan = build_plan([seg], pool, torch.device("cpu"))
    n = len(seg.tokens)
    return plan.visible(torch.arange(n), n)


def test_chain_then_tree_mask():
    m = chain_then_tree_mask(2, [0, 1])
    expect = torch.tensor([
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expect)
    m = chain_then_tree_mask(1, [0, 0])  # siblings never see each other
    assert not m[1, 2] and not m[2, 1] and m[2, 0]


def test_children_and_paths():
    kids = children_map([5, 6, 7, 5], [0, 0, 1, 0])
    assert kids[0] == {5: 1, 6: 2} and kids[1] == {7: 3}  # duplicate 5 under root: first wins
    assert path_to(3, [0, 0, 1, 0]) == [1, 3]
    assert path_to(0, [0]) == []
