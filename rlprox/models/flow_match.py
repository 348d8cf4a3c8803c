"""Flow-matching denoising steps as stochastic policies (the SDE, CPS and ODE samplers).

For pipelines whose scheduler is diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3,
FLUX) and whose transformer predicts the velocity v. The noise level σ runs from 1
(noise) to 0 (data) along the rectified-flow path

    x_σ = (1−σ)·x0 + σ·ε,    v = dx_σ/dσ = ε − x0,    dt = σ_next − σ < 0,

so a velocity v at x gives the predicted sample and noise

    x̂0 = x − σ·v,    ε̂ = x + (1−σ)·v,

and the Gaussian path's score is ∇log p_σ(x) = −ε̂/σ. The deterministic sampler is the
probability-flow ODE dx = v·dσ, whose Euler step is diffusers' own step (``ode_step``).

A stochastic step is a Gaussian policy π(x_next | x, c) = N(μ, std² I); ``log_prob`` is
its log-density at x_next *averaged* over latent elements, shape (B,), in float32 (the
DDIM step's convention in ``rlprox.models.diffusion``). Two samplers:

- ``sde_step_with_logprob``: Flow-GRPO's SDE (Liu et al. 2025), the Euler–Maruyama step
  of a reverse SDE with the ODE's marginals; std grows with σ.
- ``cps_step_with_logprob``: coefficients-preserving sampling (Wang & Yu 2025), which
  keeps x_next on the path x_σ_next = (1−σ_next)·x̂0 + σ_next·(noise) exactly.

Their log-probs live on different scales (different std), so importance ratios compare
only within one sampler. ``sample_flow_trajectories`` runs a whole trajectory from a
velocity callable, stochastic on a window of steps (``sde_window_mask``) and ODE elsewhere,
and records what a trainer needs to re-evaluate the log-probs. See docs/flow-matching.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlprox.models.diffusion import gaussian_logprob

SAMPLERS = ("sde", "cps", "ode")


def _as_sigma(sigma, like: torch.Tensor) -> torch.Tensor:
    """σ (float, 0-d or (B,) tensor) as float32 on ``like``'s device, broadcastable to (B, ...)."""
    sigma = torch.as_tensor(sigma, device=like.device, dtype=torch.float32)
    return sigma.view(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def _check_step(sigma: torch.Tensor, sigma_next: torch.Tensor) -> None:
    if not bool(((sigma_next >= 0) & (sigma_next < sigma) & (sigma <= 1)).all()):
        raise ValueError(
            "a flow-matching step needs 0 <= sigma_next < sigma <= 1 "
            f"(got sigma={sigma.flatten().tolist()}, sigma_next={sigma_next.flatten().tolist()})"
        )


def _sample_or_score(mean, std, x: torch.Tensor, prev_sample, generator):
    """Draw x_next = μ + std·z (or take ``prev_sample``) and its averaged log-density.

    The log-density is that of the returned x_next *in x's dtype*, so re-evaluating the
    stored sample reproduces the sampled log-prob exactly, in bf16 as in fp32.
    """
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = (mean + std * noise).to(x.dtype)
    return prev_sample.to(x.dtype), gaussian_logprob(prev_sample, mean, std)


def _sde_moments(v, x, sigma, sigma_next, noise_level: float, sigma_max: float | None):
    """(μ, std) of the Flow-GRPO SDE step, float32 (see ``sde_step_with_logprob``)."""
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for the SDE step (got {noise_level}); use ode_step for a = 0")
    if sigma_max is not None and not 0 < sigma_max < 1:
        raise ValueError(f"sigma_max must lie in (0, 1) (got {sigma_max})")
    x32, v32 = x.float(), v.float()
    sigma, sigma_next = _as_sigma(sigma, x32), _as_sigma(sigma_next, x32)
    _check_step(sigma, sigma_next)
    if sigma_max is None:
        noise_sigma = torch.where(sigma >= 1, sigma_next, sigma)
        if not bool((noise_sigma > 0).all()):
            raise ValueError(
                "an SDE step from sigma = 1 straight to sigma_next = 0 has no noise scale under the "
                "default sigma = 1 convention; pass sigma_max (e.g. 0.999) or use more steps"
            )
    else:
        noise_sigma = sigma.clamp(max=sigma_max)
    s2 = noise_level**2 * noise_sigma / (1 - noise_sigma)  # s², the SDE's diffusion coefficient squared
    dt = sigma_next - sigma
    eps_hat = x32 + (1 - sigma) * v32
    mean = x32 + (v32 + s2 / (2 * sigma) * eps_hat) * dt
    return mean, (s2 * -dt).sqrt()


def sde_step_with_logprob(
    v: torch.Tensor,
    x: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    sigma_max: float | None = None,
):
    """One step of Flow-GRPO's SDE sampler as a Gaussian policy: ``(x_next, log_prob)``.

    Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL",
    arXiv:2505.05470). The probability-flow ODE dx = v·dσ has the same marginals p_σ as the
    family of SDEs, written in dt = dσ < 0 (from noise to data),

        dx = [v − ½·s²·∇log p_σ(x)]·dt + s·dw̄,   ∇log p_σ(x) = −ε̂/σ,   ε̂ = x + (1−σ)·v,

    for any diffusion coefficient s(σ); Flow-GRPO takes s = a·√(σ/(1−σ)), a = ``noise_level``.
    Its Euler–Maruyama step from σ to σ_next is

        μ   = x + [v + s²/(2σ)·(x + (1−σ)·v)]·dt,   dt = σ_next − σ,
        std = s·√(−dt),
        π(x_next | x, c) = N(μ, std² I).

    **σ = 1 convention.** s diverges at σ = 1 (the first step of every schedule). With
    ``sigma_max=None`` (default) a step that starts at σ = 1 uses σ_next — the schedule's
    second σ — inside √(σ/(1−σ)), i.e. the first step has the noise scale of the second
    sigma; μ keeps the true σ = 1 in s²/(2σ) and (1−σ). This is close to Flow-GRPO's choice,
    which substitutes the second σ only in the denominator 1−σ (a factor σ_1 on s²). A
    float ``sigma_max`` in (0, 1) instead clamps σ to at most ``sigma_max`` inside the
    square root at every step (e.g. 1 − 1e-3; beware that s then grows as 1/√(1 − sigma_max)
    and a coarse first step becomes very noisy).

    ``v`` and ``x`` are (B, ...) in any dtype; ``sigma`` / ``sigma_next`` floats or (B,)
    tensors with 0 <= σ_next < σ <= 1. Samples x_next with ``generator`` unless
    ``prev_sample`` is given, in which case that sample's log-prob is returned (the update's
    re-evaluation). x_next comes back in x's dtype; log_prob is (B,), float32, the Gaussian
    log-density of that x_next averaged over latent elements. As a → 0, μ → x + v·dt, the
    ODE (diffusers) step.
    """
    mean, std = _sde_moments(v, x, sigma, sigma_next, noise_level, sigma_max)
    return _sample_or_score(mean, std, x, prev_sample, generator)


def _cps_moments(v, x, sigma, sigma_next, noise_level: float):
    """(μ, std) of the coefficients-preserving step, float32 (see ``cps_step_with_logprob``)."""
    if not 0 < noise_level <= 1:
        raise ValueError(f"noise_level must lie in (0, 1] for the CPS step (got {noise_level})")
    x32, v32 = x.float(), v.float()
    sigma, sigma_next = _as_sigma(sigma, x32), _as_sigma(sigma_next, x32)
    _check_step(sigma, sigma_next)
    if not bool((sigma_next > 0).all()):
        raise ValueError(
            "the CPS step to sigma_next = 0 has std = sigma_next*sin(a*pi/2) = 0, so its log-prob is undefined; "
            "make the final step an ODE step (ode_step, or an sde_window that ends before it)"
        )
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x32 - sigma * v32
    eps_hat = x32 + (1 - sigma) * v32
    mean = (1 - sigma_next) * x0_hat + (sigma_next**2 - std**2).clamp_min(0).sqrt() * eps_hat
    return mean, std


def cps_step_with_logprob(
    v: torch.Tensor,
    x: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """One coefficients-preserving sampling step as a Gaussian policy: ``(x_next, log_prob)``.

    CPS (Wang & Yu 2025, "Coefficients-Preserving Sampling for Reinforcement Learning with
    Flow Matching", arXiv:2509.05952): the DDIM-style step on the flow path. With
    x̂0 = x − σ·v, ε̂ = x + (1−σ)·v and a = ``noise_level`` in (0, 1],

        std = σ_next·sin(a·π/2),
        μ   = (1−σ_next)·x̂0 + √(σ_next² − std²)·ε̂,
        π(x_next | x, c) = N(μ, std² I),

    so x_next = (1−σ_next)·x̂0 + σ_next·(unit-variance noise) keeps the path's coefficients
    exactly (no excess noise, unlike the SDE step). a = 1 discards ε̂ and draws fresh noise.

    Its log-prob is on another scale than ``sde_step_with_logprob``'s (a different std at
    the same step), so log-probs and importance ratios are comparable only within one sampler.

    σ_next = 0 gives std = 0 and an undefined log-prob: this function raises ValueError
    there; the final step must be an ODE step. Shapes, dtypes, ``prev_sample`` and
    ``generator`` as in ``sde_step_with_logprob``.
    """
    mean, std = _cps_moments(v, x, sigma, sigma_next, noise_level)
    return _sample_or_score(mean, std, x, prev_sample, generator)


def step_moments(sampler: str, v: torch.Tensor, x: torch.Tensor, sigma, sigma_next, noise_level: float):
    """(μ, std) of one stochastic step of ``sampler`` ("sde" or "cps"), float32: μ (B, ...) and
    std broadcastable to it (a (B, 1, ...) tensor, or a float). The moments behind
    ``sde_step_with_logprob`` / ``cps_step_with_logprob``; a trainer needs μ itself for the KL
    to a reference policy (``rlprox.objectives.gaussian_mean_kl``)."""
    if sampler == "sde":
        return _sde_moments(v, x, sigma, sigma_next, noise_level, None)
    if sampler == "cps":
        return _cps_moments(v, x, sigma, sigma_next, noise_level)
    raise ValueError(f"sampler must be 'sde' or 'cps' for a stochastic step (got {sampler!r})")


def flow_grpo_std(sampler: str, sigma, sigma_next, noise_level: float, sigma_after_first: float, like: torch.Tensor):
    """Flow-GRPO's ``std_dev_t`` of a step, the divisor of its KL term (its training script's
    ``(μ − μ_ref)² / (2·std_dev_t²)``), broadcastable to ``like`` (B, ...):

    - SDE: a·√(σ / (1 − σ')), σ' = σ except at σ = 1, where Flow-GRPO uses the schedule's
      second σ (``sigma_after_first``). It lacks the step's √(−dt): the step's own std is
      std_dev_t·√(−dt), so the exact Gaussian KL is Flow-GRPO's divided by (−dt);
    - CPS: σ_next·sin(a·π/2), the step's own std (there both KLs agree).
    """
    sigma, sigma_next = _as_sigma(sigma, like.float()), _as_sigma(sigma_next, like.float())
    if sampler == "cps":
        return sigma_next * math.sin(noise_level * math.pi / 2)
    if sampler != "sde":
        raise ValueError(f"sampler must be 'sde' or 'cps' for a stochastic step (got {sampler!r})")
    denominator = 1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_after_first), sigma)
    return noise_level * (sigma / denominator).sqrt()


