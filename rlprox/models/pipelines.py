"""Pipeline adapters: all that the LOOP trainer knows about a diffusers text-to-image family.

One small class per family; the trainer (rlprox/algos/loop.py) calls only these methods:

    encode(prompts)          the conditioning: a dict of batch-first tensors, once per round
    negative(n)              the empty prompt's conditioning for classifier-free guidance (g > 1)
    sample(...)              a batch of trajectories: every latent, every step's log π_old
    step_log_prob(...)       log π_θ of one stored step (the update's re-evaluation)
    step_distribution(...)   that log-prob with the step's Gaussian mean and std (the KL to a reference)
    sample_with_noise(...)   final latents from fixed per-item noise (evaluation), stochastic or
                             deterministic (DDIM η = 0 / the flow ODE)
    decode(latents)          images (B, 3, H, W) in [0, 1]
    trained_steps            the steps that carry a log-prob and are trained
    load_base_denoiser / save_lora / save_full   base-vs-tuned evaluation and export

Families:

    StableDiffusionAdapter    SD-1.5 class: UNet predicting ε (or v / x0), DDIM(η) policy
                              (rlprox.models.diffusion)
    StableDiffusion3Adapter   SD3: MMDiT transformer predicting the velocity v, flow-matching
                              SDE or CPS policy on a window of steps, ODE elsewhere
                              (rlprox.models.flow_match)
    FluxAdapter               FLUX.1: SD3's policy on packed 2×2-patch latents, a distilled
                              guidance embedding instead of classifier-free guidance

``load_adapter(path, sampling)`` picks the family from the folder's ``model_index.json``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import rlprox.quiet  # noqa: F401  (two library notices dropped)
from rlprox.models import diffusion, flow_match


@dataclass
class Sampling:
    """How a pipeline samples: the trainer's sampling options, resolved (no unset values)."""

    num_steps: int  # T denoising steps
    guidance_scale: float  # classifier-free guidance g (1: none)
    eta: float = 1.0  # DDIM η
    sampler: str = "sde"  # flow: "sde" or "cps"
    noise_level: float = 0.7  # flow: the SDE's a, or CPS's a in (0, 1]
    sde_window: tuple[int, int] | None = None  # flow: stochastic steps [start, end); None: every step
    max_sequence_length: int = 256  # SD3 / FLUX: T5 tokens per prompt
    guidance_embedding: float = 3.5  # FLUX: the value fed to the transformer's guidance embedding
    resolution: int | None = None  # image side in pixels; None: the model's default size


def latent_side(pipe, sampling: Sampling, default: int, multiple: int = 1) -> int:
    """The latent side for ``sampling.resolution`` pixels (``default`` when unset): pixels over the
    VAE's downsampling factor, which must divide them (times ``multiple``, the patch size)."""
    if sampling.resolution is None:
        return default
    from rlprox.errors import RecipeError

    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if sampling.resolution % (scale * multiple):
        raise RecipeError(
            "loop.resolution",
            f"{sampling.resolution} px is not a multiple of {scale * multiple} "
            f"(the VAE's factor {scale}{f' × patch size {multiple}' if multiple > 1 else ''})",
        )
    return sampling.resolution // scale


def pipeline_class(path, hub: bool = False) -> str | None:
    """The ``_class_name`` in a pipeline folder's model_index.json; None when ``path`` is not a
    local folder, unless ``hub``: then a hub id's index is read from the cache (no download
    under HF_HUB_OFFLINE), None when that fails too."""
    import json

    index = Path(path) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name")
    if not hub:
        return None
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notices about diffusers' own arguments
            warnings.simplefilter("ignore")
            return DiffusionPipeline.load_config(str(path)).get("_class_name")
    except (OSError, ValueError):
        return None


def _quiet_loading():
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # loading bars would drown a run's one-line errors
    transformers.utils.logging.disable_progress_bar()


def _with_autocast(autocast):
    return autocast() if autocast is not None else contextlib.nullcontext()


