"""specedge.models without network or the real models: reference resolution, the chunk join and
its checksum, and the fetch short-circuit when a complete conversion is cached."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from specedge import models
from specedge.models import DEFAULT_DRAFT, DEFAULT_TARGET, KNOWN_MODELS, MARKER


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "models"
    monkeypatch.setenv("SPECEDGE_MODELS", str(root))
    return root


def _complete(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / MARKER).write_text("ok\n")
    return d


def test_models_dir_env_and_default(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert models.models_dir() == cache
    monkeypatch.delenv("SPECEDGE_MODELS")
    assert models.models_dir() == Path.home() / ".cache" / "specedge" / "models"


def test_registry_has_the_pair() -> None:
    assert {DEFAULT_TARGET, DEFAULT_DRAFT} <= KNOWN_MODELS.keys()
    for spec in KNOWN_MODELS.values():
        assert len(spec.sha256) == 64 and spec.gguf_file.endswith(".gguf")
        assert spec.requirements()[0] == f"{spec.package_prefix}1=={spec.version}"
        assert len(spec.packages()) == spec.count
        assert spec.hub_id.lower().endswith("/" + spec.name)


def test_resolve_local_dir(tmp_path: Path, cache: Path) -> None:
    assert models.resolve(str(tmp_path)) == str(tmp_path)


def test_resolve_short_name_and_alias_present(cache: Path) -> None:
    d = _complete(cache, DEFAULT_DRAFT)
    assert models.resolve(DEFAULT_DRAFT) == str(d)
    assert models.resolve(KNOWN_MODELS[DEFAULT_DRAFT].hub_id) == str(d)


@pytest.mark.parametrize("partial", [False, True])
def test_resolve_short_name_absent(cache: Path, partial: bool) -> None:
    if partial:  # a directory without the marker is a crashed conversion, not a model
        (cache / DEFAULT_TARGET).mkdir(parents=True)
    with pytest.raises(models.ModelNotFetchedError) as e:
        models.resolve(DEFAULT_TARGET)
    assert f"python -m specedge.models fetch {DEFAULT_TARGET}" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


def test_resolve_hub_id_passthrough(cache: Path) -> None:
    assert models.resolve("someorg/some-model") == "someorg/some-model"


def _parts(tmp_path: Path, chunks: list[bytes]) -> list[Path]:
    paths = []
    for i, c in enumerate(chunks, 1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(c)
        paths.append(p)
    return paths


def test_join_parts_ok(tmp_path: Path) -> None:
    chunks = [b"GGUF" + bytes(range(50)), b"x" * 1000, b"tail"]
    want = hashlib.sha256(b"".join(chunks)).hexdigest()
    out = models.join_parts(_parts(tmp_path, chunks), tmp_path / "m.gguf", want.upper(),
                            progress=False)
    assert out.read_bytes() == b"".join(chunks)


def test_join_parts_checksum_mismatch(tmp_path: Path) -> None:
    parts = _parts(tmp_path, [b"abc", b"def"])
    wrong = hashlib.sha256(b"defabc").hexdigest()  # right bytes, wrong order
    out = tmp_path / "m.gguf"
    with pytest.raises(models.ChecksumError) as e:
        models.join_parts(parts, out, wrong, progress=False)
    assert isinstance(e.value, ValueError)
    assert wrong in str(e.value) and hashlib.sha256(b"abcdef").hexdigest() in str(e.value)
    assert not out.exists()  # no half-trusted file left behind


def test_join_parts_reads_wheels(tmp_path: Path) -> None:
    """Chunks are read straight out of the wheels, in the order given."""
    chunks = [b"first-", b"second"]
    wheels = []
    for i, c in enumerate(chunks, 1):
        w = tmp_path / f"pkg_part{i}-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"pkg_part{i}/__init__.py", "")
            zf.writestr(f"pkg_part{i}/data/part{i:02d}.bin", c)
        wheels.append(w)
    want = hashlib.sha256(b"first-second").hexdigest()
    out = models.join_parts(wheels, tmp_path / "m.gguf", want, progress=False)
    assert out.read_bytes() == b"first-second"


def test_fetch_noop_when_complete(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*a, **k):
        raise AssertionError("fetch tried to download a model that is already cached")

    monkeypatch.setattr(models, "download_wheels", no_download)
    d = _complete(cache, DEFAULT_DRAFT)
    assert models.fetch(DEFAULT_DRAFT) == d
    assert models.fetch(KNOWN_MODELS[DEFAULT_DRAFT].hub_id) == d
    # Without the marker it is not complete, so fetch must try to download.
    (d / MARKER).unlink()
    with pytest.raises(AssertionError, match="already cached"):
        models.fetch(DEFAULT_DRAFT)
    assert not [p for p in cache.iterdir() if p.name.startswith(".fetch-")]  # temp cleaned up


def test_fetch_unknown_name(cache: Path) -> None:
    with pytest.raises(KeyError, match="unknown model"):
        models.fetch("no-such-model")


def test_cli_path_and_list(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _complete(cache, DEFAULT_DRAFT)
    assert models.main(["--log-level", "warning", "path", DEFAULT_DRAFT]) == 0
    assert capsys.readouterr().out.strip() == str(d)
    assert models.main(["--log-level", "warning", "path", DEFAULT_TARGET]) == 1
    assert models.main(["--log-level", "warning", "list"]) == 0
    out = capsys.readouterr().out
    assert "present" in out and "absent" in out
