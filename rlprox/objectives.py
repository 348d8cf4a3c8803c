"""Shared loss pieces as pure tensor functions.

Every trainer builds its loss from these; none re-implements them. Each function
states the formula it computes, with the symbols of the paper it comes from, and is
tested against hand-computed values and slow reference loops (tests/test_objectives.py).
"""

from __future__ import annotations

import numpy as np
import torch


def gae(
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    terminated: np.ndarray,
    done: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16), all arrays (T, N).

        δ_t = r_t + γ · V(s_{t+1}) · (1 − terminated_t) − V(s_t)
        A_t = δ_t + γλ · (1 − done_t) · A_{t+1}

    ``next_values[t]`` is V of the observation that followed step t, *before* any
    autoreset: for a truncated episode it is the value of the final observation, so
    truncation bootstraps and termination does not. ``done = terminated | truncated``
    cuts the λ-recursion at every episode boundary. Returns ``(advantages, returns)``
    with ``returns = advantages + values`` (the λ-return, the value target).

    Vectorised over envs (N); the loop over time is unavoidable. Works on numpy
    arrays (the rollout lives in numpy).
    """
    steps = rewards.shape[0]
    advantages = np.zeros_like(rewards)
    delta = rewards + gamma * next_values * (1.0 - terminated) - values
    carry = gamma * lam * (1.0 - done)
    last = np.zeros_like(rewards[0])
    for t in range(steps - 1, -1, -1):
        last = delta[t] + carry[t] * last
        advantages[t] = last
    return advantages, advantages + values


def normalize(x: torch.Tensor, eps: float = 1e-8, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
    """(x − mean) / (std + eps); statistics of x itself unless given (e.g. global ones
    all-reduced across ranks so every rank normalises a minibatch identically)."""
    if mean is None and std is None:
        std, mean = torch.std_mean(x)
    elif mean is None or std is None:
        mean = x.mean() if mean is None else mean
        std = x.std() if std is None else std
    return (x - mean) / (std + eps)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), returned as a loss to minimise:

        r = exp(log π_θ(a|s) − log π_old(a|s))
        L = −E[min(r·A, clip(r, 1−ε, 1+ε)·A)]

    Returns ``(loss, ratio)``.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    return -torch.min(unclipped, clipped).mean(), ratio


def value_loss(
    values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor | None = None, clip: float | None = None
):
    """½·E[(V − R)²]; with ``clip`` the PPO2 clipped variant
    ½·E[max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)]."""
    err = (values - returns) ** 2
    if clip is not None and old_values is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err = torch.max(err, (clipped - returns) ** 2)
    return 0.5 * err.mean()


def kl_k3(sample_logp: torch.Tensor, other_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(p ‖ q) from samples drawn from p: with
    r = q(a)/p(a), k3 = (r − 1) − log r (unbiased, always ≥ 0); mean over samples.

    ``sample_logp`` = log p(a) of the distribution the samples came from, ``other_logp`` =
    log q(a). PPO's approx-KL(π_old ‖ π_θ) is ``kl_k3(old_logp, logp)``; a KL penalty
    toward a reference on on-policy samples, KL(π_θ ‖ π_ref), is ``kl_k3(logp, ref_logp)``.
    """
    log_r = other_logp - sample_logp
    return (torch.expm1(log_r) - log_r).mean()


def gaussian_step_kl(mean: torch.Tensor, other_mean: torch.Tensor, std) -> torch.Tensor:
    """Per sample (B,): mean_i (μ_b,i − μ'_b,i)² / (2·std_b²), the exact KL of two Gaussian steps
    with the same std per latent element (see ``gaussian_mean_kl``, its batch mean)."""
    sq = (mean.float() - other_mean.float()) ** 2
    std = torch.as_tensor(std, dtype=torch.float32, device=sq.device)
    per_element = sq / (2 * std.expand_as(sq) ** 2) if std.ndim else sq / (2 * std**2)
    return per_element.mean(dim=tuple(range(1, sq.ndim)))


