"""The benchmark's arithmetic: rows from session records, ratios against the baselines."""

from __future__ import annotations

import pytest

from bench.report import add_ratios, summarize, table


def sessions(tokens_rounds: list[tuple[int, int]], itl: float, cat: str = "coding") -> list[dict]:
    return [{"category": cat, "tokens": t, "rounds": r, "accepted": t - r, "drafted": 4 * r,
             "itl": [itl] * (t - 1), "ttft_s": 0.5, "hits": 1, "judged": 2}
            for t, r in tokens_rounds]


def test_summarize_fields_and_cost():
    row = summarize("specedge", 4, 0.0, sessions([(40, 10), (20, 5)], 0.1), busy_s=6.0,
                    wall_s=10.0, batch_sizes=[2, 4], max_batch=8, edge_held_s=40.0,
                    prices={"server_usd_per_h": 3.6, "edge_usd_per_h": 0.36})
    assert row["tokens"] == 60 and row["tokens_per_round"] == 4.0
    assert row["server_tokens_per_busy_s"] == pytest.approx(10.0)
    assert row["server_tokens_per_wall_s"] == pytest.approx(6.0)
    assert row["acceptance"] == pytest.approx(45 / 60)
    assert row["server_idle_fraction"] == pytest.approx(0.4)
    assert row["batch_fill"] == pytest.approx(3 / 4)
    assert row["proactive_hit_rate"] == pytest.approx(0.5)
    # server 10 s at $3.6/h = $0.01, edges 40 s at $0.36/h = $0.004; per million tokens
    assert row["cost_per_mtok_usd"] == pytest.approx(0.014 / 60 * 1e6)
    assert row["itl_p50_s"] == pytest.approx(0.1)
    assert row["tokens_per_round_by_category"] == {"coding": 4.0}


def test_ratios_pair_rows_by_edges_and_temperature():
    mk = lambda cfg, e, busy: summarize(cfg, e, 0.0, sessions([(30, 10)], 0.2), busy, busy,  # noqa: E731
                                        [1], 8)
    rows = add_ratios([mk("ar", 1, 10.0), mk("server-spec", 1, 5.0), mk("specedge", 1, 2.0),
                       mk("specedge", 4, 2.0)])
    se = rows[2]
    assert se["vs_ar"]["server_tokens_per_busy_s"] == pytest.approx(5.0)
    assert se["vs_server_spec"]["server_tokens_per_busy_s"] == pytest.approx(2.5)
    assert rows[3]["vs_ar"] is None  # no ar row at 4 edges
    assert "| specedge | 1 |" in table(rows)
