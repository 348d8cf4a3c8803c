"""The Qwen-Image family (``QwenImagePipeline``, text-to-image): the flow-matching policy on
Qwen-Image's packed latents, 2×2 latent patches as tokens, x (B, N, 4·C). The transformer
(``QwenImageTransformer2DModel``, an MMDiT) gets σ itself as its timestep (the pipeline's
timestep / 1000) and the image's (frames, rows, columns) for its rotary embedding.

The conditioning is the last hidden state of the Qwen2.5-VL text encoder run on the pipeline's
chat template around the prompt, with the template's first ``prompt_template_encode_start_idx``
tokens dropped, as the pipeline's own ``encode_prompt`` computes it: ``embeds`` (B, L, D) padded to
the batch's longest prompt and ``mask`` (B, L) (1: a prompt token, 0: padding), which the
transformer's joint attention uses so that no token attends to padding.

Guidance is true classifier-free guidance (``loop.guidance_scale`` g, the pipeline's
``true_cfg_scale``) against ``loop.sampling.negative_prompt``, in two transformer passes (the two
prompts' lengths differ), then renormalised per token as the pipeline does:

    v̂ = v_u + g·(v_c − v_u),     v̂ ← v̂ · ‖v_c‖ / ‖v̂‖     (norms over each token's channels)

The VAE (``AutoencoderKLQwenImage``, Wan's causal video VAE) has a frame axis: latents
(B, C, 1, h, w), normalised per channel by the config's ``latents_mean`` / ``latents_std``. σ's are
the pipeline's: linspace(1, 1/T, T), shifted by μ of the image's token count, then 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlprox.errors import RecipeError
from rlprox.models import diffusion
from rlprox.models.pipelines.base import Sampling, read_config, register_adapter, with_autocast
from rlprox.models.pipelines.flow import FlowMatchingAdapter, FlowOptions, shifted_linspace_sigmas


@dataclass
class QwenImageOptions(FlowOptions):
    """``loop.sampling`` of Qwen-Image: the flow options and its true classifier-free guidance."""

    negative_prompt: str = " "  # the prompt guidance pushes away from (g > 1); the pipeline's documented example's
    renormalize_guidance: bool = (
        True  # rescale the guided velocity to the conditional one's norm per token, as the pipeline
    )


def _vae_scale(vae_config: dict) -> int:
    """The VAE's spatial downsampling factor: 2 per entry of ``temperal_downsample`` (one per down stage)."""
    return 2 ** len(vae_config.get("temperal_downsample", [False, True, True]))


