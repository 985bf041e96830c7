"""python -m specedge.demo: the whole stack on this machine. Starts an embedded nats-server, one
verifier process with the target model, and an edge with the draft model; answers a prompt,
streaming; shuts everything down, also on Ctrl-C or SIGTERM (exit status 130 / 143): the
verifier drains, then the broker stops, and both are waited for.

--api: the edge runs as `specedge.edge serve` and the official openai client streams the
answer from it (--check: then compare with the target model alone, greedy). --serve: keep
the OpenAI-compatible endpoint up until Ctrl-C.

Edge and verifier share this machine's cores, so the demo runs them as a single-box install
should: one model forward at a time (no drafting ahead, no idle cost probes, no start-up cost
calibration: each only takes the other's cores), the first round carries the prompt alone (the
first token once the target has read it; the draft model's load, its prefill and first tree
come after), and at the end it says what the target alone would take here for the same
answer. The terminal shows the answer and those figures; the logs go to files in the run's
directory (--log-level or $SPECEDGE_LOG: to the terminal instead)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import structlog

# Light imports only up to the verifier's start: the edge's (the model code, transformers)
# come after it, so that both processes' imports run side by side (see main).
from specedge import broker, lifecycle, logs, settings, subjects
from specedge.cli import add_common
from specedge.config import TreeShape, is_suffix
from specedge.edge.args import LONE_PREFILL_CHUNK, add_generation_args
from specedge.orphan import tied_to_parent

log = structlog.get_logger("specedge.demo")


def parse(argv=None) -> argparse.Namespace:
    from specedge.models import DEFAULT_DRAFT, DEFAULT_TARGET

    p = argparse.ArgumentParser(prog="python -m specedge.demo", description=__doc__)
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default=DEFAULT_DRAFT,
                   help="draft model, or `suffix`: no model, drafts from suffix matches")
    add_common(p)
    # None: the answer is the show, the logs go to files (configure_logs)
    p.set_defaults(log_level=os.environ.get("SPECEDGE_LOG"))
    add_generation_args(p)
    # one machine: a draft of the next round while this one is verified takes the verifier's
    # cores (--proactive single to try it anyway)
    p.set_defaults(proactive="off")
    # and the first token as soon as the target has read the prompt: the draft's prefill and
    # first tree come after it (--first-tree: before it, as an edge's own device does)
    p.set_defaults(first_tree=False)
    p.add_argument("--verifier-threads", type=int, default=None,
                   help="torch threads for the verifier (default: every core, as the edge's: "
                        "one forward runs at a time)")
    p.add_argument("--compare", action="store_true",
                   help="after the answer, stop the stack and time the target alone (greedy, "
                        "every core) for as many tokens")
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
    from specedge.edge.limits import LimitError
    from specedge.execution.support import UnsupportedModel

    try:
        return await answer(a, url, verifier)
    except (LimitError, UnsupportedModel) as exc:
        raise Refusal() from exc


async def answer(a: argparse.Namespace, url: str, verifier: subprocess.Popen) -> dict:
    from specedge.edge.__main__ import run_edge

    a.model = a.draft
    loop = asyncio.get_running_loop()
    loader = None
    if late_draft(a):
        # the first round carries the prompt alone and nothing drafts ahead: the draft is
        # loaded when the session first needs it, after the first token, so that the
        # verifier's load, check and prefill have the cores to themselves until then
        tok = await loop.run_in_executor(None, load_draft_tokenizer, a)
        loader, draft, runner = DraftLoader(a, tok), None, None
    else:
        # Load the draft (and check it on its packed path) while the verifier process loads
        # the target. One thread: transformers' lazy imports are not safe to race.
        tok, draft, runner = await loop.run_in_executor(None, load_draft, a)
    await wait_verifier(url, verifier)
    if a.api or a.serve:
        return await api_demo(a, url, draft, tok)
    log.info("stack ready; answering", prompt=a.prompt[:60])
    summary = await run_edge(a, url, draft=draft, tokenizer=tok, runner=runner,
                             lazy_runner=loader)
    if not a.json and summary["token_ids"]:
        summary["one_token_s"] = await one_token_cost(a, url, draft, tok, runner, loader)
    return summary


def late_draft(a: argparse.Namespace) -> bool:
    """Whether the draft model can wait until the session needs it (see answer)."""
    from specedge import synthetic

    return (not a.first_tree and a.proactive == "off" and not is_suffix(a.draft)
            and not (a.api or a.serve) and not synthetic.is_synthetic(a.draft))


def load_draft_tokenizer(a: argparse.Namespace):
    """The draft's tokenizer, with its fingerprint and id count kept on it for the session's
    open: remembered on disk (a warm machine hashes no vocabulary), else computed now, while
    the verifier loads."""
    from specedge.models import load_tokenizer, tokenizer_identity

    tok = load_tokenizer(a.draft)
    tokenizer_identity(a.draft, tok)
    return tok


class DraftLoader:
    """The draft model and its checked PackedRunner, loaded on the first call (from the
    session's draft thread), the same ones on every later call."""

    def __init__(self, a: argparse.Namespace, tok):
        self.a, self.tok = a, tok
        self.draft = self.runner = None
        self._lock = threading.Lock()

    def __call__(self):
        from specedge.cli import runner_opts
        from specedge.execution import PackedRunner
        from specedge.models import load_model, tokenizer_identity
        from specedge.vocab import token_count

        with self._lock:
            if self.runner is None:
                log.info("loading the draft")
                a = self.a
                count = tokenizer_identity(a.draft, self.tok)[1] or token_count(self.tok)
                self.draft = load_model(a.draft, dtype=a.dtype, device=a.device)
                self.runner = PackedRunner(self.draft, vocab_limit=count, **runner_opts(a))
                log.info("draft ready")
        return self.runner


def load_draft(a: argparse.Namespace) -> tuple:
    """The draft's tokenizer, model and PackedRunner (whose construction checks the model
    against its own attention: a second of forwards, done here before the verifier is up);
    the target's tokenizer and no model for suffix drafts."""
    from specedge.models import load_model, load_tokenizer

    if is_suffix(a.draft):  # no draft model: the target's tokenizer, suffix drafts
        return load_tokenizer(a.target), None, None
    tok = load_draft_tokenizer(a)
    if a.api or a.serve:  # edge serve builds its own runner
        return tok, load_model(a.draft, dtype=a.dtype, device=a.device), None
    loader = DraftLoader(a, tok)
    runner = loader()
    return tok, loader.draft, runner


PLAIN_ROUNDS = 4  # one-token forwards timed after the answer (the first, a prefill, not counted)


async def one_token_cost(a: argparse.Namespace, url: str, draft, tok, runner,
                         loader: DraftLoader | None = None) -> float | None:
    """Seconds of the target's one-token forward on this verifier: a few rounds of plain
    decoding of the same prompt (no tree; its prefill comes from the prefix cache), each
    verdict's forward time as the verifier measured it. None if it could not be measured."""
    from specedge.edge.__main__ import run_edge

    b = copy.copy(a)
    b.tree_budget, b.chain, b.adaptive, b.json = 0, None, False, True
    b.max_new_tokens, b.proactive = PLAIN_ROUNDS + 1, "off"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its JSON line is not the answer
            s = await run_edge(b, url, draft=draft, tokenizer=tok, runner=runner,
                               lazy_runner=loader)
    except Exception as exc:
        log.warning("could not time the target's one-token forward", error=str(exc)[:200])
        return None
    times = [r["verify_s"] for r in s["round_records"][1:] if r["verify_s"] > 0]
    return statistics.median(times) if times else None


def target_alone_s(summary: dict, one_token_s: float) -> float:
    """The target alone, greedy, for the same answer on this machine: its prompt's prefill
    (the first round's forward, which also held the first tree: an overestimate by that
    much) and a one-token forward per further token."""
    rounds = summary["round_records"]
    prefill = rounds[0]["verify_s"] if rounds else 0.0
    return prefill + max(0, len(summary["token_ids"]) - 1) * one_token_s


def truth(summary: dict, alone_s: float | None, how: str, cores: int, dtype: str) -> str:
    """The closing lines: the demo's own wall beside the target alone's, and why."""
    n, wall = len(summary["token_ids"]), summary["wall_s"]
    if alone_s is None:
        head = f"[speculation: {n} tokens in {wall:.1f}s on this machine ({dtype})"
    else:
        head = (f"[speculation: {n} tokens in {wall:.1f}s; the target alone, greedy, {how}: "
                f"{alone_s:.1f}s for the same {n} tokens here ({dtype}, {wall / alone_s:.2f}x "
                f"its time)")
    return (f"{head}.\n Here the edge and the verifier take turns on this machine's {cores} "
            f"cores, so one machine shows little of the design's gain: a server's capacity "
            f"across many edges, each drafting on its own device (`make bench`, "
            f"docs/results.md).]")


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

    target = load_model(a.target, dtype=a.dtype, device=a.device)
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


class Refusal(Exception):
    """Raised for the edge's refusals (LimitError, UnsupportedModel), which the demo imports
    only after its verifier started (see main)."""


def refused(exc: Refusal) -> int:
    """Say why, in one line; the exit status of the refusal."""
    from specedge.edge.__main__ import EXIT_REFUSED
    from specedge.edge.limits import LimitError

    err = exc.__cause__
    if isinstance(err, LimitError):
        print(f"specedge.demo: refused before any work ({err.code}): {err.message}",
              file=sys.stderr)
        return EXIT_REFUSED
    print(f"specedge.demo: {err}", file=sys.stderr)  # the draft, refused at load
    return err.exit_code


def threads(cores: int, verifier: int | None, edge: int | None) -> tuple[int, int]:
    """Torch threads of the verifier and of the edge. Every core for each by default: the
    demo runs one forward at a time (the edge waits for each verdict, the verifier for each
    block), so a split would only leave half the cores idle in every forward."""
    return max(1, verifier or cores), max(1, edge or cores)


def configure_logs(a: argparse.Namespace, state: Path) -> Path | None:
    """--log-level (or $SPECEDGE_LOG): the logs go to the terminal, as every command's. Else
    the answer is the show: this process's log (info) goes to demo.log in the run's directory
    (the verifier's to verifier.log), python's and transformers' warnings and progress bars
    with it, and the terminal shows the answer, the figures and any error."""
    if a.log_level:
        logs.configure(a.log_level)
        return None
    path = state / "demo.log"
    logs.configure("info", json=True)
    out = open(path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=out))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def to_log(message, category, filename, lineno, file=None, line=None) -> None:
        log.warning("python warning", category=category.__name__, message=str(message),
                    where=f"{filename}:{lineno}")

    warnings.showwarning = to_log
    return path


