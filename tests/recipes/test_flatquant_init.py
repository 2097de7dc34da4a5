"""FlatQuant's initialisation and parametrisation against the reference's formulas, in float64.

Reference: ruikangliu/FlatQuant ``flatquant/function_utils.py`` (``get_random_orthg``: scipy's QR of a
standard normal matrix, Q·diag(sign(diag R))) and ``flatquant/trans_utils.py``
(``SVDDecomposeTransMatrix``: each factor U·diag(d)·Vᵀ, U and V ``nn.Linear`` weights set to that
initial matrix and then put under torch's ``orthogonal(..., orthogonal_map="cayley",
use_trivialization=False)``, d = ones; the inverse transpose U·diag(1/d)·Vᵀ).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import qr
from torch import nn

from vllm_ptq_ascend.recipes.flatquant.trainable import (
    KroneckerFactor,
    TrainableTransform,
    orthogonal_from,
    random_hadamard,
    random_orthogonal,
    start_matrix,
)


@pytest.mark.parametrize("n", [1, 4, 24, 48])
def test_random_orthogonal_is_the_references_formula(n):
    h = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    q_ref, r_ref = qr(h.numpy())
    ref = torch.from_numpy(q_ref @ np.diag(np.sign(np.diag(r_ref))))
    q = orthogonal_from(h)
    assert torch.allclose(q, ref, atol=1e-12)
    assert torch.allclose(q.t() @ q, torch.eye(n, dtype=torch.float64), atol=1e-12)
    # the same draw the factor makes from a seeded generator
    assert torch.equal(random_orthogonal(n, torch.Generator().manual_seed(n)), q)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 24, 48, 64])
def test_hadamard_start_is_an_orthogonal_random_hadamard_matrix(n):
    """The definition, in float64: every entry ±1/sqrt(n) and H·Hᵀ = I; the signs are drawn (two seeds
    differ beyond order 1), and L ⊗ R of two such factors is itself a Hadamard matrix of order n², the
    full rotation QuIP starts from."""
    h = start_matrix(n, "hadamard", torch.Generator().manual_seed(0))
    eye = torch.eye(n, dtype=torch.float64)
    assert h.dtype == torch.float64
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5), atol=1e-12)
    assert torch.allclose(h @ h.t(), eye, atol=1e-12)
    if n > 1:
        assert not torch.equal(h, start_matrix(n, "hadamard", torch.Generator().manual_seed(1)))
    k = torch.kron(h, start_matrix(n, "hadamard", torch.Generator().manual_seed(2)))
    assert torch.allclose(k.abs(), torch.full_like(k, 1 / n), atol=1e-12)
    assert torch.allclose(k @ k.t(), torch.eye(n * n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [3, 6, 9, 260])
def test_hadamard_start_falls_back_to_the_random_orthogonal_draw_where_no_hadamard_exists(n):
    """No Hadamard matrix is known for these orders (2^k·m with m outside compressed-tensors' table): the
    factor is the random-orthogonal start drawn from the same generator."""
    assert random_hadamard(n) is None
    got = start_matrix(n, "hadamard", torch.Generator().manual_seed(5))
    assert torch.equal(got, random_orthogonal(n, torch.Generator().manual_seed(5)))


def test_hadamard_factors_keep_the_linear_function_and_start_as_hadamard():
    """Through a TrainableTransform: 24 = 4 x 6, the 4 is Hadamard and the 6 falls back."""
    g = torch.Generator().manual_seed(0)
    t = TrainableTransform(
        24, 16, None, act_clip=False, init="hadamard", parametrization="direct", generator=g
    )
    assert t.left.shape == (4, 4) and torch.allclose(t.left.detach().abs(), torch.full((4, 4), 0.5))
    assert not torch.allclose(t.right.detach().abs(), torch.full((6, 6), 6**-0.5))  # random-orthogonal
    x, w = torch.randn(5, 24, generator=g), torch.randn(8, 24, generator=g)
    out = (t.activations(x) @ t.weight(w).t()).double()
    ref = x.double() @ w.double().t()
    assert float((out - ref).norm() / ref.norm()) < 1e-3


def _reference_svd_factor(n: int, inits: list[torch.Tensor]) -> nn.Module:
    """The reference's construction of one factor of SVDDecomposeTransMatrix (U and V each drawn)."""
    ref = nn.Module()
    ref.u, ref.v = nn.Linear(n, n, bias=False), nn.Linear(n, n, bias=False)
    for lin, init in zip((ref.u, ref.v), inits):
        lin.weight.data = init.clone()
        nn.utils.parametrizations.orthogonal(lin, orthogonal_map="cayley", use_trivialization=False)
    ref.d = nn.Parameter(torch.ones(n))
    return ref


@pytest.mark.parametrize("init", ["identity", "random-orthogonal", "hadamard"])
def test_svd_cayley_factor_is_the_references_and_stays_invertible_exactly(init):
    n = 8
    factor = KroneckerFactor(n, init, "svd-cayley", torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    draws = [start_matrix(n, init, g) for _ in "uv"]
    ref = _reference_svd_factor(n, [d.float() for d in draws])
    assert torch.allclose(factor.u.weight, ref.u.weight) and torch.allclose(factor.v.weight, ref.v.weight)
    m = factor.matrix().double()
    want = ref.u.weight.double() @ ref.v.weight.double().t()  # d = 1 at the start
    assert torch.allclose(m, want, atol=1e-6)
    if init == "identity":
        assert torch.allclose(m, torch.eye(n, dtype=torch.float64), atol=1e-7)
    # after a training step U, V stay orthogonal and M⁻ᵀ = U·diag(1/d)·Vᵀ without inverting M
    opt = torch.optim.SGD(factor.parameters(), lr=0.1)
    (factor.matrix() ** 3).sum().backward()
    opt.step()
    u, v, d = factor.u.weight.double(), factor.v.weight.double(), factor.d.double()
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(u.t() @ u, eye, atol=1e-5) and torch.allclose(v.t() @ v, eye, atol=1e-5)
    assert not torch.allclose(d, torch.ones_like(d))
    m = factor.matrix().double()
    assert torch.allclose(m, u @ torch.diag(d) @ v.t(), atol=1e-5)
    assert torch.allclose(factor.inverse_t().double(), torch.linalg.inv(m).t(), atol=1e-4)


@pytest.mark.parametrize("parametrization", ["direct", "svd-cayley"])
def test_transform_keeps_the_linear_function_without_quantization_loss(parametrization):
    """x·P and W·P⁻ᵀ multiply back to x·Wᵀ: with 16-bit fake quantization the product is unchanged."""
    g = torch.Generator().manual_seed(0)
    t = TrainableTransform(
        48, 16, None, act_clip=False, init="random-orthogonal", parametrization=parametrization, generator=g
    )
    assert not torch.allclose(t.left.detach(), torch.eye(t.left.shape[0]))
    x = torch.randn(5, 48, generator=g)
    w = torch.randn(32, 48, generator=g)
    ref = x.double() @ w.double().t()
    out = (t.activations(x) @ t.weight(w).t()).double()
    assert float((out - ref).norm() / ref.norm()) < 1e-3


def test_per_head_o_proj_training_path_keeps_attention_without_quantization_loss():
    """o_proj's per-head transform while training: v_proj's FlatQuantLinear carries the within-head
    factor R on its output heads, attention mixes the (grouped-query) values, and o_proj's activations
    get only L ⊗ I: with 16-bit fake quantization the block computes what it did (float64 reference)."""
    from vllm_ptq_ascend.recipes.flatquant.trainable import FlatQuantLinear

    g = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, tokens = 4, 2, 8, 6
    kw = dict(act_clip=False, init="random-orthogonal", generator=g)
    t_in = TrainableTransform(16, 16, None, **kw)
    t_o = TrainableTransform(heads * head_dim, 16, None, head_dim=head_dim, **kw)
    assert t_o.left.shape == (heads, heads) and not torch.allclose(t_o.right.detach(), torch.eye(head_dim))
    v_lin, o_lin = nn.Linear(16, kv_heads * head_dim), nn.Linear(heads * head_dim, 20, bias=False)
    v_lin.bias.data = torch.randn(kv_heads * head_dim, generator=g)
    x = torch.randn(tokens, 16, generator=g)
    attn = torch.softmax(torch.randn(heads, tokens, tokens, generator=g), dim=-1)

    def block(v_proj, o_proj, dtype):
        v = v_proj(x.to(dtype)).reshape(tokens, kv_heads, head_dim)
        out = torch.cat([attn[h].to(dtype) @ v[:, h // (heads // kv_heads)] for h in range(heads)], dim=-1)
        return o_proj(out).double()

    ref = block(v_lin.double(), o_lin.double(), torch.float64)
    v_lin.float(), o_lin.float()
    got = block(
        FlatQuantLinear(v_lin, t_in, 16, False, value_heads=t_o),
        FlatQuantLinear(o_lin, t_o, 16, False),
        torch.float32,
    )
    assert float((got - ref).norm() / ref.norm()) < 1e-3
    # o_proj's activations: L ⊗ I only, R having been applied by v_proj
    y = torch.randn(3, heads * head_dim, generator=g)
    dense = torch.kron(t_o.left.detach().double().contiguous(), torch.eye(head_dim, dtype=torch.float64))
    assert torch.allclose(t_o.activations(y).double(), y.double() @ dense, rtol=1e-3, atol=1e-4)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="init must be one of identity, random-orthogonal, hadamard"):
        KroneckerFactor(4, "hadamard-ish", "direct")
    with pytest.raises(ValueError, match="parametrization must be one of direct, svd-cayley"):
        KroneckerFactor(4, "identity", "lu")
