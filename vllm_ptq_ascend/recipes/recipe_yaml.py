"""Recipe YAML that reloads: plain YAML only, no python-object tags.

llmcompressor 0.14 dumps modifier fields as they are: a SmoothQuant mapping (a
tuple) becomes ``!!python/tuple`` and GPTQ's act-order enum
``!!python/object/apply:...ActivationOrdering``. Its own loader (``yaml.safe_load``)
then refuses the ``recipe.yaml`` it saved beside the checkpoint. We write tuples as
lists and enums as their values, which llmcompressor's pydantic fields accept on reload.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import yaml


def _plain(value: Any) -> Any:
    from llmcompressor.sentinel import Sentinel

    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        # A Sentinel marks an argument that was not given (AWQ's offload_device): leave it out.
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, Sentinel)}
    return value


def dump_recipe_dict(recipe: dict[str, Any]) -> str:
    return yaml.safe_dump(_plain(recipe), sort_keys=False, default_flow_style=None, width=100)


class _PythonTagLoader(yaml.SafeLoader):
    """safe_load, plus the python tags llmcompressor writes for plain data, read as plain data."""


def _tuple(loader, node):
    return loader.construct_sequence(node)


def _enum_value(loader, suffix, node):
    # `!!python/object/apply:pkg.SomeEnum [value]`: keep the value, import nothing.
    args = loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else None
    if not args or len(args) != 1 or not isinstance(args[0], (str, int, float)):
        problem = f"python object {suffix} is not an enum value"
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)
    return args[0]


_PythonTagLoader.add_constructor("tag:yaml.org,2002:python/tuple", _tuple)
_PythonTagLoader.add_multi_constructor("tag:yaml.org,2002:python/object/apply:", _enum_value)


def make_recipe_file_plain(path: Path) -> None:
    """Rewrite llmcompressor's saved ``recipe.yaml`` as plain YAML that ``yaml.safe_load`` reads."""
    if not path.is_file():
        return
    text = path.read_text()
    if "!!python/" not in text:
        return
    try:
        data = yaml.load(text, Loader=_PythonTagLoader)  # noqa: S506 - a SafeLoader that imports nothing
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: llmcompressor wrote a recipe that cannot be made plain YAML: {e}") from e
    path.write_text(dump_recipe_dict(data))
