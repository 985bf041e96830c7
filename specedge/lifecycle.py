"""Stopping on SIGTERM and SIGINT alike, with every `finally` run.

Python's default SIGTERM action ends the process on the spot: no `finally`, no child stopped.
A supervisor, `timeout` or `kill` sends SIGTERM, so every entry point that owns something
(child processes, an open session) turns both signals into an orderly unwind:

* before and after its event loop: `raise_on_signals()` makes them raise `Interrupted`;
* inside it: `run()` cancels the main task instead (a handler raising inside the loop could
  land anywhere), then raises `Interrupted` once the task has unwound;
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


def ignore_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run(main), where SIGTERM/SIGINT cancel `main` (its `finally` blocks and those of
    what it awaits run) and then raise Interrupted. Outside the main thread: plain asyncio.run."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(main)
    raise_on_signals()  # until the loop's own handlers are in place
    return asyncio.run(_guarded(main))


async def _guarded(main: Coroutine[Any, Any, Any]) -> Any:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    got: list[int] = []

    def on_signal(signum: int) -> None:
        if not got:  # the first one cancels; more while unwinding change nothing
            got.append(signum)
            task.cancel()

    for s in SIGNALS:
        loop.add_signal_handler(s, on_signal, s)
    try:
        return await main
    except asyncio.CancelledError:
        if got:
            raise Interrupted(got[0]) from None
        raise
    finally:
        for s in SIGNALS:
            loop.remove_signal_handler(s)
        raise_on_signals()  # the loop's removal reset them to the defaults
