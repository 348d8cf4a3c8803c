"""The adapter protocol: all that a generative trainer (LOOP) knows about a diffusers model
family, written down once.

A family is one ``Adapter`` subclass in one file. It serves the diffusers pipeline classes
it names in ``pipeline_classes`` and registers itself for them (``register_adapter``); a
user's family registers the same way, on import or as ``"module:Class"`` in the recipe
(``loop.adapter``). The trainer calls only what this class declares:

    Options / resolve_options   the family's own part of the recipe section (``loop.sampling``),
                                checked without loading weights; an option of another family
                                is a one-line refusal
    load(path, ...)             the pipeline from a folder or a cached hub id, frozen parts listed
    prepare_denoiser(...)       LoRA adapters on the family's targets (or every weight trained)
    encode / negative           the conditioning, and the empty prompt's for guidance
    sample                      a batch of trajectories: every latent and every step's log π_old
    step_distribution           log π_θ of one stored step with the step's Gaussian mean and std
    predict_velocity            a flow-matching family's conditional velocity v_θ(x, σ), no guidance
                                (the NFT objective), where the family has one (``flow_matching``)
    flow_grpo_std               Flow-GRPO's std_dev_t of a step (its KL's divisor), ditto
    sample_with_noise           final latents from fixed per-item noise (evaluation)
    decode                      latents to the family's media: images (B, 3, H, W) or videos
                                (B, T, 3, H, W), in [0, 1]
    eval_grid                   the base-vs-tuned figure of an evaluation
    load_base_denoiser / save_lora / save_full / load_hint   base model and export

Options shared by every family (steps, guidance scale, resolution, text length) arrive as
``Sampling``; the family's own as its ``Options`` dataclass.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

import rlprox.quiet  # noqa: F401  (two library notices dropped)
from rlprox.errors import RecipeError, RegistryError, did_you_mean
from rlprox.registry import Registry, resolve_object


@dataclass(frozen=True)
class Sampling:
    """The sampling options every family takes, resolved."""

    num_steps: int  # T denoising steps
    guidance_scale: float  # classifier-free guidance g (1: none)
    resolution: int | None = None  # image side in pixels; None: the model's default size
    max_sequence_length: int = 256  # text tokens per prompt, for encoders that take a length (T5)


# family options that were keys of the loop section itself before ``loop.sampling`` (old recipes still read)
FORMER_SECTION_KEYS = ("eta", "sampler", "noise_level", "sde_window", "guidance_embedding")


@dataclass
class NoOptions:
    """A family without options of its own."""


class Adapter(abc.ABC):
    """Base of every family's adapter: the protocol (each method documented once, here) and
    what all families share (the empty prompt's conditioning, LoRA on the denoiser, the
    image grid). A family must define the abstract methods; the rest have defaults."""

    # ---- what a family declares
    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # the diffusers pipeline classes it serves
    Options: ClassVar[type] = NoOptions  # its own options (``loop.sampling``), a dataclass
    media: ClassVar[Literal["image", "video"]] = "image"  # what ``decode`` returns and the reward scores
    denoiser_name: ClassVar[str] = "denoiser"  # the trained module's name in checkpoints ("unet", "transformer")
    lora_targets: ClassVar[tuple[str, ...]] = ()  # module names LoRA adapts by default
    deterministic_suffix: ClassVar[str] = "_det"  # evaluation keys of the deterministic sampler: reward<suffix>
    guidance_embedded: ClassVar[bool] = False  # guidance is an embedding, not classifier-free guidance
    # a flow-matching family: a velocity field (predict_velocity), steps with a time increment dt (flow_grpo_std)
    flow_matching: ClassVar[bool] = False

    # ---- what an instance holds
    pipe: Any  # the diffusers pipeline
    sampling: Sampling
    options: Any  # an ``Options`` instance
    denoiser: torch.nn.Module  # the trained network (UNet or transformer)
    frozen: dict[str, torch.nn.Module]  # VAE, text encoders: used, never trained
    latent_shape: tuple[int, ...]  # one sample's latent, without the batch axis
    # (T',) the steps that carry a log-prob and are trained; where ``sample`` draws them per call, one
    # such draw: T' is the count per sample either way
    trained_steps: torch.Tensor
    _negative: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ options (no weights)
    @classmethod
    def resolve_options(cls, sampling: Sampling, options: dict, key: str = "loop.sampling"):
        """The family's ``Options`` from the recipe's mapping (unset values filled in); a
        one-line RecipeError naming ``key.<option>`` for an option that is not the family's
        or a value out of range. Families add checks in ``check_options``."""
        names = [f.name for f in dataclasses.fields(cls.Options)]
        given = {k: v for k, v in options.items() if v is not None}  # None: unset
        for name in given:
            if name not in names:
                theirs = f"its options: {', '.join(names)}" if names else "it takes none"
                raise RecipeError(
                    f"{key}.{name}",
                    f"not an option of {cls.pipeline_classes[0]}{did_you_mean(name, names)} ({theirs})",
                )
        from rlprox.recipe import parse_section

        resolved = parse_section(cls.Options, given, key)
        cls.check_options(sampling, resolved, key)
        return resolved

    @classmethod
    def check_options(cls, sampling: Sampling, options, key: str) -> None:
        """Range checks of the family's options against the shared ones (RecipeError)."""

    @classmethod
    def check_config(cls, path, sampling: Sampling, options) -> None:
        """What the model's config files in a local folder refuse, before any weights load
        (e.g. ``loop.resolution``): by default a side the VAE's downsampling factor does not divide."""
        vae = read_config(path, "vae")
        if sampling.resolution is None or vae is None:
            return
        scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
        if sampling.resolution % scale:
            raise RecipeError(
                "loop.resolution", f"{sampling.resolution} px is not a multiple of {scale} (the VAE's factor {scale})"
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    @abc.abstractmethod
    def load(cls, path, sampling: Sampling, options) -> "Adapter":
        """The pipeline at ``path`` (a local folder or a cached hub id) with this adapter."""

    def prepare_denoiser(self, finetune: str, lora, gradient_checkpointing: bool) -> torch.nn.Module:
        """The denoiser made trainable: peft LoRA adapters (``lora``: rank, alpha,
        target_modules; empty targets: the family's ``lora_targets``) on a frozen base, or
        every weight (``finetune: full``)."""
        denoiser = self.denoiser
        denoiser.requires_grad_(False)
        if finetune == "lora":
            from peft import LoraConfig

            denoiser.add_adapter(
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    target_modules=list(lora.target_modules or self.lora_targets),
                    init_lora_weights="gaussian",
                )
            )
        else:
            denoiser.requires_grad_(True)
        if gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        return denoiser

    # ------------------------------------------------------------------ conditioning
    @abc.abstractmethod
    def encode(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        """The conditioning of ``prompts``: a dict of batch-first float32 tensors."""

    def negative(self, n: int, device) -> dict[str, torch.Tensor] | None:
        """The empty prompt's conditioning for ``n`` samples (classifier-free guidance, g > 1);
        None without guidance. Encoded once."""
        if self.sampling.guidance_scale == 1.0:
            return None
        if self._negative is None:
            self._negative = self.encode([""], device)
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._negative.items()}

    # ------------------------------------------------------------------ sampling
    def noise_shape(self) -> tuple[int, ...]:
        """One evaluation item's noise: the first latent and each step's z, (T+1, ...)."""
        return (self.sampling.num_steps + 1, *self.latent_shape)

    @abc.abstractmethod
    def sample(self, model, cond, negative, generator, autocast=None, keep_means: bool = False, x_T=None) -> dict:
        """Trajectories of B = len(cond) samples: ``latents`` (B, T+1, ...), ``log_probs``
        (B, T) (0 at untrained steps) and the ``noise_schedule`` the update re-evaluates with;
        with ``keep_means`` (a ``flow_matching`` family, for the KL trust region) also
        ``means`` (B, T, ...), each step's Gaussian mean. ``x_T`` (B, ...): the first latents
        (``loop.shared_initial_noise``), drawn from ``generator`` when None; the trainer passes it
        only when set. A sampler that draws the trained steps per call (a random SDE window)
        also returns ``trained_steps`` (B, T'), each sample's, as long indices; without it every
        sample's are ``trained_steps``."""

    @abc.abstractmethod
    def step_distribution(self, model, cond, negative, noise_schedule, x, x_next, step):
        """(log π_θ(x_next | x, c) (b,), μ (b, ...), std) of step ``step`` (b,) of each
        sample: the policy's Gaussian step, float32."""

    def flow_grpo_std(self, noise_schedule, step, like: torch.Tensor) -> torch.Tensor:
        """Flow-GRPO's ``std_dev_t`` of step ``step`` (b,) (``kl_ref`` with ``scale: flow_grpo``),
        broadcastable to ``like``; only a ``flow_matching`` family has one."""
        raise ValueError(f"{type(self).__name__}'s steps have no Flow-GRPO std (it is not a flow-matching family)")

    def predict_velocity(self, model, cond, x: torch.Tensor, sigma: torch.Tensor, autocast=None) -> torch.Tensor:
        """The conditional velocity v_θ(x, σ) of ``model`` at noise level σ (b,), without guidance,
        float32; only a ``flow_matching`` family has one."""
        raise ValueError(f"{type(self).__name__} has no velocity field (it is not a flow-matching family)")

    @abc.abstractmethod
    def sample_with_noise(self, model, cond, negative, noise, deterministic: bool, autocast=None) -> torch.Tensor:
        """Final latents from ``noise`` (n, T+1, ...), with the trained sampler or the
        deterministic one."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The family's media in [0, 1], float32: images (B, 3, H, W) or videos (B, T, 3, H, W)."""

    def check_memory(self, batch_size: int, device) -> None:
        """Refuse (one line) a sampling batch that cannot fit; nothing by default."""

    # ------------------------------------------------------------------ evaluation
    def eval_grid(self, columns: list[torch.Tensor], labels: list[str], captions: list[list[str]]) -> torch.Tensor:
        """The evaluation figure: one captioned cell per item, the columns (base, tuned) side by side."""
        from rlprox.images import caption_cells

        return caption_cells(columns, labels, captions)

    # ------------------------------------------------------------------ base model and export
    def load_base_denoiser(self, path, dtype) -> torch.nn.Module:
        """A frozen copy of the base denoiser (full fine-tuning's base-vs-tuned evaluation)."""
        return type(self.denoiser).from_pretrained(str(path), subfolder=self.denoiser_name, torch_dtype=dtype)

    @abc.abstractmethod
    def save_lora(self, out_dir: Path, model) -> None:
        """The LoRA adapter in the format the pipeline class's ``load_lora_weights`` reads."""

    def save_full(self, out_dir: Path, path, model) -> None:
        """The whole pipeline with the tuned denoiser (``save_pretrained``)."""
        pipe = type(self).load(path, self.sampling, self.options).pipe
        setattr(pipe, self.denoiser_name, copy.deepcopy(model).float())
        pipe.save_pretrained(str(out_dir))

    def load_hint(self, out_dir: Path, base: str, lora: bool) -> str:
        """The diffusers call that loads an export."""
        cls = self.pipeline_classes[0]
        if lora:
            return f'{cls}.from_pretrained("{base}").load_lora_weights("{out_dir}")'
        return f'{cls}.from_pretrained("{out_dir}")'


