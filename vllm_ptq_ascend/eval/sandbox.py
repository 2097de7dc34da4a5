"""Run untrusted, model-generated Python (HumanEval completions) in a guarded child process.

A completion is arbitrary code.  It may loop forever, eat all memory, print gigabytes, delete
files, open sockets or start processes.  ``run_program`` runs it so that such a program is
stopped and *reported* (``SandboxResult.status``) instead of harming the host or hanging the run.

Layers (defence in depth; each one is independent of the others):

1. **A separate process.**  ``sys.executable -s -S -B -P`` (no user site, no ``site``, no
   bytecode writes, no script/cwd directory on ``sys.path``) runs a small bootstrap (``-c``)
   that installs the guards below, then ``exec``s the program read from a file.  This is what
   ``-I`` gives, minus ``-E``: the environment is built from scratch here (``PATH`` only, plus
   ``HOME``/``TMPDIR`` = the throwaway directory and ``PYTHONHASHSEED=0``), and ``-E`` would
   drop ``PYTHONHASHSEED``.  Without ``site`` only the standard library is importable.  The
   child gets its own session (``start_new_session``); after the wall-clock timeout the whole
   process group is SIGKILLed and reaped.  Output is read incrementally and only
   ``max_output_bytes`` of each stream is kept (head and tail), so a printing loop cannot
   exhaust the host's memory.  *Does not protect against*: anything the user account may do,
   if the other layers are bypassed -- the child runs as the same user as the host process.
2. **rlimits**, set by the bootstrap before the program runs: ``RLIMIT_CPU`` (SIGXCPU, then
   SIGKILL a second later), ``RLIMIT_AS`` (allocations fail with ``MemoryError``),
   ``RLIMIT_FSIZE`` (writes beyond it fail; Python ignores SIGXFSZ) and ``RLIMIT_CORE=0``.  Soft
   limits could be raised up to the hard ones, so ``resource.setrlimit``/``prlimit`` are refused
   by the audit hook.  ``RLIMIT_NPROC`` is *not* used: it counts every process of the user, not
   of the sandbox; process creation is refused by the audit hook instead.  *Does not protect
   against*: memory that is not address space (e.g. a huge file in a tmpfs ``TMPDIR``, capped
   only by ``RLIMIT_FSIZE`` per file), or disk usage spread over many small files.
3. **Network namespace.**  If ``unshare -rn true`` works here (probed once), the command is
   prefixed with ``unshare -rn``: the child is in new user and network namespaces with only a
   loopback interface that is down, so it cannot reach the host's or any other network, even by
   means the audit hook does not see.  Unix sockets bound to *filesystem paths* (e.g.
   ``/dev/log``) are still reachable from a new network namespace; the audit hook refuses socket
   creation for that.  Where unshare is unavailable (containers without user namespaces), the
   audit hook alone refuses network access.
4. **Audit hook** (``sys.addaudithook``, installed before the program runs; it cannot be
   removed).  It raises ``PermissionError("sandbox: <event> <arg>")`` for: every ``socket.*``
   event; process creation (``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.fork``,
   ``os.forkpty``, ``os.posix_spawn``, ``os.spawn*``); signals to other processes; every
   ``ctypes.*`` event and imports of ``ctypes``/``_ctypes``/``multiprocessing``/
   ``_posixsubprocess``/``_sqlite3``/``syslog`` and CPython's test modules; ``open``/``os.open``
   with a write/create/truncate/append flag on a path whose real path (symlinks resolved, by
   the hook's own resolver) is outside the throwaway directory, and ``os.open`` of any
   directory (so ``dir_fd`` tricks are impossible); ``os.remove``/``unlink``/``rename``/
   ``replace``/``rmdir``/``mkdir``/``chmod``/``chown``/``utime``/``truncate``/``symlink``/
   ``link``/xattr changes and ``shutil.rmtree`` outside it; ``sqlite3.connect`` outside it;
   ``sys.settrace``/``setprofile``, ``sys._current_frames`` and ``gc.get_objects``/
   ``get_referrers``/``get_referents`` (ways to reach or tamper with the hook itself).  The hook
   runs with an empty ``__builtins__`` and only uses C functions captured at install time, so
   monkeypatching ``os``/``posixpath``/``builtins`` does not change its decisions.  Reading files
   is allowed (Python's own imports need it).  An uncaught ``PermissionError("sandbox: ...")``
   makes the bootstrap exit with code 3, reported as status ``"blocked"``.  *Does not protect
   against*: reading any file the user can read (secrets included; the program's output comes
   back to the caller, so keep secrets out of reach of the eval account); time-of-check/
   time-of-use races (a second thread swapping a symlink between the hook's check and the
   system call); ``os.mkfifo``/``os.mknod``, which raise no audit event; bugs or memory-corruption
   in CPython or C extensions that let code run without audit events; kernel exploits.
5. **A throwaway directory** (``tempfile.mkdtemp``): the program file, the working directory,
   ``HOME`` and ``TMPDIR``; the only place the program may write.  It is removed after the
   run, also after a timeout (permissions the program removed are restored first).

This is defence in depth for evaluating model output, **not a security boundary against a
determined attacker**: for hostile code use a VM or a container runtime with seccomp and a
separate user.

Status of a run: ``passed`` (exit 0), ``failed`` (other non-zero exit; ``detail`` is the last
stderr line, e.g. ``AssertionError``), ``timeout`` (wall clock or CPU limit), ``memory``
(``MemoryError``), ``blocked`` (a guard fired; ``detail`` names the event), ``killed`` (another
signal).
"""