def kl_masked_surrogate(logp, old_logp, advantages, step_kl, threshold: float):
    """Flow-DPPO's divergence-masked policy loss (Ping et al. 2026, arXiv 2606.11025): the unclipped
    surrogate −mean(mask·ρ·A), ρ = exp(log π_θ − log π_old), where a sample is masked (no gradient)
    only when its step's exact KL to the old step exceeds ``threshold`` while the update moves
    it further away (ρ > 1 with A > 0, or ρ < 1 with A < 0). Returns (loss, ratio, masked)."""
    ratio = torch.exp(logp - old_logp)
    away = ((advantages > 0) & (ratio > 1)) | ((advantages < 0) & (ratio < 1))
    masked = away & (step_kl > threshold)
    return -(torch.where(masked, torch.zeros_like(ratio), ratio * advantages)).mean(), ratio, masked


def gaussian_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std) -> torch.Tensor:
    """mean_b [ mean_i (μ_b,i − μ_ref,b,i)² / (2·std_b²) ]: ``mean``, ``ref_mean`` (B, ...);
    ``std`` a float or a tensor broadcastable to them ((B, 1, ...)).

    With ``std`` the step's own std this is KL(N(μ, std²I) ‖ N(μ_ref, std²I)) per latent
    element, exact for two Gaussians (not a sample estimate): ``kl_ref``'s default scale.
    Flow-GRPO's training script computes the same expression with its ``std_dev_t``, which on
    the SDE step lacks the step's √(−dt) (``flow_match.flow_grpo_std``): its value is the
    exact KL × (−dt), about 1/T of it with T uniform steps. A β from its configs means the
    same here only with ``kl_ref``'s ``scale: flow_grpo``."""
    return gaussian_step_kl(mean, ref_mean, std).mean()


