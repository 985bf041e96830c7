"""The configuration file: the real commands' parsers, precedence flag > env > file > default,
start-up errors that name the key, and the masked first log line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from specedge import settings
from specedge.edge import serve
from specedge.edge.__main__ import parse as edge_parse
from tests.procs import ROOT
from workers.verifier.__main__ import parse as verifier_parse


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("SPECEDGE_") and k != "SPECEDGE_MODELS":
            monkeypatch.delenv(k)


def write(tmp_path, text: str, name: str = "specedge.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_precedence_flag_over_env_over_file_over_default(tmp_path, monkeypatch):
    cfg = write(tmp_path, """
[verifier]
max_batch = 4
max-nodes = 32
ack_wait = 3
kv_budget = "512MiB"
name = "from-file"
[edge]
tree_budget = 12
proactive = "off"
port = 9000          # belongs to `edge serve`; the one-shot edge accepts it silently
""")
    a = verifier_parse(["--config", cfg])
    assert (a.max_batch, a.max_nodes, a.ack_wait, a.kv_budget, a.name) == (
        4, 32, 3.0, (None, 512 * 2**20, None), "from-file")
    assert a.max_depth == 16  # default: not in the file
    monkeypatch.setenv("SPECEDGE_MAX_BATCH", "6")
    monkeypatch.setenv("SPECEDGE_VERIFIER_NAME", "from-env")
    a = verifier_parse(["--config", cfg])
    assert (a.max_batch, a.name) == (6, "from-env")
    a = verifier_parse(["--config", cfg, "--max-batch", "2"])
    assert (a.max_batch, a.name) == (2, "from-env")
    monkeypatch.setenv("SPECEDGE_CONFIG", cfg)  # the file named by the environment
    e = edge_parse([])
    assert (e.tree_budget, e.proactive) == (12, "off")
    s = serve.parse([])
    assert (s.port, s.tree_budget, s.host) == (9000, 12, "127.0.0.1")
    monkeypatch.setenv("SPECEDGE_CHAT", "false")
    assert edge_parse([]).chat is False


def test_limit_keys(tmp_path):
    """The limits are configuration like every flag: the verifier's (published on the board)
    and the edge's own, which `edge` and `edge serve` share."""
    cfg = write(tmp_path, """
[verifier]
max_prompt_tokens = 4096
max_positions = 16384
[edge]
max_prompt_tokens = 2048
max_tokens_limit = 512
""")
    v = verifier_parse(["--config", cfg])
    assert (v.max_prompt_tokens, v.max_positions) == (4096, 16384)
    assert edge_parse(["--config", cfg]).max_prompt_tokens == 2048
    s = serve.parse(["--config", cfg])
    assert (s.max_prompt_tokens, s.max_tokens_limit) == (2048, 512)
    assert edge_parse([]).max_prompt_tokens is None  # default: the fleet's


@pytest.mark.parametrize("text, message", [
    ("[verifier]\nmax_bach = 4\n", "unknown key 'max_bach' in [verifier] (did you mean 'max_batch'?)"),
    ("[verifier]\nmax_batch = 'eight'\n", "max_batch (from"),
    ("[verifier]\nmax_batch = 2.5\n", "expected an integer, got 2.5"),
    ("[verifier]\nmax_batch = true\n", "expected an integer, got True"),
    ("[verifier]\ndtype = 'int8'\n", "'int8' is not one of"),
    ("[verifier]\nkv_budget = '8 parsecs'\n", "bad KV budget"),
    ("[verifeir]\nmax_batch = 2\n", "unknown section(s) ['verifeir']"),
    ("[verifier\n", "does not parse"),
])
def test_bad_config_fails_at_start_with_the_key(tmp_path, capsys, text, message):
    cfg = write(tmp_path, text)
    with pytest.raises(SystemExit) as e:
        verifier_parse(["--config", cfg])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "configuration:" in err


def test_bad_env_value_and_missing_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECEDGE_MAX_BATCH", "many")
    with pytest.raises(SystemExit):
        verifier_parse([])
    assert "$SPECEDGE_MAX_BATCH" in capsys.readouterr().err
    monkeypatch.delenv("SPECEDGE_MAX_BATCH")
    with pytest.raises(SystemExit):
        verifier_parse(["--config", str(tmp_path / "absent.toml")])
    assert "cannot read config file" in capsys.readouterr().err


def test_yaml_file_and_masking(tmp_path):
    cfg = write(tmp_path, "edge:\n  nats: nats://edge:s3cret@broker:4222\n  seed: 5\n",
                "c.yaml")
    a = edge_parse(["--config", cfg])
    assert a.nats == "nats://edge:s3cret@broker:4222" and a.seed == 5
    shown = settings.effective(a)
    assert shown["nats"] == "nats://edge:***@broker:4222"
    assert shown["seed"] == 5  # the sampling seed is not a secret; an NKey seed is
    assert settings.mask("nkey_seed", "SUAB") == "***"
    assert shown["max_new_tokens"] == 128  # "tokens" is not "token": not a secret
    assert settings.mask("user_creds", "/path") == "***"
    assert settings.mask("api_key", "abc") == "***"


def test_first_log_line_is_the_masked_config(tmp_path):
    """The real command: its first stderr line (JSON: not a terminal) is the effective
    configuration; a missing broker then stops it with a clear message."""
    cfg = write(tmp_path, "[edge]\nport = 8123\nmax_sessions = 3\n")
    p = subprocess.run([sys.executable, "-m", "specedge.edge", "serve", "--config", cfg],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                            "SPECEDGE_SEED": "99"})
    assert p.returncode == 2
    first = json.loads(p.stderr.splitlines()[0])
    assert first["event"] == "config" and first["command"] == "edge serve"
    assert (first["port"], first["max_sessions"], first["seed"]) == (8123, 3, 99)
    assert "no broker given" in p.stderr
