"""Property-based tests: any ``quantization_config`` / msModelSlim description dict either parses
into a PtqAscendConfig or fails with our CheckpointError, whose message names the file at fault
(config.json or quant_model_description.json). Never a KeyError, TypeError, AttributeError or a
pydantic ValidationError leaking from the libraries underneath.

The profile is fixed (derandomized, bounded examples, no deadline) so CI runs the same examples
every time, in a few seconds.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_ptq_ascend.formats.msmodelslim import DESCRIPTION_FILE, NOT_YET, OTHER, SERVED
from vllm_ptq_ascend.validation import CheckpointError

settings.register_profile(
    "ptq_ascend_ci",
    derandomize=True,
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
CI = settings.get_profile("ptq_ascend_ci")
# compressed-tensors warns about odd but valid groups (different group sizes); not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# -- JSON-like junk -----------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def maybe(values, junk=json_values):
    """Mostly (about 4 in 5) a plausible value, sometimes junk of any JSON type."""
    return st.one_of(*[st.sampled_from(values)] * 4, junk)


# -- compressed-tensors configs that look valid, with random fields -------------------------------
STRATEGIES = ["tensor", "channel", "group", "block", "token", "tensor_group", "attn_head"]
QUANT_FIELDS = {  # field -> plausible values (valid or subtly wrong) for QuantizationArgs
    "num_bits": [4, 8, 0, 1, 2, 3, 16, 32, -4, "8", 4.0, 4.5, None],
    "type": ["int", "float", "INT", None],
    "symmetric": [True, False, None, "yes", 1],
    "strategy": [*STRATEGIES, "row", None],
    "group_size": [None, -1, 0, 1, 7, 32, 64, 128, "64", 3.5],
    "block_structure": [None, [128, 128], [0, 0], "128x128"],
    "dynamic": [True, False, "local", None, "yes"],
    "actorder": [None, "group", "weight", "static", "dynamic", "bogus", True],
    "observer": ["minmax", "memoryless", None, "nope"],
}
# valid-looking groups: the int schemes we serve, with one or two fields changed at random
SERVABLE_ARGS = st.fixed_dictionaries(
    {
        "num_bits": st.sampled_from([4, 8]),
        "type": st.just("int"),
        "symmetric": st.booleans(),
        "strategy": st.sampled_from(["channel", "group", "tensor", "token"]),
        "group_size": st.sampled_from([None, 32, 64, 128]),
        "dynamic": st.booleans(),
    },
    optional={"actorder": st.sampled_from([None, "group", "weight", "static"])},
)


@st.composite
def quant_args(draw):
    kind = draw(st.sampled_from(["servable", "servable", "mutated", "random"]))
    if kind == "random":  # any subset of the fields, each plausible or junk
        keys = draw(st.lists(st.sampled_from(list(QUANT_FIELDS)), unique=True))
        return {k: draw(maybe(QUANT_FIELDS[k])) for k in keys}
    args = draw(SERVABLE_ARGS)
    if args["strategy"] == "group" and args["group_size"] is None:
        args["group_size"] = 64
    if args["strategy"] != "group":
        args["group_size"] = None
    if kind == "mutated":
        for key in draw(st.lists(st.sampled_from(list(QUANT_FIELDS)), min_size=1, max_size=2)):
            if draw(st.booleans()):
                args.pop(key, None)
            else:
                args[key] = draw(maybe(QUANT_FIELDS[key]))
    return args


targets = st.one_of(
    st.lists(st.sampled_from(["Linear", "re:.*mlp.*", "re:[", "lm_head", ""]), max_size=3),
    json_values,
)
config_group = st.one_of(
    st.fixed_dictionaries(
        {"targets": targets},
        optional={
            "weights": st.one_of(quant_args(), st.none(), json_values),
            "input_activations": st.one_of(quant_args(), st.none(), json_values),
            "output_activations": st.one_of(st.none(), quant_args()),
            "format": maybe(["int-quantized", "pack-quantized", "float-quantized", "dense", None]),
        },
    ),
    json_values,
)
FORMATS = ["int-quantized", "pack-quantized", "naive-quantized", "marlin-24", "dense", None]
ct_configs = st.fixed_dictionaries(
    {"quant_method": maybe(["compressed-tensors", "ptq_ascend"])},
    optional={
        "format": maybe(FORMATS),
        "config_groups": st.one_of(
            st.dictionaries(st.sampled_from(["group_0", "group_1", "g", "x y"]), config_group, max_size=3),
            json_values,
        ),
        "ignore": st.one_of(
            st.lists(st.sampled_from(["lm_head", "re:.*k_proj$", "re:("]), max_size=2), json_values
        ),
        "quantization_status": maybe(["compressed", "frozen", "bogus"]),
        "kv_cache_scheme": st.one_of(st.none(), quant_args(), json_values),
        "ptq_ascend": maybe([{"version": "0.1.0"}, {}]),
        "global_compression_ratio": maybe([None, 1.5]),
    },
)

# -- msModelSlim descriptions -------------------------------------------------------------------
LAYERS = [f"model.layers.0.{p}.weight" for p in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
labels = maybe([*SERVED, *NOT_YET, *OTHER, "W3A3", ""])
descriptions = st.fixed_dictionaries(
    {},
    optional={
        "model_quant_type": maybe(["W8A8", "W8A8_DYNAMIC", "W4A16", "W8A16", "FLOAT"]),
        "version": maybe(["1.0.0", "0.0.1", 1, None]),
        "group_size": maybe([0, 32, 64, -1, "64", 1.5, True, None]),
        "kv_cache_type": maybe(["C8", None]),
        **{layer: labels for layer in LAYERS},
        "model.embed_tokens.weight": labels,
        "model.layers.0.input_layernorm.weight": labels,
        "model.layers.0.self_attn.q_proj.input_scale": labels,
    },
)

# what from_config can receive: vLLM passes config.json's quantization_config (any JSON object) or
# the description file's dict
any_config = st.one_of(
    ct_configs,
    descriptions,
    st.dictionaries(st.sampled_from(["quant_method", "config_groups", "model_quant_type", "x"]), json_values),
    st.dictionaries(st.text(max_size=20), json_values, max_size=5),
)


def parse(config):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    try:
        return PtqAscendConfig.from_config(config)
    except CheckpointError as e:
        msg = str(e)
        assert "config.json" in msg or DESCRIPTION_FILE in msg, msg
        return None


@CI
@given(ct_configs)
def test_compressed_tensors_configs_parse_or_fail_clearly(config):
    c = parse(config)
    if c is not None:
        assert c.modelslim is None
        for name, plan in c.plans.items():
            assert plan is None or plan.source == name


@CI
@given(descriptions)
def test_modelslim_descriptions_parse_or_fail_clearly(config):
    c = parse(config)
    if c is not None and c.modelslim is not None:
        assert isinstance(c.modelslim.group_size, int) and c.modelslim.group_size >= 0
        assert all(isinstance(v, str) for v in c.modelslim.labels.values())


@CI
@given(any_config)
def test_any_dict_parses_or_fails_clearly(config):
    parse(config)


@CI
@given(quant_args(), st.one_of(st.none(), quant_args()), st.sampled_from(FORMATS))
def test_single_group_parses_or_names_the_group(weights, acts, fmt):
    group = {"targets": ["Linear"], "weights": weights}
    if acts is not None:
        group["input_activations"] = acts
    config = {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"grp_q": group}}
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    try:
        c = PtqAscendConfig.from_config(config)
    except CheckpointError as e:
        # either the whole config is invalid, or the group that is unsupported is named
        assert "config.json: quantization_config" in str(e), str(e)
        return
    plan = c.plans["grp_q"]
    if plan is not None:  # a plan always builds its scheme for a layer
        from vllm_ptq_ascend.schemes.registry import build_scheme

        build_scheme(plan, "model.layers.0.mlp.down_proj", {}, ["model.layers.0.mlp.down_proj"])


@pytest.mark.parametrize(
    "config",
    [
        ["quant_method", "compressed-tensors"],
        None,
        {"quant_method": "compressed-tensors", "config_groups": ["group_0"]},
        {"quant_method": "compressed-tensors", "config_groups": "Linear"},
        {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"], "weights": 8}}},
        {"model_quant_type": "W8A8", 1: "W8A8"},
        {"model_quant_type": "W8A8", "group_size": True},
        {"model_quant_type": "W8A8", "model.layers.0.mlp.down_proj.weight": ["W8A8"]},
    ],
)
def test_known_malformed_configs_are_checkpoint_errors(config):
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    with pytest.raises(CheckpointError, match=rf"config\.json|{DESCRIPTION_FILE}"):
        PtqAscendConfig.from_config(config)


def test_a_field_of_the_wrong_type_names_its_group():
    """compressed-tensors' validators compare group_size before pydantic checks its type."""
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": "64"}
    config = {
        "quant_method": "compressed-tensors",
        "config_groups": {"g": {"targets": ["Linear"], "weights": weights}},
    }
    with pytest.raises(CheckpointError, match=r"config_groups\['g'\]: a field has a value of the wrong type"):
        PtqAscendConfig.from_config(config)
