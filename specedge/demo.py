"""python -m specedge.demo: the whole stack on this machine. Starts an embedded nats-server, one
verifier process with the target model, and an edge with the draft model; answers a prompt,
streaming; shuts everything down, also on Ctrl-C or SIGTERM (exit status 130 / 143): the
verifier drains, then the broker stops, and both are waited for.

--api: the edge runs as `specedge.edge serve` and the official openai client streams the
answer from it (--check: then compare with the target model alone, greedy). --serve: keep
the OpenAI-compatible endpoint up until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from specedge import broker, lifecycle, logs, settings, subjects
from specedge.cli import DTYPES, add_common
from specedge.edge.__main__ import EXIT_REFUSED, add_generation_args
from specedge.edge.limits import LimitError
from specedge.edge.suffixdraft import is_suffix
from specedge.execution.support import UnsupportedModel
from specedge.orphan import tied_to_parent

log = structlog.get_logger("specedge.demo")


def parse(argv=None) -> argparse.Namespace:
    from specedge.models import DEFAULT_DRAFT, DEFAULT_TARGET

    p = argparse.ArgumentParser(prog="python -m specedge.demo", description=__doc__)
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default=DEFAULT_DRAFT,
                   help="draft model, or `suffix`: no model, drafts from suffix matches")
    add_common(p)
    p.set_defaults(log_level=os.environ.get("SPECEDGE_LOG", "warning"))  # the answer is the show
    add_generation_args(p)
    p.add_argument("--verifier-threads", type=int, default=None,
                   help="torch threads for the verifier (default: half the cores)")
    p.add_argument("--api", action="store_true",
                   help="answer through `edge serve` with the openai client")
    p.add_argument("--check", action="store_true",
                   help="with --api: compare with the target alone (greedy; loads it here too)")
    p.add_argument("--serve", action="store_true",
                   help="serve the OpenAI-compatible API until Ctrl-C")
    p.add_argument("--port", type=int, default=8000, help="API port for --api/--serve")
    return settings.parse_args(p, "demo", argv)


async def wait_verifier(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Ready = every partition is leased by a verifier."""
    nc = await broker.connect(url, "demo-probe")
    try:
        js = nc.jetstream()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise VerifierExited(proc.returncode)
            if await broker.partitions_served(js) == subjects.PARTITIONS:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("the verifier did not become ready")
    finally:
        await nc.close()


class VerifierExited(RuntimeError):
    """The demo's verifier stopped before serving (e.g. it refused its model: exit 2)."""

    def __init__(self, code: int):
        super().__init__(f"the verifier exited with {code}")
        self.code = code


async def amain(a: argparse.Namespace, url: str, verifier: subprocess.Popen) -> dict:
    from specedge.edge.__main__ import run_edge
    from specedge.models import load_model, load_tokenizer

    a.model = a.draft
    loop = asyncio.get_running_loop()
    # Load the draft while the verifier process loads the target. One thread: transformers'
    # lazy imports are not safe to race.
    if is_suffix(a.draft):  # no draft model: the target's tokenizer, suffix drafts
        tok, draft = await loop.run_in_executor(None, load_tokenizer, a.target), None
    else:
        tok, draft = await loop.run_in_executor(None, lambda: (
            load_tokenizer(a.draft), load_model(a.draft, dtype=DTYPES[a.dtype],
                                                device=a.device)))
    await wait_verifier(url, verifier)
    if a.api or a.serve:
        return await api_demo(a, url, draft, tok)
    log.info("stack ready; answering", prompt=a.prompt[:60])
    return await run_edge(a, url, draft=draft, tokenizer=tok)