from __future__ import annotations

import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

BLOCKED_EXIT_CODE = 3
SANDBOX_MARKER = "sandbox:"
PROGRAM_NAME = "program.py"

STATUSES = ("passed", "failed", "timeout", "memory", "killed", "blocked")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock; the whole process group is killed after it
    cpu_s: int = 10  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 4  # RLIMIT_FSIZE
    max_output_bytes: int = 16384  # stdout/stderr kept (truncated beyond)


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout" | "memory" | "killed" | "blocked"
    returncode: int | None
    detail: str  # short human-readable reason (last lines of stderr, or which guard fired)
    seconds: float
    stdout: str = field(default="", repr=False)
    stderr: str = field(default="", repr=False)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------- child side

# The audit hook.  It is compiled with an empty ``__builtins__``: everything it uses comes in as
# an argument of ``make_hook`` (C functions and types captured before the program runs), so the
# program cannot change its behaviour by monkeypatching modules or builtins.
_HOOK_SRC = r'''
def make_hook(work, mypid, lstat, stat, readlink, getcwd, fsenc, write_flags, tmpfile_flag, blocked_modules,
              type, repr, str, bytes, int, frozenset, PermissionError, Exception):
    # all state is immutable: frames of this hook are reachable from the tracebacks it raises
    prefix = work + "/"
    deny_events = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn",
        "os.spawn", "os.startfile", "pty.spawn", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "resource.setrlimit", "resource.prlimit", "sqlite3.enable_load_extension",
        "sqlite3.load_extension", "syslog.openlog", "syslog.syslog", "os.add_dll_directory",
    ))
    # (event, indexes of (path, dir_fd) pairs that must lie inside ``work``, keep_last = do not
    # resolve the final component because the call acts on a link itself)
    path_events = (
        ("os.remove", ((0, 1),), True),
        ("os.rmdir", ((0, 1),), True),
        ("os.mkdir", ((0, 2),), True),
        ("os.rename", ((0, 2), (1, 3)), True),
        ("os.link", ((0, 2), (1, 3)), False),
        ("os.symlink", ((1, 2),), True),
        ("os.chmod", ((0, 2),), False),
        ("os.chown", ((0, 3),), False),
        ("os.utime", ((0, 3),), False),
        ("os.chflags", ((0, None),), False),
        ("os.lchflags", ((0, None),), True),
        ("os.setxattr", ((0, None),), False),
        ("os.removexattr", ((0, None),), False),
        ("shutil.rmtree", ((0, 1),), True),
    )
    path_event_names = frozenset([e[0] for e in path_events])

    def deny(event, arg=None):
        if type(arg) is bytes:
            arg = arg.decode(fsenc, "surrogateescape")
        detail = " " + repr(arg) if type(arg) is str or type(arg) is int else ""
        raise PermissionError("sandbox: " + event + detail)

    def plain(p):
        if type(p) is str:
            return p
        if type(p) is bytes:
            return p.decode(fsenc, "surrogateescape")
        return None

    def real(p, keep_last):
        """Absolute path with symlinks resolved (like os.path.realpath), None if unresolvable."""
        if not p.startswith("/"):
            p = getcwd() + "/" + p
        parts = [c for c in p.split("/") if c]
        last = None
        if keep_last and parts and parts[-1] not in (".", ".."):
            last = parts.pop()
        parts.reverse()
        out = ""
        hops = 0
        while parts:
            c = parts.pop()
            if c == ".":
                continue
            if c == "..":
                out = out[: out.rfind("/")]
                continue
            cand = out + "/" + c
            try:
                mode = lstat(cand).st_mode
            except Exception:
                out = cand
                continue
            if mode & 0o170000 == 0o120000:
                hops += 1
                if hops > 40:
                    return None
                target = readlink(cand)
                if target.startswith("/"):
                    out = ""
                more = [x for x in target.split("/") if x]
                more.reverse()
                parts.extend(more)
            else:
                out = cand
        if last is not None:
            out = out + "/" + last
        return out or "/"

    def inside(p, keep_last):
        s = plain(p)
        if s is None:
            return False
        try:
            r = real(s, keep_last)
        except Exception:
            return False
        return r is not None and (r == work or r.startswith(prefix))

    def is_dir(p):
        try:
            return stat(p).st_mode & 0o170000 == 0o040000
        except Exception:
            return False

    def hook(event, args):
        if event == "open":
            path, flags = args[0], args[2]
            if type(path) is int:
                return
            s = plain(path)
            if s is None:
                deny(event, "<non-str path>")
            # os.open (mode None) of a directory would give an fd for os.open(..., dir_fd=fd),
            # past the path checks; O_TMPFILE names a directory but returns a file.  io.open
            # never returns a directory fd (and with an opener its path is only a label).
            tmpfile = type(flags) is int and tmpfile_flag and (flags & tmpfile_flag) == tmpfile_flag
            if args[1] is None and not tmpfile and is_dir(s):
                deny(event, s + " (directory)")
            if (type(flags) is not int or flags & write_flags) and not inside(s, False):
                deny(event, s)
            return
        if event == "import":
            name = args[0]
            if type(name) is str and name.partition(".")[0] in blocked_modules:
                deny(event, name)
            return
        if event.startswith("socket.") or event.startswith("ctypes."):
            deny(event, args[0] if args else None)
        if event in deny_events:
            deny(event)
        if event in path_event_names:
            for name, pairs, keep_last in path_events:
                if name == event:
                    break
            for i, j in pairs:
                p = args[i]
                if j is not None and type(args[j]) is int and args[j] != -1:
                    if type(p) is not str or not p.startswith("/"):
                        deny(event + " (dir_fd)", plain(p))
                if not inside(p, keep_last):
                    deny(event, plain(p) if type(p) is not int else p)
            return
        if event == "os.truncate":
            if type(args[0]) is not int and not inside(args[0], False):
                deny(event, plain(args[0]))
            return
        if event == "sqlite3.connect":
            db = args[0]
            if not (plain(db) == ":memory:" or plain(db) == "" or inside(db, False)):
                deny(event, plain(db))
            return
        if event == "os.kill":
            if not (type(args[0]) is int and (args[0] == mypid or args[0] == 0)):
                deny(event, args[0])
            return
        if event == "os.killpg":
            if not (type(args[0]) is int and args[0] == mypid):
                deny(event, args[0])
            return

    return hook
'''

