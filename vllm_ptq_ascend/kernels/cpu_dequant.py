"""CPU weight-only kernels whose long calls dequantize the weight tile by tile and run bf16 GEMMs.

The dequantization costs N·K against the GEMM's M·N·K, so from some hundreds of tokens per call it
pays to expand a low-bit weight into the model dtype first, into one scratch buffer shared by every
layer of the process (layers run one after another). A large weight is expanded :data:`TILE_ROWS`
output rows at a time, so each tile is multiplied while it is still in cache: on Llama-2-7B's
4096 x 4096 that is 4x cheaper than expanding the whole weight (2.9 against 12.4 ms at 1 token).
Short calls stay on a kernel that reads the low-bit weight directly. Either way the low-bit weight
is the only copy kept.

- :class:`CpuWna16PrefillKernel` (W4A16, and per-group W4A8 through it): vLLM's
  ``CPUWNA16LinearKernel`` (``cpu_gemm_wna16``, about 0.4x the bf16 GEMM at every size,
  ``benchmarks/results/w4_prefill_dequant_cpu.md``) below :data:`DEQUANT_MIN_TOKENS`; from there
  vLLM's packed nibbles read in place. Not where cpu_gemm_wna16 runs its AMX path (a bf16 model on an
  AMX CPU): that beats dequantizing at every token count (``w4_prefill_dequant_cpu_amx.md``).
  vLLM's layout, from
  ``CPUWNA16LinearKernel._process_gptq_weights_w4a16`` (vLLM 0.32.0): int32 words [N/16, K·2], each
  16 output channels a block, for each input channel k two words of 8 nibbles, output 8·w + i in bits
  4i..4i+3, unsigned (q + 8 for symmetric uint4b8); scales [groups, N]. The tests check this against
  vLLM's own repacking.
- :class:`CpuInt8WeightKernel` (per-channel W8A16): the int8 weight kept as it is (half the bytes of
  the bf16 copy the portable kernel makes at load); torch's ``_weight_int8pack_mm`` up to
  :data:`INT8_GEMV_MAX_TOKENS`, dequantized per call above.
"""

from __future__ import annotations

import torch

from vllm_ptq_ascend.cpu_features import request_amx_tiles
from vllm_ptq_ascend.kernels.base import LinearKernel, WeightOnlySpec
from vllm_ptq_ascend.kernels.cpu import CpuWna16Kernel
from vllm_ptq_ascend.kernels.torch_generic import drop_params
from vllm_ptq_ascend.kernels.torch_ops import unpack_weight

#: tokens per call from which dequantize + GEMM beats cpu_gemm_wna16 (measured on the 2-core AMD EPYC
#: with AVX-512 BF16, ``benchmarks/bench_dequant_cpu.py --bits 4``, ``w4_prefill_dequant_cpu.md``): at
#: 256 SmolLM2's and Llama-2-7B's layers gain 1.2-1.5x; at 128 SmolLM2's lose (0.86-0.88x), at 64 7B's
#: (0.5-0.6x)
DEQUANT_MIN_TOKENS = 256
#: tokens per call up to which torch's int8 weight-only kernel beats dequantize + GEMM (same host and
#: benchmark, ``--bits 8``)
INT8_GEMV_MAX_TOKENS = 16
BLOCK_N = 16  # output channels per block of vLLM's packed layout


#: a weight of up to this many elements is dequantized whole (tiles gave SmolLM2's nothing: 0.84x bf16
#: at 1024 tokens on gate_up, whole 0.86-0.93x); a larger one TILE_ROWS output rows at a time (a multiple
#: of 16), each tile multiplied while still in cache: on Llama-2-7B's o_proj 0.86x against 0.76x bf16 at
#: 2048 tokens, and at 256 tokens 0.56x where the whole weight gave 0.37x
SMALL_WEIGHT = 1 << 22
TILE_ROWS = 512