async def api_demo(a: argparse.Namespace, url: str, draft, tok) -> dict:
    """`edge serve` in this process; the openai client streams a chat completion from it."""
    from specedge.edge import serve

    a.nats, a.host, a.served_model_name = url, "127.0.0.1", None
    a.max_sessions, a.max_tokens_limit, a.grace_s = 16, 4096, 5.0  # `edge serve`'s own flags
    stop = asyncio.Event()
    started = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve.serve(a, stop, draft=draft, tokenizer=tok, started=started))
    server = await asyncio.wait_for(started, 60)
    base = f"{server.url}/v1"
    model = serve.serve_config(a).model_id
    try:
        if a.serve:
            print(f"OpenAI-compatible API on {base} (model {model!r}); Ctrl-C to stop\n"
                  f"  curl {base}/chat/completions -H 'Content-Type: application/json' -d "
                  f"'{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", "
                  f"\"content\": \"Hello\"}}], \"stream\": true}}'", file=sys.stderr, flush=True)
            await asyncio.Event().wait()  # until Ctrl-C or SIGTERM cancel this task
        import openai

        client = openai.AsyncOpenAI(base_url=base, api_key="not-needed")
        text, usage = "", None
        t0 = time.perf_counter()
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": a.prompt}], stream=True,
            max_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            elif chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                sys.stdout.write(chunk.choices[0].delta.content)
                sys.stdout.flush()
        wall = time.perf_counter() - t0
        await client.close()
        print(f"\n[openai client: {usage.completion_tokens} tokens in {wall:.1f}s via {base}]",
              file=sys.stderr)
        if a.check:
            same = await asyncio.get_running_loop().run_in_executor(
                None, check_against_target, a, tok, text, usage.completion_tokens)
            print("[identical to the target alone, greedy]" if same else
                  "[differs from the target alone: see above]", file=sys.stderr)
        return {"text": text}
    finally:
        stop.set()  # serve stops taking requests and gives those in flight its grace
        while not task.done():  # lifecycle.run's cancellation retries must not cut that short
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                pass
        task.result()


NEAR_TIE = 0.1  # top-2 logit margin under which bf16 noise may honestly flip the pick


def check_against_target(a: argparse.Namespace, tok, text: str, n: int) -> bool:
    """The target alone, greedy, on the same prompt ids. On a difference, print where and the
    target's top-2 margin there: bf16 kernels of different batch shapes may flip a near-tie
    honestly (DESIGN.md section 7); a wider margin is a real divergence."""
    import torch

    from specedge.edge.text import prompt_ids
    from specedge.models import load_model

    target = load_model(a.target, dtype=DTYPES[a.dtype], device=a.device)
    ids = prompt_ids(tok, a.prompt, True)
    dev = target.device
    with torch.no_grad():
        out = target.generate(torch.tensor([ids], device=dev), attention_mask=torch.ones(
            1, len(ids), dtype=torch.long, device=dev), max_new_tokens=n, do_sample=False)
    ref_ids = out[0, len(ids):].tolist()
    ref = tok.decode(ref_ids, skip_special_tokens=True)
    if ref == text:
        return True
    i = next((k for k, (x, y) in enumerate(zip(ref, text, strict=False)) if x != y),
             min(len(ref), len(text)))
    # the first reference token whose text the served answer does not continue with
    k = next((j for j in range(len(ref_ids))
              if not text.startswith(tok.decode(ref_ids[: j + 1], skip_special_tokens=True))),
             len(ref_ids) - 1)
    with torch.no_grad():
        x = torch.tensor([ids + ref_ids[:k]], device=dev)
        top = torch.topk(target(input_ids=x, logits_to_keep=1).logits[0, -1].float(), 2)
    margin = float(top.values[0] - top.values[1])
    why = ("a near-tie, which bf16 kernels of different batch shapes may flip honestly"
           if margin < NEAR_TIE else "not a near-tie: a real divergence (please report it)")
    print(f"first difference at character {i} (token {k}): target alone {ref[i:i + 40]!r}, "
          f"served {text[i:i + 40]!r}; the target's top-2 margin there is {margin:.3g}, {why}",
          file=sys.stderr)
    return False


