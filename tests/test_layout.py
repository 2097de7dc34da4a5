"""The package's layout, as the README's Layout section states it: one-way data flow from checkpoint
format to kernel, no import cycle, every scheme in schemes/, and the section naming every module."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import vllm_ptq_ascend

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(vllm_ptq_ascend.__file__).parent
NAME = "vllm_ptq_ascend"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside a function (a lazy import
    is still a dependency). Importing a package's own parent is not counted: it runs no code of ours
    beyond the package's __init__."""
    mods = modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                target = owner(name) if name.startswith(NAME) else None
                if target and target not in (mod, NAME) and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    """The check below would pass trivially if the finder could not see one."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_formats_import_no_scheme_kernel_or_serving_code():
    """Checkpoint formats return plain plans: nothing downstream of the plan is reachable from them."""
    graph = import_graph()
    downstream = tuple(f"{NAME}.{p}" for p in ("schemes", "kernels", "serving", "integrations", "recipes"))
    for mod in graph:
        if mod.startswith(f"{NAME}.formats"):
            bad = sorted(m for m in reachable(graph, mod) if m.startswith(downstream))
            assert not bad, f"{mod} imports {bad}"


def all_scheme_classes() -> list[type]:
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix=f"{NAME}."):
        importlib.import_module(info.name)
    from vllm_ptq_ascend.schemes.base import PtqScheme

    found, todo = [], [PtqScheme]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith(NAME):  # tests may subclass too
                found.append(sub)
                todo.append(sub)
    return found


def test_every_scheme_lives_in_schemes_and_each_plan_has_one_scheme():
    from vllm_ptq_ascend.schemes.registry import SCHEMES

    classes = all_scheme_classes()
    assert classes, "no scheme found"
    outside = [
        f"{c.__module__}.{c.__name__}" for c in classes if not c.__module__.startswith(f"{NAME}.schemes.")
    ]
    assert not outside, f"scheme classes outside schemes/: {outside}"
    served = [plan for cls in SCHEMES for plan in cls.__dict__.get("serves", ())]
    assert all(cls.__dict__.get("serves") for cls in SCHEMES), "a registered scheme serves no plan"
    assert len(served) == len(set(served)), "two schemes serve the same plan"
    # every scheme that serves plans is registered (else the registry could never build it)
    unregistered = [c.__name__ for c in classes if c.__dict__.get("serves") and c not in SCHEMES]
    assert not unregistered, f"schemes with plans but no registry line: {unregistered}"


def layout_section() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("\n## Layout\n")
    return readme[start : readme.index("\n## ", start + 1)]


def test_readme_layout_names_every_module_and_only_real_ones():
    named = set(re.findall(r"`([\w/]+\.py)`", layout_section()))
    on_disk = {str(p.relative_to(PACKAGE)) for p in modules().values() if p.name != "__init__.py"}
    missing = sorted(on_disk - named)
    assert not missing, f"README's Layout section does not name: {missing}"
    stale = sorted(n for n in named - on_disk if not (REPO / n).exists())
    assert not stale, f"README's Layout section names modules that do not exist: {stale}"


@pytest.mark.parametrize(
    "folder", sorted({str(p.relative_to(PACKAGE).parent) + "/" for p in PACKAGE.rglob("*.py")} - {"./"})
)
def test_readme_layout_names_every_folder(folder):
    assert f"`{folder}`" in layout_section() or f"`{folder.rstrip('/')}/" in layout_section()


def ptq_attributes(folder: str) -> tuple[set[str], set[str]]:
    """(``ptq_*`` attributes ``folder`` sets on objects, those it reads), by their source text."""
    sets, reads = set(), set()
    for path in (PACKAGE / folder).rglob("*.py"):
        text = path.read_text()
        sets |= set(re.findall(r"\.(ptq_\w+)\s*(?:=(?!=)|,[^=\n]*=(?!=))", text))
        sets |= set(re.findall(r"setattr\([^,]+,\s*\"(ptq_\w+)\"", text))
        reads |= set(re.findall(r"\.(ptq_\w+)\b", text)) | set(re.findall(r"\"(ptq_\w+)\"", text))
    return sets, reads


def test_schemes_and_kernels_share_no_ptq_attribute():
    """A scheme hands a kernel what it needs through the kernel's arguments (specs), never through
    ``layer.ptq_*`` attributes one side sets and the other reads."""
    scheme_sets, scheme_reads = ptq_attributes("schemes")
    kernel_sets, kernel_reads = ptq_attributes("kernels")
    shared = {"ptq_loaded_shards"}  # validation's loader bookkeeping, read by both through validation
    assert not (scheme_sets & kernel_reads) - shared, sorted(scheme_sets & kernel_reads)
    assert not (kernel_sets & scheme_reads) - shared, sorted(kernel_sets & scheme_reads)
