"""The SD-1.5 family (``StableDiffusionPipeline``): a UNet predicting ε (or v / x0) and
DDIM(η) as the Gaussian policy of rlprox.models.diffusion. The numbers are exactly those of
the functions there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlprox.errors import RecipeError
from rlprox.models import diffusion
from rlprox.models.pipelines.base import Adapter, Sampling, latent_side, quiet_loading, register_adapter


@dataclass
class DDIMOptions:
    """``loop.sampling`` of a DDIM family."""

    eta: float = 1.0  # DDIM η (> 0: a stochastic policy with a log-prob; evaluation also samples η = 0)


def _embeds(cond: dict, negative: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text embeddings of the prompts and of the empty prompt (None without guidance)."""
    return cond["embeds"], negative["embeds"] if negative is not None else None


@register_adapter
class StableDiffusionAdapter(Adapter):
    """A ``StableDiffusionPipeline``: UNet + DDIM(η)."""

    pipeline_classes = ("StableDiffusionPipeline",)
    Options = DDIMOptions
    denoiser_name = "unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections
    deterministic_suffix = "_eta0"  # evaluation values of the deterministic sampler: reward_eta0

    @classmethod
    def check_options(cls, sampling: Sampling, options: DDIMOptions, key: str) -> None:
        if options.eta <= 0:
            raise RecipeError(
                f"{key}.eta",
                f"must be > 0: with η = 0 DDIM is deterministic and has no log-probability (got {options.eta})",
            )

    def __init__(self, pipe, sampling: Sampling, options: DDIMOptions):
        from diffusers import DDIMScheduler

        self.pipe, self.sampling, self.options = pipe, sampling, options
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.denoiser = pipe.unet
        self.frozen = {"vae": pipe.vae, "text_encoder": pipe.text_encoder}
        config = self.denoiser.config
        side = latent_side(pipe, sampling, config.sample_size)
        self.latent_shape = (config.in_channels, side, side)  # (C, H, W)
        self.trained_steps = torch.arange(sampling.num_steps)  # (T',) every DDIM step has a log-prob
        self._negative = None

    @classmethod
    def load(cls, path, sampling: Sampling, options: DDIMOptions) -> "StableDiffusionAdapter":
        from diffusers import StableDiffusionPipeline

        quiet_loading()
        pipe = StableDiffusionPipeline.from_pretrained(str(path))
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, sampling, options)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        embeds = diffusion.encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts, device)
        return {"embeds": embeds.float()}

    # ------------------------------------------------------------------ sampling
    def sample(self, model, cond, negative, generator, autocast=None, keep_means: bool = False, x_T=None) -> dict:
        """Latents (B, T+1, C, H, W) from x_T ~ N(0, I) (``x_T`` if given), log_probs (B, T),
        noise_schedule = the timesteps (T,)."""
        s = self.sampling
        traj = diffusion.sample_trajectories(
            model,
            self.scheduler,
            *_embeds(cond, negative),
            s.num_steps,
            s.guidance_scale,
            self.options.eta,
            generator,
            self.latent_shape,
            initial=x_T,
            autocast=autocast,
        )
        return {"latents": traj.latents, "log_probs": traj.log_probs, "noise_schedule": traj.timesteps}

    def step_distribution(self, model, cond, negative, noise_schedule, x, x_next, step):
        """The DDIM(η) step's Gaussian: μ (b, C, H, W), std (b, 1, 1, 1)."""
        t = noise_schedule[step]  # (b,) per-sample timesteps
        eps = diffusion.guided_noise(
            model,
            self.scheduler.scale_model_input(x, t),
            t,
            *_embeds(cond, negative),
            self.sampling.guidance_scale,
        )
        mean, std = diffusion.ddim_step_moments(self.scheduler, eps.float(), t, x, self.options.eta)
        return diffusion.gaussian_logprob(x_next.to(x.dtype), mean, std), mean, std

    def sample_with_noise(self, model, cond, negative, noise, deterministic: bool, autocast=None) -> torch.Tensor:
        s = self.sampling
        return diffusion.denoise_with_noise(
            model,
            self.scheduler,
            *_embeds(cond, negative),
            s.num_steps,
            s.guidance_scale,
            0.0 if deterministic else self.options.eta,
            noise,
            autocast=autocast,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return diffusion.decode_latents(self.pipe.vae, latents)

    # ------------------------------------------------------------------ export
    def save_lora(self, out_dir: Path, model) -> None:
        """The adapter in the format ``StableDiffusionPipeline.load_lora_weights`` reads."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        StableDiffusionPipeline.save_lora_weights(
            str(out_dir), unet_lora_layers=layers, unet_lora_adapter_metadata=model.peft_config["default"].to_dict()
        )