@register_adapter
class QwenImageAdapter(FlowMatchingAdapter):
    """A ``QwenImagePipeline``."""

    pipeline_classes = ("QwenImagePipeline",)
    Options = QwenImageOptions
    # the joint attention's projections of both streams (image: to_*, text: add_*)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @classmethod
    def check_config(cls, path, sampling: Sampling, options: QwenImageOptions) -> None:
        """From the config files, no weights: a folder without its text encoder, a guidance-distilled
        transformer, and a side the VAE factor × 2 (the 2×2 packing) does not divide."""
        import json
        from pathlib import Path

        index = Path(path) / "model_index.json"
        if index.is_file():
            entry = json.loads(index.read_text()).get("text_encoder")
            if not entry or entry[0] is None or read_config(path, "text_encoder") is None:
                raise RecipeError(
                    "loop.pipeline",
                    f"{str(path)!r} has no text encoder (Qwen-Image conditions on its Qwen2.5-VL text encoder's "
                    "states: the folder needs text_encoder/ and tokenizer/)",
                )
        transformer, vae = read_config(path, "transformer"), read_config(path, "vae")
        if transformer is not None and transformer.get("guidance_embeds", False):
            raise RecipeError(
                "loop.pipeline",
                f"the transformer of {str(path)!r} is guidance-distilled (guidance_embeds): not supported",
            )
        if sampling.resolution is None or vae is None:
            return
        multiple = _vae_scale(vae) * 2
        if sampling.resolution % multiple:
            raise RecipeError(
                "loop.resolution", f"{sampling.resolution} px is not a multiple of {multiple} (the VAE's factor × 2)"
            )

    @classmethod
    def load(cls, path, sampling: Sampling, options: QwenImageOptions) -> "QwenImageAdapter":
        cls.check_config(path, sampling, options)
        return super().load(path, sampling, options)

    def __init__(self, pipe, sampling: Sampling, options: QwenImageOptions):
        if pipe.text_encoder is None or pipe.tokenizer is None:
            raise RecipeError("loop.pipeline", "the Qwen-Image pipeline has no text encoder or tokenizer")
        vae_scale = pipe.vae_scale_factor
        size = sampling.resolution or pipe.default_sample_size * vae_scale
        if size % (vae_scale * 2):
            raise RecipeError(
                "loop.resolution", f"{size} px is not a multiple of {vae_scale * 2} (the VAE's factor × 2)"
            )
        self.image_size = size  # pixels, square
        self.latent_size = size // vae_scale  # the unpacked latent's h = w (2×2 patches)
        super().__init__(pipe, sampling, options)

    def _latent_shape(self) -> tuple[int, ...]:
        """One sample's packed latent: (N tokens, 4·C), N = (h/2)·(w/2)."""
        return ((self.latent_size // 2) ** 2, self.denoiser.config.in_channels)

    def _tokens(self) -> int:
        return self.latent_shape[0]

    def _schedule(self, scheduler, num_steps: int) -> torch.Tensor:
        """QwenImagePipeline's σ's: ``shifted_linspace_sigmas`` of the packed token count (the pipeline's own
        calculate_shift is FLUX's)."""
        return shifted_linspace_sigmas(scheduler, num_steps, self.latent_shape[0])

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        """The template-wrapped prompts' last hidden states, the template's prefix dropped: ``embeds``
        (B, L, D) and ``mask`` (B, L) (1: a token of the prompt, 0: padding), float32."""
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=torch.device(device), max_sequence_length=self.sampling.max_sequence_length
        )
        if mask is None:  # every prompt as long as the longest
            mask = torch.ones(embeds.shape[:2], device=embeds.device)
        return {"embeds": embeds.float(), "mask": mask.float()}

    def negative(self, n: int, device) -> dict[str, torch.Tensor] | None:
        """``negative_prompt``'s conditioning for ``n`` samples (g > 1); None without guidance."""
        if self.sampling.guidance_scale == 1.0:
            return None
        if self._negative is None:
            self._negative = self.encode([self.options.negative_prompt], device)
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._negative.items()}

    def _velocity(self, model, cond, negative, autocast=None):
        """v̂(x, σ) on packed latents x (B, N, 4·C): the conditional velocity, or true CFG against
        ``negative`` renormalised to the conditional norm (module docstring); σ (B,) is the timestep."""
        g = self.sampling.guidance_scale
        renormalize = self.options.renormalize_guidance
        rows = self.latent_size // 2
        dtype = diffusion.base_dtype(model)  # a bf16 base under fp32 LoRA adapters takes bf16 inputs

        def prepared(c):
            mask = c["mask"].bool()
            return c["embeds"].to(dtype), None if bool(mask.all()) else mask  # all valid: no mask, as the pipeline

        cond = prepared(cond)
        negative = prepared(negative) if negative is not None else None

        def run(x, sigma, embeds, mask):
            with with_autocast(autocast):
                return model(
                    hidden_states=x,
                    timestep=sigma,
                    encoder_hidden_states=embeds,
                    encoder_hidden_states_mask=mask,
                    img_shapes=[[(1, rows, rows)]] * x.shape[0],
                    return_dict=False,
                )[0]

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            x = x.to(dtype)
            v = run(x, sigma, *cond)
            if negative is None:
                return v
            v_u = run(x, sigma, *negative)
            guided = v_u + g * (v - v_u)
            if renormalize:
                guided = guided * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
            return guided

        return velocity

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents (B, N, 4·C) to images (B, 3, H, W) in [0, 1], float32: unpacked to one frame
        (B, C, 1, h, w), un-normalised z·std + mean per channel, decoded, the frame axis dropped."""
        pipe, vae = self.pipe, self.pipe.vae
        dtype = next(vae.parameters()).dtype
        z = pipe._unpack_latents(latents, self.image_size, self.image_size, pipe.vae_scale_factor).to(dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        images = vae.decode(z / inverse_std + mean, return_dict=False)[0][:, :, 0]  # the pipeline's rounding
        return (images.float() / 2 + 0.5).clamp(0, 1)
