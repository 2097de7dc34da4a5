"""README.md shows the SmolLM2 report exactly as `vllm-ptq-ascend report` wrote it (not typed by hand)."""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from readme_report import DEFAULT, current_block, embedded  # noqa: E402


def test_readme_holds_the_generated_report():
    block = current_block((REPO / "README.md").read_text(encoding="utf-8"))
    assert block is not None, "README.md lost its report block"
    assert block == embedded(DEFAULT), "README.md differs: run python benchmarks/readme_report.py"


def test_every_linked_plot_exists():
    import re

    block = current_block((REPO / "README.md").read_text(encoding="utf-8"))
    links = re.findall(r"\]\(([^)]+\.png)\)", block)
    assert links and all((REPO / link).is_file() for link in links)
