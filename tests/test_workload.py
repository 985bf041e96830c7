"""The Spec-Bench prompts ship with the project: read from the package, not from a directory
beside the checkout; SPECEDGE_SPEC_BENCH still points elsewhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench import workload
from tests.procs import ROOT


def test_default_copy_is_inside_the_package(monkeypatch):
    monkeypatch.delenv("SPECEDGE_SPEC_BENCH", raising=False)
    path = workload.spec_bench_path()
    assert path.is_file() and path.is_relative_to(ROOT / "bench")
    for name in ("SOURCE.md", "LICENSE"):  # provenance and licence travel with the data
        assert (path.parent / name).is_file()
    qs = workload.load()
    assert len(qs) == 480 and qs[0]["question_id"] == 81
    counts = {c: sum(q["category"] == c for q in qs) for c in ("coding", "translation", "rag")}
    assert counts == {"coding": 10, "translation": 80, "rag": 80}


def test_filters_keep_file_order(monkeypatch):
    monkeypatch.delenv("SPECEDGE_SPEC_BENCH", raising=False)
    qs = workload.load(per_category=2, categories=["qa", "coding"])
    assert [q["category"] for q in qs] == ["coding", "coding", "qa", "qa"]
    assert qs[0]["question_id"] < qs[1]["question_id"] < qs[2]["question_id"]
    assert all(isinstance(q["prompt"], str) and q["prompt"] for q in qs)


def test_env_override(tmp_path, monkeypatch):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question_id": 7, "category": "x", "turns": ["hi", "again"]}) + "\n")
    monkeypatch.setenv("SPECEDGE_SPEC_BENCH", str(f))
    assert workload.load() == [{"question_id": 7, "category": "x", "prompt": "hi"}]


def test_a_lone_copy_of_the_package_reads_its_prompts(tmp_path):
    """No sibling folder of shared data: the bench package copied on its own still finds the
    prompts."""
    shutil.copytree(ROOT / "bench", tmp_path / "bench",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    code = "from bench import workload as w; print(w.spec_bench_path(), len(w.load()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    path, n = out.stdout.split()
    assert Path(path).is_relative_to(tmp_path) and n == "480"


def test_nothing_reads_a_directory_beside_the_checkout():
    tracked = subprocess.run(["git", "ls-files", "*.py", "Makefile", "*.toml", "*.cfg"],
                             cwd=ROOT, capture_output=True, text=True).stdout.split()
    beside = "shared"  # the folder next to a developer's checkout, absent from a clone
    patterns = (f'"{beside}"', f"../{beside}")
    offenders = [f for f in tracked if f != "tests/test_workload.py"
                 and any(s in (ROOT / f).read_text() for s in patterns)]
    assert not offenders, offenders


def test_shipped_data_is_package_data():
    """Every file the prompts and the synthetic models read is declared as package data, so an
    installed wheel carries it (checked by building one when this was written)."""
    import tomllib
    from pathlib import PurePosixPath

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    for pkg, folder in (("bench", "bench/data"), ("specedge", "specedge/assets")):
        files = [f for f in (ROOT / folder).rglob("*") if f.is_file()]
        assert files
        for f in files:
            rel = PurePosixPath(f.relative_to(ROOT / pkg).as_posix())
            assert any(rel.match(g) for g in globs[pkg]), f"{f} is not package data"