class _GuidedAdapter:
    """What every adapter shares: the empty prompt's conditioning for classifier-free
    guidance, encoded once (``encode`` is the family's own), and ``step_log_prob`` from the
    family's ``step_distribution``."""

    sampling: Sampling
    _negative: dict[str, torch.Tensor] | None = None
    guidance_embedded = False  # FLUX: a guidance embedding (loop.guidance_embedding) instead of guidance

    def step_log_prob(self, model, cond, negative, schedule, x, x_next, step) -> torch.Tensor:
        """log π_θ(x_next | x, c) (b,) of step ``step`` (b,) of each sample (``step_distribution``'s first)."""
        return self.step_distribution(model, cond, negative, schedule, x, x_next, step)[0]

    def negative(self, n: int, device) -> dict[str, torch.Tensor] | None:
        """The empty prompt's conditioning for ``n`` samples; None without guidance."""
        if self.sampling.guidance_scale == 1.0:
            return None
        if self._negative is None:
            self._negative = self.encode([""], device)
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._negative.items()}


class StableDiffusionAdapter(_GuidedAdapter):
    """A ``StableDiffusionPipeline``: UNet + DDIM(η) as the Gaussian policy of
    rlprox.models.diffusion. The numbers are exactly those of the functions there."""

    flow = False
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser_name = "unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections
    deterministic_suffix = "_eta0"  # evaluation values of the deterministic sampler: reward_eta0

    def __init__(self, pipe, sampling: Sampling):
        from diffusers import DDIMScheduler

        self.pipe, self.sampling = pipe, sampling
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.denoiser = pipe.unet
        self.frozen = {"vae": pipe.vae, "text_encoder": pipe.text_encoder}
        config = self.denoiser.config
        side = latent_side(pipe, sampling, config.sample_size)
        self.latent_shape = (config.in_channels, side, side)  # (C, H, W)
        self.trained_steps = torch.arange(sampling.num_steps)  # (T',) every DDIM step has a log-prob
        self._negative = None

    @classmethod
    def load(cls, path, sampling: Sampling) -> "StableDiffusionAdapter":
        from rlprox.zoo.sd import load_sd_pipeline

        return cls(load_sd_pipeline(path), sampling)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        embeds = diffusion.encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts, device)
        return {"embeds": embeds.float()}

    # ------------------------------------------------------------------ sampling
    def noise_shape(self) -> tuple[int, ...]:
        """One evaluation item's noise: x_T and each step's z, (T+1, C, H, W)."""
        return (self.sampling.num_steps + 1, *self.latent_shape)

    def sample(self, model, cond, negative, generator, autocast=None) -> dict:
        """Trajectories of B = len(cond) samples: latents (B, T+1, ...), log_probs (B, T),
        and the schedule the update re-evaluates with (timesteps (T,))."""
        s = self.sampling
        traj = diffusion.sample_trajectories(
            model,
            self.scheduler,
            cond["embeds"],
            negative["embeds"] if negative is not None else None,
            s.num_steps,
            s.guidance_scale,
            s.eta,
            generator,
            self.latent_shape,
            autocast=autocast,
        )
        return {"latents": traj.latents, "log_probs": traj.log_probs, "schedule": traj.timesteps}

    def step_distribution(self, model, cond, negative, schedule, x, x_next, step):
        """(log π_θ(x_next | x, c) (b,), μ (b, C, H, W), std (b, 1, 1, 1)) of step ``step`` (b,)
        of each sample: the DDIM(η) step's Gaussian, float32."""
        t = schedule[step]  # (b,) per-sample timesteps
        eps = diffusion.guided_noise(
            model,
            self.scheduler.scale_model_input(x, t),
            t,
            cond["embeds"],
            negative["embeds"] if negative is not None else None,
            self.sampling.guidance_scale,
        )
        mean, std = diffusion.ddim_step_moments(self.scheduler, eps.float(), t, x, self.sampling.eta)
        return diffusion.gaussian_logprob(x_next.to(x.dtype), mean, std), mean, std

    def sample_with_noise(self, model, cond, negative, noise, deterministic: bool, autocast=None) -> torch.Tensor:
        s = self.sampling
        return diffusion.denoise_with_noise(
            model,
            self.scheduler,
            cond["embeds"],
            negative["embeds"] if negative is not None else None,
            s.num_steps,
            s.guidance_scale,
            0.0 if deterministic else s.eta,
            noise,
            autocast=autocast,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return diffusion.decode_latents(self.pipe.vae, latents)

    # ------------------------------------------------------------------ base model and export
    def load_base_denoiser(self, path, dtype):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", torch_dtype=dtype)

    def save_lora(self, out_dir: Path, model) -> None:
        """The adapter in the format ``StableDiffusionPipeline.load_lora_weights`` reads."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        StableDiffusionPipeline.save_lora_weights(
            str(out_dir), unet_lora_layers=layers, unet_lora_adapter_metadata=model.peft_config["default"].to_dict()
        )

    def save_full(self, out_dir: Path, path, model) -> None:
        pipe = type(self).load(path, self.sampling).pipe
        pipe.unet = copy.deepcopy(model).float()
        pipe.save_pretrained(str(out_dir))


class StableDiffusion3Adapter(_GuidedAdapter):
    """A ``StableDiffusion3Pipeline``: an SD3 transformer predicting the velocity v at
    timestep 1000·σ, classifier-free guidance v̂ = v_u + g·(v_c − v_u), and the flow-matching
    policy of rlprox.models.flow_match: ``sampler`` (SDE or CPS) on the steps of ``sde_window``,
    the ODE elsewhere. The conditioning is CLIP-L/G's penultimate states with T5's sequence
    (``embeds`` (B, L, D)) and CLIP-L/G's pooled projections (``pooled`` (B, D')), as the
    pipeline's own ``encode_prompt`` computes them; a folder saved without T5
    (text_encoder_3 = None) has zeros in its place, as diffusers does."""

    flow = True
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    # the joint attention's projections of both streams (image: to_*, text: add_*)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    deterministic_suffix = "_ode"  # evaluation values of the ODE sampler: reward_ode

    def __init__(self, pipe, sampling: Sampling):
        self.pipe, self.sampling = pipe, sampling
        self.denoiser = pipe.transformer
        self.frozen = {
            name: module
            for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
            if (module := getattr(pipe, name, None)) is not None
        }
        self.latent_shape = self._latent_shape()
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        self.sigmas = self._schedule(pipe.scheduler, sampling.num_steps)  # (T+1,) float32, 1 ... 0
        stochastic = flow_match.sde_window_mask(sampling.num_steps, sampling.sde_window)
        self.trained_steps = torch.nonzero(stochastic).flatten()  # (T',) the window's steps
        self._negative = None

    def _latent_shape(self) -> tuple[int, ...]:
        """One sample's latent, (C, H, W): the transformer's sample size, or ``sampling.resolution``."""
        config = self.denoiser.config
        side = latent_side(self.pipe, self.sampling, config.sample_size, config.patch_size)
        return (config.in_channels, side, side)

    @staticmethod
    def _pipeline_type():
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def _schedule(self, scheduler, num_steps: int) -> torch.Tensor:
        """The σ's of ``num_steps`` steps as the pipeline sets them, (T+1,) float32, 1 ... 0."""
        scheduler = copy.deepcopy(scheduler)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            c, patch = scheduler.config, self.denoiser.config.patch_size
            seq_len = (self.latent_shape[1] // patch) * (self.latent_shape[2] // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        return scheduler.sigmas.detach().float().cpu()

    @classmethod
    def load(cls, path, sampling: Sampling) -> "StableDiffusion3Adapter":
        from diffusers import DiffusionPipeline

        _quiet_loading()
        index = DiffusionPipeline.load_config(str(path))
        absent = {k: None for k, v in index.items() if isinstance(v, list) and list(v) == [None, None]}
        pipe = cls._pipeline_type().from_pretrained(str(path), **absent)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, sampling)

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
            with _with_autocast(autocast):
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

    # ------------------------------------------------------------------ sampling
    def noise_shape(self) -> tuple[int, ...]:
        """One evaluation item's noise: x at σ = 1 and each step's z, (T+1, C, H, W) (FLUX: (T+1, N, 4·C))."""
        return (self.sampling.num_steps + 1, *self.latent_shape)

    @torch.no_grad()
    def sample(self, model, cond, negative, generator, autocast=None) -> dict:
        """Trajectories of B samples from x ~ N(0, I) at σ = 1, float32: latents (B, T+1, ...),
        log_probs (B, T) (0 at the ODE steps outside the window), schedule = the σ's (T+1,)."""
        device = cond["embeds"].device
        x_T = torch.randn((cond["embeds"].shape[0], *self.latent_shape), generator=generator, device=device)
        s = self.sampling
        traj = flow_match.sample_flow_trajectories(
            self._velocity(model, cond, negative, autocast),
            self.sigmas.to(device),
            x_T,
            s.noise_level,
            s.sde_window,
            s.sampler,
            generator,
        )
        return {"latents": traj.latents, "log_probs": traj.log_probs, "schedule": traj.sigmas}

    def step_distribution(self, model, cond, negative, schedule, x, x_next, step):
        """(log π_θ(x_next | x, c) (b,), μ (b, ...), std) of step ``step`` (b,) of each sample,
        σ_step → σ_step+1: the sampler's Gaussian step, float32."""
        sigma, sigma_next = schedule[step], schedule[step + 1]  # (b,)
        v = self._velocity(model, cond, negative)(x, sigma)
        s = self.sampling
        mean, std = flow_match.step_moments(s.sampler, v, x, sigma, sigma_next, s.noise_level)
        return diffusion.gaussian_logprob(x_next.to(x.dtype), mean, std), mean, std

    @torch.no_grad()
    def sample_with_noise(self, model, cond, negative, noise, deterministic: bool, autocast=None) -> torch.Tensor:
        s = self.sampling
        return flow_match.denoise_flow_with_noise(
            self._velocity(model, cond, negative, autocast),
            self.sigmas.to(noise.device),
            noise,
            s.noise_level,
            None if deterministic else s.sde_window,
            "ode" if deterministic else s.sampler,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode: x / scaling_factor + shift_factor, images in [0, 1], float32."""
        vae = self.pipe.vae
        shift = vae.config.get("shift_factor", None) or 0.0
        dtype = next(vae.parameters()).dtype
        images = vae.decode((latents / vae.config.scaling_factor + shift).to(dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ base model and export
    def load_base_denoiser(self, path, dtype):
        return type(self.denoiser).from_pretrained(str(path), subfolder="transformer", torch_dtype=dtype)

    def save_lora(self, out_dir: Path, model) -> None:
        """The adapter in the format the pipeline class's ``load_lora_weights`` reads
        (``StableDiffusion3Pipeline``'s, ``FluxPipeline``'s): peft's lora_A / lora_B names (its
        loader drops the older lora.down / lora.up names that ``convert_state_dict_to_diffusers``
        would give the to_q / to_k / to_v / to_out.0 layers)."""
        from peft.utils import get_peft_model_state_dict

        self._pipeline_type().save_lora_weights(
            str(out_dir),
            transformer_lora_layers=get_peft_model_state_dict(model),
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        )

    def save_full(self, out_dir: Path, path, model) -> None:
        pipe = type(self).load(path, self.sampling).pipe
        pipe.transformer = copy.deepcopy(model).float()
        pipe.save_pretrained(str(out_dir))


class FluxAdapter(StableDiffusion3Adapter):
    """A ``FluxPipeline`` (FLUX.1-dev / schnell): SD3's flow-matching policy (``sample``,
    ``step_log_prob`` and ``sample_with_noise`` are SD3's) on FLUX's packed latents, 2×2 latent
    patches as tokens, x (B, N, 4·C). The transformer gets σ itself as its timestep (the
    pipeline's timestep / 1000), the rotary ids of the image tokens and of the text tokens (all
    zero), and, when ``guidance_embeds``, the distilled guidance ``sampling.guidance_embedding``;
    there is no classifier-free guidance. The conditioning is T5's sequence (``embeds`` (B, L, D))
    and CLIP's pooled output (``pooled`` (B, D')), from the pipeline's own ``encode_prompt``. The
    image is ``sampling.resolution`` or the VAE's ``sample_size`` square (1024 for FLUX.1); σ's are the pipeline's:
    linspace(1, 1/T, T), shifted by μ of the image's token count."""

    pipeline_classes = ("FluxPipeline",)
    guidance_embedded = True  # a guidance embedding, not classifier-free guidance (loop.guidance_embedding)
    # the attention projections of the double blocks' two streams (image: to_*, text: add_*) and
    # of the single blocks (to_q, to_k, to_v; their output projection also carries the MLP)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def __init__(self, pipe, sampling: Sampling):
        vae_scale = pipe.vae_scale_factor
        default = 2 * (int(pipe.vae.config.sample_size) // (vae_scale * 2))
        self.latent_size = latent_side(pipe, sampling, default, 2)  # the unpacked latent's H = W (2×2 patches)
        self.image_size = self.latent_size * vae_scale  # pixels, square
        self.img_ids = pipe._prepare_latent_image_ids(  # (N, 3) the image tokens' (0, row, column)
            1, self.latent_size // 2, self.latent_size // 2, "cpu", torch.float32
        )
        super().__init__(pipe, sampling)

    def _latent_shape(self) -> tuple[int, ...]:
        """One sample's packed latent: (N tokens, 4·C), N = (H/2)·(W/2)."""
        return ((self.latent_size // 2) ** 2, self.denoiser.config.in_channels)

    @staticmethod
    def _pipeline_type():
        from diffusers import FluxPipeline

        return FluxPipeline

    def _schedule(self, scheduler, num_steps: int) -> torch.Tensor:
        """FluxPipeline's σ's, (T+1,) float32: linspace(1, 1/T, T) (the scheduler's own with
        ``use_flow_sigmas``), shifted by μ = calculate_shift(N tokens), then 0."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler, c = copy.deepcopy(scheduler), scheduler.config
        mu = calculate_shift(
            self.latent_shape[0],
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        if c.get("use_flow_sigmas", False):
            scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", mu=mu)
        return scheduler.sigmas.detach().float().cpu()

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
        guidance_value = self.sampling.guidance_embedding if self.denoiser.config.guidance_embeds else None
        img_ids = self.img_ids.to(cond["embeds"].device)
        txt_ids = torch.zeros(cond["embeds"].shape[1], 3, device=img_ids.device)  # (L, 3) text positions: zeros
        dtype = diffusion.base_dtype(model)  # a bf16 base under fp32 LoRA adapters takes bf16 inputs
        cond = {k: v.to(dtype) for k, v in cond.items()}

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            guidance = None if guidance_value is None else torch.full_like(sigma, guidance_value, dtype=torch.float32)
            with _with_autocast(autocast):
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

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents (B, N, 4·C) to images (B, 3, H, W) in [0, 1], float32: unpacked, then
        x / scaling_factor + shift_factor through the VAE."""
        size = self.image_size
        return super().decode(self.pipe._unpack_latents(latents, size, size, self.pipe.vae_scale_factor))


ADAPTERS = (StableDiffusionAdapter, StableDiffusion3Adapter, FluxAdapter)


def adapter_for_class(class_name: str | None):
    """The adapter class for a pipeline class name (None: StableDiffusionAdapter, the
    default family, for a hub id whose class is not known before loading)."""
    if class_name is None:
        return StableDiffusionAdapter
    for adapter in ADAPTERS:
        if class_name in adapter.pipeline_classes:
            return adapter
    supported = ", ".join(c for a in ADAPTERS for c in a.pipeline_classes)
    raise ValueError(f"no LOOP adapter for {class_name} (supported: {supported})")


def load_adapter(path, sampling: Sampling):
    """Load the pipeline at ``path`` (a local folder or a cached hub id) with its family's adapter."""
    return adapter_for_class(pipeline_class(path, hub=True)).load(path, sampling)
