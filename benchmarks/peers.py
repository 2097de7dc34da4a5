"""Peer methods run by our benchmarks: llmcompressor's own modifiers, unmodified, registered as
presets named ``<bits>-peer-<method>`` so ``bench_recipes.py`` quantizes, serves and scores them
exactly as it does ours (same calibration data, same held-out text, same engine).

Only peers that differ from a preset are here. ``w4a4-quip``, ``w4a8-quip``, ``w4a16-gptq`` and
``w4a16-autoround`` are llmcompressor's QuIPModifier / GPTQModifier / AutoRoundModifier with
their own defaults (the QuIP presets name both rotations and random Hadamards), so their rows are
also the peer's. The SpinQuant peer differs from ours: llmcompressor centres the embeddings, and
chooses its own norm mappings (``recipes/families.py``, FamilySpinQuantModifier).
"""

from __future__ import annotations

from vllm_ptq_ascend.recipes.presets import _activations, _gptq, _groups, _weights, preset


def _spinquant_peer(act_bits: int, group_size: int | None) -> list:
    from llmcompressor.modifiers.transform import SpinQuantModifier

    groups = _groups(_weights(4, group_size), _activations("dynamic", bits=act_bits), fmt="pack-quantized")
    # random Hadamards, as ours: compressed-tensors has plain ones for powers of two only (576 is not)
    spin = SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard")
    return [spin, _gptq(groups, None, "static")]


@preset("w4a8-peer-spinquant", needs_calibration=True)
def w4a8_peer_spinquant(group_size: int | None = 128) -> list:
    """Peer: llmcompressor's SpinQuantModifier (R1 + R2, unmodified) + GPTQ; int4 group weights, int8 acts."""
    return _spinquant_peer(8, group_size)


@preset("w4a4-peer-spinquant", needs_calibration=True)
def w4a4_peer_spinquant() -> list:
    """Peer: llmcompressor's SpinQuantModifier (R1 + R2, unmodified) + GPTQ; int4 channel weights and acts."""
    return _spinquant_peer(4, None)


PEERS = ("w4a8-peer-spinquant", "w4a4-peer-spinquant")
