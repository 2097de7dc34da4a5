"""W4A8 int: symmetric int4 weights (per group or per channel), int8 per-token dynamic activations.

What llmcompressor's ``W4A8`` preset writes. Both compressed-tensors formats are served:
``int-quantized`` (``weight`` int8 [out, in] holding values in [-8, 7]) and
``pack-quantized`` (``weight_packed`` int32 [out, in/8] plus ``weight_shape``, as WNA16);
``weight_scale`` is [out, groups] in both (``int_weights.IntWeightTensors``).
"""

from __future__ import annotations

from vllm_ptq_ascend.formats.plan import CT_FORMAT
from vllm_ptq_ascend.kernels import W4A8Spec
from vllm_ptq_ascend.schemes.int_weights import IntWeightsScheme, IntWeightTensors


class W4A8IntScheme(IntWeightsScheme):
    serves = ((CT_FORMAT, "W4A8"),)

    def __init__(
        self,
        layer_name: str,
        *,
        group_size: int | None,
        packed: bool,
        files: dict[str, str] | None = None,
        shards: list[str] | None = None,
    ):
        super().__init__(layer_name, files, shards)
        self.spec = W4A8Spec(group_size=-1 if not group_size else int(group_size))
        self.weights = IntWeightTensors(4, packed, self.spec.group_size)
        self.tensor_names = self.weights.tensor_names

    def describe(self) -> str:
        return f"W4A8 int ({self.weights.describe()}; int8 dynamic per-token activations)"

    def kernel_spec(self, shape):
        return self.spec
