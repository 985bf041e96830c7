"""Clean stops: the real entry points as processes, SIGTERM (what a supervisor or `timeout`
sends) at a point where they own something, and then no process of theirs left alive.
Descendants are found by scanning /proc (no psutil)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from schemas import SessionClosed
from specedge import broker
from specedge.sessionlog import read_session
from tests.procs import ROOT
from tests.stack import running_worker

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(240)]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, ...]; comm may hold spaces


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _stat(int(d))) is not None:
            children.setdefault(int(st[1]), []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def wait_gone(pids: set[int], timeout: float) -> list[int]:
    """The pids still alive after up to `timeout` seconds."""
    end = time.monotonic() + timeout
    while (left := [k for k in pids if alive(k)]) and time.monotonic() < end:
        time.sleep(0.1)
    return left


class Proc:
    """A command's process with its JSON log lines (stderr) and text (stdout) collected."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.lines: list[dict] = []
        self.text: list[str] = []
        self.out = b""
        self._tasks = [asyncio.create_task(self._read_err()),
                       asyncio.create_task(self._read_out())]

    @classmethod
    async def start(cls, *args: str) -> Proc:
        # its own process group, so a "Ctrl-C" can go to it and its children, as a terminal's
        return cls(await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT))))

    async def _read_err(self) -> None:
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.text.append(line)
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    async def _read_out(self) -> None:
        while chunk := await self.proc.stdout.read(64):
            self.out += chunk

    async def wait_for(self, pred, what: str, timeout: float = 120.0) -> None:
        end = asyncio.get_running_loop().time() + timeout
        while not pred():
            if self.proc.returncode is not None:
                raise AssertionError(f"exited ({self.proc.returncode}) before {what}:\n"
                                     + "".join(self.text)[-3000:])
            if asyncio.get_running_loop().time() > end:
                raise AssertionError(f"timed out waiting for {what}:\n"
                                     + "".join(self.text)[-3000:])
            await asyncio.sleep(0.05)

    def event(self, name: str) -> dict | None:
        return next((x for x in self.lines if x.get("event") == name), None)

    async def stop(self, sig: int, timeout: float = 90.0, group: bool = False) -> int:
        if group:  # a terminal's Ctrl-C: the whole foreground process group
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._tasks)
        return rc

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.mark.parametrize("mode", ["serve", "answer", "ctrl-c"])
async def test_demo_sigterm_stops_verifier_and_broker(model_dirs, mode):
    """`python -m specedge.demo` (embedded nats-server + verifier process + edge), SIGTERM while
    it serves the API (--serve) or streams an answer: it exits 143 after stopping and waiting
    for both children; the verifier drained (exit 0); nothing of it is left running. Ctrl-C in
    a terminal (SIGINT to the whole group, the broker dies at once): 130, nothing left, and
    without waiting out the verifier's drain timeout."""
    target, draft = model_dirs
    extra = ["--serve", "--port", "0"] if mode != "answer" else ["--max-new-tokens", "900"]
    p = await Proc.start("-m", "specedge.demo", "--target", target, "--draft", draft,
                         "--dtype", "float64", "--threads", "1", "--verifier-threads", "1",
                         "--log-level", "debug" if mode == "answer" else "info",
                         "--prompt", "Hello there", *extra)
    try:
        if mode == "answer":  # (its text may be held back: these ids can decode to U+FFFD)
            await p.wait_for(lambda: p.event("round done") is not None, "the first round")
        else:
            await p.wait_for(lambda: any("OpenAI-compatible API on" in t for t in p.text),
                             "the API")
        started = p.event("started")
        kids = descendants(p.proc.pid)
        assert {started["verifier_pid"], started["broker_pid"]} <= kids, (started, kids)
        t0 = time.monotonic()
        rc = await p.stop(signal.SIGINT if mode == "ctrl-c" else signal.SIGTERM,
                          group=mode == "ctrl-c")
        took = time.monotonic() - t0
    finally:
        await p.kill()
    assert rc == (130 if mode == "ctrl-c" else 143), "".join(p.text)[-3000:]
    left = [k for k in kids if alive(k)]
    assert not left, f"left running: {left}"
    assert p.event("demo stopped")["returncode"] == rc
    stopped = {x["child"]: x["returncode"] for x in p.lines if x.get("event") == "child stopped"}
    if mode == "ctrl-c":
        assert took < 15, took
    else:
        assert stopped == {"verifier": 0}, stopped  # drained on its SIGTERM, not killed
    if mode == "answer":
        assert p.event("session finished") is None  # cut short, not run to the end


