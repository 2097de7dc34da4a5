"""Write a directory all at once or not at all."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
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


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM or SIGHUP arrives inside ``atomic_directory``, so the
    partial directory is removed on the way out. Exit status 128 + the signal number (143 for
    SIGTERM), as a shell reports a process ended by that signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


# Signals whose default action ends the process with no cleanup. SIGINT already raises
# KeyboardInterrupt; SIGKILL cannot be caught (the next run removes what it leaves).
_CAUGHT = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))


@contextmanager
def _cleanup_on_termination() -> Iterator[list[int]]:
    """While inside, SIGTERM and SIGHUP raise :class:`Terminated` instead of ending the process.

    Only in the main thread, and only for signals left at their default action (a handler the
    program installed, or SIG_IGN as under nohup, is kept). A second signal while cleaning up is
    ignored, so the cleanup is not itself cut short.

    Yields the signals received, so the caller can refuse to publish even where the exception
    was lost: Python swallows an exception raised in a ``__del__`` or a weakref callback (the
    garbage collector runs them between any two bytecodes), so a signal landing there is
    delivered again from ``sys.unraisablehook``, and the list is the last guard.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    stopping = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
        if stopping:
            return
        stopping.append(signum)
        raise Terminated(signum)

    previous_hook = sys.unraisablehook

    def send_again(signum):
        # from another thread, once the hook has returned: the handler then runs in the main
        # thread's own code (raise_signal here would run it inside the hook, which drops it too)
        time.sleep(0.01)
        stopping.clear()
        os.kill(os.getpid(), signum)

    def redeliver(unraisable):
        exc = unraisable.exc_value
        if not (isinstance(exc, Terminated) and stopping):
            previous_hook(unraisable)
            return
        while True:
            try:
                threading.Thread(target=send_again, args=(exc.signum,), daemon=True).start()
                return
            except Terminated:  # delivered while still in here: send it once more
                continue

    previous = {}
    for sig in _CAUGHT:
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, handler)
    sys.unraisablehook = redeliver
    try:
        yield received
    finally:
        sys.unraisablehook = previous_hook
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``dest``; rename it into place on success.

    Any exception (Ctrl-C included) removes it, so ``dest`` is either complete or absent.
    SIGTERM and SIGHUP (a timeout, a closed terminal) raise :class:`Terminated` inside, which
    removes it too and ends the process with status 128 + the signal number.
    A process killed outright (SIGKILL) cannot clean up: its partial directory, named after
    its pid, is removed by the next ``atomic_directory`` for the same ``dest``.
    An existing ``dest`` is replaced only once the new one is complete: it is first renamed
    aside (so it is never seen half-deleted), then removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dest)
    with _cleanup_on_termination() as received:
        with _atomic_directory(dest, received) as tmp:
            yield tmp


@contextmanager
def _atomic_directory(dest: Path, received: list[int]) -> Iterator[Path]:
    tag = _prefix(dest) + _owner_tag()
    tmp = old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=tag, dir=dest.parent))
        yield tmp
        if received:  # a stop signal whose exception was lost: never publish after it
            raise Terminated(received[0])
        tmp.chmod(0o755)  # mkdtemp makes it private
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=tag, dir=dest.parent))
            dest.rename(old / dest.name)
        tmp.rename(dest)
    except BaseException:
        if old is not None and not dest.exists() and (old / dest.name).exists():
            (old / dest.name).rename(dest)  # put the previous one back
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
