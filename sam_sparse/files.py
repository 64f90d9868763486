"""Writing the user's files: whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple


def make_plain_file(path: os.PathLike) -> None:
    """Give a mkstemp file (mode 0600) the permissions a newly created file would get (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so it reads as `path` will); on success it is
    renamed to `path`, on any error or interrupt removed, so `path` is either what it was before or the
    complete new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        make_plain_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output(path: os.PathLike, what: str, suffixes: Sequence[str]) -> Path:
    """ValueError unless `path` can be written: an accepted suffix, an existing folder, not a folder itself.

    Commands call this for every output before any work, so a typo never costs a model load."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {path}: expected a file name ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} {path}: folder {folder} is not writable")
    return path


def same_file(a: os.PathLike, b: os.PathLike) -> bool:
    """Whether two paths name one file (equal once resolved, or one file through links)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def refuse_inputs(path: os.PathLike, what: str, inputs: Sequence[Tuple[str, Optional[os.PathLike]]]) -> None:
    """ValueError if writing `path` would replace one of `inputs` ((label, path or None) pairs): an input of
    the user's is never overwritten, --force or not."""
    for label, given in inputs:
        if given is not None and same_file(path, given):
            raise ValueError(f"{what} {path}: is the same file as {label}; choose another output name "
                             "(inputs are never overwritten)")