async def test_demo_killed_leaves_nothing_behind(model_dirs):
    """kill -9 (or the OOM killer) on the demo runs no `finally`: its children get SIGTERM
    from the kernel (the parent-death signal) and stop as they would on a supervisor's
    SIGTERM: the verifier drains and says so, the broker exits."""
    target, draft = model_dirs
    p = await Proc.start("-m", "specedge.demo", "--target", target, "--draft", draft,
                         "--dtype", "float64", "--threads", "1", "--verifier-threads", "1",
                         "--log-level", "info", "--serve", "--port", "0")
    try:
        await p.wait_for(lambda: any("OpenAI-compatible API on" in t for t in p.text), "the API")
        started = p.event("started")
        kids = {started["verifier_pid"], started["broker_pid"]}
        assert kids <= descendants(p.proc.pid), (started, descendants(p.proc.pid))
        p.proc.kill()
        await p.proc.wait()
        left = await asyncio.to_thread(wait_gone, kids, 30.0)
    finally:
        await p.kill()
    assert not left, "left running after kill -9 of the demo"
    vlog = await asyncio.to_thread(Path(started["verifier_log"]).read_text, errors="replace")
    assert '"verifier stopped"' in vlog and "Traceback" not in vlog, vlog[-3000:]


async def test_tied_to_parent_exits_when_its_parent_already_died():
    """The race the wrapper closes: a parent gone before the signal was armed."""
    import subprocess

    from specedge.orphan import tied_to_parent

    cmd = tied_to_parent(["sleep", "30"])
    assert cmd[-2:] == ["sleep", "30"] and cmd[0] == sys.executable
    cmd[3] = "1"  # a "parent" that is not ours: as if it had died before the prctl
    done = await asyncio.to_thread(subprocess.run, cmd, timeout=10)
    assert done.returncode == 128 + signal.SIGTERM


async def test_verifier_with_embedded_broker_stops_it_on_sigterm(model_dirs):
    """`python -m workers.verifier` without --nats owns a nats-server: SIGTERM as soon as it
    has started it (usually still loading the model: 143; a warm machine may be serving by
    then: a drain, 0) and SIGTERM while serving (a drain, 0) both stop and reap the broker."""
    target, _ = model_dirs
    args = ["-m", "workers.verifier", "--model", target, "--dtype", "float64", "--threads", "1",
            "--log-level", "info", "--adaptive-batch-tokens", "16"]
    for phase, event in (("early", "no --nats given: started an embedded broker"),
                         ("serving", "verifier ready")):
        p = await Proc.start(*args)
        try:
            await p.wait_for(lambda e=event, p=p: p.event(e) is not None, event)
            nats_pid = p.event("no --nats given: started an embedded broker")["pid"]
            assert nats_pid in descendants(p.proc.pid)
            rc = await p.stop(signal.SIGTERM)
        finally:
            await p.kill()
        want = {0: "verifier stopped", 143: "stopped before serving"}
        assert rc in (want if phase == "early" else {0}), (phase, "".join(p.text)[-3000:])
        assert p.event(want[rc]) is not None, (phase, rc)
        if rc == 0:  # the signal and every drain step are in the log
            assert p.event("stop requested; draining")["reason"] == "SIGTERM"
            steps = [x["step"] for x in p.lines if x.get("event") == "drain step"]
            assert steps[0] == "stop pulling" and "close the connection" in steps, steps
            assert p.event("drained") is not None
        assert not alive(nats_pid), f"{phase}: the embedded nats-server was left running"


