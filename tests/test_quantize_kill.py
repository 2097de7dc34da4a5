"""A quantize run killed outright (SIGKILL: no cleanup runs) leaves its hidden partial directory;
the next run for the same output removes it and succeeds. The output never appears half-written,
and a partial directory whose process is still alive is never touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from vllm_ptq_ascend.atomic import atomic_directory, remove_stale_partials

HOLD = textwrap.dedent(
    """
    import sys, time
    from vllm_ptq_ascend.atomic import atomic_directory
    with atomic_directory(sys.argv[1]) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        print("ready", flush=True)
        time.sleep(120)
    """
)


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def hold_partial(out: Path) -> subprocess.Popen:
    """A process inside atomic_directory(out), writing, until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


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


def test_quantize_killed_mid_run_then_rerun(tiny_model, tmp_path):
    """SIGKILL the CLI while it writes (a calibrated preset), then run it again."""
    out = tmp_path / "ckpt"
    cmd = [
        sys.executable, "-m", "vllm_ptq_ascend.cli", "quantize", str(tiny_model),
        "--recipe", "w8a8-smoothquant", "--calib-samples", "16", "--calib-seq-len", "64", "--out", str(out),
    ]  # fmt: skip
    log = tmp_path / "first.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.time() + 240
        while not partials(out):
            assert proc.poll() is None, f"quantize ended before writing:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no partial directory after 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()  # never half-written
    (stale,) = partials(out)  # SIGKILL ran no cleanup

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not stale.exists() and partials(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "first.log"]
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["ptq_ascend"]["recipe"] == "w8a8-smoothquant"
    assert (out / "ptq_ascend_card.json").exists() and list(out.glob("*.safetensors"))
