"""DDIM as a stochastic policy over a diffusers pipeline's UNet and scheduler.

The per-step policy (Song et al. 2021, eq. 12 and 16; as DDPO and LOOP use it): with
ᾱ_t the scheduler's cumulative alphas and ε̂ the (guided) noise prediction,

    x̂0  = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t                        (ε-prediction; v- and x0-prediction convert)
    σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_prev))
    μ   = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ_t²)·ε̂
    π(x_{t−1} | x_t, c) = N(μ, σ_t² I)

and ``log_prob`` is the Gaussian log-density of x_{t−1} *averaged* over the latent
dimensions (DDPO's convention: the sum over ~16k dimensions of SD latents overflows
importance ratios). With the same noise z, x_{t−1} = μ + σ_t·z equals
``DDIMScheduler.step(eps, t, x_t, eta=η, variance_noise=z).prev_sample``.

``sample_trajectories`` runs our own denoising loop (no monkey-patching of diffusers):
classifier-free guidance, noise from a caller-given generator, and it returns every
latent, every step's log-prob and the timesteps, which the update needs to re-evaluate
log π_θ(x_{t−1} | x_t, c) for the ratio. Decoding to images is separate
(``decode_latents``) so a caller can decode and score one batch while the next one is
being denoised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_2PI = math.log(2.0 * math.pi)


def _per_sample(values: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
    """values[t] for a scalar or (B,) t, broadcast to ``like``'s shape (B, ...)."""
    t = torch.as_tensor(t, device=values.device).long()
    out = values[t].to(device=like.device, dtype=torch.float32)
    if out.ndim == 0:
        return out
    return out.view(-1, *([1] * (like.ndim - 1)))


