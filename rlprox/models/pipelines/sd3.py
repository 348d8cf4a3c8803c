"""The SD3 / SD3.5 family (``StableDiffusion3Pipeline``): an MMDiT transformer predicting the
velocity v at timestep 1000·σ, with classifier-free guidance v̂ = v_u + g·(v_c − v_u). The
conditioning is CLIP-L/G's penultimate states with T5's sequence (``embeds`` (B, L, D)) and
CLIP-L/G's pooled projections (``pooled`` (B, D')), as the pipeline's own ``encode_prompt``
computes them; a folder saved without T5 (text_encoder_3 = None) has zeros in its place, as
diffusers does."""

from __future__ import annotations

import copy

import torch

from rlprox.models import diffusion
from rlprox.models.pipelines.base import latent_side, register_adapter, with_autocast
from rlprox.models.pipelines.flow import FlowMatchingAdapter


@register_adapter
class StableDiffusion3Adapter(FlowMatchingAdapter):
    """A ``StableDiffusion3Pipeline``."""

    pipeline_classes = ("StableDiffusion3Pipeline",)
    # the joint attention's projections of both streams (image: to_*, text: add_*)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def _latent_shape(self) -> tuple[int, ...]:
        """One sample's latent, (C, H, W): the transformer's sample size, or ``sampling.resolution``."""
        config = self.denoiser.config
        side = latent_side(self.pipe, self.sampling, config.sample_size, config.patch_size)
        return (config.in_channels, side, side)

    def _tokens(self) -> int:
        patch = self.denoiser.config.patch_size
        return (self.latent_shape[1] // patch) * (self.latent_shape[2] // patch)

    def _schedule(self, scheduler, num_steps: int) -> torch.Tensor:
        scheduler = copy.deepcopy(scheduler)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            c = scheduler.config
            kwargs["mu"] = calculate_shift(
                self._tokens(),
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        return scheduler.sigmas.detach().float().cpu()

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=torch.device(device),
            do_classifier_free_guidance=False,
            max_sequence_length=self.sampling.max_sequence_length,
        )
        return {"embeds": embeds.float(), "pooled": pooled.float()}

    def _velocity(self, model, cond, negative, autocast=None):
        """v̂(x, σ) with classifier-free guidance; σ (B,) maps to the timestep 1000·σ."""
        g = self.sampling.guidance_scale
        dtype = diffusion.base_dtype(model)  # a bf16 base under fp32 LoRA adapters takes bf16 inputs
        cond = {k: v.to(dtype) for k, v in cond.items()}
        negative = {k: v.to(dtype) for k, v in negative.items()} if negative is not None else None

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            t = sigma * self.num_train_timesteps
            x = x.to(dtype)
            with with_autocast(autocast):
                if negative is None:
                    return model(
                        hidden_states=x,
                        timestep=t,
                        encoder_hidden_states=cond["embeds"],
                        pooled_projections=cond["pooled"],
                        return_dict=False,
                    )[0]
                both = model(
                    hidden_states=torch.cat([x, x]),
                    timestep=torch.cat([t, t]),
                    encoder_hidden_states=torch.cat([negative["embeds"], cond["embeds"]]),
                    pooled_projections=torch.cat([negative["pooled"], cond["pooled"]]),
                    return_dict=False,
                )[0]
            uncond, conditional = both.chunk(2)
            return uncond + g * (conditional - uncond)

        return velocity