def nft_optimality(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability of each sample from its advantage:
    r = clip(A, ±adv_clip)/adv_clip/2 + 1/2, in [0, 1] (r = ½ for A = 0)."""
    return (advantages.clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    mix: float,
    adaptive: bool = True,
    scale: float = 1.0,
) -> torch.Tensor:
    """DiffusionNFT's likelihood-free policy loss (Zheng et al. 2025, arXiv 2509.16117) on noised
    samples x_t = (1 − t)·x0 + t·ε of clean samples x0 (B, ...), t (B,), with the current
    velocity v (grad) and the old policy's v_old (no grad):

        v⁺ = β·v + (1 − β)·v_old        v⁻ = (1 + β)·v_old − β·v      (β = ``mix``)
        x̂0± = x_t − t·v±               ℓ± = mean_i (x̂0± − x0)_i² / w±
        L = scale · mean_b [ r·ℓ⁺ + (1 − r)·ℓ⁻ ] / β

    with r the optimality probability (``nft_optimality``) and, when ``adaptive``, the
    per-sample weight w± = max(mean_i |x̂0± − x0|_i, 1e-5) without gradient (else w = 1). The
    official code multiplies by ``adv_clip`` (``scale``). Positive samples pull v towards the
    data along v⁺, negative ones push v⁻ there, i.e. v away from it."""
    dims = tuple(range(1, x0.ndim))
    t = t.view(-1, *([1] * (x0.ndim - 1))).float()
    x0, x_t, v_old = x0.float(), x_t.float(), v_old.float().detach()
    losses = []
    for prediction in (mix * v + (1 - mix) * v_old, (1 + mix) * v_old - mix * v):
        error = x_t - t * prediction - x0
        if adaptive:
            with torch.no_grad():
                weight = error.double().abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
            losses.append((error**2 / weight).mean(dim=dims))
        else:
            losses.append((error**2).mean(dim=dims))
    positive, negative = losses
    return scale * (r * positive / mix + (1 - r) * negative / mix).mean()


def clip_fraction(ratio: torch.Tensor, clip: float) -> torch.Tensor:
    """Fraction of samples whose ratio lies outside [1−ε, 1+ε]."""
    return ((ratio - 1.0).abs() > clip).float().mean()


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantage over groups of K samples (RLOO / LOOP), rewards (P, K):

        A_{p,k} = r_{p,k} − 1/(K−1) · Σ_{j≠k} r_{p,j}  =  K/(K−1) · (r_{p,k} − r̄_p)

    Non-finite rewards (NaN, ±inf: a failed scorer) are left out of the other samples'
    baselines and get A = 0; with c finite rewards in a group the identity holds with K
    replaced by c, and a group with fewer than 2 finite rewards gets A = 0 everywhere.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"leave_one_out needs K >= 2 samples per group (got {k})")
    finite = torch.isfinite(rewards)
    r = torch.where(finite, rewards, torch.zeros_like(rewards))
    count = finite.sum(-1, keepdim=True).to(r.dtype)
    others = (r.sum(-1, keepdim=True) - r) / (count - 1).clamp_min(1)
    adv = r - others
    return torch.where(finite & (count >= 2), adv, torch.zeros_like(adv))


def zero_spread(rewards: torch.Tensor) -> torch.Tensor:
    """(N,) True for the groups of ``rewards`` (N, G) whose finite rewards are all equal (or fewer than
    two): groups that carry no relative signal, so a group-based advantage is 0 there."""
    finite = torch.isfinite(rewards)
    high = torch.where(finite, rewards, torch.full_like(rewards, -torch.inf)).max(1).values
    low = torch.where(finite, rewards, torch.full_like(rewards, torch.inf)).min(1).values
    return ~(high > low)


def group_normalize(
    rewards: torch.Tensor, eps: float = 1e-8, clip: float | None = None, std: torch.Tensor | None = None
) -> torch.Tensor:
    """Group-normalised advantage (GRPO / VA-π), rewards (N, G):

        A_{n,g} = (r_{n,g} − mean_n) / (std_n + eps),   then clipped to ±clip

    with the unbiased std of each group, or a given ``std`` for every group (Flow-GRPO's
    global_std: the whole batch's). A group with zero spread (or fewer than 2 finite
    rewards) gets A = 0; non-finite rewards are left out of the statistics and get A = 0.
    """
    finite = torch.isfinite(rewards)
    r = torch.where(finite, rewards, torch.zeros_like(rewards))
    count = finite.sum(-1, keepdim=True).to(r.dtype)
    mean = r.sum(-1, keepdim=True) / count.clamp_min(1)
    centred = torch.where(finite, r - mean, torch.zeros_like(r))
    own = (centred.pow(2).sum(-1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
    spread = (count >= 2) & (own > torch.finfo(r.dtype).eps * mean.abs().clamp_min(1.0))
    divisor = own if std is None else torch.as_tensor(std, dtype=r.dtype, device=r.device)
    adv = torch.where(finite & spread, centred / (divisor + eps), torch.zeros_like(r))
    return adv.clamp(-clip, clip) if clip is not None else adv


LOG_2PI = float(np.log(2.0 * np.pi))


def flow_log_ratio(
    delta: torch.Tensor, dv: torch.Tensor, log_std: torch.Tensor, log_std_old: torch.Tensor
) -> torch.Tensor:
    """PolicyFlow's velocity-difference log importance ratio (sum over action dims):

        log ρ = Σ_i log N(δ_i; δv_i, σ_i²) − Σ_i log N(δ_i; 0, σ̂_i²)

    with δ = a − φ̂₁ the Gaussian part of the stored action (before env clipping),
    δv = v_θ(x_t, t, s) − v̂(x_t, t, s) the change of the velocity field at the sampled
    point of the straight path (≈ the change of the flow's output), σ = exp(log_std)
    the current and σ̂ = exp(log_std_old) the rollout's per-dimension std. Shapes:
    delta, dv (B, A); log_std, log_std_old (A,) or (B, A). Returns (B,).
    """
    new = -0.5 * ((delta - dv) * torch.exp(-log_std)) ** 2 - log_std
    old = -0.5 * (delta * torch.exp(-log_std_old)) ** 2 - log_std_old
    return (new - old).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """H(N(0, diag σ²)) = Σ_i (log σ_i + ½·log 2πe)."""
    return (log_std + 0.5 * (1.0 + LOG_2PI)).sum(-1)
