"""The online cost model (specedge/execution/costmodel.py): the start-up costs as a prior,
updated from observed forwards, robust to single outliers, and its probes."""

from __future__ import annotations

from specedge.execution.costmodel import CostModel

# a CPU-like curve: flat to 16 tokens, then growing (knee 16, prefill chunk 32)
IDLE = {1: 0.040, 8: 0.041, 16: 0.050, 24: 0.070, 32: 0.090, 48: 0.130}
# the same machine measured under load at start-up: noisy, the knee collapsed to 1
LOADED = {1: 0.045, 8: 0.120, 16: 0.150}


def test_prior_gives_the_start_up_knee_and_chunk():
    m = CostModel(IDLE)
    assert (m.knee(), m.prefill_chunk()) == (16, 32)
    assert CostModel(LOADED).knee() == 1


def test_observations_land_in_the_bucket_below():
    m = CostModel(IDLE)
    assert [m.bucket_of(n) for n in (1, 7, 8, 20, 600)] == [1, 1, 8, 16, 512]
    m.observe(20, 0.5)
    m.observe(20, 0.5)
    assert m.costs()[16] == 0.5 and m.costs()[24] == IDLE[24]  # (0.05, 0.5, 0.5): median
    m.observe(0, 1.0)  # nothing to learn from an empty or untimed forward
    m.observe(8, 0.0)
    assert m.observations == 2


def test_a_size_seen_once_waits_for_a_second_sample():
    m = CostModel(LOADED)
    m.observe(40, 0.046)  # one long prompt's prefill: a lucky (or mis-bucketed) reading
    assert m.knee() == 1 and 32 not in m.costs()
    m.observe(40, 0.047)
    assert m.knee() == 32


def test_one_outlier_does_not_move_the_knee():
    m = CostModel(IDLE)
    for _ in range(4):
        m.observe(16, 0.050)
    m.observe(16, 2.0)  # a page fault, a GC pause, a neighbour's burst
    assert m.knee() == 16
    m.observe(1, 0.5)  # one slow single-token forward neither
    assert m.knee() == 16


def test_recovers_from_a_loaded_start_within_a_bounded_number_of_samples():
    """Started under load, then idle: each probe the model asks for is answered with the
    idle cost (one of them a spike); the knee is back within three samples per bucket on the
    way up."""
    m = CostModel(LOADED)
    timed = 0
    while m.knee() < 16 and timed < 20:
        n = m.probe()
        assert n is not None
        m.observe(n, 1.0 if timed == 1 else IDLE.get(n, 0.2))
        timed += 1
    assert m.knee() == 16
    assert timed <= 3 * 3  # base, 8 and 16: at most three fresh samples each


def test_follows_a_load_that_comes_and_goes():
    m = CostModel(IDLE)
    for _ in range(3):  # the machine gets busy: forwards above one token cost far more
        m.observe(1, 0.040)
        m.observe(16, 0.200)
    assert m.knee() == 8
    for _ in range(3):  # the load is gone: a majority of the window is idle samples again
        m.observe(16, 0.050)
    assert m.knee() == 16


def test_probes_only_what_no_recent_sample_supports():
    m = CostModel(IDLE, stale_after=12)
    assert m.probe() == 1  # nothing observed yet: the base first
    for _ in range(3):
        m.observe(1, 0.040)
    assert m.probe() == 24  # then just above the knee (16)
    for _ in range(3):
        m.observe(24, 0.070)
    assert m.probe() == 48  # then just above the prefill chunk (32)
    for _ in range(3):
        m.observe(48, 0.130)
    assert m.probe() is None  # all supported
    for _ in range(13):  # forwards of other sizes only: the base's samples grow old
        m.observe(8, 0.041)
    assert m.probe() == 1
