"""docs/cli.md from the commands' own argument parsers: `python -m specedge.clidoc` (or
`make docs`) rewrites it, and tests/test_docs.py fails when the file and the parsers disagree.

Each command's parser is taken from its real entry point: the entry point is called with
parse_known_args intercepted, so what is rendered is the parser `--help` prints (the --config
flag that specedge.settings adds included), and nothing runs past argument parsing."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

WIDTH = 100  # fixed, so the file does not depend on the terminal that regenerates it
OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


@dataclass(frozen=True)
class Command:
    module: str  # python -m MODULE
    argv: tuple[str, ...] = ()  # what selects a subcommand dispatched by hand (`edge serve`)
    entry: str = "main"  # the function that builds and parses the arguments
    what: str = ""  # one line for the table of contents

    @property
    def title(self) -> str:
        return " ".join(("python -m", self.module, *self.argv))


COMMANDS: tuple[Command, ...] = (
    Command("specedge.demo", what="the whole stack on this machine"),
    Command("workers.verifier", what="a verifier worker (target model)"),
    Command("specedge.edge", what="one prompt from the command line (draft model)"),
    Command("specedge.edge", ("serve",), what="the edge as an OpenAI-compatible endpoint"),
    Command("specedge.broker", what="the stream and its consumers"),
    Command("specedge.replay", what="a session's rounds read back from the stream"),
    Command("specedge.auth", what="broker users, keys and TLS configuration"),
    Command("specedge.models", what="the model cache"),
    Command("specedge.synthetic", what="random-weight models of real shapes"),
    Command("bench", what="every configuration side by side"),
    Command("bench.loop", what="one edge's round-time split"),
    Command("bench.proactive", what="proactive drafting off / single / multi"),
    Command("bench.scaling", what="the verifier's control path, 1 and 2 workers"),
    Command("bench.kernels", what="the packed forward against dense batches"),
    Command("bench.longprompt", what="what a long prompt costs the others"),
    Command("bench.conversations", what="multi-turn chat with and without the prefix cache"),
    Command("bench.transforms", what="the cost of logit transforms"),
    Command("bench.grammar", what="the cost of structured output"),
    Command("bench.hostpath", what="the verifier's host-side path"),
    Command("bench.pick", what="the sampled pick"),
    Command("bench.flexlayout", what="FlexAttention block layouts"),
    Command("bench.suffixreplay", what="model-free drafting replayed on recorded answers"),
    Command("bench.corpusbuild", what="a suffix corpus from a target's answers to public edit requests"),
    Command("bench.gpu_check", entry="parse", what="every GPU check in one run"),
)


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _capture(self: argparse.ArgumentParser, *args, **kwargs):
    raise _Captured(self)


def parser_of(cmd: Command) -> argparse.ArgumentParser:
    """The parser cmd's entry point builds; it is stopped at its first parse."""
    mod = importlib.import_module(cmd.module)
    if hasattr(mod, "__path__"):  # a package: `python -m` runs its __main__
        mod = importlib.import_module(f"{cmd.module}.__main__")
    fn: Callable = getattr(mod, cmd.entry)
    # entry points that read sys.argv themselves see only the subcommand
    with mock.patch.object(sys, "argv", [cmd.module, *cmd.argv]), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", _capture):
        try:
            fn(list(cmd.argv)) if cmd.argv or _takes_argv(fn) else fn()
        except _Captured as c:
            return c.parser
    raise RuntimeError(f"{cmd.title}: its entry point returned without parsing arguments")


def _takes_argv(fn: Callable) -> bool:
    return fn.__code__.co_argcount > 0


def _subparsers(p: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


@contextlib.contextmanager
def _fixed_width(p: argparse.ArgumentParser) -> Iterator[None]:
    """Help at WIDTH columns whatever the terminal, and with `python -m` in the usage line
    for the few parsers that leave prog to sys.argv[0]."""
    old = p.formatter_class
    p.formatter_class = functools.partial(old, width=WIDTH)
    try:
        yield
    finally:
        p.formatter_class = old


def help_text(p: argparse.ArgumentParser, prog: str) -> str:
    if not p.prog.startswith("python -m"):
        p.prog = prog
    with _fixed_width(p):
        return p.format_help().rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, spaces to dashes, other punctuation dropped."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def render() -> str:
    """docs/cli.md as the parsers are now."""
    out = ["# Command-line reference", "",
           "Generated from the commands' own argument parsers by `make docs`",
           "(`python -m specedge.clidoc`); do not edit by hand. Every flag of `workers.verifier`,",
           "`specedge.edge`, `specedge.edge serve` and `specedge.demo` can also be set in the",
           "configuration file or the environment",
           "([operations.md](operations.md#configuration)).",
           ""]
    out += [f"* [`{c.title}`](#{_anchor(c.title.replace('python -m ', ''))}): {c.what}"
            for c in COMMANDS]
    for c in COMMANDS:
        p = parser_of(c)
        out += ["", f"## {c.title.replace('python -m ', '')}", "", "```text",
                help_text(p, c.title).rstrip(), "```"]
        for name, sp in _subparsers(p):
            out += ["", f"### {c.title.replace('python -m ', '')} {name}", "", "```text",
                    help_text(sp, f"{c.title} {name}").rstrip(), "```"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("SPECEDGE_LOG", "warning")
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
