"""The verifier process's /metrics, /health and /ready (what the Kubernetes probes call),
started through its CLI with --metrics-port."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

from tests.procs import ProcWorker


def test_verifier_process_serves_probes_and_metrics(nats_server, target_dir, tmp_path):
    w = ProcWorker(nats_server.url, target_dir, "vm", tmp_path, "--metrics-port", "0",
                   "--metrics-host", "127.0.0.1")
    try:
        url = None
        for _ in range(600):
            for line in w.log().splitlines():
                if line.startswith("{") and json.loads(line).get("server") == "verifier-metrics":
                    url = json.loads(line)["url"]
            if url or w.proc.poll() is not None:
                break
            time.sleep(0.1)
        assert url, w.log()[-2000:]
        with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["partitions"] == list(range(16))
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            body = r.read().decode()
        assert "specedge_verifier_partitions 16.0" in body
        assert "specedge_verifier_rounds_total 0.0" in body
        first = json.loads(w.log().splitlines()[0])
        assert first["event"] == "config" and first["metrics_port"] == 0
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0
    finally:
        w.stop()
