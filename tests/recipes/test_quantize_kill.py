"""A quantize run stopped by SIGTERM, SIGHUP or SIGINT removes its hidden partial directory and exits
with the conventional status. One killed outright (SIGKILL: no cleanup runs) leaves it; the next run
for the same output removes it and succeeds. The output never appears half-written, and a partial
directory whose process is still alive is never touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vllm_ptq_ascend.atomic import atomic_directory, remove_stale_partials

# the default dispositions, whatever this test run inherited (a background job ignores SIGINT,
# nohup ignores SIGHUP)
DEFAULTS = textwrap.dedent(
    """
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    """
)
HOLD = DEFAULTS + textwrap.dedent(
    """
    import sys, time
    from vllm_ptq_ascend.atomic import atomic_directory
    with atomic_directory(sys.argv[1]) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        print("ready", flush=True)
        time.sleep(120)
    """
)


# the same, with SIGHUP ignored first (as under nohup)
HOLD_NOHUP = HOLD.replace("signal.SIGHUP, signal.SIG_DFL", "signal.SIGHUP, signal.SIG_IGN")


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def hold_partial(out: Path, script: str = HOLD) -> subprocess.Popen:
    """A process inside atomic_directory(out), writing, until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize(
    "sig, status",
    [
        (signal.SIGTERM, 128 + signal.SIGTERM),  # 143, as a shell reports it
        (signal.SIGHUP, 128 + signal.SIGHUP),
        (signal.SIGINT, -signal.SIGINT),  # KeyboardInterrupt: Python ends by re-raising SIGINT
    ],
)
def test_catchable_signals_remove_the_partial_directory(tmp_path, sig, status):
    out = tmp_path / "out"
    proc = hold_partial(out)
    (partial,) = partials(out)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == status, proc.stderr.read()[-2000:]
    assert not partial.exists() and partials(out) == [] and not out.exists()


