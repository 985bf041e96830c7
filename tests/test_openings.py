"""state.Openings: a broadcast opening stands in for the log only when it is unambiguous."""

from __future__ import annotations

from schemas import SCHEMA_VERSION, Sampling, SessionOpened, pack_ids
from workers.verifier.state import Openings


def opening(prompt: list[int]) -> SessionOpened:
    return SessionOpened(v=SCHEMA_VERSION, prompt=pack_ids(prompt), sampling=Sampling(), seed=0,
                         max_new_tokens=8, eos_ids=pack_ids([]), target="t", draft="d",
                         vocab_size=256)


def test_taken_once_and_discarded_on_close():
    o = Openings()
    o.add("e.a", opening([1, 2, 3]))
    o.add("e.b", opening([4]))
    o.discard("e.b")
    assert o.take("e.a") == opening([1, 2, 3])
    assert o.take("e.a") is None and o.take("e.b") is None and len(o) == 0


def test_a_repeated_opening_is_kept_and_a_different_one_leaves_it_to_the_log():
    o = Openings()
    o.add("e.a", opening([1, 2]))
    o.add("e.a", opening([1, 2]))  # a retried publish: the same body
    assert o.take("e.a") == opening([1, 2])
    o.add("e.b", opening([1, 2]))
    o.add("e.b", opening([9, 9]))
    o.add("e.b", opening([1, 2]))
    assert o.take("e.b") is None


def test_bounded_in_bytes_oldest_first():
    o = Openings(max_bytes=40)  # 10 token ids
    for i in range(4):
        o.add(f"e.s{i}", opening([i] * 4))  # 16 bytes each
    assert o.take("e.s0") is None and o.take("e.s1") is None
    assert o.take("e.s2") is not None and o.take("e.s3") is not None
