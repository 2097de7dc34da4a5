"""W4A4 int: symmetric int4 per-channel weights, int4 per-token dynamic activations.

Checkpoint layout as W4A8 per channel (``int-quantized`` int8 ``weight`` or ``pack-quantized``
``weight_packed``; ``weight_scale`` [out, 1]). Activation rows are quantized at run time with
``s = max|x| / 7`` and clamped to [-8, 7]: npu_dynamic_quant's int4 convention (and vLLM's
for int8), where compressed-tensors' fake quantization divides by 7.5; the difference is
within half a step of the int4 grid.
"""

from __future__ import annotations

from vllm_ptq_ascend.formats.plan import CT_FORMAT
from vllm_ptq_ascend.kernels import IntDynamicSpec
from vllm_ptq_ascend.schemes.int_weights import IntWeightsScheme, IntWeightTensors


class W4A4IntScheme(IntWeightsScheme):
    serves = ((CT_FORMAT, "W4A4"),)

    def __init__(self, layer_name: str, *, packed: bool, files=None, shards=None):
        super().__init__(layer_name, files, shards)
        self.weights = IntWeightTensors(4, packed)
        self.tensor_names = self.weights.tensor_names

    def describe(self) -> str:
        return f"W4A4 int ({self.weights.describe()}; int4 dynamic per-token activations)"

    def kernel_spec(self, shape):
        return IntDynamicSpec(weight_bits=4, act_bits=4)
