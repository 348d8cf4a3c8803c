"""The Wan text-to-video family (``WanPipeline``: Wan 2.1 T2V): the flow-matching policy on
video latents with a time axis, x (B, C, F', H', W'), F' = (F − 1)/t + 1 latent frames for F
frames and the VAE's temporal factor t (4), H' = H/s, W' = W/s for its spatial factor s (8).
The ``WanTransformer3DModel`` predicts the velocity v at timestep 1000·σ from UMT5's sequence
(``embeds`` (B, L, D), zero-padded to ``max_sequence_length`` as the pipeline's
``encode_prompt`` does); classifier-free guidance v̂ = v_u + g·(v_c − v_u) uses the
negative prompt (``loop.sampling.negative_prompt``, "" by default, as the pipeline).

Every step of the policy is the other flow families' (SDE / CPS on ``sde_window``, ODE
elsewhere, one Gaussian per step over all latent elements): a step's log-prob is the mean of
log N over every element of the video latent, as for an image latent, so its numbers stay on
the image families' scale. The σ's are the scheduler's (``set_timesteps``); a scheduler other
than Euler's (Wan 2.1 ships UniPC) gives the σ grid only, the steps are the adapter's own.

Decoding: x / (1/latents_std) + latents_mean through ``AutoencoderKLWan``, videos
(B, F, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from rlprox.errors import RecipeError
from rlprox.models import diffusion
from rlprox.models.pipelines.base import Sampling, read_config, register_adapter, with_autocast
from rlprox.models.pipelines.flow import FlowMatchingAdapter, FlowOptions

DEFAULT_FRAMES = 81  # WanPipeline's default
DEFAULT_SIZE = (480, 832)  # WanPipeline's default (height, width)
SIDE_MULTIPLE = 16  # WanPipeline refuses sides that 16 does not divide


@dataclass
class WanOptions(FlowOptions):
    """``loop.sampling`` of Wan: the flow options, the clip's frames and size, the negative prompt."""

    frames: int | None = None  # frames per clip, (frames − 1) divisible by the VAE's temporal factor; unset: 81
    height: int | None = None  # pixels; unset: loop.resolution, else 480 (with width: WanPipeline's 480×832)
    width: int | None = None  # pixels; unset: loop.resolution, else 832
    negative_prompt: str = ""  # the prompt classifier-free guidance steers away from (WanPipeline's default: "")


def _size(sampling: Sampling, options: WanOptions) -> tuple[int, int]:
    """(height, width) in pixels: the options', else loop.resolution square, else WanPipeline's 480×832."""
    square = sampling.resolution
    height = options.height or square or DEFAULT_SIZE[0]
    width = options.width or square or DEFAULT_SIZE[1]
    return height, width


def _scales(vae: dict) -> tuple[int, int]:
    """(temporal, spatial) downsampling factors from an ``AutoencoderKLWan`` config."""
    return int(vae.get("scale_factor_temporal") or 4), int(vae.get("scale_factor_spatial") or 8)


