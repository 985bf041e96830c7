"""The README and docs/ against the code: the command-line reference is what the parsers print,
the picture is what its source draws, every flag the manual names exists, every local link and
anchor resolves, and the README stays a front door."""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from schemas import wire
from specedge import clidoc, subjects

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# pages whose flags are checked against the parsers: the README and the manual (cli.md is the
# parsers' own output; results.md and gpu-check.md record runs, with the flags of their day)
MANUAL = [ROOT / "README.md", *(p for p in sorted(DOCS.glob("*.md"))
                                 if p.name not in {"cli.md", "results.md", "gpu-check.md"})]
# flags of other programs the manual shows: nats-server, docker, pytest, pip, venv, curl, make
FOREIGN_FLAGS = {"--signal", "--scale", "--system-site-packages", "--no-deps", "--no-index",
                 "--upgrade", "--only-binary", "--python-version", "--implementation",
                 "--platform"}


def stale(name: str, want: str, have: str) -> str:
    diff = difflib.unified_diff(have.splitlines(), want.splitlines(), f"{name} (committed)",
                                f"{name} (from the code)", lineterm="", n=1)
    return f"{name} is stale: run `make docs`\n" + "\n".join(list(diff)[:40])


def test_the_cli_reference_is_what_the_parsers_print(monkeypatch):
    """docs/cli.md == the live parsers' help, whatever the terminal width and environment."""
    monkeypatch.setenv("COLUMNS", "47")
    monkeypatch.setenv("SPECEDGE_NATS", "nats://elsewhere:4222")
    have = (DOCS / "cli.md").read_text()
    want = clidoc.render()
    assert want == have, stale("docs/cli.md", want, have)


def test_the_cli_reference_covers_every_command():
    """Every module that builds an argument parser is in the reference."""
    documented = {c.module for c in clidoc.COMMANDS} | {"specedge.edge.serve"}
    found = set()
    for top in ("specedge", "workers", "bench"):
        for path in (ROOT / top).rglob("*.py"):
            if "ArgumentParser(" in path.read_text():
                mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                found.add(mod.removesuffix(".__main__"))
    assert found - documented == set(), "add them to specedge.clidoc.COMMANDS"


def all_flags() -> set[str]:
    flags: set[str] = set()
    for c in clidoc.COMMANDS:
        p = clidoc.parser_of(c)
        parsers = [p, *(sp for _, sp in clidoc._subparsers(p))]
        for q in parsers:
            for action in q._actions:
                flags.update(action.option_strings)  # --x and --no-x of a boolean flag
    return flags


def test_every_flag_the_manual_names_exists():
    known = all_flags() | FOREIGN_FLAGS
    unknown = {}
    for page in MANUAL:
        for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", page.read_text())):
            if flag not in known:
                unknown.setdefault(flag, []).append(page.name)
    assert not unknown, f"flags no command has: {unknown}"


def load_system():
    spec = importlib.util.spec_from_file_location("docs_system", DOCS / "system.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_the_picture_is_drawn_from_its_source_and_the_code():
    svg = load_system().render()
    have = (DOCS / "system.svg").read_text()
    assert svg == have, stale("docs/system.svg", svg, have)
    sid = "&lt;edge&gt;.&lt;nonce&gt;"
    for kind in subjects.KINDS:  # the three session subjects, the stored draft subject
        assert f"{subjects.PREFIX}.{kind}.{sid}" in svg
    assert f"{subjects.PREFIX}.draft.&lt;p&gt;.{sid}" in svg
    for name in (subjects.STREAM, subjects.LEASES, subjects.FLEET, subjects.fleet_query(),
                 subjects.fleet_limits(), subjects.partition_durable(0),
                 subjects.partition_durable(subjects.PARTITIONS - 1)):
        assert name in svg, name
    for t in (wire.SessionOpened, wire.DraftBlock, wire.Verdict, wire.Rejected,
              wire.SessionClosed):
        assert t.__name__ in svg
    assert svg.count(">edge ") >= 3 and svg.count(">verifier ") >= 2  # several of each


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not comments in code
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))],
                         ids=lambda p: p.name)
def test_local_links_and_anchors_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: link to {target}: no such heading"


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "\nmake demo   #" in readme and "\nmake test   #" in readme
    assert "](docs/system.svg)" in readme
    for page in ("running", "cli", "api", "limits", "operations", "models", "design",
                 "benchmarks"):
        assert f"](docs/{page}.md)" in readme, page
