"""Our dynamic W8A8 layers after an RMSNorm, through vLLM-Ascend's own norm + quant fusion pattern.

vLLM-Ascend's ``compilation/passes/norm_quant_fusion_pass.py`` (``AddRMSNormQuantFusionPass``) rewrites
``npu_add_rms_norm`` followed by ``npu_dynamic_quant`` of its output into one
``npu_add_rms_norm_dynamic_quant``. Here its pattern and replacement (``AddRMSNormDynamicQuantPattern``'s
``get_pattern`` / ``get_replacement``, compiled from each pinned release's source) are registered with
torch's pattern matcher, as its ``BasePattern.register`` does, and applied to a traced graph of an
RMSNorm and one of our real vLLM layers on the NPU kernel list.

What stands in, and why: the module itself cannot be imported here (``base_pattern.py`` imports
torchair / npugraph_ex, and the pass class vLLM-Ascend's compiled backend); its ``get_inputs`` makes
tensors on ``device="npu"``, so the same shapes on CPU are the example inputs; the torch_npu ops are the
emulation's, registered as ``torch.ops.npu`` operators (tests/npu_helpers.py), as torch_npu's are; the
graph is traced by ``make_fx`` with fake tensors and dead code removed, as Inductor's post-grad graph
is, not by vLLM-Ascend's compiled backend.
"""

from __future__ import annotations

import types

import pytest
import torch

from tests.layer_helpers import (
    W8A8_DYNAMIC,
    build_layer,
    ct_config,
    load_tensors,
    make_w4a8_tensors,
    make_w8a8_tensors,
    w4a8,
)
from tests.npu_helpers import use_npu_torch_ops
from tests.vllm_ascend_real import VERSIONS, source_dir, upstream_code

EPS = 1e-6
FUSED = "npu_add_rms_norm_dynamic_quant"


def _vllm_ascend_pattern(version: str):
    """(pattern, replacement) of that release's AddRMSNormDynamicQuantPattern, at EPS."""
    path = source_dir(version) / "vllm_ascend" / "compilation" / "passes" / "norm_quant_fusion_pass.py"
    methods = upstream_code(
        path, ["get_pattern", "get_replacement"], {"torch": torch}, "AddRMSNormDynamicQuantPattern"
    )
    pattern_self = types.SimpleNamespace(eps=EPS)
    return methods["get_pattern"](pattern_self), methods["get_replacement"](pattern_self)


def _fusion_pass(version: str):
    import torch._inductor.pattern_matcher as pm

    passes = pm.PatternMatcherPass(pass_name="rmsnorm_quant_fusion_pass")
    pattern, replacement = _vllm_ascend_pattern(version)
    # its get_inputs' shapes and dtype, on CPU
    example = [torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(2, 4, dtype=torch.bfloat16)]
    example.append(torch.randn(4, dtype=torch.bfloat16))
    pm.register_replacement(pattern, replacement, example, pm.fwd_only, passes)
    return passes


def _traced_block(layer, hidden: int, tokens: int = 5):
    from torch.fx.experimental.proxy_tensor import make_fx

    def block(x, residual, gamma):
        normed, _, new_residual = torch.ops.npu.npu_add_rms_norm(x, residual, gamma, EPS)
        return layer(normed)[0], new_residual

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(tokens, hidden, generator=g).to(torch.bfloat16) for _ in range(2)]
    args.append((torch.rand(hidden, generator=g) + 0.5).to(torch.bfloat16))
    gm = make_fx(block, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)
    gm.graph.eliminate_dead_code()
    return gm, block, args


def _ops(gm) -> list[str]:
    return [
        n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "__name__")
    ]


@pytest.fixture
def npu_ops(monkeypatch, vllm_dist):
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "npu")
    return use_npu_torch_ops(monkeypatch)


SCHEMES = {
    "w8a8-dynamic": (W8A8_DYNAMIC, lambda: make_w8a8_tensors(48, 64), "NpuInt8Kernel"),
    # per-channel W4A8 is served as dynamic W8A8 (kernels/composed.py)
    "w4a8-channel": (
        w4a8(None),
        lambda: make_w4a8_tensors(48, 64, None, packed=False),
        "PerChannelW4A8AsInt8Kernel",
    ),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("version", VERSIONS)
def test_dynamic_int8_activations_after_rms_norm_are_fused_by_vllm_ascends_pattern(npu_ops, version, scheme):
    cfg, tensors, kernel = SCHEMES[scheme]
    layer = build_layer("ReplicatedLinear", ct_config(*cfg), 64, 48, torch.bfloat16, bias=False)
    load_tensors(layer, tensors())
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.scheme.kernel.name.startswith(kernel)
    gm, block, args = _traced_block(layer, 64)
    before = gm(*args)
    assert "npu_dynamic_quant.default" in _ops(gm)
    assert _fusion_pass(version).apply(gm.graph) == 1
    gm.recompile()
    ops = _ops(gm)
    assert f"{FUSED}.default" in ops and "npu_dynamic_quant.default" not in ops
    assert "npu_add_rms_norm.default" not in ops
    after = gm(*args)
    # the residual is the same tensor; the layer output moves only where the fused op quantizes the
    # norm's float32 output instead of its bf16 rounding (a code off by one here and there)
    assert torch.equal(after[1], before[1])
    rel = float((after[0].double() - before[0].double()).norm() / before[0].double().norm())
    assert rel < 2e-2, rel
    eager = block(*args)
    assert torch.equal(before[0], eager[0])  # the traced graph is the layer's own computation
