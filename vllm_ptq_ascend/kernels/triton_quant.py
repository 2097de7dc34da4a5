"""W4A4 / FlatQuant activations in one Triton kernel on GPUs (CUDA, ROCm, XPU).

Per token, one program: the row viewed as X [n1, n2], the online transform Lᵀ·X·R (float32, IEEE),
the clip and the symmetric per-token quantization, written as int8 values and a float32 scale.
In torch eager the same steps are about a dozen kernel launches (``TorchIntDynamicKernel``), which
at decode sizes cost more than the GEMM they feed (``benchmarks/results/cuda_gemm.md``). The int
GEMM after it is the platform's int8 kernel, chosen by the same candidate lists (vLLM's on CUDA).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from vllm_ptq_ascend.kernels.torch_generic import TorchIntDynamicKernel

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the kernel is not a candidate (can_implement says so)
    triton = None

GPU_PLATFORMS = ("cuda", "rocm", "xpu")
#: |x| below 2**22: adding and taking away 1.5 * 2**23 rounds a float32 to the nearest integer, ties
#: to even (torch.round's rule), with plain IEEE adds that every backend and Triton's interpreter share
_ROUND_MAGIC = tl.constexpr(12582912.0) if triton is not None else None
#: what one program keeps in registers: a row without a transform, a padded factor's side with one.
#: Measured on an H200 (cuda_gemm.md, 2048 tokens): 64 x 64 factors 0.22 ms (torch eager 0.28 ms);
#: 86 x 128 padded to 128 x 128 spills registers, 19.6 ms (torch eager 0.69 ms)
MAX_ROW, MAX_FACTOR = 65536, 64

if triton is not None:

    @triton.jit
    def _transform_quant_kernel(
        x_ptr,
        left_ptr,
        right_ptr,
        q_ptr,
        scale_ptr,
        n1,
        n2,
        clip_ratio,
        qmax,
        N1P: tl.constexpr,
        N2P: tl.constexpr,
        TRANSFORM: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, N1P)
        j = tl.arange(0, N2P)
        in_row = (i[:, None] < n1) & (j[None, :] < n2)
        offs = row * n1 * n2 + i[:, None] * n2 + j[None, :]
        x = tl.load(x_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
        if TRANSFORM:
            # padding rows / columns of the factors are zero, so the padded product is exact
            r_mask = (j[:, None] < n2) & (j[None, :] < n2)
            right = tl.load(right_ptr + j[:, None] * n2 + j[None, :], mask=r_mask, other=0.0)
            l_mask = (i[:, None] < n1) & (i[None, :] < n1)
            # Lᵀ loaded directly: element (a, b) of Lᵀ is L[b, a]
            left_t = tl.load(left_ptr + i[None, :] * n1 + i[:, None], mask=l_mask, other=0.0)
            x = tl.dot(x, right, input_precision="ieee")
            x = tl.dot(left_t, x, input_precision="ieee")
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-10)
        scale = amax * clip_ratio / qmax  # torch_ops.per_token_quant_clipped's order of operations
        q = x / scale
        q = (q + _ROUND_MAGIC) - _ROUND_MAGIC
        q = tl.minimum(tl.maximum(q, -qmax - 1.0), qmax)
        tl.store(q_ptr + offs, q.to(tl.int8), mask=in_row)
        tl.store(scale_ptr + row, scale)


@lru_cache(maxsize=1)
def triton_can_run() -> bool:
    """A GPU driver for Triton, or its interpreter (which runs the kernel on CPU tensors)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    try:
        triton.runtime.driver.active.get_current_target()
    except RuntimeError:  # "0 active drivers": a host without a GPU
        return False
    return True


def _padded(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # tl.dot wants power-of-two sides of at least 16


def transform_quant(
    x: torch.Tensor,
    left: torch.Tensor | None,
    right: torch.Tensor | None,
    clip_ratio: float,
    qmax: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q int8 [M, n], scale float32 [M, 1]) of 2-D ``x``: rows times L ⊗ R (if given), clipped
    to ``clip_ratio`` of their max, quantized to [-qmax-1, qmax] (``torch_ops.per_token_quant_clipped``
    after ``kronecker_transform``)."""
    x = x.contiguous()
    m, n = x.shape
    if left is None:
        n1, n2 = 1, n  # no transform: the row as one [1, n] tile
    else:
        n1, n2 = left.shape[0], right.shape[0]
        left, right = left.float().contiguous(), right.float().contiguous()  # row-major, as loaded
    x_q = torch.empty((m, n), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        n1p, n2p = (1, triton.next_power_of_2(n)) if left is None else (_padded(n1), _padded(n2))
        _transform_quant_kernel[(m,)](
            x,
            left if left is not None else x,
            right if right is not None else x,
            x_q,
            scale,
            n1,
            n2,
            float(clip_ratio),
            float(qmax),
            N1P=n1p,
            N2P=n2p,
            TRANSFORM=left is not None,
            num_warps=8 if n1p * n2p >= 128 * 128 else 4,
        )
    return x_q, scale


class TritonIntDynamicKernel(TorchIntDynamicKernel):
    """:class:`TorchIntDynamicKernel` with its transform, clip and quantization fused into one
    Triton kernel; the same int GEMM after it."""

    @classmethod
    def can_implement(cls, config):
        if triton is None:
            return False, "Triton is not installed"
        if config.platform not in GPU_PLATFORMS:
            return False, f"a GPU kernel ({', '.join(GPU_PLATFORMS)}), not {config.platform}"
        if not triton_can_run():
            return False, "Triton sees no GPU here (and TRITON_INTERPRET is not set)"
        if config.spec.kronecker is None:
            if config.in_features > MAX_ROW:
                return False, f"{config.in_features} input features: one program holds at most {MAX_ROW}"
            return True, None
        n1, n2 = config.spec.kronecker
        if max(_padded(n1), _padded(n2)) > MAX_FACTOR:
            return False, f"a {n1} x {n2} transform: one program holds factors of at most {MAX_FACTOR}"
        return True, None

    @classmethod
    def fallback(cls, config):
        return False

    def quantize_input(self, x):
        if self.factors is None:
            return transform_quant(x, None, None, 1.0, self.spec.act_qmax)
        f = self.factors  # float32 since process_weights_after_loading; transform_quant makes them row-major
        return transform_quant(x, f.left, f.right, f.clip_ratio, self.spec.act_qmax)
