"""Children that die with their parent, even when the parent is SIGKILLed (OOM killer, kill -9),
which no `finally` survives: on Linux the child is started through this file run as a script,
which arms the parent-death signal (SIGTERM, so the verifier still drains and the nats-server
still shuts down cleanly) and then execs the real command in the same process. Elsewhere the
command runs as it is.

Stdlib only, and run by path rather than `-m`: it must not import the package or its deps."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1


def tied_to_parent(cmd: list[str]) -> list[str]:
    """`cmd` wrapped so that it gets SIGTERM when this process dies. The kernel sends it when
    the spawning *thread* ends, so only a main-thread spawn is wrapped (a pool thread may end
    long before the process)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
            threading.main_thread()):
        return list(cmd)
    # -I: no script folder on sys.path (a module of the package could shadow the stdlib)
    return [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), *cmd]


def main(argv: list[str]) -> int:
    parent, cmd = int(argv[0]), argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        print(f"orphan: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); "
              f"{cmd[0]} will outlive a killed parent", file=sys.stderr)
    if os.getppid() != parent:  # the parent died before the signal was armed
        return 128 + signal.SIGTERM
    os.execvp(cmd[0], cmd)
    return 127  # not reached: execvp raises on failure


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