_BLOCKED_MODULES = (
    "ctypes",
    "_ctypes",
    "multiprocessing",
    "_multiprocessing",
    "_posixsubprocess",
    "_posixshmem",
    "_xxsubinterpreters",
    "_testcapi",
    "_testinternalcapi",
    "_testmultiphase",
    "_testbuffer",
    "_testimportmultiple",
    "_sqlite3",
    "syslog",
)

# argv: program path, work dir, cpu seconds, address-space bytes, file-size bytes
_BOOTSTRAP = r"""
import sys, os, resource, builtins

def _limits():
    cpu, mem, fsize = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    for which, soft, hard in ((resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu, cpu + 1),
                              (resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_FSIZE, fsize, fsize)):
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass

def _guard(work):
    ns = {"__builtins__": {}}
    exec(compile(HOOK_SRC, "<sandbox-guard>", "exec"), ns)
    wf = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    hook = ns["make_hook"](
        work, os.getpid(), os.lstat, os.stat, os.readlink, os.getcwd,
        sys.getfilesystemencoding(), wf, getattr(os, "O_TMPFILE", 0), frozenset(BLOCKED_MODULES),
        type, repr, str, bytes, int, frozenset, PermissionError, Exception)
    for name in list(sys.modules):
        if name.partition(".")[0] in BLOCKED_MODULES:
            del sys.modules[name]
    sys.addaudithook(hook)

_limits()
with open(sys.argv[1], "rb") as _f:
    _code = compile(_f.read(), sys.argv[1], "exec")
_main = type(sys)("__main__")
_main.__file__ = sys.argv[1]
sys.modules["__main__"] = _main
_work = sys.argv[2]
sys.argv = [sys.argv[1]]
_guard(_work)
del _guard, _limits, _f, _work, HOOK_SRC, BLOCKED_MODULES
try:
    exec(_code, _main.__dict__)
except BaseException as _e:
    _x, _n = _e, 0
    while _x is not None and _n < 16:
        _msg = _x.args[0] if type(_x) is PermissionError and _x.args else None
        if type(_msg) is str and _msg.startswith("sandbox:"):
            sys.excepthook(type(_e), _e, _e.__traceback__)
            try:
                sys.stdout.flush()
            except BaseException:
                pass
            os.write(2, ("\n" + _msg + "\n").encode("utf-8", "replace"))
            os._exit(3)
        _x, _n = _x.__cause__ or _x.__context__, _n + 1
    raise
"""


