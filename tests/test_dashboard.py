"""deploy/grafana: every metric the dashboard queries (and docs/operations.md lists) is exported
by a running verifier or `edge serve` (real broker, real tiny models, their /metrics scraped),
and the compose file's Prometheus and Grafana are wired to what the fleet serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from specedge.edge import serve
from tests.test_api import _get, _http, api_stack
from tests.tokens import char_tokenizer
from workers.verifier.__main__ import parse as verifier_parse

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "specedge.json"
METRIC = re.compile(r"\bspecedge_[a-z0-9_]+")
# the sample names a family of each type exposes, from its family name
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created"), "summary": ("", "_sum", "_count")}


def panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def queried() -> dict[str, set[str]]:
    """Each sample name the dashboard's PromQL reads -> the panels that read it."""
    out: dict[str, set[str]] = {}
    for p in panels():
        for t in p["targets"]:
            for name in METRIC.findall(t["expr"]):
                out.setdefault(name, set()).add(p["title"])
    return out


def documented() -> set[str]:
    """The metric names of docs/operations.md's tables (`rounds_total` under the
    `specedge_verifier_` column is specedge_verifier_rounds_total)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    out, prefix = set(), None
    for line in text.splitlines():
        head = re.match(r"\| \w+ \(`(specedge_\w+_)`\) \|", line)
        if head:
            prefix = head.group(1)
        elif prefix and line.startswith("| `"):
            first = line.split(" | ")[0]
            out |= {prefix + re.sub(r"\{.*", "", n) for n in re.findall(r"`([^`]+)`", first)}
        elif not line.startswith("|"):
            prefix = None
    return out


def exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """(every family and sample name the scrape can carry, by its TYPE lines, so labelled
    families with no series yet count; the labels seen on each sample name)."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        names |= {fam.name} | {fam.name + s for s in SUFFIXES[fam.type]}
        for s in fam.samples:
            names.add(s.name)
            labels.setdefault(s.name, set()).update(s.labels)
    return names, labels


def test_the_dashboard_reads_what_the_compose_fleet_serves(tmp_path):
    """Datasource uid, scrape ports and mounts line up with deploy/specedge.toml and the
    dashboard's own JSON."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" /
                         "prometheus.yaml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in compose
    assert {p["datasource"]["uid"] for p in panels()} == {ds["uid"]}
    assert all(t["datasource"]["uid"] == ds["uid"] for p in panels() for t in p["targets"])
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))

    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    cfg = str(DEPLOY / "specedge.toml")
    v = verifier_parse(["--config", cfg])
    e = serve.parse(["--config", cfg])
    sd = jobs["verifier"]["dns_sd_configs"][0]
    assert sd["names"] == ["verifier"] and sd["port"] == v.metrics_port
    assert jobs["edge"]["static_configs"][0]["targets"] == [f"edge:{e.port}"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"

    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" /
                               "specedge.yaml").read_text())["providers"][0]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["grafana"]["volumes"]}
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert (DEPLOY / "compose.yaml").parent.joinpath(
        mounts[provider["options"]["path"]], DASHBOARD.name).resolve() == DASHBOARD


@pytest.mark.timeout(300)
async def test_every_metric_the_dashboard_queries_is_exported(nats_server, tiny_pair):
    """A verifier and `edge serve` answer one request; their scrapes cover every name the
    dashboard queries, and every label it groups by is on that name's series."""
    tok = char_tokenizer()
    async with api_stack(nats_server.url, tiny_pair, tok) as (base, w):
        body = {"model": "tiny-target", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]}
        r = await _http(f"{base}/v1/chat/completions", "POST", json.dumps(body).encode())
        assert r.status_code == 200, r.text
        await w.metrics.poll_consumers(w.js, w.leases.owned)
        edge_text = (await _get(f"{base}/metrics")).text
        verifier_text = (await _get(f"{w.http.url}/metrics")).text
    names, labels = exported(edge_text)
    v_names, v_labels = exported(verifier_text)
    names |= v_names
    for k, v in v_labels.items():
        labels.setdefault(k, set()).update(v)

    wanted = queried()
    missing = {n: sorted(p) for n, p in wanted.items() if n not in names}
    assert not missing, f"queried by the dashboard, exported by nobody: {missing}"
    listed = documented()
    assert len(listed) > 30 and not listed - names, \
        f"in docs/operations.md, exported by nobody: {sorted(listed - names)}"
    # the families the issue names are all on the dashboard
    for family in ("specedge_verifier_tokens_total", "specedge_verifier_tokens_per_round_sum",
                   "specedge_verifier_position_accepted_total", "specedge_verifier_batch_fill_bucket",
                   "specedge_verifier_forward_seconds_sum", "specedge_verifier_consumer_lag",
                   "specedge_verifier_redeliveries_total", "specedge_verifier_kv_cache_bytes",
                   "specedge_verifier_rejects_total", "specedge_edge_time_to_first_token_seconds_bucket",
                   "specedge_edge_inter_token_seconds_bucket",
                   "specedge_verifier_prompt_tokens_total", "specedge_edge_prompt_tokens_total"):
        assert family in wanted, family
    # `by (label)` and `{label=...}`: the label exists on the series (where a series exists yet)
    for p in panels():
        for t in p["targets"]:
            used = set(re.findall(r"by \(([^)]*)\)", t["expr"]))
            used = {x.strip() for group in used for x in group.split(",")}
            used |= set(re.findall(r"\{(\w+)=", t["expr"]))
            seen = set().union(*(labels.get(n, set()) for n in METRIC.findall(t["expr"])))
            # instance: added by Prometheus at scrape time; le: the buckets' own
            unknown = used - seen - {"instance", "le"}
            if seen:
                assert not unknown, f"{p['title']}: {t['expr']} groups by {unknown}, not on " \
                                    f"its series ({seen})"
