"""Write a directory all at once or not at all."""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# .{dest}.partial-{host}-{pid}-{process start time}-{random}: the owner of a partial directory,
# so a later run can tell the leftovers of a killed process (SIGKILL runs no cleanup) from
# the work of one still running
_OWNER = re.compile(r"-(?P<pid>\d+)-(?P<start>\d+)-[^-]+$")


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux), 0 where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after "pid (comm)"
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int, start: int) -> bool:
    """Whether process ``pid`` (started at ``start``, 0 = unknown) is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return True  # cannot tell: keep its directory
    now = _start_time(pid)
    return not (start and now and now != start)  # a different start time: the pid was reused


def _prefix(dest: Path) -> str:
    return f".{dest.name}.partial-"


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}-{pid}-{_start_time(pid)}-"


def remove_stale_partials(dest: str | Path) -> list[Path]:
    """Remove partial directories of ``dest`` left by dead processes of this host; returns them.

    A directory whose owner is alive, belongs to another host, or has no owner in its
    name (written by an older version) is kept.
    """
    dest = Path(dest)
    host = f"{socket.gethostname()}-"
    removed = []
    if not dest.parent.is_dir():
        return removed
    for path in dest.parent.glob(f"{glob.escape(_prefix(dest))}*"):
        tag = path.name[len(_prefix(dest)) :]
        m = _OWNER.search(tag)
        if not (path.is_dir() and m and tag[: m.start()] + "-" == host):
            continue
        if not _alive(int(m["pid"]), int(m["start"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``dest``; rename it into place on success.

    Any exception (Ctrl-C included) removes it, so ``dest`` is either complete or absent.
    A process killed outright (SIGKILL) cannot clean up: its partial directory, named after
    its pid, is removed by the next ``atomic_directory`` for the same ``dest``.
    An existing ``dest`` is replaced only once the new one is complete: it is first renamed
    aside (so it is never seen half-deleted), then removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dest)
    tag = _prefix(dest) + _owner_tag()
    tmp = Path(tempfile.mkdtemp(prefix=tag, dir=dest.parent))
    old = None
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=tag, dir=dest.parent))
            dest.rename(old / dest.name)
        tmp.rename(dest)
    except BaseException:
        if old is not None and not dest.exists() and (old / dest.name).exists():
            (old / dest.name).rename(dest)  # put the previous one back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
