"""Tier-1 tests for regularizers, ProxOptimizer (ISTA / FISTA vs scikit-learn's Lasso,
LR schedulers, state dicts) and coefficient schedules."""

import math

import numpy as np
import pytest
import torch

from rlprox.prox import (
    REGULARIZERS,
    ProxOptimizer,
    build_regularizer,
    build_schedule,
    constant,
    cosine,
    linear,
    piecewise_sine,
    prox_l1,
    prox_wgsef,
    wgsef,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------- regularizers


def test_registry_has_all_types():
    assert {"l1", "group_l2", "l0", "topk", "elastic_net", "nuclear", "wgsef"} <= set(REGULARIZERS)


def test_build_regularizer_and_prox_step_is_lr_times_lam():
    reg = build_regularizer({"type": "l1", "lam": 0.5})
    p = torch.nn.Parameter(torch.tensor([2.0, -0.2, 0.7]))
    out = reg.prox(p, 0.4)  # threshold η·λ = 0.2
    assert out is p
    torch.testing.assert_close(p.data, torch.tensor([1.8, 0.0, 0.5]))
    torch.testing.assert_close(reg.penalty(p), torch.tensor(0.5 * 2.3))
    assert reg.sparsity(p) == pytest.approx(1 / 3)
    reg.lam = 0.0  # settable (schedules update it)
    reg.prox(p, 1.0)
    torch.testing.assert_close(p.data, torch.tensor([1.8, 0.0, 0.5]))


def test_group_regularizers_use_row_view():
    W = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    W = W / W.view(6, -1).norm(dim=1).view(6, 1, 1, 1)
    W = torch.nn.Parameter(W * torch.tensor([5.0, 1.0, 4.0, 1.0, 1.5, 1.0]).view(6, 1, 1, 1))
    reg = build_regularizer({"type": "wgsef", "k": 2, "lam": 50.0, "params": "policy.*weight"})
    W0 = W.detach().clone()
    reg.prox(W, 0.1)
    torch.testing.assert_close(W.data.view(6, -1), prox_wgsef(W0.view(6, -1), 2, 5.0))
    torch.testing.assert_close(reg.penalty(W0), 50.0 * wgsef(W0.view(6, -1), 2))
    assert reg.sparsity(W) == pytest.approx(4 / 6)  # λ large: exactly k = 2 rows survive
    ek = build_regularizer({"type": "wgsef", "k": 3, "lam": 1e-3, "exact_k": True})
    ek.prox(W0, 1.0)
    assert (W0.view(6, -1).abs().sum(1) > 0).sum() == 3
    # penalty is differentiable
    W.grad = None
    reg.penalty(W).backward()
    assert torch.isfinite(W.grad).all()


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "group_l2", "lam": 0.1},
        {"type": "l0", "lam": 0.1},
        {"type": "topk", "k": 5},
        {"type": "elastic_net", "lam": 0.1, "l1_ratio": 0.3},
        {"type": "nuclear", "lam": 0.5},
        {"type": "rlprox.prox.regularizers:L1", "lam": 0.1},
    ],
)
def test_all_types_run(spec):
    reg = build_regularizer(spec)
    p = torch.nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(reg.penalty(p))
    reg.prox(p, 1.0)
    assert 0.0 <= reg.sparsity(p) <= 1.0
    if spec["type"] == "topk":
        assert (p.data != 0).sum() == 5


@pytest.mark.parametrize(
    "spec,field",
    [
        ({"type": "wgsf", "k": 2}, "'type'"),
        ({"type": "wgsef", "kk": 2}, "'kk'"),
        ({"type": "l1", "lam": -1.0}, "'lam'"),
        ({"type": "wgsef", "k": 0}, "'k'"),
        ({"lam": 1.0}, "'type'"),
        ({"type": "no_such_module_xyz:Cls"}, "'type'"),
    ],
)
def test_build_regularizer_errors_name_the_field(spec, field):
    with pytest.raises(ValueError) as e:
        build_regularizer(spec)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


# ---------------------------------------------------------------------- ProxOptimizer


