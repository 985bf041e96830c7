"""An ASGI app served by uvicorn inside the caller's event loop (the edge's or the verifier's),
so HTTP handlers share the loop, the NATS connection and the models with the rest of the
process. The owner keeps its own signal handlers (the verifier's SIGTERM drain) and uvicorn's
log lines go through structlog like every other line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import structlog
import uvicorn

log = structlog.get_logger(__name__)


class _StructlogHandler(logging.Handler):
    """uvicorn logs through the standard library; forward its records to structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        getattr(structlog.get_logger(record.name), level if level != "critical" else "error",
                structlog.get_logger(record.name).info)(record.getMessage())


def _bridge_uvicorn_logs() -> None:
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        if not any(isinstance(h, _StructlogHandler) for h in lg.handlers):
            lg.addHandler(_StructlogHandler())
        lg.setLevel(logging.WARNING)  # startup chatter is replaced by our own "listening" line
        lg.propagate = False


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the process owner decides when to stop (stop() below)


class HttpServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, name: str = "http"):
        _bridge_uvicorn_logs()
        self.name = name
        self.server = _Server(uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
            loop="none", timeout_graceful_shutdown=5))
        self._task: asyncio.Task | None = None
        self._sock: socket.socket | None = None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock else self.server.config.port

    @property
    def url(self) -> str:
        host = self.server.config.host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"

    async def start(self, timeout: float = 10.0) -> HttpServer:
        # Bind here, not in uvicorn: a taken port is then a plain OSError with the address,
        # where uvicorn would call sys.exit inside our event loop.
        cfg = self.server.config
        try:
            self._sock = socket.create_server((cfg.host, cfg.port), reuse_port=False)
        except OSError as exc:
            raise OSError(exc.errno, f"{self.name}: cannot listen on {cfg.host}:{cfg.port}: "
                                     f"{exc.strerror}") from None
        self._task = asyncio.create_task(self.server.serve(sockets=[self._sock]))
        end = asyncio.get_running_loop().time() + timeout
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"{self.name}: HTTP server stopped at start-up")
            if asyncio.get_running_loop().time() > end:
                raise TimeoutError(f"{self.name}: HTTP server did not start")
            await asyncio.sleep(0.01)
        log.info("listening", server=self.name, url=self.url)
        return self

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, 10)
        self._task = None
        if self._sock is not None:
            self._sock.close()