@register_adapter
class WanAdapter(FlowMatchingAdapter):
    """A ``WanPipeline`` (text to video)."""

    pipeline_classes = ("WanPipeline",)
    Options = WanOptions
    media = "video"
    # the self-attention (attn1) and cross-attention (attn2) projections of every block
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    @classmethod
    def check_options(cls, sampling: Sampling, options: WanOptions, key: str) -> None:
        frames = DEFAULT_FRAMES if options.frames is None else options.frames
        if frames < 1:
            raise RecipeError(f"{key}.frames", f"must be >= 1 (got {frames})")
        if options.frames is None:
            options.frames = frames
        if sampling.resolution is not None and (options.height or options.width):
            raise RecipeError(
                f"{key}.height" if options.height else f"{key}.width",
                f"sets the clip's size and loop.resolution {sampling.resolution} does too: set only one of them",
            )
        for name, side in zip(("height", "width"), _size(sampling, options)):
            if side < SIDE_MULTIPLE or side % SIDE_MULTIPLE:
                field = f"{key}.{name}" if getattr(options, name) else "loop.resolution"
                raise RecipeError(field, f"{side} px is not a multiple of {SIDE_MULTIPLE} (WanPipeline's rule)")
        super().check_options(sampling, options, key)

    @classmethod
    def check_frames(cls, frames: int, temporal: int, key: str = "loop.sampling.frames") -> None:
        """Wan's rule: (frames − 1) divisible by the VAE's temporal factor (a one-line RecipeError)."""
        if (frames - 1) % temporal:
            lower = (frames - 1) // temporal * temporal + 1
            raise RecipeError(
                key,
                f"{frames} frames: (frames − 1) must be divisible by the VAE's temporal factor {temporal} "
                f"(e.g. {lower} or {lower + temporal})",
            )

    @classmethod
    def check_config(cls, path, sampling: Sampling, options: WanOptions) -> None:
        """The frame count and the size against the VAE's factors and the patch size, from the config files."""
        transformer, vae = read_config(path, "transformer"), read_config(path, "vae")
        if vae is None:
            return
        temporal, spatial = _scales(vae)
        cls.check_frames(options.frames, temporal)
        patch = list((transformer or {}).get("patch_size", [1, 2, 2]))
        multiple = spatial * max(patch[1:])
        for name, side in zip(("height", "width"), _size(sampling, options)):
            if side % multiple:
                field = f"loop.sampling.{name}" if getattr(options, name) else "loop.resolution"
                raise RecipeError(
                    field, f"{side} px is not a multiple of {multiple} (the VAE's factor {spatial} × patch size)"
                )

    def __init__(self, pipe, sampling: Sampling, options: WanOptions):
        temporal, spatial = _scales(dict(pipe.vae.config))
        self.check_frames(options.frames, temporal)
        self.frames = options.frames
        self.height, self.width = _size(sampling, options)
        patch = pipe.transformer.config.patch_size
        if self.height % (spatial * patch[1]) or self.width % (spatial * patch[2]):
            raise RecipeError(
                "loop.resolution",
                f"{self.height}×{self.width} px is not a multiple of {spatial * patch[1]} (the VAE's factor {spatial} "
                "× patch size)",
            )
        self.latent_frames = (self.frames - 1) // temporal + 1
        self.latent_size = (self.height // spatial, self.width // spatial)
        super().__init__(pipe, sampling, options)

    # ------------------------------------------------------------------ what a family gives
    def _latent_shape(self) -> tuple[int, ...]:
        """One clip's latent, (C, F', H', W')."""
        return (self.denoiser.config.in_channels, self.latent_frames, *self.latent_size)

    def _tokens(self) -> int:
        p = self.denoiser.config.patch_size
        return (self.latent_frames // p[0]) * (self.latent_size[0] // p[1]) * (self.latent_size[1] // p[2])

    def _schedule(self, scheduler, num_steps: int) -> torch.Tensor:
        """The scheduler's σ's for ``num_steps`` (its shift applied), (T+1,) float32, 1 ... 0."""
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(num_steps, device="cpu")
        sigmas = torch.as_tensor(scheduler.sigmas).detach().float().cpu()
        return sigmas if len(sigmas) == num_steps + 1 else torch.cat([sigmas[:num_steps], sigmas.new_zeros(1)])

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        """UMT5's sequence ``embeds`` (B, L, D), zero past each prompt's tokens, float32."""
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.sampling.max_sequence_length,
            device=torch.device(device),
        )
        return {"embeds": embeds.float()}

    def negative(self, n: int, device) -> dict[str, torch.Tensor] | None:
        """The negative prompt's conditioning for ``n`` samples (g > 1), encoded once."""
        if self.sampling.guidance_scale == 1.0:
            return None
        if self._negative is None:
            self._negative = self.encode([self.options.negative_prompt], device)
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._negative.items()}

    def _velocity(self, model, cond, negative, autocast=None):
        """v̂(x, σ) with classifier-free guidance, conditional and unconditional passes apart (as the
        pipeline: a video's activations twice over would double the memory); σ (B,) maps to 1000·σ."""
        g = self.sampling.guidance_scale
        dtype = diffusion.base_dtype(model)  # a bf16 base under fp32 LoRA adapters takes bf16 inputs
        embeds = cond["embeds"].to(dtype)
        negative_embeds = negative["embeds"].to(dtype) if negative is not None else None

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            t = sigma * self.num_train_timesteps
            x = x.to(dtype)
            with with_autocast(autocast):
                v = model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]
                if negative_embeds is None:
                    return v
                uncond = model(hidden_states=x, timestep=t, encoder_hidden_states=negative_embeds, return_dict=False)[
                    0
                ]
            return uncond + g * (v - uncond)

        return velocity

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F', H', W') to videos (B, F, 3, H, W) in [0, 1], float32: x·latents_std +
        latents_mean through the VAE (the pipeline's x / (1/std) + mean)."""
        vae = self.pipe.vae
        dtype = next(vae.parameters()).dtype
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        videos = vae.decode((latents.float() * std + mean).to(dtype), return_dict=False)[0]  # (B, 3, F, H, W)
        return ((videos.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    # ------------------------------------------------------------------ evaluation
    def eval_grid(self, columns: list[torch.Tensor], labels: list[str], captions: list[list[str]]) -> torch.Tensor:
        """Captioned cells per frame: (N, F, 3, H', W'), each frame a cell of the image grid (base | tuned
        side by side, the prompt and rewards under them); written as an animated grid and a still strip."""
        from rlprox.images import caption_cells

        frames = columns[0].shape[1]
        per_frame = [caption_cells([c[:, f] for c in columns], labels, captions) for f in range(frames)]
        return torch.stack(per_frame, dim=1)
