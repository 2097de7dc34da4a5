"""Online Hadamard rotations of linear inputs and outputs (llmcompressor's QuIPModifier), on every backend.

A rotation checkpoint stores weights with one half of each rotation fused in when it was saved
(``weight_input`` / ``weight_output``) and needs the other half at run time: x -> x·V before the
layer and y -> y·U after it (compressed-tensors' ``apply_transform_weight``), with V and U the
stored ±1 matrices divided by √n. vLLM already reads this part: ``get_linear_transform_schemes``
picks each layer's transforms from the config, and ``CompressedTensorsLinearTransformMethod``'s
``create_weights`` registers the ``<group>_<location>.weight`` tensors, shared by every layer of
a size as compressed-tensors saves them once per size. Both are reused as they are. vLLM's
``apply`` is not: its Hadamard path is CUDA's hadacore, its dense path needs vLLM-CPU's per-layer
oneDNN handle (``layer.cpu_linear``) and it refuses a bias. Here the rotation is a float32 matmul
with the normalised matrix, the same on CPU, CUDA and NPU, and a bias is added before the output
rotation, as compressed-tensors' output hook sees it.
"""

from __future__ import annotations

import math

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method

# vLLM's transform module imports compressed_tensors.py, which imports it back: load that one first
from vllm.model_executor.layers.quantization.compressed_tensors import compressed_tensors  # noqa: F401, I001
from vllm.model_executor.layers.quantization.compressed_tensors.transform.linear import (
    CompressedTensorsLinearTransformMethod,
    get_linear_transform_schemes,
)

from vllm_ptq_ascend.formats.transforms import location_name
from vllm_ptq_ascend.validation import CheckpointError

# a stored ±1 matrix is exact in any float dtype; this only tolerates rounding in H·Hᵀ
MAX_HADAMARD_ERROR = 1e-3


def with_online_rotations(
    method: LinearMethodBase, rotations, layer: torch.nn.Module, prefix: str, mapping: dict, cache: dict
) -> LinearMethodBase:
    """``method`` wrapped with the layer's online rotations, or ``method`` if it has none."""
    input_tfms, output_tfms = get_linear_transform_schemes(layer, prefix, rotations, mapping)
    if not input_tfms and not output_tfms:
        return method
    from vllm.distributed import get_tensor_model_parallel_world_size

    if get_tensor_model_parallel_world_size() > 1:
        raise CheckpointError(
            f"config.json: layer '{prefix}' has online Hadamard rotations (transform_config), which "
            "ptq_ascend and vLLM serve at tensor-parallel size 1 only"
        )
    return OnlineRotationLinearMethod(method, input_tfms, output_tfms, prefix, cache)


@register_weight_loader_v2_supported_method
class OnlineRotationLinearMethod(CompressedTensorsLinearTransformMethod):
    """vLLM's transform wrapper around a linear method, applied by portable matmuls."""

    def __init__(self, quant_method, input_tfms, output_tfms, prefix: str, cache: dict):
        super().__init__(quant_method, input_tfms, output_tfms)
        self.prefix = prefix
        self.cache = cache
        self.input_rotation: dict[int, torch.Tensor] = {}
        self.output_rotation: dict[int, torch.Tensor] = {}

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, *args, **kwargs):
        sized = [(t, input_size_per_partition) for t in self.input_tfms.values()]
        sized += [(t, output_partition_sizes[part]) for part, t in self.output_tfms.items()]
        for (group, scheme, _), size in sized:
            if scheme.head_dim and size % scheme.head_dim:
                raise CheckpointError(
                    f"config.json: transform group {group!r} rotates blocks of head_dim="
                    f"{scheme.head_dim}, which does not divide the {size} features of layer "
                    f"'{self.prefix}'"
                )
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, *args, **kwargs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.quant_method.process_weights_after_loading(layer)
        self.input_rotation = self._matrices(self.input_transform, self.input_tfms)
        self.output_rotation = self._matrices(self.output_transform, self.output_tfms)

    def _matrices(self, module, tfms) -> dict[int, torch.Tensor]:
        """part -> the float32 matrix M with x·M the rotation (normalised, transposed if inverse)."""
        out = {}
        for part, (group, _scheme, args) in tfms.items():
            stored = module.weight.partitions[part].data
            key = (stored.untyped_storage().data_ptr(), stored.shape, bool(args.inverse))
            if key not in self.cache:
                what = f"layer '{self.prefix}', tensor '{group}_{location_name(args)}.weight'"
                err = hadamard_error(stored)
                if err > MAX_HADAMARD_ERROR:  # also catches a tensor left unwritten (missing)
                    raise CheckpointError(
                        f"{what}: not a Hadamard matrix (H·Hᵀ/n is off the identity by {err:.3g}); "
                        "is it missing from the checkpoint?"
                    )
                matrix = stored.float() / math.sqrt(stored.shape[0])
                self.cache[key] = (matrix.T if args.inverse else matrix).contiguous()
            out[part] = self.cache[key]
        return out

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        if self.input_rotation:
            x = rotate(x, self.input_rotation[0])
        y = self.quant_method.apply(layer, x, bias)
        if not self.output_rotation:
            return y
        parts = []
        for part, (start, length) in enumerate(self.partition_ranges):
            piece = y[..., start : start + length]
            parts.append(rotate(piece, self.output_rotation[part]) if part in self.output_rotation else piece)
        return torch.cat(parts, dim=-1)


def hadamard_error(h: torch.Tensor) -> float:
    """max |H·Hᵀ/n - I|: 0 for a (random) Hadamard matrix of ±1 entries; inf if not finite."""
    h = h.double()
    if not bool(torch.isfinite(h).all()):
        return math.inf
    n = h.shape[0]
    return (h @ h.T / n - torch.eye(n, dtype=h.dtype)).abs().max().item()


def rotate(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """x·M over the last dim, in blocks of M's size (a head_dim scheme is block diagonal), in float32."""
    n = matrix.shape[0]
    blocks = x.float().unflatten(-1, (-1, n))
    return (blocks @ matrix.to(x.device)).flatten(-2).to(x.dtype)