# ----------------------------------------------------------------------------- registry

ADAPTERS = Registry(
    "pipeline adapter",
    lazy={
        "StableDiffusionPipeline": "rlprox.models.pipelines.sd",
        "StableDiffusion3Pipeline": "rlprox.models.pipelines.sd3",
        "FluxPipeline": "rlprox.models.pipelines.flux",
        "QwenImagePipeline": "rlprox.models.pipelines.qwen_image",
        "WanPipeline": "rlprox.models.pipelines.wan",
    },
)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Register ``cls`` for each diffusers pipeline class it names (usable as a decorator)."""
    if not cls.pipeline_classes:
        raise RegistryError(f"adapter {cls.__name__} names no pipeline_classes")
    for name in cls.pipeline_classes:
        ADAPTERS.register(name, cls)
    return cls


def adapter_for_class(class_name: str) -> type[Adapter]:
    """The adapter registered for a diffusers pipeline class; ValueError naming the ones there are."""
    if class_name in ADAPTERS:
        return ADAPTERS[class_name]
    raise ValueError(f"no adapter for {class_name} (adapters: {', '.join(ADAPTERS.names())}; or loop.adapter)")


def family_options() -> dict[str, type]:
    """{pipeline class: its adapter's Options} for every registered family (``--help-recipe``)."""
    return {name: ADAPTERS[name].Options for name in ADAPTERS.names()}


def adapter_from_spec(spec: str, class_name: str | None = None) -> type[Adapter]:
    """An adapter class named as ``"module:Class"`` (chosen over the registered one); a
    RegistryError when it is no ``Adapter`` or does not serve ``class_name`` (when known)."""
    cls = resolve_object(spec, "pipeline adapter")
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise RegistryError(f"{spec} is not a subclass of rlprox.models.pipelines.Adapter")
    if class_name is not None and class_name not in cls.pipeline_classes:
        served = ", ".join(cls.pipeline_classes) or "no pipeline class"
        raise RegistryError(f"{spec} serves {served}, not {class_name}")
    return cls


def pipeline_class(path, hub: bool = False) -> str | None:
    """The ``_class_name`` in a pipeline folder's model_index.json; None when ``path`` is not
    a local pipeline folder, unless ``hub``: then a hub id's index is read from the cache (no
    download under HF_HUB_OFFLINE), None when that fails too."""
    import json

    index = Path(path) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name")
    if not hub or Path(path).exists():
        return None
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notices about diffusers' own arguments
            warnings.simplefilter("ignore")
            return DiffusionPipeline.load_config(str(path)).get("_class_name")
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- helpers of the families


def read_config(path, subfolder: str) -> dict | None:
    """A component's config.json in a local pipeline folder; None when there is none."""
    import json

    config = Path(path) / subfolder / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def quiet_loading() -> None:
    """Loading bars off: they would drown a run's one-line errors."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def with_autocast(autocast):
    return autocast() if autocast is not None else contextlib.nullcontext()


def latent_side(pipe, sampling: Sampling, default: int, multiple: int = 1) -> int:
    """The latent side for ``sampling.resolution`` pixels (``default`` when unset): pixels over
    the VAE's downsampling factor, which must divide them (times ``multiple``, the patch size)."""
    if sampling.resolution is None:
        return default
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if sampling.resolution % (scale * multiple):
        raise RecipeError(
            "loop.resolution",
            f"{sampling.resolution} px is not a multiple of {scale * multiple} "
            f"(the VAE's factor {scale}{f' × patch size {multiple}' if multiple > 1 else ''})",
        )
    return sampling.resolution // scale