def test_an_ignored_signal_stays_ignored(tmp_path):
    """Under nohup (SIGHUP ignored) a hang-up neither stops the run nor removes its work."""
    out = tmp_path / "out"
    assert HOLD_NOHUP != HOLD
    proc = hold_partial(out, HOLD_NOHUP)
    try:
        proc.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        (partial,) = partials(out)
        assert (partial / "model.safetensors").read_bytes() == b"half"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert partials(out) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_signal_handlers_are_restored_after_the_directory_is_written(tmp_path):
    script = DEFAULTS + textwrap.dedent(
        """
        import signal, sys
        from vllm_ptq_ascend.atomic import atomic_directory
        mine = lambda *a: None
        signal.signal(signal.SIGHUP, mine)  # a program's own handler is left in place
        with atomic_directory(sys.argv[1]) as tmp:
            inside = signal.getsignal(signal.SIGTERM)
            assert signal.getsignal(signal.SIGHUP) is mine
        assert inside is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGHUP) is mine
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert (tmp_path / "out").is_dir()


# SIGTERM handled while the garbage collector runs a destructor: Python prints "Exception ignored
# in ..." and drops the exception (this stopped a CI run's quantize too late: it published).
LOST_IN_DESTRUCTOR = DEFAULTS + textwrap.dedent(
    """
    import os, signal, sys, time
    from vllm_ptq_ascend.atomic import atomic_directory

    class Collected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs here, inside the destructor
                pass

    with atomic_directory(sys.argv[1]) as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
        if sys.argv[2] == "swallow":  # a library's hook that drops unraisable exceptions
            sys.unraisablehook = lambda unraisable: None
        Collected()
        time.sleep(2)
        print("finished the run", flush=True)
    print("published", flush=True)
    """
)


@pytest.mark.parametrize("hook", ["ours", "swallow"])
def test_a_signal_lost_in_a_destructor_still_stops_the_run_unpublished(tmp_path, hook):
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-c", LOST_IN_DESTRUCTOR, str(out), hook], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-2000:]
    assert "published" not in r.stdout and not out.exists() and partials(out) == []
    # delivered again at the next bytecode; under a hook that drops it, refused at the rename
    assert ("finished the run" in r.stdout) == (hook == "swallow"), r.stdout


def test_stale_partial_of_a_killed_process_is_removed(tmp_path):
    out = tmp_path / "out"
    proc = hold_partial(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    (stale,) = partials(out)
    assert not out.exists()
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and partials(out) == []
    assert (out / "config.json").read_text() == "{}"


def test_partial_of_a_live_process_is_kept(tmp_path):
    out = tmp_path / "out"
    proc = hold_partial(out)
    try:
        (live,) = partials(out)
        assert remove_stale_partials(out) == []
        with atomic_directory(out) as tmp:  # a concurrent writer of the same output
            (tmp / "config.json").write_text("{}")
        assert live.exists() and (live / "model.safetensors").read_bytes() == b"half"
        assert (out / "config.json").exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_only_partials_of_dead_processes_of_this_host_are_removed(tmp_path):
    import socket

    out = tmp_path / "out"
    dead = 999_999_999  # above any pid_max
    stale = tmp_path / f".out.partial-{socket.gethostname()}-{dead}-1-abc123"
    legacy = tmp_path / ".out.partial-abc123_x"  # written by an older version: owner unknown
    other = tmp_path / f".out.partial-elsewhere.example-{dead}-1-abc123"  # another machine's pid
    other_dest = tmp_path / f".outer.partial-{socket.gethostname()}-{dead}-1-abc"  # another output
    for d in (stale, legacy, other, other_dest):
        d.mkdir()
    assert remove_stale_partials(out) == [stale]
    assert not stale.exists() and legacy.exists() and other.exists() and other_dest.exists()


def test_replacing_an_existing_output_is_atomic(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    try:
        with atomic_directory(out) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert [p.name for p in out.iterdir()] == ["old"] and partials(out) == []
    with atomic_directory(out) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"] and partials(out) == []


def quantize_cmd(tiny_model, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "vllm_ptq_ascend.cli", "quantize", str(tiny_model),
        "--recipe", "w8a8-smoothquant", "--calib-samples", "16", "--calib-seq-len", "64", "--out", str(out),
    ]  # fmt: skip


def signal_mid_write(cmd: list[str], out: Path, log: Path, sig: int) -> int:
    """Start the CLI, send ``sig`` once its partial directory exists; returns its exit status."""
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.time() + 240
        while not partials(out):
            assert proc.poll() is None, f"quantize ended before writing:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no partial directory after 240 s"
            time.sleep(0.05)
        time.sleep(0.5)  # into the run: loading and calibrating
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_quantize_stopped_by_sigterm_mid_run_leaves_nothing(tiny_model, tmp_path):
    """SIGTERM (a timeout, a service stop) while the CLI works: no output, no partial directory."""
    out = tmp_path / "ckpt"
    log = tmp_path / "run.log"
    status = signal_mid_write(quantize_cmd(tiny_model, out), out, log, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert "error: stopped by SIGTERM; no partial output is left behind" in log.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.log"]


def test_quantize_killed_mid_run_then_rerun(tiny_model, tmp_path):
    """SIGKILL the CLI while it writes (a calibrated preset), then run it again."""
    out = tmp_path / "ckpt"
    cmd = quantize_cmd(tiny_model, out)
    assert signal_mid_write(cmd, out, tmp_path / "first.log", signal.SIGKILL) == -signal.SIGKILL
    assert not out.exists()  # never half-written
    (stale,) = partials(out)  # SIGKILL ran no cleanup

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not stale.exists() and partials(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "first.log"]
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["ptq_ascend"]["recipe"] == "w8a8-smoothquant"
    assert (out / "ptq_ascend_card.json").exists() and list(out.glob("*.safetensors"))