def _bootstrap_source() -> str:
    return f"HOOK_SRC = {_HOOK_SRC!r}\nBLOCKED_MODULES = {_BLOCKED_MODULES!r}\n" + _BOOTSTRAP


# --------------------------------------------------------------------------- host side


@functools.lru_cache(maxsize=1)
def _unshare() -> str | None:
    """Path of a working ``unshare`` (new user + network namespace), None if it fails here."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return None
    try:
        proc = subprocess.run([exe, "-rn", "true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return exe if proc.returncode == 0 else None


def network_namespace_available() -> bool:
    """Whether ``unshare -rn true`` works here (probed once per process)."""
    return _unshare() is not None


def isolation_report() -> dict:
    """Which isolation layers are active on this machine (all bools)."""
    try:
        import resource  # noqa: F401

        rlimits = True
    except ImportError:
        rlimits = False
    return {
        "process": True,
        "process_group_kill": hasattr(os, "killpg"),
        "rlimits": rlimits,
        "network_namespace": network_namespace_available(),
        "audit_hook": hasattr(sys, "addaudithook"),
        "throwaway_dir": True,
    }


class _Capture:
    """Keeps the first and last bytes of a stream, counting what was dropped in between."""

    def __init__(self, limit: int):
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self.tail_limit > 0:
            self.tail += data
            if len(self.tail) > self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    def text(self) -> str:
        dropped = self.total - len(self.head) - len(self.tail)
        mid = f"\n...[{dropped} bytes truncated]...\n".encode() if dropped > 0 else b""
        return bytes(self.head + mid + self.tail).decode("utf-8", "replace")


def _child_env(work: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": work,
        "TMPDIR": work,
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "LC_ALL": "C.UTF-8",
    }


def _command(program: str, work: str, limits: SandboxLimits, use_netns: bool) -> list[str]:
    flags = ["-s", "-S", "-B"] + (["-P"] if sys.version_info >= (3, 11) else [])
    cmd = [sys.executable, *flags, "-c", _bootstrap_source(), program, work]
    cmd += [str(int(limits.cpu_s)), str(int(limits.memory_mb) << 20), str(int(limits.file_size_mb) << 20)]
    if not use_netns:
        return cmd
    exe = _unshare()
    if exe is None:
        raise RuntimeError("the network-namespace layer was requested but `unshare -rn` does not work here")
    return [exe, "-rn", *cmd]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_exited(pid: int, deadline: float) -> bool:
    """Wait (without reaping, so the process group id stays reserved) until ``pid`` exits."""
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _remove_tree(path: str) -> None:
    """rmtree that first restores permissions the program may have removed."""
    try:
        os.chmod(path, 0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _last_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


def _classify(
    returncode: int, timed_out: bool, stderr: str, seconds: float, limits: SandboxLimits
) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall-clock timeout after {limits.timeout_s:g}s (process group killed)"
    if returncode == 0:
        return "passed", ""
    marker = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith(SANDBOX_MARKER)]
    wrapped = [ln for ln in stderr.splitlines() if "PermissionError: " + SANDBOX_MARKER in ln]
    if marker and returncode == BLOCKED_EXIT_CODE:
        return "blocked", marker[-1][:300]
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and seconds >= limits.cpu_s):
            return "timeout", f"CPU limit of {limits.cpu_s}s exceeded ({name})"
        if "MemoryError" in stderr:
            return "memory", f"killed by {name} after MemoryError"
        return "killed", f"killed by {name}"
    if wrapped:
        return "blocked", wrapped[-1].strip()[:300]
    if "MemoryError" in stderr:
        return "memory", _last_line(stderr) or "MemoryError"
    return "failed", _last_line(stderr) or f"exit code {returncode}"


def _run_program(code: str, limits: SandboxLimits = SandboxLimits(), use_netns: bool | None = None):
    """``run_program`` with the network-namespace layer selectable (None = use it if available)."""
    if use_netns is None:
        use_netns = network_namespace_available()
    root = os.path.realpath(tempfile.mkdtemp(prefix="vllm-ptq-sandbox-"))
    try:
        program = os.path.join(root, PROGRAM_NAME)
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        out, err = _Capture(limits.max_output_bytes), _Capture(limits.max_output_bytes)
        start = time.monotonic()
        deadline = start + limits.timeout_s
        proc = subprocess.Popen(
            _command(program, root, limits, use_netns),
            cwd=root,
            env=_child_env(root),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        timed_out = False
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ, out)
                sel.register(proc.stderr, selectors.EVENT_READ, err)
                while sel.get_map():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        timed_out = True
                        break
                    for key, _ in sel.select(remaining):
                        data = os.read(key.fd, 65536)
                        if data:
                            key.data.add(data)
                        else:
                            sel.unregister(key.fileobj)
            if not timed_out and not _wait_exited(proc.pid, deadline):
                timed_out = True
        finally:
            # the group leader is not reaped yet, so its pid still names this process group
            _kill_group(proc.pid)
            proc.wait()
            seconds = time.monotonic() - start
            proc.stdout.close()
            proc.stderr.close()
        stdout, stderr = out.text(), err.text()
        status, detail = _classify(proc.returncode, timed_out, stderr, seconds, limits)
        return SandboxResult(status, proc.returncode, detail, seconds, stdout, stderr)
    finally:
        _remove_tree(root)


def run_program(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code`` in the sandbox (all available layers) and classify the outcome."""
    return _run_program(code, limits)


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval's ``check_correctness`` runs for ``completion`` of ``problem``."""
    return (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"
    )


def check_humaneval(problem: dict, completion: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    return run_program(humaneval_program(problem, completion), limits)


def run_many(
    programs: list[str],
    limits: SandboxLimits = SandboxLimits(),
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> list[SandboxResult]:
    """Run every program (``workers`` at a time); results in the order of ``programs``.

    ``progress(n_done)`` is called from the calling thread after each program finishes.
    """
    results: list[SandboxResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sandbox") as pool:
        futures = {pool.submit(run_program, code, limits): i for i, code in enumerate(programs)}
        for done, fut in enumerate(as_completed(futures), start=1):
            results[futures[fut]] = fut.result()
            if progress is not None:
                progress(done)
    return results  # type: ignore[return-value]