def ode_step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """The deterministic Euler step of the probability-flow ODE: x_next = x + v·(σ_next − σ).

    Computed in float32 and returned in v's dtype, as ``FlowMatchEulerDiscreteScheduler.step``
    does (bit-for-bit the same for the same σ's). For evaluation and for steps outside the
    SDE window; it has no log-prob.
    """
    x32 = x.float()
    dt = _as_sigma(sigma_next, x32) - _as_sigma(sigma, x32)
    return (x32 + dt * v).to(v.dtype)


def sde_window_mask(num_steps: int, window: Sequence[int] | None) -> torch.Tensor:
    """Which of ``num_steps`` steps are stochastic (and trained): a (T,) bool tensor.

    ``window`` = [start, end) in step indices (0 = the step from σ = 1); None means every
    step. Steps outside it are ODE steps and carry no log-prob.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if window is None:
        return mask.fill_(True)
    valid = (
        isinstance(window, Sequence)
        and len(window) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) for i in window)
        and 0 <= window[0] < window[1] <= num_steps
    )
    if not valid:
        raise ValueError(
            f"sde_window {window!r} is not a step range [start, end) with 0 <= start < end <= num_steps={num_steps}"
        )
    mask[window[0] : window[1]] = True
    return mask


@dataclass
class FlowTrajectories:
    """One batch of flow-matching trajectories (B samples, T steps)."""

    latents: torch.Tensor  # (B, T + 1, ...): x at σ_0 = 1 ... x at σ_T = 0, in x_T's dtype
    log_probs: torch.Tensor  # (B, T), float32: log π_old(x_{k+1} | x_k, c); exactly 0 at ODE steps
    sigmas: torch.Tensor  # (T + 1,), float32: σ_0 > σ_1 > ... > σ_T
    stochastic: torch.Tensor  # (T,), bool: which steps were sampled (and carry a log-prob)
    means: torch.Tensor | None = None  # (B, T, ...), float32: each step's Gaussian mean (with keep_means)


def _check_schedule(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of T + 1 >= 2 values (got shape {tuple(sigmas.shape)})")
    if not bool(((sigmas[1:] < sigmas[:-1]) & (sigmas[1:] >= 0) & (sigmas[:-1] <= 1)).all()):
        raise ValueError(f"sigmas must decrease strictly within [0, 1] (got {sigmas.tolist()})")


def _check_cps_window(sigmas: torch.Tensor, stochastic: torch.Tensor) -> None:
    to_zero = stochastic & (sigmas[1:] == 0)
    if bool(to_zero.any()):
        step = int(torch.nonzero(to_zero)[0])
        raise ValueError(
            f"sampler 'cps': step {step} goes to sigma = 0 where the CPS std is 0 and the log-prob is undefined; "
            f"use an sde_window that ends at or before step {step} (e.g. [0, {step}])"
        )


@torch.no_grad()
def sample_flow_trajectories(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sigmas,
    x_T: torch.Tensor,
    noise_level: float,
    window: Sequence[int] | None = None,
    sampler: str = "sde",
    generator: torch.Generator | None = None,
    *,
    sigma_max: float | None = None,
    keep_means: bool = False,
) -> FlowTrajectories:
    """Denoise x_T along ``sigmas``, stochastic on the window's steps, recording every latent and log-prob
    (and, with ``keep_means``, every step's mean μ_old: the next latent at an ODE step).

    ``velocity(x, sigma)`` returns v for latents x (B, ...) at noise level ``sigma``, a (B,)
    float32 tensor (a pipeline adapter maps it to its timestep, e.g. 1000·σ, and applies
    guidance). ``sigmas`` is the scheduler's ``sigmas`` after ``set_timesteps``: T + 1
    values from σ_0 (1 for the default schedules) down to σ_T = 0. Step k goes σ_k → σ_{k+1}.

    ``sampler`` "sde" (``sde_step_with_logprob``, with ``sigma_max``) or "cps"
    (``cps_step_with_logprob``) is used on the steps of ``window`` = [start, end) (None: all
    steps) and ``ode_step`` elsewhere; "ode" is deterministic everywhere (``window`` must be
    None). ODE steps record log-prob 0 — a finite marker, not a density: mask them with
    ``stochastic``. With "cps", the window must stop before a step to σ = 0 (ValueError).

    Latents are stored in x_T's dtype, and each log-prob is that of the stored latent. Keep
    x_T float32 when the window reaches the last steps: there the step std (~a·σ) falls
    below bf16's rounding of x (~2⁻⁸·|x|), and a bf16 trajectory's log-probs drift far from
    fp32's (they stay exact on re-evaluation, but mean little).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler == "ode" and window is not None:
        raise ValueError(f"sampler 'ode' has no stochastic steps; leave window unset (got {window!r})")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).to(x_T.device)
    _check_schedule(sigmas)
    num_steps = len(sigmas) - 1
    stochastic = sde_window_mask(num_steps, window).to(x_T.device)
    if sampler == "ode":
        stochastic.fill_(False)
    if sampler == "cps":
        _check_cps_window(sigmas, stochastic)
    B = x_T.shape[0]
    x, latents, log_probs, means = x_T, [x_T], [], []
    for k, is_stochastic in enumerate(stochastic.tolist()):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        v = velocity(x, sigma.expand(B))
        if keep_means and is_stochastic:
            means.append(
                _sde_moments(v, x, sigma, sigma_next, noise_level, sigma_max)[0]
                if sampler == "sde"
                else _cps_moments(v, x, sigma, sigma_next, noise_level)[0]
            )
        if not is_stochastic:
            x, logp = ode_step(v, x, sigma, sigma_next).to(x_T.dtype), torch.zeros(B, device=x.device)
            if keep_means:
                means.append(x.float())
        elif sampler == "sde":
            x, logp = sde_step_with_logprob(
                v, x, sigma, sigma_next, noise_level, generator=generator, sigma_max=sigma_max
            )
        else:
            x, logp = cps_step_with_logprob(v, x, sigma, sigma_next, noise_level, generator=generator)
        latents.append(x)
        log_probs.append(logp)
    kept = torch.stack(means, 1) if means else None
    return FlowTrajectories(torch.stack(latents, 1), torch.stack(log_probs, 1), sigmas, stochastic, kept)