def _lasso_problem(n=200, p=500, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    w0 = np.zeros(p)
    w0[:10] = 3 * rng.standard_normal(10)
    y = X @ w0 + 0.1 * rng.standard_normal(n)
    alpha = 0.1 * np.abs(X.T @ y).max() / n
    return X, y, alpha


@pytest.mark.parametrize("fista", [False, True])
def test_ista_fista_match_sklearn_lasso(fista):
    Lasso = pytest.importorskip("sklearn.linear_model").Lasso
    X, y, alpha = _lasso_problem()
    n, p = X.shape
    obj = lambda w: 0.5 / n * np.sum((y - X @ w) ** 2) + alpha * np.abs(w).sum()
    f_ref = obj(Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(X, y).coef_)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    L = np.linalg.norm(X, 2) ** 2 / n
    w = torch.nn.Parameter(torch.zeros(p, dtype=torch.float64))
    opt = ProxOptimizer(
        torch.optim.SGD([w], lr=1 / L), [([w], build_regularizer({"type": "l1", "lam": alpha}))], fista=fista
    )
    f = math.inf
    for it in range(20_000):
        opt.zero_grad()
        (0.5 / n * ((Xt @ w - yt) ** 2).sum()).backward()
        opt.step()
        if it % 25 == 0:
            f = obj(opt.state[w].get("fista_x", w).detach().numpy())
            if f <= f_ref * (1 + 1e-9):
                break
    if fista:
        opt.use_iterates()
        assert f == obj(w.detach().numpy())
    assert abs(f - f_ref) <= 1e-8 * f_ref, (f - f_ref) / f_ref


def test_prox_optimizer_with_lambdalr_and_state_dict():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.05]))
    reg = build_regularizer({"type": "l1", "lam": 1.0})
    opt = ProxOptimizer(torch.optim.SGD([w], lr=0.1), [([w], reg)])
    assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    expected = w.detach().clone()
    for i in range(3):
        lr = 0.1 * 0.5**i
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
        expected = prox_l1(expected - lr, lr * reg.lam)  # prox step follows the scheduled lr
        torch.testing.assert_close(w.data, expected)
    # state dicts delegate to the base
    adam_w = torch.nn.Parameter(torch.ones(3))
    opt = ProxOptimizer(torch.optim.Adam([adam_w], lr=0.01), [([adam_w], reg)])
    adam_w.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    assert sd == opt.base.state_dict() and "exp_avg" in sd["state"][0]
    opt2 = ProxOptimizer(torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.5))
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.01
    torch.testing.assert_close(opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"], opt.state[adam_w]["exp_avg"])


def test_prox_optimizer_unregistered_param_and_fista_base_checks():
    w = torch.nn.Parameter(torch.ones(2))
    other = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError):
        ProxOptimizer(torch.optim.SGD([w], lr=0.1), [([other], build_regularizer({"type": "l1"}))])
    with pytest.raises(ValueError):
        ProxOptimizer(torch.optim.SGD([w], lr=0.1, momentum=0.9), fista=True)
    with pytest.raises(ValueError):
        ProxOptimizer(torch.optim.Adam([w], lr=0.1), fista=True)


def test_prox_runs_after_step_with_closure_and_hooks():
    w = torch.nn.Parameter(torch.tensor([0.3, 2.0]))
    opt = ProxOptimizer(torch.optim.SGD([w], lr=1.0), [(w, build_regularizer({"type": "l0", "lam": 0.5}))])
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))

    def closure():
        opt.zero_grad()
        loss = (w * 0).sum()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(w.data, torch.tensor([0.0, 2.0]))  # hard threshold at 1
    assert calls == [1]


# ------------------------------------------------------------------------- schedules


def test_schedules_hand_values():
    assert constant(0.3)(0) == constant(0.3)(10**6) == 0.3
    lin = linear(1.0, 0.0, 10)
    assert [lin(s) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    cos = cosine(1.0, 0.0, 10)
    assert [cos(s) for s in (0, 5, 10, 15)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert cos(2) == pytest.approx(0.5 * (1 + math.cos(0.2 * math.pi)))
    ps = piecewise_sine(peaks=[1.0, 3.0], ends=[10, 30])
    assert ps(0) == 0.0
    assert ps(5) == pytest.approx(0.5)  # mid-stage: η = ½
    assert ps(10) == pytest.approx(1.0)
    assert ps(20) == pytest.approx(2.0)
    assert ps(25) == pytest.approx(1.0 + 2.0 * 0.5 * (math.sin(-math.pi / 2 + math.pi * 0.75) + 1))
    assert ps(30) == ps(1000) == 3.0
    assert piecewise_sine([2.0], [4], start=1.0)(2) == pytest.approx(1.5)


def test_build_schedule():
    assert build_schedule({"type": "linear", "start": 0.0, "end": 1.0, "steps": 4})(1) == 0.25
    assert build_schedule(0.7)(99) == 0.7
    assert build_schedule({"type": "piecewise_sine", "peaks": [1.0], "ends": [2]})(1) == pytest.approx(0.5)
    for spec, field in [
        ({"type": "lineer"}, "'type'"),
        ({"type": "linear", "start": 0, "end": 1}, "'steps'"),
        ({"type": "cosine", "start": 0, "end": 1, "step": 3}, "'step'"),
    ]:
        with pytest.raises(ValueError, match=field):
            build_schedule(spec)


def test_accelerate_accumulation_runs_prox_on_sync_steps_only():
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Linear(4, 3)
    reg = build_regularizer({"type": "l1", "lam": 1.0})
    opt = ProxOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), [([model.weight], reg)])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    model, opt, sched = acc.prepare(model, opt, sched)
    steps = []
    prox = reg.prox
    reg.prox = lambda p, step: (steps.append(step), prox(p, step))[1]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # 4 micro-batches = 2 real optimizer steps
        with acc.accumulate(model):
            acc.backward(model(torch.randn(2, 4, generator=g)).pow(2).sum())
            opt.step()
            sched.step()
            opt.zero_grad()
    assert len(steps) == 2 and steps[0] == pytest.approx(0.1)
    opt.load_state_dict(opt.state_dict())


