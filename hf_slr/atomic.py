"""Replace a folder with a new version atomically: readers (and a killed writer) see either the
old folder or the new one, complete, never a mixture; no file the writer did not write is lost.

The new version is written into a temporary sibling ``.<name>.tmp-<pid>-<random>``, fsynced, and
swapped with the target in one ``renameat2(RENAME_EXCHANGE)`` call (Linux). Where that call is
missing, the target is first renamed to ``.<name>.old-<pid>-<random>`` and the new folder renamed
into place; a writer killed between the two renames leaves the old folder under that name, and the
next writer puts it back before it starts. Temporaries of dead writers are removed by the next one.
Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temporaries(target: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{kind}-(\d+)-")
    found = []
    for path in target.parent.iterdir():
        match = pattern.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            found.append(path)
    return sorted(found)


def recover(target: Path) -> None:
    """Undo what a killed writer left: restore a target it had moved aside, then delete its temporaries."""
    if not target.exists():
        for old in _temporaries(target, "old"):
            os.rename(old, target)
            break
    for stale in _temporaries(target, "tmp") + _temporaries(target, "old"):
        shutil.rmtree(stale, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folders themselves to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(Path(root))


def fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one system call; False where the call is not available."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(error, os.strerror(error), str(second))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _link_tree(source: Path, destination: Path, skip) -> None:
    """Hard-link (copy where links fail) every file of ``source`` that ``destination`` lacks and
    ``skip(relative_path)`` does not reject, keeping the folder structure."""
    for root, _, files in os.walk(source):
        for name in files:
            relative = Path(root, name).relative_to(source)
            if skip(relative) or (destination / relative).exists():
                continue
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / relative, destination / relative)
            except OSError:
                shutil.copy2(source / relative, destination / relative)


@contextlib.contextmanager
def replace_folder(target: Path, replaced=lambda relative: False):
    """Yield an empty temporary folder; on normal exit it becomes ``target`` atomically.

    Files of an existing ``target`` that the new version does not write are kept (hard-linked into
    it), except those ``replaced(relative_path)`` names as belonging to the old version (e.g. stale
    weight shards). On an exception the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        if target.exists():
            _link_tree(target, tmp, replaced)
        os.chmod(tmp, 0o777 & ~_umask())
        fsync_tree(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif not _exchange(tmp, target):
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-{os.getpid()}-"))
            os.rmdir(aside)
            os.rename(target, aside)
            os.rename(tmp, target)
            tmp = aside
        fsync_directory(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
