"""The FLUX.1 family (``FluxPipeline``, dev / schnell): the flow-matching policy on FLUX's
packed latents, 2×2 latent patches as tokens, x (B, N, 4·C). The transformer gets σ itself as
its timestep (the pipeline's timestep / 1000), the rotary ids of the image tokens and of the
text tokens (all zero), and, when ``guidance_embeds``, the distilled guidance value
(``loop.sampling.guidance_embedding``); there is no classifier-free guidance. The conditioning
is T5's sequence (``embeds`` (B, L, D)) and CLIP's pooled output (``pooled`` (B, D')), from the
pipeline's own ``encode_prompt``. The image is ``loop.resolution`` or the VAE's
``sample_size`` square (1024 for FLUX.1); σ's are the pipeline's: linspace(1, 1/T, T), shifted
by μ of the image's token count."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlprox.errors import RecipeError
from rlprox.models import diffusion
from rlprox.models.pipelines.base import Sampling, latent_side, read_config, register_adapter, with_autocast
from rlprox.models.pipelines.flow import FlowMatchingAdapter, FlowOptions, shifted_linspace_sigmas


@dataclass
class FluxOptions(FlowOptions):
    """``loop.sampling`` of FLUX: the flow options and the guidance embedding."""

    # the distilled guidance value fed to the transformer's guidance embedding; unset: 3.5 (a transformer
    # without one, FLUX.1-schnell, refuses it: leave it unset there)
    guidance_embedding: float | None = None


@register_adapter
class FluxAdapter(FlowMatchingAdapter):
    """A ``FluxPipeline``."""

    pipeline_classes = ("FluxPipeline",)
    Options = FluxOptions
    guidance_embedded = True  # a guidance embedding, not classifier-free guidance
    # the attention projections of the double blocks' two streams (image: to_*, text: add_*) and
    # of the single blocks (to_q, to_k, to_v; their output projection also carries the MLP)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @classmethod
    def check_options(cls, sampling: Sampling, options: FluxOptions, key: str) -> None:
        if sampling.guidance_scale != 1:
            raise RecipeError(
                "loop.guidance_scale",
                f"FLUX uses a guidance embedding, not classifier-free guidance: set {key}.guidance_embedding "
                f"instead (got {sampling.guidance_scale})",
            )
        super().check_options(sampling, options, key)

    @classmethod
    def check_config(cls, path, sampling: Sampling, options: FluxOptions) -> None:
        """A guidance value for a transformer without the embedding, and a side the VAE factor × 2
        (the 2×2 packing) does not divide, from the config files."""
        transformer, vae = read_config(path, "transformer"), read_config(path, "vae")
        if options.guidance_embedding is not None and transformer and not transformer.get("guidance_embeds", True):
            raise RecipeError(
                "loop.sampling.guidance_embedding",
                f"the transformer of {str(path)!r} has no guidance embedding (FLUX.1-schnell): leave it unset",
            )
        if sampling.resolution is None or vae is None:
            return
        multiple = 2 ** (len(vae.get("block_out_channels", [0])) - 1) * 2
        if sampling.resolution % multiple:
            raise RecipeError(
                "loop.resolution", f"{sampling.resolution} px is not a multiple of {multiple} (the VAE's factor × 2)"
            )

    def __init__(self, pipe, sampling: Sampling, options: FluxOptions):
        if options.guidance_embedding is not None and not pipe.transformer.config.get("guidance_embeds", True):
            raise RecipeError(
                "loop.sampling.guidance_embedding",
                "the transformer has no guidance embedding (FLUX.1-schnell): leave it unset",
            )
        vae_scale = pipe.vae_scale_factor
        default = 2 * (int(pipe.vae.config.sample_size) // (vae_scale * 2))
        self.latent_size = latent_side(pipe, sampling, default, 2)  # the unpacked latent's H = W (2×2 patches)
        self.image_size = self.latent_size * vae_scale  # pixels, square
        self.img_ids = pipe._prepare_latent_image_ids(  # (N, 3) the image tokens' (0, row, column)
            1, self.latent_size // 2, self.latent_size // 2, "cpu", torch.float32
        )
        super().__init__(pipe, sampling, options)

    def _latent_shape(self) -> tuple[int, ...]:
        """One sample's packed latent: (N tokens, 4·C), N = (H/2)·(W/2)."""
        return ((self.latent_size // 2) ** 2, self.denoiser.config.in_channels)

    def _tokens(self) -> int:
        return self.latent_shape[0]

    def _schedule(self, scheduler, num_steps: int) -> torch.Tensor:
        """FluxPipeline's σ's: ``shifted_linspace_sigmas`` of the packed token count."""
        return shifted_linspace_sigmas(scheduler, num_steps, self.latent_shape[0])

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        """T5's sequence ``embeds`` (B, L, D) and CLIP's pooled output ``pooled`` (B, D'), float32."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=torch.device(device),
            max_sequence_length=self.sampling.max_sequence_length,
        )
        return {"embeds": embeds.float(), "pooled": pooled.float()}

    def negative(self, n: int, device) -> None:
        """None: FLUX has no classifier-free guidance (its guidance is an embedding)."""
        return None

    def _velocity(self, model, cond, negative, autocast=None):
        """v(x, σ) on packed latents x (B, N, 4·C); σ (B,) is the transformer's timestep."""
        embedding = 3.5 if self.options.guidance_embedding is None else self.options.guidance_embedding
        guidance_value = embedding if self.denoiser.config.guidance_embeds else None
        img_ids = self.img_ids.to(cond["embeds"].device)
        txt_ids = torch.zeros(cond["embeds"].shape[1], 3, device=img_ids.device)  # (L, 3) text positions: zeros
        dtype = diffusion.base_dtype(model)  # a bf16 base under fp32 LoRA adapters takes bf16 inputs
        cond = {k: v.to(dtype) for k, v in cond.items()}

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            guidance = None if guidance_value is None else torch.full_like(sigma, guidance_value, dtype=torch.float32)
            with with_autocast(autocast):
                return model(
                    hidden_states=x.to(dtype),
                    timestep=sigma,
                    guidance=guidance,
                    pooled_projections=cond["pooled"],
                    encoder_hidden_states=cond["embeds"],
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )[0]

        return velocity

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents (B, N, 4·C) to images (B, 3, H, W) in [0, 1], float32: unpacked, then
        x / scaling_factor + shift_factor through the VAE."""
        size = self.image_size
        return super().decode(self.pipe._unpack_latents(latents, size, size, self.pipe.vae_scale_factor))
