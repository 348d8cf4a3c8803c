"""What every flow-matching family shares (SD3, FLUX, ...): the transformer predicts the
velocity v, and the policy is rlprox.models.flow_match's ``sampler`` (Flow-GRPO's SDE or the
coefficients-preserving CPS step) on the steps of ``sde_window`` (or of a window of
``sde_window_size`` steps drawn per sampling batch, Flow-GRPO-Fast's), the ODE elsewhere. A family
gives its velocity (``_velocity``), its latent shape, its σ schedule and its conditioning."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlprox.errors import RecipeError
from rlprox.models import diffusion, flow_match
from rlprox.models.pipelines.base import Adapter, Sampling, quiet_loading, read_config


@dataclass
class FlowOptions:
    """``loop.sampling`` of a flow-matching family. See docs/flow-matching.md."""

    sampler: Literal["sde", "cps"] = "sde"  # the stochastic step: "sde" (Flow-GRPO) or "cps" (coefficients-preserving)
    noise_level: float = 0.7  # the sampler's noise level a (> 0; cps: in (0, 1])
    # [start, end): the steps sampled stochastically and trained (0 = the step from σ = 1); the others are
    # ODE steps with no log-prob, never trained. Unset: every step (sde), every step but the last to σ = 0 (cps)
    sde_window: list[int] | None = None
    # Flow-GRPO-Fast / MixGRPO: instead of sde_window, a window of this many steps whose start is drawn uniformly
    # in [lo, hi − size] for each sampling batch (the run's generator); only its steps carry log-probs and train
    sde_window_size: int | None = None
    # [lo, hi): the steps the random window lies in. Unset: [0, num_steps // 2] (Flow-GRPO-Fast's); cps: hi < T
    sde_window_range: list[int] | None = None


def shifted_linspace_sigmas(scheduler, num_steps: int, tokens: int) -> torch.Tensor:
    """The σ's FluxPipeline and QwenImagePipeline set, (T+1,) float32: linspace(1, 1/T, T) (the scheduler's
    own with ``use_flow_sigmas``), time-shifted by the scheduler with μ = calculate_shift(tokens), linear in
    the image's token count from ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at
    ``max_image_seq_len`` (its config's), then 0."""
    import copy

    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler, c = copy.deepcopy(scheduler), scheduler.config
    mu = calculate_shift(
        tokens,
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


def available_memory(device) -> int | None:
    """Bytes free for one allocation on ``device``: the GPU's free memory, or the host's
    MemAvailable; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class FlowMatchingAdapter(Adapter):
    """A transformer pipeline trained by flow matching, σ from 1 (noise) to 0 (data)."""

    Options = FlowOptions
    denoiser_name = "transformer"
    deterministic_suffix = "_ode"  # evaluation values of the ODE sampler: reward_ode
    flow_matching = True

    @classmethod
    def check_options(cls, sampling: Sampling, options: FlowOptions, key: str) -> None:
        """The noise level's range, and a window of steps [start, end) the sampler can take
        (unset: filled in here), or a random window's size and range."""
        if not options.noise_level > 0 or (options.sampler == "cps" and options.noise_level > 1):
            bound = "in (0, 1] for sampler cps" if options.sampler == "cps" else "> 0"
            raise RecipeError(f"{key}.noise_level", f"must be {bound} (got {options.noise_level})")
        T = sampling.num_steps
        if T == 1 and options.sampler == "cps":
            raise RecipeError("loop.num_steps", "sampler cps needs >= 2 steps (the last one is an ODE step)")
        if options.sde_window_size is not None:
            cls._check_random_window(T, options, key)
            return
        if options.sde_window_range is not None:
            raise RecipeError(
                f"{key}.sde_window_range", "is the range of a random window: set sde_window_size too (or remove it)"
            )
        window = options.sde_window
        if window is None:
            window = options.sde_window = [0, T - 1] if options.sampler == "cps" else [0, T]
        if len(window) != 2 or not 0 <= window[0] < window[1] <= T:
            raise RecipeError(
                f"{key}.sde_window",
                f"must be steps [start, end) with 0 <= start < end <= num_steps={T} (got {window})",
            )
        if options.sampler == "cps" and window[1] == T:
            raise RecipeError(
                f"{key}.sde_window",
                f"sampler cps cannot sample the last step (to σ = 0, std 0): end the window by {T - 1} (got {window})",
            )

    @staticmethod
    def _check_random_window(T: int, options: FlowOptions, key: str) -> None:
        """A random window: size >= 1 inside a range [lo, hi) of the steps (unset: [0, T // 2]), not with
        a fixed sde_window; under cps the range ends before the last step (to σ = 0)."""
        size = options.sde_window_size
        if options.sde_window is not None:
            raise RecipeError(
                f"{key}.sde_window_size",
                f"draws a window per sampling batch; sde_window {options.sde_window} fixes one: set only one of them",
            )
        if size < 1:
            raise RecipeError(f"{key}.sde_window_size", f"must be >= 1 (got {size})")
        span = options.sde_window_range
        if span is None:
            span = options.sde_window_range = [0, T // 2]
        if len(span) != 2 or not 0 <= span[0] < span[1] <= T:
            raise RecipeError(
                f"{key}.sde_window_range", f"must be steps [lo, hi) with 0 <= lo < hi <= num_steps={T} (got {span})"
            )
        if options.sampler == "cps" and span[1] == T:
            raise RecipeError(
                f"{key}.sde_window_range",
                f"sampler cps cannot sample the last step (to σ = 0, std 0): end the range by {T - 1} (got {span})",
            )
        if size > span[1] - span[0]:
            raise RecipeError(
                f"{key}.sde_window_size",
                f"{size} steps do not fit in sde_window_range {span} ({span[1] - span[0]} steps)",
            )

    @classmethod
    def check_config(cls, path, sampling: Sampling, options) -> None:
        """The resolution against the transformer's and the VAE's config files (no weights):
        a side the VAE factor × patch size does not divide, or a latent side above the
        transformer's position-embedding size."""
        if sampling.resolution is None:
            return
        transformer, vae = read_config(path, "transformer"), read_config(path, "vae")
        if transformer is None or vae is None:
            return
        scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
        patch = int(transformer.get("patch_size", 1))
        if sampling.resolution % (scale * patch):
            raise RecipeError(
                "loop.resolution",
                f"{sampling.resolution} px is not a multiple of {scale * patch} "
                f"(the VAE's factor {scale} × patch size {patch})",
            )
        max_size = transformer.get("pos_embed_max_size")
        side = sampling.resolution // scale
        if max_size is not None and side // patch > max_size:
            raise RecipeError(
                "loop.resolution",
                f"{sampling.resolution} px is a latent of {side // patch} patches a side, above the transformer's "
                f"position embedding ({max_size}: at most {max_size * patch * scale} px)",
            )

    def __init__(self, pipe, sampling: Sampling, options: FlowOptions):
        self.pipe, self.sampling, self.options = pipe, sampling, options
        self.denoiser = pipe.transformer
        self.frozen = {
            name: module
            for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
            if (module := getattr(pipe, name, None)) is not None
        }
        self.latent_shape = self._latent_shape()
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        self.sigmas = self._schedule(pipe.scheduler, sampling.num_steps)  # (T+1,) float32, 1 ... 0
        # the fixed window; with a random one, its first position in the range (evaluation's stochastic sampler)
        if options.sde_window_size is None:
            self.sde_window = tuple(options.sde_window)
        else:
            self.sde_window = (options.sde_window_range[0], options.sde_window_range[0] + options.sde_window_size)
        stochastic = flow_match.sde_window_mask(sampling.num_steps, self.sde_window)
        # (T',) the window's steps; with a random window one position of it: T' = sde_window_size per sample
        self.trained_steps = torch.nonzero(stochastic).flatten()
        self._negative = None

    @classmethod
    def load(cls, path, sampling: Sampling, options: FlowOptions) -> "FlowMatchingAdapter":
        import diffusers
        from diffusers import DiffusionPipeline

        quiet_loading()
        index = DiffusionPipeline.load_config(str(path))
        absent = {k: None for k, v in index.items() if isinstance(v, list) and list(v) == [None, None]}
        pipe = getattr(diffusers, cls.pipeline_classes[0]).from_pretrained(str(path), **absent)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, sampling, options)

    # ------------------------------------------------------------------ what a family gives
    @abc.abstractmethod
    def _latent_shape(self) -> tuple[int, ...]:
        """One sample's latent (without the batch axis)."""

    @abc.abstractmethod
    def _schedule(self, scheduler, num_steps: int) -> torch.Tensor:
        """The σ's of ``num_steps`` steps as the pipeline sets them, (T+1,) float32, 1 ... 0."""

    @abc.abstractmethod
    def _velocity(self, model, cond, negative, autocast=None):
        """v̂(x, σ) (guided where the family guides), a function of (x (B, ...), σ (B,))."""

    @abc.abstractmethod
    def _tokens(self) -> int:
        """Image tokens the transformer attends over."""

    def check_memory(self, batch_size: int, device) -> None:
        """Refuse a sampling batch whose attention scores alone (batch × CFG copies × heads ×
        tokens², float32, the unfused attention of a CPU) exceed the memory free now."""
        free = available_memory(device)
        if free is None:
            return
        config = self.denoiser.config
        heads = int(config.get("num_attention_heads", 1))
        copies = 2 if self.sampling.guidance_scale != 1 and not self.guidance_embedded else 1
        need = batch_size * copies * heads * self._tokens() ** 2 * 4
        if need > free:
            raise RecipeError(
                "loop.resolution",
                f"one sampling batch ({batch_size} samples at {self._tokens()} tokens) needs about {need / 2**30:.1f} "
                f"GiB for attention alone, {free / 2**30:.1f} GiB is free: lower loop.resolution or "
                "loop.sample_batch_size",
            )

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, model, cond, negative, generator, autocast=None, keep_means: bool = False, x_T=None) -> dict:
        """Trajectories of B samples from x ~ N(0, I) at σ = 1 (``x_T`` (B, ...) if given), float32:
        latents (B, T+1, ...), log_probs (B, T) (0 at the ODE steps outside the window), noise_schedule =
        the σ's (T+1,); with ``keep_means`` also means (B, T, ...), each step's Gaussian mean. With
        ``sde_window_size`` the window's start is drawn first, once for the batch, and trained_steps
        (B, size) names each sample's window steps."""
        device = cond["embeds"].device
        o, B = self.options, cond["embeds"].shape[0]
        window, out = self.sde_window, {}
        if o.sde_window_size is not None:  # Flow-GRPO-Fast: start uniform in [lo, hi − size]
            lo, hi = o.sde_window_range
            start = int(torch.randint(lo, hi - o.sde_window_size + 1, (1,), generator=generator, device=device))
            window = (start, start + o.sde_window_size)
            out["trained_steps"] = torch.arange(*window, device=device).expand(B, -1)
        if x_T is None:
            x_T = torch.randn((B, *self.latent_shape), generator=generator, device=device)
        traj = flow_match.sample_flow_trajectories(
            self._velocity(model, cond, negative, autocast),
            self.sigmas.to(device),
            x_T.to(device, torch.float32),
            o.noise_level,
            window,
            o.sampler,
            generator,
            keep_means=keep_means,
        )
        out |= {"latents": traj.latents, "log_probs": traj.log_probs, "noise_schedule": traj.sigmas}
        return out | ({"means": traj.means} if keep_means else {})

    def step_distribution(self, model, cond, negative, noise_schedule, x, x_next, step):
        """σ_step → σ_step+1: the sampler's Gaussian step."""
        sigma, sigma_next = noise_schedule[step], noise_schedule[step + 1]  # (b,)
        v = self._velocity(model, cond, negative)(x, sigma)
        o = self.options
        mean, std = flow_match.step_moments(o.sampler, v, x, sigma, sigma_next, o.noise_level)
        return diffusion.gaussian_logprob(x_next.to(x.dtype), mean, std), mean, std

    def predict_velocity(self, model, cond, x: torch.Tensor, sigma: torch.Tensor, autocast=None) -> torch.Tensor:
        """v_θ(x, σ), conditional, no guidance, float32."""
        return self._velocity(model, cond, None, autocast)(x, sigma).float()

    def flow_grpo_std(self, noise_schedule, step, like: torch.Tensor) -> torch.Tensor:
        """Flow-GRPO's std_dev_t of the step (``flow_match.flow_grpo_std``)."""
        o = self.options
        sigma, sigma_next = noise_schedule[step], noise_schedule[step + 1]
        return flow_match.flow_grpo_std(o.sampler, sigma, sigma_next, o.noise_level, float(noise_schedule[1]), like)

    @torch.no_grad()
    def sample_with_noise(self, model, cond, negative, noise, deterministic: bool, autocast=None) -> torch.Tensor:
        o = self.options
        return flow_match.denoise_flow_with_noise(
            self._velocity(model, cond, negative, autocast),
            self.sigmas.to(noise.device),
            noise,
            o.noise_level,
            None if deterministic else self.sde_window,
            "ode" if deterministic else o.sampler,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode: x / scaling_factor + shift_factor, images in [0, 1], float32."""
        vae = self.pipe.vae
        shift = vae.config.get("shift_factor", None) or 0.0
        dtype = next(vae.parameters()).dtype
        images = vae.decode((latents / vae.config.scaling_factor + shift).to(dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ export
    def save_lora(self, out_dir: Path, model) -> None:
        """The adapter in the format the pipeline class's ``load_lora_weights`` reads: peft's
        lora_A / lora_B names (its loader drops the older lora.down / lora.up names that
        ``convert_state_dict_to_diffusers`` would give the to_q / to_k / to_v / to_out.0 layers)."""
        import diffusers
        from peft.utils import get_peft_model_state_dict

        getattr(diffusers, self.pipeline_classes[0]).save_lora_weights(
            str(out_dir),
            transformer_lora_layers=get_peft_model_state_dict(model),
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        )