_LIFECYCLE = """
import asyncio, sys, time
from specedge import lifecycle, logs
logs.configure("info")  # log lines to stderr: stdout is what the test compares

async def main():
    try:
        print("ready", flush=True)
        await asyncio.sleep(60)
    finally:
        await asyncio.sleep(0.1)  # an await inside the unwinding still runs
        print("async cleanup", flush=True)

async def swallowing():  # as 3.11's wait_for does when its result lands with the cancel
    print("ready", flush=True)
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        print("swallowed", flush=True)
    try:
        await asyncio.sleep(60)
    finally:
        print("async cleanup", flush=True)

if sys.argv[1] == "sync":
    lifecycle.raise_on_signals()
    try:
        print("ready", flush=True)
        time.sleep(60)
    except lifecycle.Interrupted as exc:
        print("sync cleanup", flush=True)
        sys.exit(exc.exit_code)
try:
    lifecycle.run(swallowing() if sys.argv[1] == "swallow" else main(), retry_s=0.5)
except lifecycle.Interrupted as exc:
    sys.exit(exc.exit_code)
"""


@pytest.mark.parametrize("phase, sig, rc", [("sync", signal.SIGTERM, 143),
                                            ("loop", signal.SIGTERM, 143),
                                            ("loop", signal.SIGINT, 130),
                                            ("swallow", signal.SIGTERM, 143)])
async def test_lifecycle_turns_signals_into_an_unwind(phase, sig, rc):
    """The mechanism every entry point uses, deterministically: outside the event loop a signal
    raises Interrupted where the code stands; inside, it cancels the main coroutine, whose
    finally blocks (awaits included) run, again if a cancellation was swallowed; the exit
    status is 128 + the signal."""
    p = await Proc.start("-c", _LIFECYCLE, phase)
    try:
        await p.wait_for(lambda: b"ready" in p.out, "ready", timeout=30)
        assert await p.stop(sig, timeout=10) == rc
    finally:
        await p.kill()
    want = {"sync": "ready sync cleanup", "swallow": "ready swallowed async cleanup"}
    assert p.out.decode().split() == want.get(phase, "ready async cleanup").split()
    assert (p.event("still running after a stop signal; cancelling again") is not None) == (
        phase == "swallow")


async def test_edge_cli_sigterm_closes_its_session(nats_server, tiny_pair, model_dirs):
    """`python -m specedge.edge`, SIGTERM mid-answer: exit 143, and its session is closed on the
    broker (the verifiers stop counting it against the edge) instead of left open."""
    target_model, _ = tiny_pair
    _, draft = model_dirs
    async with running_worker(target_model, nats_server.url) as w:
        p = await Proc.start("-m", "specedge.edge", "--nats", nats_server.url, "--model", draft,
                             "--target", "tiny", "--dtype", "float64", "--threads", "1",
                             "--log-level", "info", "--prompt", "Hello there",
                             "--max-new-tokens", "900")
        try:
            await p.wait_for(lambda: w.stats.blocks >= 3, "three rounds verified")
            rc = await p.stop(signal.SIGTERM)
        finally:
            await p.kill()
        sid = p.event("session opened")["sid"]
        nc = await broker.connect(nats_server.url, "probe")
        try:
            slog = await read_session(nc.jetstream(), sid)
        finally:
            await nc.close()
    assert rc == 143, "".join(p.text)[-3000:]
    closed = [e.msg for e in slog.entries if isinstance(e.msg, SessionClosed)]
    assert [c.reason for c in closed] == ["error"]
    assert "stopped by SIGTERM" in "".join(p.text)
    assert p.event("session finished") is None and w.stats.tokens < 900


_STUCK = """
import time
from specedge import lifecycle
lifecycle.dump_stacks_on_signal()

def stuck_here():
    print("ready", flush=True)
    time.sleep(60)

stuck_here()
"""


async def test_sigusr2_dumps_the_stacks_and_the_process_goes_on():
    """A stuck process shows where it is on `kill -USR2` (what the verifier and edge entry
    points install) and is not stopped by it."""
    p = await Proc.start("-c", _STUCK)
    try:
        await p.wait_for(lambda: b"ready" in p.out, "ready", timeout=30)
        p.proc.send_signal(signal.SIGUSR2)
        await p.wait_for(lambda: "stuck_here" in "".join(p.text), "the stack dump", timeout=10)
        assert p.proc.returncode is None
        assert "(most recent call first)" in "".join(p.text)
    finally:
        await p.kill()