def tile_rows(out_features: int, in_features: int) -> int:
    return out_features if out_features * in_features <= SMALL_WEIGHT else TILE_ROWS


def scratch(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] view of the process's scratch buffer for ``dtype``, grown on demand."""
    buf = _SCRATCH.get(dtype)
    if buf is None or buf.numel() < rows * cols:
        buf = _SCRATCH[dtype] = torch.empty(rows * cols, dtype=dtype)
    return buf[: rows * cols].view(rows, cols)


_SCRATCH: dict[torch.dtype, torch.Tensor] = {}


def tiled_matmul(x: torch.Tensor, n: int, rows: int, tile_t, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ Wᵀ (+ bias), W [n, K], with ``tile_t(n0, n1)`` giving W[n0:n1]ᵀ, [K, n1 - n0], ``rows`` at a
    time (each tile overwrites the scratch buffer the last one used)."""
    if rows >= n:
        out = torch.mm(x, tile_t(0, n))
    else:
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            out[:, n0:n1] = torch.mm(x, tile_t(n0, n1))
    return out if bias is None else out.add_(bias)


def wna16_runs_amx(config) -> bool:
    """Whether vLLM's cpu_gemm_wna16 takes its AMX path for this layer: AMX tiles and a bf16 model, as
    its ``_get_isa_hint`` decides, with the tile permission granted (else CpuWna16Kernel keeps it on
    AVX-512)."""
    bf16 = config.params_dtype == torch.bfloat16
    return bf16 and torch.cpu._is_amx_tile_supported() and request_amx_tiles()


class CpuWna16PrefillKernel(CpuWna16Kernel):
    """cpu_gemm_wna16 below :data:`DEQUANT_MIN_TOKENS` tokens per call; from there the weight
    dequantized from vLLM's own packed copy, tile by tile, and GEMMs in the model dtype (numerics:
    each weight rounded once to the model dtype, then the GEMM, as a bf16 layer)."""

    switches_on_tokens = True

    @classmethod
    def can_implement(cls, config):
        spec = config.spec
        if spec.num_bits != 4:
            return False, f"{spec.num_bits}-bit weights (it reads vLLM-CPU's 4-bit layout)"
        if not spec.symmetric:
            return False, "asymmetric weights (it expands symmetric uint4b8 nibbles)"
        group = spec.group_width(config.in_features)
        if config.in_features % group:
            return False, f"group size {group} does not divide the input ({config.in_features})"
        if cls.vllm_uses_w4a8_layout(config):
            return False, "vLLM-CPU repacks for its int4 W4A8 kernel here (VLLM_CPU_INT4_W4A8 on AMX)"
        if wna16_runs_amx(config):
            return False, (
                "cpu_gemm_wna16 runs its AMX path here, faster than dequantizing at 16-4096 tokens "
                "(benchmarks/results/w4_prefill_dequant_cpu_amx.md)"
            )
        return super().can_implement(config)

    @staticmethod
    def vllm_uses_w4a8_layout(config) -> bool:
        """vLLM's own condition (``CPUWNA16LinearKernel.process_weights_after_loading``)."""
        from vllm import envs

        return bool(
            envs.VLLM_CPU_INT4_W4A8
            and config.params_dtype == torch.bfloat16
            and torch.cpu._is_amx_tile_supported()
        )

    def process_weights_after_loading(self, layer):
        super().process_weights_after_loading(layer)
        if layer.use_w4a8:
            raise RuntimeError(
                f"layer '{self.config.layer_name}': vLLM-CPU packed its weight for the int4 W4A8 kernel, "
                "which CpuWna16PrefillKernel cannot read"
            )
        n, k = self.config.out_features, self.config.in_features
        group = self.spec.group_width(k)
        # [N/16, K, 8] bytes, byte j holding outputs 2j (low nibble) and 2j + 1 of its block: a view
        self.nibbles = layer.weight_packed.data.view(torch.uint8).reshape(n // BLOCK_N, k, BLOCK_N // 2)
        scale = layer.weight_scale.data  # [groups, N]
        # tiles are written transposed, [K, rows], seen as [groups, group, rows/16, 16]
        self.scale = scale.reshape(k // group, 1, n // BLOCK_N, BLOCK_N)
        self.group = group
        self.min_tokens, self.tile_rows = DEQUANT_MIN_TOKENS, tile_rows(n, k)

    def tile_t(self, n0: int, n1: int) -> torch.Tensor:
        """Output rows n0:n1 of the weight (multiples of 16), transposed: [K, n1 - n0], in the model
        dtype, in the scratch buffer."""
        k, b0, b1 = self.config.in_features, n0 // BLOCK_N, n1 // BLOCK_N
        b = self.nibbles[b0:b1]
        q = torch.stack((b & 0xF, b >> 4), dim=-1).view(torch.int8).sub_(8)  # [blocks, K, 8, 2] signed
        # [blocks, K, 16] -> [groups, group, blocks, 16], times the scales, into a [K, n1 - n0] tile
        q = q.reshape(b1 - b0, k // self.group, self.group, BLOCK_N).permute(1, 2, 0, 3)
        out = scratch(k, n1 - n0, self.scale.dtype)
        torch.mul(q, self.scale[:, :, b0:b1], out=out.view(k // self.group, self.group, b1 - b0, BLOCK_N))
        return out

    def apply(self, layer, x, bias):
        if x.shape[0] < self.min_tokens:
            return super().apply(layer, x, bias)
        n = self.config.out_features
        return tiled_matmul(x.to(self.scale.dtype), n, self.tile_rows, self.tile_t, bias)


class CpuInt8WeightKernel(LinearKernel):
    """Per-channel symmetric W8A16 with the int8 weight resident: ``_weight_int8pack_mm`` (one read
    of the int8 weight per call) for short calls; the weight dequantized tile by tile and GEMMs for
    long ones."""

    family = WeightOnlySpec
    switches_on_tokens = True

    @classmethod
    def can_implement(cls, config):
        spec: WeightOnlySpec = config.spec
        if spec.num_bits != 8:
            return False, f"{spec.num_bits}-bit weights (it keeps int8 ones)"
        if not spec.symmetric:
            return False, "asymmetric weights (torch's int8 kernel has no zero points)"
        if spec.has_g_idx:
            return False, "act-order g_idx (ActOrderKernel permutes the input first)"
        if spec.group_size not in (-1, config.in_features):
            return (
                False,
                f"group size {spec.group_size} (torch's int8 kernel takes one scale per output channel)",
            )
        if config.params_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return False, f"{config.params_dtype} activations"
        return True, None

    def process_weights_after_loading(self, layer):
        self.weight = unpack_weight(layer, 8).contiguous()  # [N, K] int8
        self.gemv_max_tokens, self.tile_rows = INT8_GEMV_MAX_TOKENS, tile_rows(*self.weight.shape)
        self.scale = layer.weight_scale.data.reshape(-1).to(self.config.params_dtype).contiguous()
        drop_params(layer, "weight_packed", "weight", "weight_scale", "weight_zero_point")

    def tile_t(self, n0: int, n1: int) -> torch.Tensor:
        """Output rows n0:n1 of the weight, transposed: [K, n1 - n0], in the model dtype, in the
        scratch buffer."""
        out = scratch(n1 - n0, self.weight.shape[1], self.scale.dtype)
        # convert, then scale in place: 1.4-2x faster here than one int8 x bf16 mul into ``out``
        return out.copy_(self.weight[n0:n1]).mul_(self.scale[n0:n1, None]).t()

    def apply(self, layer, x, bias):
        if x.shape[0] <= self.gemv_max_tokens:
            out = torch._weight_int8pack_mm(x, self.weight, self.scale)
            return out if bias is None else out + bias
        return tiled_matmul(x, self.weight.shape[0], self.tile_rows, self.tile_t, bias)