def ddim_step_moments(scheduler, eps: torch.Tensor, t, x_t: torch.Tensor, eta: float):
    """(μ, σ_t) of the DDIM(η) step π(x_{t−1} | x_t, c) for model output ``eps`` (float32, broadcastable)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) first")
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError(
            "dynamic thresholding makes x̂0 a non-Gaussian function "
            "of the noise; use a scheduler with thresholding=False"
        )
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(x_t.device)
    t = torch.as_tensor(t, device=x_t.device).long()
    prev_t = t - step
    a_t = _per_sample(alphas, t, x_t)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=x_t.device, dtype=torch.float32)
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp_min(0)].float(), final)
    a_prev = a_prev.view(-1, *([1] * (x_t.ndim - 1))) if a_prev.ndim else a_prev
    b_t = 1.0 - a_t
    eps32, x32 = eps.float(), x_t.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0, eps_hat = (x32 - b_t.sqrt() * eps32) / a_t.sqrt(), eps32
    elif kind == "v_prediction":
        x0, eps_hat = a_t.sqrt() * x32 - b_t.sqrt() * eps32, a_t.sqrt() * eps32 + b_t.sqrt() * x32
    elif kind == "sample":
        x0, eps_hat = eps32, (x32 - a_t.sqrt() * eps32) / b_t.sqrt()
    else:
        raise ValueError(f"unknown prediction_type {kind!r}")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev)
    std = eta * variance.clamp_min(0).sqrt()
    mean = a_prev.sqrt() * x0 + (1.0 - a_prev - std**2).clamp_min(0).sqrt() * eps_hat
    return mean, std


def ddim_step_with_logprob(
    scheduler,
    eps: torch.Tensor,
    t,
    x_t: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """One DDIM step as a Gaussian policy: ``(x_prev, log_prob)``.

    ``eps`` is the model output (ε, v or x0 as the scheduler's ``prediction_type``
    says), ``t`` a timestep (scalar, or (B,) per sample), ``x_t`` (B, C, H, W).
    Samples x_{t−1} with ``generator`` unless ``prev_sample`` is given, in which case
    that sample's log-probability is returned (the update's re-evaluation). log_prob
    is shaped (B,), averaged over latent dimensions; with η = 0 the step is the
    deterministic mean and log_prob is 0.
    """
    mean, std = ddim_step_moments(scheduler, eps, t, x_t, eta)
    if prev_sample is None:
        if eta <= 0:
            return mean.to(x_t.dtype), torch.zeros(x_t.shape[0], device=x_t.device)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
        prev_sample = mean + std * noise
    return prev_sample.to(x_t.dtype), gaussian_logprob(prev_sample, mean, std)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """log N(x; μ, σ²) averaged over all but the batch dimension."""
    std = std.expand_as(mean) if torch.is_tensor(std) else torch.full_like(mean, float(std))
    log_prob = -((x.detach().float() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * LOG_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@dataclass
class Trajectories:
    """One batch of sampled denoising trajectories (B samples, T steps)."""

    latents: torch.Tensor  # (B, T + 1, C, H, W): x_T ... x_0
    log_probs: torch.Tensor  # (B, T): log π_old(x_{t−1} | x_t, c)
    timesteps: torch.Tensor  # (T,): the scheduler's timesteps, high to low
    prompt_embeds: torch.Tensor  # (B, L, D)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """Text-encoder hidden states (B, L, D) for ``prompts`` (padded to the tokenizer's max length)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(device))[0]


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a denoiser's own (non-LoRA) weights: what its inputs are cast to."""
    return next((p.dtype for n, p in model.named_parameters() if "lora_" not in n), torch.float32)


def guided_noise(
    unet, x: torch.Tensor, t, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, guidance_scale: float
) -> torch.Tensor:
    """ε̂ = ε_u + g·(ε_c − ε_u) (classifier-free guidance; g = 1 or no negative: ε_c only).
    Inputs are cast to the UNet's weights' dtype (a bf16 base under fp32 LoRA adapters)."""
    dtype = base_dtype(unet)
    x, prompt_embeds = x.to(dtype), prompt_embeds.to(dtype)
    negative_embeds = negative_embeds.to(dtype) if negative_embeds is not None else None
    if negative_embeds is None or guidance_scale == 1.0:
        return unet(x, t, encoder_hidden_states=prompt_embeds).sample
    both = unet(
        torch.cat([x, x]),
        torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t,
        encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
    ).sample
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_trajectories(
    unet,
    scheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    generator: torch.Generator | None,
    latent_shape: tuple[int, int, int],
    initial: torch.Tensor | None = None,
    autocast=None,
) -> Trajectories:
    """Denoise B = len(prompt_embeds) samples from x_T ~ N(0, I) (``initial`` if given)
    with DDIM(η), recording every latent and log-prob. ``latent_shape`` = (C, H, W)."""
    import contextlib

    device = prompt_embeds.device
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    B = prompt_embeds.shape[0]
    x = (
        initial.to(device)
        if initial is not None
        else torch.randn((B, *latent_shape), generator=generator, device=device)
    )
    x = x * scheduler.init_noise_sigma
    latents, log_probs = [x], []
    for t in timesteps:
        with autocast() if autocast is not None else contextlib.nullcontext():
            eps = guided_noise(
                unet, scheduler.scale_model_input(x, t), t, prompt_embeds, negative_embeds, guidance_scale
            )
        x, logp = ddim_step_with_logprob(scheduler, eps.float(), t, x.float(), eta, generator=generator)
        latents.append(x)
        log_probs.append(logp)
    return Trajectories(torch.stack(latents, 1), torch.stack(log_probs, 1), timesteps.clone(), prompt_embeds)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode final latents to images (B, 3, H, W) in [0, 1], float32."""
    scaling = getattr(vae.config, "scaling_factor", 1.0)
    dtype = next(vae.parameters()).dtype
    images = vae.decode(latents.to(dtype) / scaling).sample
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def denoise_with_noise(
    unet,
    scheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    noise: torch.Tensor,
    autocast=None,
) -> torch.Tensor:
    """Final latents from given noise ``noise`` (B, T+1, C, H, W): x_T = noise[:, 0] and
    step k's z = noise[:, k+1], so a sample depends only on its own noise (evaluation
    items are reproducible however they are batched or sharded)."""
    import contextlib

    scheduler.set_timesteps(num_steps, device=prompt_embeds.device)
    x = noise[:, 0] * scheduler.init_noise_sigma
    for k, t in enumerate(scheduler.timesteps):
        with autocast() if autocast is not None else contextlib.nullcontext():
            eps = guided_noise(
                unet, scheduler.scale_model_input(x, t), t, prompt_embeds, negative_embeds, guidance_scale
            )
        mean, std = ddim_step_moments(scheduler, eps.float(), t, x.float(), eta)
        x = mean + std * noise[:, k + 1] if eta > 0 else mean
    return x
