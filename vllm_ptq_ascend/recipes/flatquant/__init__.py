"""FlatQuant as an llmcompressor Modifier (one folder per algorithm, as llmcompressor's modifiers/)."""

from vllm_ptq_ascend.recipes.flatquant.base import FlatQuantModifier

__all__ = ["FlatQuantModifier"]

# YAML recipes name modifiers by class: register ours with llmcompressor's factory on import.
def _register() -> None:
    from llmcompressor.modifiers.factory import ModifierFactory

    ModifierFactory.register("FlatQuantModifier", FlatQuantModifier)


_register()