@torch.no_grad()
def denoise_flow_with_noise(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sigmas,
    noise: torch.Tensor,
    noise_level: float,
    window: Sequence[int] | None = None,
    sampler: str = "sde",
) -> torch.Tensor:
    """Final latents from given noise ``noise`` (B, T+1, ...): x at σ_0 is noise[:, 0] and a
    stochastic step k draws x_next = μ + std·noise[:, k+1], so a sample depends only on its own
    noise (evaluation items are reproducible however they are batched). ``sampler`` "ode" is the
    deterministic ODE at every step (noise[:, 1:] unused); "sde" / "cps" are stochastic on
    ``window`` as in ``sample_flow_trajectories``. Computed in float32."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).to(noise.device)
    _check_schedule(sigmas)
    stochastic = sde_window_mask(len(sigmas) - 1, window)
    if sampler == "ode":
        stochastic.fill_(False)
    if sampler == "cps":
        _check_cps_window(sigmas, stochastic.to(sigmas.device))
    x = noise[:, 0].float()
    for k, is_stochastic in enumerate(stochastic.tolist()):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        v = velocity(x, sigma.expand(x.shape[0]))
        if not is_stochastic:
            x = ode_step(v.float(), x, sigma, sigma_next)
            continue
        if sampler == "sde":
            mean, std = _sde_moments(v, x, sigma, sigma_next, noise_level, None)
        else:
            mean, std = _cps_moments(v, x, sigma, sigma_next, noise_level)
        x = mean + std * noise[:, k + 1].float()
    return x