def quiet_transformers() -> None:
    """Its progress bars and advice off the terminal (imported here, after the verifier
    process started: the import takes seconds)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def time_target_alone(a: argparse.Namespace, n: int) -> float:
    """--compare: seconds of the target alone, greedy, writing n tokens for the prompt here
    with every core (the stack stopped first: its memory and cores are free)."""
    import torch

    from specedge.edge.text import prompt_ids
    from specedge.models import load_model, load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    ids = prompt_ids(load_tokenizer(a.draft), a.prompt, a.chat)
    target = load_model(a.target, dtype=a.dtype, device=a.device)
    x = torch.tensor([ids], device=target.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False)
    return time.perf_counter() - t0


def choose_dtype(a: argparse.Namespace, vthreads: int, ethreads: int):
    """--dtype resolved (`auto`: timed with the verifier's threads, what it will run), one
    choice for both processes; torch then keeps the edge's threads."""
    import torch

    from specedge.models import pick_dtype

    torch.set_num_threads(vthreads)
    choice = pick_dtype(a.target, a.dtype, a.device)
    a.dtype = choice.dtype
    torch.set_num_threads(ethreads)
    return choice


def main(argv=None) -> int:
    a = parse(argv)
    state = Path(tempfile.mkdtemp(prefix="specedge-demo-"))
    log_file = configure_logs(a, state)
    log.info("config", command="demo", **settings.effective(a))
    from specedge.models import resolve

    for ref in (a.target, a.draft):
        if not is_suffix(ref):
            resolve(ref)  # a clear error now rather than inside a child process
    cores = os.cpu_count() or 2
    vthreads, ethreads = threads(cores, a.verifier_threads, a.threads)
    # From here on a signal unwinds through the finally below, which stops the children.
    lifecycle.raise_on_signals()
    nats_srv = broker.EmbeddedNats(store_dir=state / "nats")
    verifier: subprocess.Popen | None = None
    vlog = open(state / "verifier.log", "wb")  # noqa: SIM115
    rc, result = 0, None
    try:
        nats_srv.start()
        broker.run_setup(nats_srv.url)
        env = dict(os.environ, SPECEDGE_LOG=a.log_level or "info")
        # The verifier starts first: its imports (seconds) run while this process imports
        # torch and times the dtypes; under --dtype auto it reads the choice from its stdin
        # before loading, so that both processes run one choice.
        # No start-up cost calibration and so no idle probes: on one machine they only take
        # the cores the edge drafts on, and delay the first answer by a dozen forwards. The
        # knee is the default tree's, the prefill chunk a lone session's.
        late = a.dtype == "auto"
        verifier = subprocess.Popen(tied_to_parent(
            [sys.executable, "-m", "workers.verifier", "--nats", nats_srv.url, "--model",
             a.target, *(["--dtype-from-stdin"] if late else ["--dtype", a.dtype]),
             "--device", a.device, "--threads", str(vthreads),
             "--attention", a.attention, "--adaptive-batch-tokens", str(TreeShape().budget),
             "--prefill-chunk", str(LONE_PREFILL_CHUNK),
             *({True: ["--cuda-graphs"], False: ["--no-cuda-graphs"]}.get(a.cuda_graphs, []))]),
            stdin=subprocess.PIPE if late else None, stdout=vlog, stderr=subprocess.STDOUT,
            env=env)
        choice = choose_dtype(a, vthreads, ethreads)
        if late:
            with contextlib.suppress(BrokenPipeError):  # it exited: wait_verifier says why
                verifier.stdin.write(f"{choice.dtype}\n".encode())
                verifier.stdin.close()
        log.info("started", broker=nats_srv.url, broker_pid=nats_srv.proc.pid,
                 verifier_pid=verifier.pid, verifier_log=str(state / "verifier.log"),
                 verifier_threads=vthreads, edge_threads=ethreads, **choice.fields())
        if log_file is not None:
            quiet_transformers()
        logs.install_uvloop()
        result = lifecycle.run(amain(a, nats_srv.url, verifier))
    except lifecycle.Interrupted as exc:
        print(f"\n{exc}; stopping the verifier and the broker", file=sys.stderr)
        rc = exc.exit_code
    except Refusal as exc:
        rc = refused(exc)
    except VerifierExited as exc:  # its last line says why (a refused target: one line)
        vlog.flush()
        lines = (state / "verifier.log").read_text(errors="replace").strip().splitlines()
        print(f"specedge.demo: {exc}: {lines[-1] if lines else '(no output)'}",
              file=sys.stderr)
        rc = exc.code or 1
    except Exception as exc:
        log.error("demo failed", error=str(exc), verifier_log=str(state / "verifier.log"))
        print(f"specedge.demo: failed: {exc} (logs in {state})", file=sys.stderr)
        rc = 1
    finally:
        lifecycle.ignore_signals()  # the cleanup runs to its end; each wait is bounded
        if verifier is not None:
            if verifier.stdin is not None and not verifier.stdin.closed:
                with contextlib.suppress(OSError):  # no choice came: it reads an end of file
                    verifier.stdin.close()
            stop_child(verifier, "verifier",
                       hopeless=lambda: nats_srv.proc is None or nats_srv.proc.poll() is not None)
        vlog.close()
        nats_srv.cleanup()
        log.info("demo stopped", returncode=rc)
    if rc == 0 and result and "one_token_s" in result:
        rc = report(a, result, cores)
        if log_file is not None:
            print(f"[logs: {state}]", file=sys.stderr)
    return rc


def report(a: argparse.Namespace, summary: dict, cores: int) -> int:
    """The closing figures: the target alone beside the demo's own wall, measured with
    --compare, else estimated from the verifier's own one-token forward."""
    alone, how = None, ""
    if a.compare:
        try:
            alone, how = time_target_alone(a, len(summary["token_ids"])), "measured"
        except Exception as exc:  # the answer stands; only the comparison failed
            print(f"specedge.demo: --compare failed: {exc}", file=sys.stderr)
    elif summary["one_token_s"]:
        alone = target_alone_s(summary, summary["one_token_s"])
        how = (f"estimated from the verifier's one-token forward "
               f"({summary['one_token_s'] * 1000:.0f} ms, timed after the answer)")
    log.info("target alone", seconds=alone, how=how, wall_s=summary["wall_s"])
    print(truth(summary, alone, how, cores, a.dtype), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
