"""Tier-1 tests for rlprox.prox.operators: hand values, definitions, optimality,
and pyproximal as an independent reference."""

import math

import numpy as np
import pytest
import torch

from rlprox.prox import (
    clip_outliers,
    project_abs_topk,
    project_topk,
    prox_elastic_net,
    prox_group_l2,
    prox_l0,
    prox_l1,
    prox_nuclear,
    prox_sef,
    prox_wgsef,
    sef,
    wgsef,
)

torch.set_num_threads(1)
DTYPES = [torch.float32, torch.float64]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _assert_prox_optimal(obj, p, n_pert=200, scales=(1e-2, 1e-4), tol=1e-10, seed=0):
    """obj(p) <= obj(p + δ) for many small random δ (objective must be convex)."""
    g = _gen(seed)
    f0 = float(obj(p))
    for s in scales:
        for _ in range(n_pert):
            q = p + s * torch.randn(p.shape, generator=g, dtype=p.dtype)
            assert float(obj(q)) >= f0 - tol * max(1.0, abs(f0)), (s, float(obj(q)) - f0)


# ------------------------------------------------------------------------ hand values


@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_l1_hand_values(dtype):
    v = torch.tensor([3.0, -0.5, 1.0, -2.0, 0.0], dtype=dtype)
    out = prox_l1(v, 1.0)
    assert out.dtype == dtype
    assert torch.equal(out, torch.tensor([2.0, 0.0, 0.0, -1.0, 0.0], dtype=dtype))
    # weighted L1: per-entry thresholds
    t = torch.tensor([0.5, 1.0, 0.0, 3.0, 1.0], dtype=dtype)
    assert torch.equal(prox_l1(v, t), torch.tensor([2.5, 0.0, 1.0, 0.0, 0.0], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_l0_hand_values(dtype):
    v = torch.tensor([1.5, -1.0, 0.9, -3.0], dtype=dtype)
    # t = 0.5 -> threshold sqrt(2t) = 1: keep |v| > 1 (strict)
    out = prox_l0(v, 0.5)
    assert torch.equal(out, torch.tensor([1.5, 0.0, 0.0, -3.0], dtype=dtype))
    assert torch.equal(prox_l0(v, torch.full_like(v, 0.5)), out)


def test_project_topk_hand_values():
    v = torch.tensor([[3.0, -5.0, 1.0, 2.0], [-1.0, -2.0, -3.0, 0.5]])
    assert torch.equal(project_topk(v, 2), torch.tensor([[3.0, 0, 0, 2.0], [0, 0, 0, 0.5]]))
    assert torch.equal(project_abs_topk(v, 2), torch.tensor([[3.0, -5.0, 0, 0], [0, -2.0, -3.0, 0]]))
    col = project_abs_topk(v, 1, dim=0)
    assert torch.equal(col, torch.tensor([[3.0, -5.0, 0, 2.0], [0, 0, -3.0, 0]]))
    assert torch.equal(project_abs_topk(v, 9), v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_group_l2_hand_values(dtype):
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=dtype)
    # weights=1: row norms 5, 0.5, 0 ; t = 1
    out = prox_group_l2(v, 1.0, weights=1.0)
    ref = torch.tensor([[3 * 0.8, 4 * 0.8], [0.0, 0.0], [0.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(out, ref)
    # default weight sqrt(2): threshold sqrt(2) on the norm
    out = prox_group_l2(v, 1.0)
    torch.testing.assert_close(out[0], v[0] * (1 - math.sqrt(2) / 5))
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_elastic_net_hand_values(dtype):
    v = torch.tensor([3.0, -0.5, -2.0], dtype=dtype)
    out = prox_elastic_net(v, 1.0, 1.0)  # soft(v, 1) / 2
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, -0.5], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_nuclear_hand_values(dtype):
    V = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=dtype))
    torch.testing.assert_close(prox_nuclear(V, 0.75), torch.diag(torch.tensor([2.25, 0.25, 0.0], dtype=dtype)))
    # batched over leading dims, rectangular
    B = torch.randn(4, 5, 3, generator=_gen(), dtype=dtype)
    out = prox_nuclear(B, 0.3)
    for i in range(4):
        torch.testing.assert_close(out[i], prox_nuclear(B[i], 0.3))
    s_in, s_out = torch.linalg.svdvals(B), torch.linalg.svdvals(out)
    torch.testing.assert_close(s_out, (s_in - 0.3).clamp_min(0), atol=1e-5, rtol=1e-5)


def test_clip_outliers_hand_values():
    g = torch.arange(1.0, 11.0) * torch.tensor([1.0, -1.0] * 5)  # |g| = 1..10
    out = clip_outliers(g, q=0.9)  # linear interpolation at rank 0.9·9 = 8.1: τ = 9.1 (ROOT's torch.quantile)
    assert out.abs().max() == pytest.approx(9.1)
    assert out[-1] == pytest.approx(-9.1) and out[-2] == 9.0 and torch.equal(out[:9], g[:9])
    small = torch.tensor([0.5, -2.0, 3.0])  # τ = quantile([0.5, 2, 3], 0.9) = 2.8: the 3 is clipped
    assert clip_outliers(small, 0.9)[2] == pytest.approx(2.8)
    big = torch.randn(3_000_000, generator=_gen())
    tau = clip_outliers(big, 0.5).abs().max()
    assert abs(float(tau) - 0.6745) < 0.01  # median of |N(0,1)|
    tau_s = clip_outliers(big, 0.5, sample_size=2**16).abs().max()
    assert abs(float(tau_s) - 0.6745) < 0.02


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9, 0.97, 1.0])
def test_clip_outliers_equals_torch_quantile_and_selection_path_agrees(q, monkeypatch):
    from rlprox.prox import operators

    g = torch.randn(1001, generator=_gen())
    tau = torch.quantile(g.abs(), q)
    torch.testing.assert_close(clip_outliers(g, q), g.clamp(-tau, tau), rtol=0, atol=0)
    monkeypatch.setattr(operators, "QUANTILE_MAX_NUMEL", 100)  # force the selection path
    torch.testing.assert_close(operators.clip_outliers(g, q), g.clamp(-tau, tau), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------- SEF


@pytest.mark.parametrize("dtype", DTYPES)
def test_sef_definitions(dtype):
    g = _gen(1)
    x = torch.randn(7, generator=g, dtype=dtype)
    half_sq = 0.5 * (x * x).sum()
    # k = 1: ½‖x‖₁² ; k ≥ d: ½‖x‖²
    torch.testing.assert_close(sef(x, 1), 0.5 * x.abs().sum() ** 2)
    torch.testing.assert_close(sef(x, 7), half_sq)
    torch.testing.assert_close(sef(x, 20), half_sq)
    # dense x: strictly above ½‖x‖² for every k < d
    for k in range(1, 7):
        assert sef(x, k) > half_sq * (1 + 1e-4)
    # k-sparse x: equality
    xs = x.clone()
    xs[3:] = 0
    for k in range(3, 8):
        torch.testing.assert_close(sef(xs, k), 0.5 * (xs * xs).sum())
    assert sef(xs, 2) > 0.5 * (xs * xs).sum() * (1 + 1e-4)
    # hand value: z = (3, 1, 1), k = 2 -> r = 0 (3 > T_0 = 2 ≥ 1), SEF = ½[9 + 2²] = 6.5
    torch.testing.assert_close(sef(torch.tensor([1.0, -3.0, 1.0], dtype=dtype), 2), torch.tensor(6.5, dtype=dtype))
    # z = (3, 2, 1), k = 2 -> r = 1 (T_1 = 6, 6/2 = 3 ≥ z_1), SEF = ½·6²/2 = 9
    torch.testing.assert_close(sef(torch.tensor([1.0, -3.0, 2.0], dtype=dtype), 2), torch.tensor(9.0, dtype=dtype))


def test_sef_batched_matches_rows():
    x = torch.randn(5, 9, generator=_gen(2), dtype=torch.float64)
    vals = sef(x, 3)
    assert vals.shape == (5,)
    for i in range(5):
        torch.testing.assert_close(vals[i], sef(x[i], 3))


def _sef_by_box_norm(x, k):
    """Slow reference: (‖x‖^sp_k)² = min_{0≤θ≤1, Σθ≤k} Σ x_i²/θ_i, by scipy."""
    from scipy.optimize import minimize

    z = np.abs(x.numpy())
    z = z[z > 0]
    d = len(z)
    if d <= k:
        return 0.5 * float((z * z).sum())
    res = minimize(
        lambda th: float((z * z / th).sum()),
        np.full(d, k / d),
        jac=lambda th: -(z * z) / th**2,
        bounds=[(1e-9, 1.0)] * d,
        constraints=[{"type": "ineq", "fun": lambda th: k - th.sum(), "jac": lambda th: -np.ones(d)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return 0.5 * res.fun


def test_sef_value_matches_variational_form():
    g = _gen(3)
    for d, k in [(5, 2), (8, 3), (6, 5)]:
        x = torch.randn(d, generator=g, dtype=torch.float64)
        assert abs(float(sef(x, k)) - _sef_by_box_norm(x, k)) < 1e-6 * float(sef(x, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_sef_large_k_is_ridge(dtype):
    v = torch.randn(6, generator=_gen(4), dtype=dtype)
    for k in (6, 10):
        torch.testing.assert_close(prox_sef(v, k, 0.7), v / 1.7)
    # k-sparse input with k < d is also just shrunk
    vs = v.clone()
    vs[2:] = 0
    torch.testing.assert_close(prox_sef(vs, 2, 0.7), vs / 1.7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_sef_hand_value(dtype):
    # v = (4, 1, 0.5), k = 1, t = 1: α solves Σ clip(α a_i − 1, 0, 1) = 1.
    # a_1 saturates at α = 0.5 (θ = 1 when α·4 ≥ 2); for α ∈ [0.5, 1]: only entry 1 → g = 1
    # at α = 0.5 exactly, so θ = (1, 0, 0), x = (4/2, 0, 0).
    v = torch.tensor([4.0, 1.0, 0.5], dtype=dtype)
    torch.testing.assert_close(prox_sef(v, 1, 1.0), torch.tensor([2.0, 0.0, 0.0], dtype=dtype))
    # exactly k-sparse iff a_[k]/a_[k+1] ≥ 1 + 1/t ; here (1.2, 1, ...) is not, t = 1
    v = torch.tensor([1.2, 1.0, 0.1], dtype=dtype)
    assert (prox_sef(v, 1, 1.0) != 0).sum() == 2


def test_prox_sef_optimality_random():
    g = _gen(5)
    for trial in range(20):
        d = int(torch.randint(3, 12, (1,), generator=g))
        k = int(torch.randint(1, d, (1,), generator=g))
        t = float(10 ** (torch.rand(1, generator=g) * 3 - 2))
        v = torch.randn(d, generator=g, dtype=torch.float64) * 2
        p = prox_sef(v, k, t)
        _assert_prox_optimal(lambda x: t * sef(x, k) + 0.5 * ((x - v) ** 2).sum(), p, n_pert=60, seed=trial)


def test_prox_sef_batched_and_float32():
    v = torch.randn(4, 50, generator=_gen(6), dtype=torch.float64)
    p64 = prox_sef(v, 5, 0.3)
    for i in range(4):
        torch.testing.assert_close(p64[i], prox_sef(v[i], 5, 0.3))
    p32 = prox_sef(v.float(), 5, 0.3)
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), p64, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- WGSEF


@pytest.mark.parametrize("dtype", DTYPES)
def test_wgsef_unit_groups_equals_sef(dtype):
    v = torch.randn(12, generator=_gen(7), dtype=dtype)
    for k in (1, 3, 12):
        torch.testing.assert_close(wgsef(v.view(-1, 1), k), sef(v, k))
        torch.testing.assert_close(prox_wgsef(v.view(-1, 1), k, 0.4).view(-1), prox_sef(v, k, 0.4))


def test_wgsef_is_sef_of_weighted_norms():
    x = torch.randn(6, 4, generator=_gen(8), dtype=torch.float64)
    d = torch.rand(6, generator=_gen(9), dtype=torch.float64) + 0.5
    u = torch.linalg.vector_norm(x, dim=1) * d.sqrt()
    torch.testing.assert_close(wgsef(x, 2, d), sef(u, 2))


def test_prox_wgsef_optimality_random():
    g = _gen(10)
    for trial in range(12):
        m = int(torch.randint(3, 9, (1,), generator=g))
        n = int(torch.randint(1, 4, (1,), generator=g))
        k = int(torch.randint(1, m, (1,), generator=g))
        t = float(10 ** (torch.rand(1, generator=g) * 2 - 1.5))
        d = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
        v = torch.randn(m, n, generator=g, dtype=torch.float64)
        p = prox_wgsef(v, k, t, d=d)
        _assert_prox_optimal(lambda x: t * wgsef(x, k, d) + 0.5 * ((x - v) ** 2).sum(), p, n_pert=60, seed=trial)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prox_wgsef_many_groups(dtype):
    """m = 1000 groups (vectorised solve): KKT of the box-norm form holds."""
    m, n, k, t = 1000, 8, 50, 0.05
    v = torch.randn(m, n, generator=_gen(11), dtype=dtype)
    v = v * torch.linspace(0.1, 3.0, m, dtype=dtype).unsqueeze(1)
    p = prox_wgsef(v, k, t)
    assert p.dtype == dtype and p.shape == v.shape
    a = torch.linalg.vector_norm(v.double(), dim=1)
    scale = torch.linalg.vector_norm(p.double(), dim=1) / a
    theta = t * scale / (1 - scale)  # invert x = v·θ/(θ + t)
    assert abs(float(theta.sum()) - k) < 1e-3 * k  # Σθ = k (the constraint is active)
    inner = (theta > 1e-6) & (theta < 1 - 1e-6)
    alpha = (theta[inner] + t) / a[inner]  # θ = α·a − t on the linear groups: one α
    assert inner.sum() > 0 and float(alpha.max() - alpha.min()) < 1e-3 * float(alpha.mean())
    # objective no worse than at small perturbations (a few, m is large)
    obj = lambda x: t * wgsef(x.double(), k) + 0.5 * ((x.double() - v.double()) ** 2).sum()
    _assert_prox_optimal(obj, p.double(), n_pert=10, scales=(1e-3,), tol=1e-7)


def test_prox_wgsef_exact_k():
    v = torch.randn(20, 3, generator=_gen(12), dtype=torch.float64)
    p = prox_wgsef(v, 4, 0.05)
    assert (torch.linalg.vector_norm(p, dim=1) > 0).sum() > 4  # small t: not exactly k-sparse
    pk = prox_wgsef(v, 4, 0.05, exact_k=True)
    keep = torch.linalg.vector_norm(pk, dim=1) > 0
    assert keep.sum() == 4
    top = torch.topk(torch.linalg.vector_norm(v, dim=1), 4).indices
    assert keep[top].all()
    torch.testing.assert_close(pk[keep], p[keep])


def test_prox_wgsef_large_t_is_exactly_k_sparse():
    v = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.5, 0.0]], dtype=torch.float64)
    # a = (5, 1, 0.5): a_[1]/a_[2] = 5 ≥ 1 + 1/t for t = 1 -> exactly 1 group, ridge on it
    p = prox_wgsef(v, 1, 1.0)
    torch.testing.assert_close(p, torch.tensor([[2.5, 0], [0, 0], [0, 0]], dtype=torch.float64))


# -------------------------------------------------------------------- other optimality


def test_prox_group_l2_elastic_net_nuclear_optimality():
    g = _gen(13)
    v = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = 0.6
    p = prox_group_l2(v, t)
    gl2 = lambda x: 2.0 * torch.linalg.vector_norm(x, dim=1).sum()  # weight √4
    _assert_prox_optimal(lambda x: t * gl2(x) + 0.5 * ((x - v) ** 2).sum(), p)
    t1, t2 = 0.4, 0.3
    p = prox_elastic_net(v, t1, t2)
    _assert_prox_optimal(lambda x: t1 * x.abs().sum() + 0.5 * t2 * (x * x).sum() + 0.5 * ((x - v) ** 2).sum(), p)
    p = prox_nuclear(v, t)
    _assert_prox_optimal(lambda x: t * torch.linalg.svdvals(x).sum() + 0.5 * ((x - v) ** 2).sum(), p, n_pert=60)


# ------------------------------------------------------------------ pyproximal reference


@pytest.mark.parametrize("dtype", DTYPES)
def test_against_pyproximal(dtype):
    pyprox = pytest.importorskip("pyproximal")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    g = _gen(14)
    v = torch.randn(6, 5, generator=g, dtype=dtype)
    vn = v.double().numpy()
    t = 0.7
    # L1: pyproximal L1(sigma).prox(x, tau) = soft(x, tau·sigma)
    ref = pyprox.L1(sigma=t).prox(vn.ravel(), 1.0).reshape(6, 5)
    torch.testing.assert_close(prox_l1(v, t).double(), torch.from_numpy(ref), **tol)
    # group L2: pyproximal L21(ndim) reshapes to (ndim, N/ndim) and groups the *columns*;
    # our groups are rows, so feed the transpose (row-major ravel of vᵀ).
    w = math.sqrt(5)
    ref = pyprox.L21(ndim=5, sigma=t * w).prox(vn.T.ravel(), 1.0).reshape(5, 6).T
    torch.testing.assert_close(prox_group_l2(v, t).double(), torch.from_numpy(ref), **tol)
    # L0: pyproximal hard-thresholds at tau·sigma; ours at √(2t)
    ref = pyprox.L0(sigma=math.sqrt(2 * t)).prox(vn.ravel(), 1.0).reshape(6, 5)
    torch.testing.assert_close(prox_l0(v, t).double(), torch.from_numpy(ref), **tol)
    # L0 ball: projection onto {‖x‖₀ ≤ r}
    ref = pyprox.L0Ball(radius=7).prox(vn.ravel(), 1.0)
    torch.testing.assert_close(project_abs_topk(v.reshape(-1), 7).double(), torch.from_numpy(ref), **tol)
    # nuclear norm
    ref = pyprox.Nuclear(dim=(6, 5), sigma=t).prox(vn.ravel(), 1.0).reshape(6, 5)
    torch.testing.assert_close(
        prox_nuclear(v, t).double(),
        torch.from_numpy(ref),
        **(tol if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)),
    )


def test_operators_do_not_modify_input_and_keep_device():
    v = torch.randn(8, 4, generator=_gen(15))
    v0 = v.clone()
    for out in (
        prox_l1(v, 0.1),
        prox_l0(v, 0.1),
        prox_group_l2(v, 0.1),
        prox_elastic_net(v, 0.1, 0.1),
        prox_nuclear(v, 0.1),
        prox_sef(v, 3, 0.1),
        prox_wgsef(v, 3, 0.1),
        clip_outliers(v),
        project_topk(v, 2),
        project_abs_topk(v, 2),
    ):
        assert out.shape == v.shape and out.device == v.device and out.dtype == v.dtype
    assert torch.equal(v, v0)


def test_wgsef_selection_path_matches_sort_path():
    """Long vectors (m > 4096) bracket the root by sampling instead of a full sort; both
    paths must give the same θ, including heavy ties and many empty groups."""
    from rlprox.prox.operators import _box_theta

    g = _gen(16)
    for trial in range(6):
        m = 6000 + 777 * trial
        a = torch.rand(m, generator=g, dtype=torch.float64) ** 3
        if trial % 3 == 0:
            a = torch.round(a * 20) / 20  # many equal norms -> tied breakpoints
        if trial % 2 == 0:
            a[: m // 3] = 0
        b = torch.tensor(10 ** (-3 + 3 * float(torch.rand(1, generator=g))), dtype=torch.float64)
        if trial % 2:
            b = b * (torch.rand(m, generator=g, dtype=torch.float64) + 0.5)
        k = int(torch.randint(1, m // 3, (1,), generator=g))
        fast = _box_theta(a, b, k)
        ref = _box_theta(a.unsqueeze(0), b.unsqueeze(0) if b.dim() else b, k)[0]
        torch.testing.assert_close(fast, ref, atol=1e-9, rtol=0)
        assert abs(float(fast.sum()) - k) < 1e-6


def test_wgsef_rejects_nonpositive_weights():
    with pytest.raises(ValueError, match="d must be > 0"):
        prox_wgsef(torch.ones(3, 2), 1, 0.1, d=torch.tensor([1.0, 0.0, 1.0]))
