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
from vllm_ptq_ascend.schemes.w4a8_int import W4A8IntScheme


class W4A4IntScheme(W4A8IntScheme):
    serves = ((CT_FORMAT, "W4A4"),)

    act_bits = 4

    def __init__(self, layer_name: str, *, packed: bool, files=None, shards=None):
        super().__init__(layer_name, group_size=None, packed=packed, files=files, shards=shards)
        self.dynamic_spec = IntDynamicSpec(self.weight_bits, self.act_bits)

    def describe(self) -> str:
        fmt = "pack-quantized" if self.packed else "int-quantized"
        return f"W4A4 int (int4 symmetric per-channel weights, {fmt}; int4 dynamic per-token activations)"

    def prepare(self, layer):
        self.kernels.prepare_int_dynamic(layer, self.dynamic_spec)

    def apply_weights(self, layer, x, bias=None):
        kernels = self.kernels
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_scale = kernels.quant_act_dynamic(layer, x2)
        out = kernels.int_dynamic_mm(layer, x_q, x_scale, bias, x.dtype)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])