# ------------------------------------------------------------------ decoupled prox step
def test_prox_after_adam_uses_its_own_step_not_the_adam_lr():
    w = torch.nn.Parameter(torch.tensor([1.0, 0.2, -0.7]))
    adam = torch.optim.Adam([w], lr=1e-3)
    opt = ProxOptimizer(adam, [([w], build_regularizer({"type": "l1", "lam": 1.0}), lambda: 0.5)])
    w.grad = torch.zeros(3)  # Adam moves nothing: only the prox acts
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([0.5, 0.0, -0.2]))  # soft threshold at 0.5·1, not 1e-3
    default = torch.nn.Parameter(torch.tensor([1.0, 0.2, -0.7]))
    opt2 = ProxOptimizer(
        torch.optim.Adam([default], lr=1e-3), [([default], build_regularizer({"type": "l1", "lam": 1.0}))]
    )
    default.grad = torch.zeros(3)
    opt2.step()
    torch.testing.assert_close(default.detach(), torch.tensor([0.999, 0.199, -0.699]))  # the group lr


def test_sgd_with_prox_is_exactly_proximal_gradient_descent():
    torch.manual_seed(0)
    A, b = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    eta, lam = 0.01, 0.3
    for own_step in (None, lambda: eta):  # the group lr, or the same value as prox_lr
        w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
        opt = ProxOptimizer(
            torch.optim.SGD([w], lr=eta), [([w], build_regularizer({"type": "l1", "lam": lam}), own_step)]
        )
        ref = torch.zeros(5, dtype=torch.float64)
        for _ in range(30):
            opt.zero_grad()
            (0.5 * ((A @ w - b) ** 2).sum()).backward()
            opt.step()
            g = A.T @ (A @ ref - b)
            v = ref - eta * g
            ref = torch.sign(v) * (v.abs() - eta * lam).clamp_min(0)  # x ← prox_{ηλ‖·‖₁}(x − η∇f)
        torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-12)  # float64: equal up to rounding


def test_prox_lr_schedule_in_a_recipe_is_logged_and_survives_resume(tmp_path, tiny_recipe):
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    def recipe(name, iterations, resume="never"):
        data = tiny_recipe(
            run={"name": name, "iterations": iterations, "save_every": 1, "resume": resume},
            optim={"name": "adam", "lr": 1e-3},
        )
        data["regularizers"] = [
            {
                "type": "wgsef",
                "params": "policy.actor.[02].weight",
                "k": 8,
                "lam": 1.0,
                "prox_lr": {"type": "linear", "start": 0.05, "end": 0.0, "steps": 6},
            }
        ]
        return load_recipe(data)

    full = Engine(recipe("full", 6))
    stats = full.fit()
    full.close()
    assert stats["penalty/0.wgsef.prox_lr"] == pytest.approx(0.05 * (1 - 5 / 6))
    Engine(recipe("cut", 3)).fit()
    resumed = Engine(recipe("cut", 6, resume="auto"))
    resumed.fit()
    resumed.close()
    for a, b in zip(full.algo.policy.parameters(), resumed.algo.policy.parameters()):
        assert torch.equal(a, b)
    zero_rows = full.algo.policy.actor[0].weight.abs().sum(1).eq(0).sum()
    assert zero_rows > 0  # a prox step of 0.05 (not Adam's 1e-3) prunes neurons
