"""Stopping on SIGTERM and SIGINT alike, with every `finally` run.

Python's default SIGTERM action ends the process on the spot: no `finally`, no child stopped.
A supervisor, `timeout` or `kill` sends SIGTERM, so every entry point that owns something
(child processes, an open session) turns both signals into an orderly unwind:

* before and after its event loop: `raise_on_signals()` makes them raise `Interrupted`;
* inside it: `run()` cancels the main coroutine's task instead (a handler raising inside the
  loop could land anywhere), then raises `Interrupted` once it has unwound;
* while cleaning up: `ignore_signals()`, so a second Ctrl-C cannot cut the cleanup short
  (every wait in it has its own timeout).

The exit status is 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports
a process killed by it, but reached cleanly.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """A stop asked for by a signal. BaseException: `except Exception` must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, _frame) -> None:
    raise Interrupted(signum)


def raise_on_signals() -> None:
    """SIGTERM and SIGINT raise Interrupted in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise)


STACKS_SIGNAL = signal.SIGUSR2  # SIGUSR1 is the verifier's counters (log_stats)


def dump_stacks_on_signal() -> None:
    """`kill -USR2 PID` writes every thread's Python stack to stderr (faulthandler, from the
    C level: it works while the event loop is stuck), and the process goes on."""
    import faulthandler
    import sys

    if threading.current_thread() is threading.main_thread():
        faulthandler.register(STACKS_SIGNAL, file=sys.stderr, all_threads=True, chain=False)


def ignore_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def run(main: Coroutine[Any, Any, Any], retry_s: float = 1.0) -> Any:
    """asyncio.run(main), where SIGTERM/SIGINT cancel `main` (its `finally` blocks and those of
    what it awaits run) and then raise Interrupted. Outside the main thread: plain asyncio.run.

    Python 3.11's asyncio.wait_for drops a cancellation that lands in the same loop iteration as
    the result it waits for (a verdict arriving, say), and the session would run on. So `main`
    runs as its own task and is cancelled again every `retry_s` until it has ended; keep
    `retry_s` above the time its cleanup awaits (or make those awaits tolerate a retry)."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(main)
    raise_on_signals()  # until the loop's own handlers are in place
    return asyncio.run(_guarded(main, retry_s))


async def _guarded(main: Coroutine[Any, Any, Any], retry_s: float) -> Any:
    loop = asyncio.get_running_loop()
    inner = asyncio.ensure_future(main)
    stop = loop.create_future()

    def on_signal(signum: int) -> None:
        if not stop.done():  # the first one stops; more while unwinding change nothing
            log.info("stop signal; unwinding", signal=signal.Signals(signum).name)
            stop.set_result(signum)

    for s in SIGNALS:
        loop.add_signal_handler(s, on_signal, s)
    try:
        await asyncio.wait({inner, stop}, return_when=asyncio.FIRST_COMPLETED)
        tries = 0
        while not inner.done():
            if tries:
                log.info("still running after a stop signal; cancelling again", tries=tries)
            inner.cancel()
            tries += 1
            await asyncio.wait({inner}, timeout=retry_s)
        if stop.done() and (inner.cancelled() or inner.exception() is None):
            raise Interrupted(stop.result())
        return inner.result()
    except asyncio.CancelledError:  # this task itself cancelled (the loop shutting down)
        inner.cancel()
        raise
    finally:
        for s in SIGNALS:
            loop.remove_signal_handler(s)
        raise_on_signals()  # the loop's removal reset them to the defaults