def stop_child(proc: subprocess.Popen, what: str, timeout_s: float = 30.0,
               hopeless: Callable[[], bool] = lambda: False, grace_s: float = 3.0) -> None:
    """SIGTERM (the verifier drains), wait, then SIGKILL if it would not go. Once `hopeless()`
    (its broker is gone, e.g. Ctrl-C reached the nats-server too), a drain cannot finish: it
    gets `grace_s` more, not the whole timeout."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout_s
        cut = False
        while proc.poll() is None and time.monotonic() < end:
            if not cut and hopeless():
                cut, end = True, min(end, time.monotonic() + grace_s)
            time.sleep(0.05)
        if proc.poll() is None:
            log.warning("child did not stop in time; killed", child=what, pid=proc.pid,
                        broker_gone=cut)
            proc.kill()
            proc.wait()
    log.info("child stopped", child=what, pid=proc.pid, returncode=proc.returncode)


def main(argv=None) -> int:
    a = parse(argv)
    logs.configure(a.log_level)
    log.info("config", command="demo", **settings.effective(a))
    from specedge.models import resolve

    for ref in (a.target, a.draft):
        if not is_suffix(ref):
            resolve(ref)  # a clear error now rather than inside a child process
    cores = os.cpu_count() or 2
    vthreads = a.verifier_threads or max(1, cores // 2)
    # Separate cores for the verifier and the edge, as the deployment would have.
    import torch

    torch.set_num_threads(a.threads or max(1, cores - vthreads))
    state = Path(tempfile.mkdtemp(prefix="specedge-demo-"))
    # From here on a signal unwinds through the finally below, which stops the children.
    lifecycle.raise_on_signals()
    nats_srv = broker.EmbeddedNats(store_dir=state / "nats")
    verifier: subprocess.Popen | None = None
    vlog = open(state / "verifier.log", "wb")  # noqa: SIM115
    rc = 0
    try:
        nats_srv.start()
        broker.run_setup(nats_srv.url)
        env = dict(os.environ, SPECEDGE_LOG=a.log_level)
        verifier = subprocess.Popen(tied_to_parent(
            [sys.executable, "-m", "workers.verifier", "--nats", nats_srv.url, "--model",
             a.target, "--dtype", a.dtype, "--device", a.device, "--threads", str(vthreads),
             "--attention", a.attention,
             *({True: ["--cuda-graphs"], False: ["--no-cuda-graphs"]}.get(a.cuda_graphs, []))]),
            stdout=vlog, stderr=subprocess.STDOUT, env=env)
        log.info("started", broker=nats_srv.url, broker_pid=nats_srv.proc.pid,
                 verifier_pid=verifier.pid, verifier_log=str(state / "verifier.log"))
        logs.install_uvloop()
        lifecycle.run(amain(a, nats_srv.url, verifier))
    except lifecycle.Interrupted as exc:
        print(f"\n{exc}; stopping the verifier and the broker", file=sys.stderr)
        rc = exc.exit_code
    except LimitError as exc:
        print(f"specedge.demo: refused before any work ({exc.code}): {exc.message}",
              file=sys.stderr)
        rc = EXIT_REFUSED
    except UnsupportedModel as exc:  # the draft, refused at load
        print(f"specedge.demo: {exc}", file=sys.stderr)
        rc = exc.exit_code
    except VerifierExited as exc:  # its last line says why (a refused target: one line)
        vlog.flush()
        lines = (state / "verifier.log").read_text(errors="replace").strip().splitlines()
        print(f"specedge.demo: {exc}: {lines[-1] if lines else '(no output)'}",
              file=sys.stderr)
        rc = exc.code or 1
    except Exception as exc:
        log.error("demo failed", error=str(exc), verifier_log=str(state / "verifier.log"))
        rc = 1
    finally:
        lifecycle.ignore_signals()  # the cleanup runs to its end; each wait is bounded
        if verifier is not None:
            stop_child(verifier, "verifier",
                       hopeless=lambda: nats_srv.proc is None or nats_srv.proc.poll() is not None)
        vlog.close()
        nats_srv.cleanup()
        log.info("demo stopped", returncode=rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
