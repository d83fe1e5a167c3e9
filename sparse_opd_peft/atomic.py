"""Atomic writes of files and whole directories, with the usual permissions.

* Files: the data goes to a temporary file in the target's folder, is flushed to disk and moved into place with
  ``os.replace``, so a reader sees either the old file or the whole new one, never a half-written file.
* Directories: :func:`staged_directory` yields an empty temporary sibling; once everything was written into it,
  :func:`replace_dir` swaps it in for the target as a whole (the old directory is moved aside, the new one renamed
  into place, the old one removed; a failed rename puts the old directory back). On failure the temporary
  directory is removed, so nothing is half-changed and nothing is left behind.

``tempfile.mkstemp`` / ``mkdtemp`` (and safetensors >= 0.8's own writer) create private entries (0600 / 0700)
whatever the umask; every file and directory written here is given the mode a plain ``open`` / ``mkdir`` would give
instead (0644 / 0755 under umask 022, 0600 / 0700 under umask 077), so outputs stay readable by whom the user's umask
allows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "atomic_file",
    "current_umask",
    "make_temp_dir",
    "normalize_modes",
    "replace_dir",
    "staged_directory",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def current_umask() -> int:
    """The process umask (read from ``/proc/self/status`` where it is there, so no other thread sees it change)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a directory's entries (e.g. after a rename), to disk where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (mode as ``open`` would create it); write it with any writer, e.g.
    ``safetensors.torch.save_file(tensors, tmp)``. On normal exit the file is flushed and renamed onto ``path``; on an
    exception it is removed and ``path`` is unchanged. The parent folder must exist."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp, mode = Path(name), 0o666 & ~current_umask()
    try:
        os.close(fd)
        fd = -1
        yield tmp
        os.chmod(tmp, mode)  # after the writer: some (safetensors) replace the file with a private one of their own
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (the parent folder must exist)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (the parent folder must exist)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(
    path: str | os.PathLike, obj: Any, indent: Optional[int] = 1, default: Optional[Callable] = None
) -> None:
    """Write ``json.dumps(obj, indent=indent, default=default)`` plus a newline to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def make_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """Create an empty, uniquely named hidden directory ``.<name>.tmp-*`` in ``parent`` with the mode ``mkdir``
    would give it (``0o777 & ~umask``), not ``mkdtemp``'s 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def normalize_modes(directory: str | os.PathLike) -> None:
    """Give ``directory``, every directory under it and every file in it the modes ``mkdir`` / ``open`` would give
    (``0o777`` / ``0o666`` masked by the umask); symbolic links are left alone. For directories filled by writers
    that make private files (safetensors >= 0.8, ``mkstemp``)."""
    umask = current_umask()
    root = Path(directory)
    os.chmod(root, 0o777 & ~umask)
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(base) / name
            if not p.is_symlink():
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move directory ``src`` to ``dst`` (same filesystem), replacing an existing ``dst`` as a whole.

    ``dst`` is moved aside to a hidden sibling, ``src`` renamed to ``dst``, then the old directory is removed. If the
    second rename fails, the old directory is renamed back, so ``dst`` is either the old or the new directory.

    Raises:
        OSError: the rename failed (``dst`` is then unchanged; ``src`` is left for the caller to remove).
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
        fsync_path(dst.parent)
        return
    if not dst.is_dir() or dst.is_symlink():
        raise NotADirectoryError(f"{dst} exists and is not a directory; remove it or choose another path")
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rmdir(old)  # a unique free name; rename() then moves dst there
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        try:
            os.replace(old, dst)
        except OSError as err:
            raise OSError(
                f"{dst}: replacing it failed and so did restoring it; the previous contents are in {old}: move them "
                f"back by hand ({err})"
            ) from err
        raise
    fsync_path(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_directory(target: str | os.PathLike, normalize: bool = True) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` (its parent is created if needed); on normal exit it replaces
    ``target`` as a whole (:func:`replace_dir`), after :func:`normalize_modes` unless ``normalize`` is False. On an
    exception, the temporary directory and any parent directory created for it are removed and ``target`` is
    unchanged."""
    target = Path(target)
    if target.is_symlink() and target.is_dir():  # swap the directory the link points to; the link stays
        target = target.resolve()
    created, p = [], target.parent.absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        yield tmp
        if normalize:
            normalize_modes(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
