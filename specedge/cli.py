"""Command-line pieces shared by the entry points."""

from __future__ import annotations

import argparse
import os

# the names only: torch takes a second to import, and the demo parses its flags and starts its
# verifier before it needs torch (DTYPES, the torch dtypes, imports it on first use)
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")


def __getattr__(name: str):
    if name == "DTYPES":
        import torch

        return {n: getattr(torch, n) for n in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats", default=os.environ.get("SPECEDGE_NATS"),
                   help="broker URL (default: $SPECEDGE_NATS)")
    add_auth(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPE_NAMES)],
                   help="model dtype (auto: bfloat16 on a GPU that computes it natively; on a "
                        "CPU the faster of bfloat16 and float32, timed at start-up: bfloat16 "
                        "wins only where the CPU computes it natively, AVX512-BF16 or AMX)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--log-level", default=os.environ.get("SPECEDGE_LOG", "info"))
    p.add_argument("--attention", choices=["auto", "sdpa", "flex"], default="auto",
                   help="attention over the KV pool (auto: flex on CUDA if it checks out "
                        "against sdpa at start-up, else sdpa)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay CUDA graphs of the forward per bucket of tokens (default: on "
                        "CUDA with the flex backend and a fixed-size KV pool)")


def runner_opts(a: argparse.Namespace) -> dict:
    """PackedRunner keyword arguments from the flags of add_common."""
    return {"attention": getattr(a, "attention", "auto"),
            "cuda_graphs": getattr(a, "cuda_graphs", None)}


def add_auth(p: argparse.ArgumentParser) -> None:
    """Broker credentials and TLS (see specedge/auth.py and deploy/nats/secure.conf)."""
    env = os.environ.get
    p.add_argument("--nkey-seed", default=env("SPECEDGE_NKEY_SEED"),
                   help="NKey seed file of this process's broker user ($SPECEDGE_NKEY_SEED)")
    p.add_argument("--creds", default=env("SPECEDGE_CREDS"),
                   help="JWT .creds file, for brokers run with nsc accounts ($SPECEDGE_CREDS)")
    p.add_argument("--tls-ca", default=env("SPECEDGE_TLS_CA"),
                   help="CA bundle that signed the broker's certificate ($SPECEDGE_TLS_CA)")
    p.add_argument("--tls-cert", default=env("SPECEDGE_TLS_CERT"),
                   help="client certificate, for mutual TLS ($SPECEDGE_TLS_CERT)")
    p.add_argument("--tls-key", default=env("SPECEDGE_TLS_KEY"),
                   help="client key, for mutual TLS ($SPECEDGE_TLS_KEY)")
    p.add_argument("--inbox-prefix", default=env("SPECEDGE_INBOX_PREFIX"),
                   help="reply inbox prefix; an edge defaults to _INBOX_<edge name>, the only "
                        "inbox its broker user may read ($SPECEDGE_INBOX_PREFIX)")


def connect_opts(a: argparse.Namespace, inbox_prefix: str | None = None) -> dict:
    """broker.connect keyword arguments from the flags of add_auth."""
    from specedge.auth import connect_options

    return connect_options(a.nkey_seed, a.creds, a.tls_ca, a.tls_cert, a.tls_key,
                           a.inbox_prefix or inbox_prefix)


def apply_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)
