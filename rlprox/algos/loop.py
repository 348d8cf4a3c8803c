"""LOOP: leave-one-out PPO fine-tuning of a diffusers generative pipeline
(Gupta et al., "A Simple and Effective Reinforcement Learning Method for Text-to-Image
Diffusion Fine-tuning", arXiv 2503.00897).

Each denoising step is a Gaussian policy π_θ(x_{t−1} | x_t, c), given by the model family's
adapter (rlprox/models/pipelines/: a DDIM(η) step for UNet families, a flow-matching SDE or CPS
step on a window of steps for transformer families). The adapter encodes prompts, samples,
re-evaluates a step's log-prob and decodes; the trainer names no family and calls no pipeline
class itself. Per iteration, each process:

    COLLECT    P prompts × K samples each with the family's stochastic sampler, noise from
               the engine's per-rank generator (``shared_initial_noise``: one x_T per prompt);
               every latent and log π_old kept (a ``Rollout``). Samples are decoded and scored
               in a worker thread while the next batch is denoised.
    ADVANTAGE  leave-one-out within each prompt's K samples (LOOP eq. 5):
                   A_{p,k} = r_{p,k} − 1/(K−1)·Σ_{j≠k} r_{p,j}
               or DDPO's per-prompt reward statistics, group normalisation (GRPO) or batch
               normalisation; optionally normalised over the batch; clipped to ±adv_clip.
    UPDATE     update_epochs × minibatches × a random subset of the trained steps
               (timestep_fraction): the PPO clipped surrogate on the per-step ratio
                   ρ_t = exp(log π_θ(x_{t−1}|x_t,c) − log π_old(x_{t−1}|x_t,c)),
                   L = −E[min(ρ_t·A, clip(ρ_t, 1−ε, 1+ε)·A)]
               with the trajectory's A at every trained step; the gradients of all
               trained steps of a minibatch are accumulated into one optimizer step
               (``micro_steps``) by the engine's one step helper.

Options of every family: a KL to the base model (the ``kl_ref`` regularizer on the step's
Gaussian means, Flow-GRPO's term), an EMA of the trained weights for evaluation and export
(``ema_decay``), gradient checkpointing, a ``run.frozen_dtype`` base under fp32 LoRA adapters.

Settings of this one trainer reach the related methods: DDPO = ``advantage:
prompt_stats``; REINFORCE with a leave-one-out baseline = ``advantage: loo`` with one
optimizer step per round (ρ ≡ 1); GRPO-style = ``advantage: group_norm`` (Flow-GRPO's
options: ``advantage_std: batch``, ``drop_zero_advantage``, ``timestep_subset: first``,
kl_ref's ``scale: flow_grpo``; Flow-GRPO-Fast: ``shared_initial_noise`` with a random SDE
window); Flow-DPPO = ``trust_region: kl``. ``objective: nft`` replaces the UPDATE above by
DiffusionNFT's likelihood-free forward-process loss on the old policy's ODE samples
(``_nft_loss``, ``objectives.nft_loss``; docs/nft.md), everything else unchanged.

The denoiser (UNet or transformer) is trained (LoRA through peft by default, or fully); the
VAE and text encoders are frozen. The K copies of a prompt stay on the process that sampled them, so the
leave-one-out baseline needs no communication; DDPO's per-prompt statistics and batch normalisation
gather the rewards of all processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Optional

import numpy as np
import torch

from rlprox import objectives
from rlprox.algos import TrainerSpec, register_trainer
from rlprox.errors import RecipeError, RegistryError
from rlprox.models.pipelines import (
    FORMER_SECTION_KEYS,
    Adapter,
    Sampling,
    adapter_for_class,
    adapter_from_spec,
    family_options,
    pipeline_class,
)
from rlprox.prompts import read_prompt_file
from rlprox.rewards import RewardSpec, build_reward

if TYPE_CHECKING:
    from rlprox.prox.attach import LossTerms
    from rlprox.recipe import Recipe
    from rlprox.runtime import EvalRequest, EvalShard, Runtime


@dataclass
class LoraSpec:
    """LoRA adapters on the denoiser (UNet or transformer, peft)."""

    rank: int = 4  # r
    alpha: float = 4.0  # scale α/r
    # module names to adapt; empty: the family's attention projections (its adapter's lora_targets)
    target_modules: list[str] = field(default_factory=list)


@dataclass
class NFTSpec:
    """DiffusionNFT's objective (``loop.objective: nft``): see ``objectives.nft_loss``."""

    # β, the mixing coefficient of the implicit policies v⁺ = β·v_θ + (1−β)·v_old and v⁻ = (1+β)·v_old − β·v_θ
    # (a step size toward the reward, not a KL weight; the KL to the base is the kl_ref regularizer)
    mix: float = 1.0
    ode: bool = True  # the old policy samples with the ODE (the paper's; false: the family's stochastic steps)
    adaptive_weight: bool = True  # divide each sample's x0 error by its mean absolute x0 error (no gradient)
    # the old (sampling) policy after each round: θ_old ← d·θ_old + (1−d)·θ with d = 0 before old_decay_start
    # optimizer steps, then min((steps − old_decay_start)·old_decay_rate, old_decay_max); the official
    # defaults (decay_type 1) are 0, 0.001, 0.5; its decay_type 2 (OCR) is 75, 0.0075, 0.999
    old_decay_start: int = 0  # optimizer steps before θ_old starts to lag (d = 0: θ_old = θ after each round)
    old_decay_rate: float = 0.001  # d's growth per optimizer step after old_decay_start
    old_decay_max: float = 0.5  # d's ceiling


@dataclass
class LoopConfig:
    """LOOP hyperparameters. "per process" counts are multiplied by the process count."""

    # the old keys of this section, for one release: old -> new (a dotted new key is a family option)
    RENAMED: ClassVar[dict[str, str]] = {
        "clip_range": "clip_coef",
        "num_inner_epochs": "update_epochs",
        "train_batch_size": "minibatch_size",
        **{key: f"sampling.{key}" for key in FORMER_SECTION_KEYS},
    }

    # the diffusers pipeline to tune: a local folder, a hub id (offline cache) or zoo:NAME; its model_index.json
    # names the pipeline class, which picks the family's adapter
    pipeline: str = "zoo:digits-sd"
    # a family adapter of one's own, "module:Class" (a rlprox.models.pipelines.Adapter); "": the one registered
    # for the pipeline's class
    adapter: str = ""
    # the family's own sampling options, checked by its adapter (an option of another family is refused);
    # each family's are listed below
    sampling: dict = field(default_factory=dict, metadata={"variants": family_options})
    # a named set: "digits" (the 50 digits-world prompts "a <colour> <digit>"), "digits-paraphrased" (700:
    # 14 phrasings of each, so a prompt recurs rarely), or either with "-train" (40 of the 50 (digit, colour)
    # pairs) or "-test" (the other 10, every phrasing); a .txt file (one per line, UTF-8); or "module:function"
    # returning (prompts, metadata)
    prompts: str = "digits-train"
    # prompts for evaluation, the same kinds; "": a "-train" set's "-test" partner (pairs the tuned model never
    # trained on), else the training prompts
    eval_prompts: str = ""
    num_samples_per_prompt: int = 4  # K, samples per prompt (>= 2 for the leave-one-out baseline)
    prompts_per_iteration: int = 16  # P, prompts sampled per iteration, per process
    num_steps: int = 20  # denoising steps T
    max_sequence_length: int = 256  # text tokens per prompt for encoders that take a length (T5; SD's CLIP: 77)
    resolution: int | None = None  # image side in pixels (a multiple of the VAE's factor); unset: the model's own
    guidance_scale: float = 1.0  # classifier-free guidance g (1: none)
    sample_batch_size: int = 16  # samples denoised together in one sampling batch, per process
    # Flow-GRPO-Fast's same_latent: the K samples of a prompt start from one x_T, drawn per group, so that
    # outside the SDE window (ODE steps) a group shares one path and branches only inside it; flow-matching
    # families only (DDIM(η) steps are stochastic everywhere)
    shared_initial_noise: bool = False
    # the advantage of a sample: loo (leave-one-out over its prompt's K samples, LOOP), prompt_stats (DDPO's
    # per-prompt reward statistics), group_norm (GRPO: the group's mean and std), batch_norm (over all processes)
    advantage: Literal["loo", "prompt_stats", "group_norm", "batch_norm"] = "loo"
    # the update: ppo (the clipped surrogate on each SDE step's likelihood ratio: LOOP, DDPO, GRPO) or nft
    # (DiffusionNFT: flow-matching regression on the old policy's clean samples, noised afresh, toward the
    # implicit positive policy and away from the negative; no likelihoods; flow-matching families only)
    objective: Literal["ppo", "nft"] = "ppo"
    nft: NFTSpec = field(default_factory=NFTSpec)  # objective nft's options
    # group_norm's divisor: each group's own reward std (group, GRPO) or the std of every reward of the round over
    # all processes (batch: Flow-GRPO's global_std); the mean is the group's either way
    advantage_std: Literal["group", "batch"] = "group"
    # leave the samples whose advantage is exactly 0 (a group with no reward spread) out of the update, as
    # Flow-GRPO does; the minibatch count stays, so minibatches shrink (reward/dropped_zero_adv counts them)
    drop_zero_advantage: bool = False
    normalize_advantages: bool = False  # after the group advantage, divide by the batch std (all processes)
    adv_clip: float = 5.0  # advantages clipped to ±adv_clip
    clip_coef: float = 1e-4  # PPO ε on the per-step ratio (DDPO / Flow-GRPO: clip_range)
    # objective ppo's trust region: clip (the ratio clipped to [1−ε, 1+ε]) or kl (Flow-DPPO: the ratio unclipped,
    # a sample's step masked when its exact Gaussian KL to the old step exceeds kl_threshold while the update
    # moves it further away; flow-matching families)
    trust_region: Literal["clip", "kl"] = "clip"
    kl_threshold: float = 0.0  # trust_region kl: δ, on the per-element KL mean_i (μ_θ − μ_old)_i² / (2·std²)
    update_epochs: int = 1  # passes over each round's samples (DDPO / Flow-GRPO: num_inner_epochs)
    # samples per training minibatch (one optimizer step), per process (DDPO / Flow-GRPO: train_batch_size)
    minibatch_size: int = 16
    # fraction of the trained steps (all T, or the sde window's) trained per sample: int(T' × fraction), at least 1
    timestep_fraction: float = 1.0
    # which of them: a random subset per sample and minibatch (random, DDPO) or the first ones in order (first,
    # Flow-GRPO: with 10 steps and 0.99, steps 0-8, never the last)
    timestep_subset: Literal["random", "first"] = "random"
    # trained steps of a minibatch evaluated in one denoiser pass (a batch of minibatch_size × this):
    # fewer, larger passes for the same gradient; must divide the steps trained per sample
    steps_per_pass: int = 1
    prompt_stats_buffer_size: int = 32  # prompt_stats: rewards kept per prompt
    prompt_stats_min_count: int = 16  # prompt_stats: below this many, use the batch's mean/std
    finetune: Literal["lora", "full"] = "lora"  # train LoRA adapters (peft) or every denoiser weight
    lora: LoraSpec = field(default_factory=LoraSpec)  # the LoRA adapters (finetune: lora)
    gradient_checkpointing: bool = False  # recompute the denoiser's activations in backward (memory for time)
    # an EMA of the trained weights, updated after each round's update, θ̄ ← d·θ̄ + (1−d)·θ with
    # d = min(ema_decay, (1+n)/(10+n)) at the n-th update; evaluation and export use it. 0: off.
    # Rollouts always sample the live policy (the PPO ratio needs π_old = the sampler).
    ema_decay: float = 0.0
    score_in_background: bool = True  # decode and score batch b while batch b+1 is denoised
    eval_base: bool = True  # evaluation also samples the base model (same prompts and noise)
    eval_deterministic: bool = True  # evaluation also samples deterministically (DDIM η = 0 / the flow ODE)
    eval_grid_size: int = 16  # items shown in the base-vs-tuned sample grid


def trained_timesteps(num_trainable: int, fraction: float) -> int:
    """Steps trained per sample and minibatch: ``fraction`` of the ``num_trainable`` steps, rounded down
    as DDPO and Flow-GRPO do (int(T·f)), at least one."""
    return max(1, int(num_trainable * fraction))


@dataclass(frozen=True)
class LoopSetup:
    """What a LOOP recipe resolves to before any weights load: made once by ``validate`` and
    handed to the trainer's constructor."""

    adapter: type[Adapter] | None  # the family's adapter class; None: a hub id whose class is known once it loads
    sampling: Sampling  # the options every family takes
    options: Any  # the family's options (its adapter's Options), resolved; None with adapter None
    reward: Any  # the reward section, its names and options checked
    prompts: tuple[list[str], list[dict]]  # training prompts and their metadata
    eval_prompts: tuple[list[str], list[dict]]  # evaluation prompts and their metadata
    eval_reward: Any = None  # the eval_reward section (None: evaluation scores with the reward)


def _resolve_adapter(cfg: LoopConfig, class_name: str | None) -> type[Adapter] | None:
    """The adapter class: ``loop.adapter``'s, else the one registered for ``class_name``."""
    try:
        if cfg.adapter:
            return adapter_from_spec(cfg.adapter, class_name)
        return None if class_name is None else adapter_for_class(class_name)
    except (ValueError, RegistryError) as err:
        raise RecipeError("loop.adapter" if cfg.adapter else "loop.pipeline", str(err)) from None


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


def _pipeline_class(spec: str) -> str | None:
    """The pipeline class that ``loop.pipeline`` names, read from config files only; None for a
    hub id missing from the offline cache. A RecipeError for a folder that is missing or is not a
    diffusers pipeline."""
    from rlprox.zoo.build import PIPELINE_CLASSES, check_spec

    if spec.startswith("zoo:"):
        try:
            check_spec(spec, tuple(PIPELINE_CLASSES))
        except ValueError as err:
            raise RecipeError("loop.pipeline", str(err)) from None
        return PIPELINE_CLASSES[spec[4:]]
    path = Path(spec)
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise RecipeError("loop.pipeline", f"{spec} is a folder but not a diffusers pipeline (no model_index.json)")
    if path.exists() and not path.is_dir():
        raise RecipeError("loop.pipeline", f"{spec} is a file, not a diffusers pipeline folder")
    if not path.exists() and not HUB_ID.fullmatch(spec):
        raise RecipeError("loop.pipeline", f"no pipeline folder at {spec} (nor a hub id, nor zoo:NAME)")
    return pipeline_class(spec, hub=True)


def resolve_options(cfg: LoopConfig, adapter: type[Adapter] | None) -> tuple[Sampling, Any]:
    """(the shared sampling options, the family's) for ``adapter``'s family."""
    sampling = Sampling(cfg.num_steps, cfg.guidance_scale, cfg.resolution, cfg.max_sequence_length)
    return sampling, (None if adapter is None else adapter.resolve_options(sampling, cfg.sampling))


def validate(recipe: "Recipe", scoring: bool = True) -> LoopSetup:
    """The section's cross-field checks, then everything it names resolved without loading
    weights (the pipeline's family from its model_index.json, the family's options, the
    model's config files, the reward's names unless not ``scoring``, the prompts): the
    ``LoopSetup`` the trainer is built from."""
    cfg = recipe.loop
    if cfg.num_samples_per_prompt < 2 and cfg.advantage in ("loo", "group_norm"):
        raise RecipeError(
            "loop.num_samples_per_prompt",
            f"must be >= 2 for the {'leave-one-out baseline' if cfg.advantage == 'loo' else 'group statistics'} "
            f"(got {cfg.num_samples_per_prompt})",
        )
    if not 0 < cfg.timestep_fraction <= 1:
        raise RecipeError("loop.timestep_fraction", f"must be in (0, 1] (got {cfg.timestep_fraction})")
    if cfg.advantage_std != "group" and cfg.advantage != "group_norm":
        raise RecipeError(
            "loop.advantage_std", f"is group_norm's divisor; advantage {cfg.advantage} has none (remove it)"
        )
    if cfg.drop_zero_advantage and cfg.advantage not in ("loo", "group_norm"):
        raise RecipeError(
            "loop.drop_zero_advantage",
            f"drops the groups with no reward spread, whose loo / group_norm advantage is 0; advantage "
            f"{cfg.advantage} gives such samples a non-zero advantage",
        )
    if cfg.clip_coef <= 0 or cfg.adv_clip <= 0:
        raise RecipeError("loop.clip_coef" if cfg.clip_coef <= 0 else "loop.adv_clip", "must be > 0")
    if cfg.guidance_scale < 1:
        raise RecipeError("loop.guidance_scale", f"must be >= 1 (got {cfg.guidance_scale})")
    samples = cfg.num_samples_per_prompt * cfg.prompts_per_iteration
    if samples % cfg.minibatch_size:
        raise RecipeError(
            "loop.minibatch_size",
            f"{cfg.minibatch_size} does not divide the {samples} samples "
            "per iteration (num_samples_per_prompt × prompts_per_iteration)",
        )
    if cfg.finetune == "lora" and cfg.lora.rank <= 0:
        raise RecipeError("loop.lora", f"rank must be > 0 (got {cfg.lora.rank})")
    if not 0 <= cfg.ema_decay < 1:
        raise RecipeError("loop.ema_decay", f"must be in [0, 1) (0: no EMA) (got {cfg.ema_decay})")
    if cfg.ema_decay and recipe.run.grad_sync == "fsdp":
        raise RecipeError("loop.ema_decay", "an EMA of FSDP-sharded weights is not supported; use grad_sync ddp")
    if cfg.resolution is not None and cfg.resolution < 8:
        raise RecipeError("loop.resolution", f"must be >= 8 pixels (got {cfg.resolution})")
    if cfg.max_sequence_length < 1:
        raise RecipeError("loop.max_sequence_length", f"must be >= 1 (got {cfg.max_sequence_length})")
    adapter = _resolve_adapter(cfg, _pipeline_class(cfg.pipeline))
    _check_kl_scale(recipe, adapter)
    _check_nft(recipe, adapter)
    _check_trust_region(recipe, adapter)
    _check_shared_noise(recipe, adapter)
    sampling, options = resolve_options(cfg, adapter)
    if adapter is not None and not cfg.pipeline.startswith("zoo:"):
        adapter.check_config(cfg.pipeline, sampling, options)
    if scoring:
        media = None if adapter is None else adapter.media
        for section in ("reward", "eval_reward"):
            if section == "eval_reward" and recipe.eval_reward is None:
                continue
            try:
                build_reward(getattr(recipe, section), check_only=True, media=media)
            except (ValueError, RegistryError) as err:
                raise RecipeError(section, str(err)) from None
    train = load_prompts(cfg.prompts)
    evaluation = load_prompts(eval_prompt_source(cfg.prompts, cfg.eval_prompts), "loop.eval_prompts")
    return LoopSetup(adapter, sampling, options, recipe.reward, train, evaluation, recipe.eval_reward)


def _check_trust_region(recipe: "Recipe", adapter: type[Adapter] | None) -> None:
    """``trust_region: kl`` needs Gaussian flow-matching steps and a threshold; clip needs no threshold."""
    cfg = recipe.loop
    if cfg.trust_region == "clip":
        if cfg.kl_threshold:
            raise RecipeError("loop.kl_threshold", "is trust_region kl's δ; with trust_region clip remove it")
        return
    if cfg.objective == "nft":
        raise RecipeError("loop.trust_region", "objective nft has no likelihood ratio to keep in a trust region")
    if adapter is not None and not adapter.flow_matching:
        raise RecipeError(
            "loop.trust_region", f"kl masks flow-matching SDE/CPS steps by their KL; {adapter.__name__}'s are not"
        )
    if not cfg.kl_threshold > 0:
        raise RecipeError("loop.kl_threshold", f"trust_region kl needs δ > 0 (got {cfg.kl_threshold})")


def _check_shared_noise(recipe: "Recipe", adapter: type[Adapter] | None) -> None:
    """``shared_initial_noise`` needs the PPO sampler of a flow-matching family (ODE steps outside its window)."""
    cfg = recipe.loop
    if not cfg.shared_initial_noise:
        return
    if cfg.objective == "nft":
        raise RecipeError(
            "loop.shared_initial_noise", "objective nft samples with its own sampler, not the SDE window's (remove it)"
        )
    if adapter is not None and not adapter.flow_matching:
        raise RecipeError(
            "loop.shared_initial_noise",
            f"a group shares its path up to a flow-matching SDE window; {adapter.__name__}'s steps are all "
            "stochastic (remove it)",
        )


def _check_nft(recipe: "Recipe", adapter: type[Adapter] | None) -> None:
    """``objective: nft`` needs a flow-matching family, no guidance, whole weights and its own options in range."""
    cfg = recipe.loop
    if cfg.objective != "nft":
        return
    if adapter is not None and not adapter.flow_matching:
        raise RecipeError(
            "loop.objective",
            f"nft regresses a flow-matching velocity; {adapter.__name__}'s denoiser is not one (use objective ppo)",
        )
    if cfg.guidance_scale != 1:
        raise RecipeError(
            "loop.guidance_scale", f"objective nft samples and trains unguided: set 1 (got {cfg.guidance_scale})"
        )
    if recipe.run.grad_sync == "fsdp":
        raise RecipeError("loop.objective", "nft keeps whole old-policy weights; FSDP shards them: use grad_sync ddp")
    if not cfg.nft.mix > 0:
        raise RecipeError("loop.nft.mix", f"must be > 0 (got {cfg.nft.mix})")
    if not 0 <= cfg.nft.old_decay_max < 1 or cfg.nft.old_decay_rate < 0 or cfg.nft.old_decay_start < 0:
        raise RecipeError("loop.nft", "old_decay_max must be in [0, 1), old_decay_rate and old_decay_start >= 0")


def _check_kl_scale(recipe: "Recipe", adapter: type[Adapter] | None) -> None:
    """A ``kl_ref`` with ``scale: flow_grpo`` needs flow-matching SDE/CPS steps (their dt)."""
    for i, entry in enumerate(recipe.regularizers):
        if not (isinstance(entry, dict) and entry.get("type") == "kl_ref" and entry.get("scale") == "flow_grpo"):
            continue
        if recipe.loop.objective == "nft":
            raise RecipeError(
                f"regularizers[{i}].scale", "objective nft has no SDE steps to scale: kl_ref takes scale exact there"
            )
        if adapter is not None and not adapter.flow_matching:
            raise RecipeError(
                f"regularizers[{i}].scale",
                f"flow_grpo rescales a flow-matching step's KL by its dt; {adapter.__name__}'s steps have none "
                "(use scale exact)",
            )


# ----------------------------------------------------------------------------- prompts


def eval_prompt_source(prompts: str, eval_prompts: str) -> str:
    """What evaluation samples: ``eval_prompts``, else the held-out partner of a named "-train" set
    ("digits-train" → "digits-test"), else the training prompts."""
    from rlprox.zoo.data import PROMPT_SETS

    if eval_prompts:
        return eval_prompts
    partner = prompts.removesuffix("-train") + "-test"
    return partner if prompts.endswith("-train") and partner in PROMPT_SETS else prompts


def load_prompts(spec: str, key: str = "loop.prompts") -> tuple[list[str], list[dict]]:
    """(prompts, metadata) from a named set (rlprox.zoo.data.PROMPT_SETS), a text file, or
    "module:function"; a RecipeError naming ``key`` when the source fails or gives no prompt."""
    from rlprox.zoo.data import PROMPT_SETS

    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]()
    if ":" in spec:
        from rlprox.registry import resolve_object

        try:
            out = resolve_object(spec, "prompt source")()
        except RegistryError as err:
            raise RecipeError(key, str(err)) from None
        prompts, metadata = out if isinstance(out, tuple) else (out, [{} for _ in out])
        prompts, metadata = list(prompts), list(metadata)
    else:
        if not Path(spec).is_file():
            raise RecipeError(key, f"not a prompt set ({', '.join(PROMPT_SETS)}) nor a prompt file: {spec}")
        try:
            prompts = read_prompt_file(spec)
        except ValueError as err:
            raise RecipeError(key, str(err)) from None
        metadata = [{} for _ in prompts]
    if not prompts:
        raise RecipeError(key, f"{spec} gives no prompt")
    if len(metadata) != len(prompts):
        raise RecipeError(key, f"{spec} gives {len(prompts)} prompts but {len(metadata)} metadata dicts")
    return prompts, metadata


class TimestepSlice(NamedTuple):
    """What one ``loss`` call trains: denoising step ``step[i]`` of sample ``samples[i]``."""

    batch: "Rollout"  # the round's samples
    samples: torch.Tensor  # (b,) indices into the batch: this minibatch's samples
    step: torch.Tensor  # (b,) the denoising step trained for each of them


class PromptStats:
    """DDPO's per-prompt reward statistics: a deque of the last ``buffer_size`` rewards
    per prompt; a prompt with fewer than ``min_count`` uses the whole batch's mean/std."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, collections.deque] = {}
        self.tracked_fraction = 0.0  # of the last update's samples, those baselined by their own prompt's rewards

    def update(self, prompts: list[str], rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add the rewards, return each sample's (mean, std) baseline."""
        finite = np.isfinite(rewards)
        batch_mean = rewards[finite].mean() if finite.any() else 0.0
        batch_std = rewards[finite].std() if finite.any() else 1.0
        for p, r in zip(prompts, rewards):
            if np.isfinite(r):
                self.stats.setdefault(p, collections.deque(maxlen=self.buffer_size)).append(float(r))
        mean, std = np.empty(len(prompts)), np.empty(len(prompts))
        tracked = 0
        for i, p in enumerate(prompts):
            seen = self.stats.get(p, ())
            if len(seen) < self.min_count:
                mean[i], std[i] = batch_mean, batch_std
            else:
                mean[i], std[i] = np.mean(seen), np.std(seen)
                tracked += 1
        self.tracked_fraction = tracked / max(len(prompts), 1)
        return mean, std

    def state_dict(self) -> dict:
        return {p: list(d) for p, d in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {p: collections.deque(v, maxlen=self.buffer_size) for p, v in state.items()}


# ----------------------------------------------------------------------------- the trainer


@dataclass(frozen=True)
class Rollout:
    """One round's samples on this process; prompt group p is samples p·K .. p·K+K−1."""

    latents: torch.Tensor  # (B, T+1, ...) every latent of each trajectory
    log_probs: torch.Tensor  # (B, T) log π_old of each step; 0 at untrained (ODE) steps
    noise_schedule: torch.Tensor  # DDIM timesteps (T,) or flow σ's (T+1,): what the update re-evaluates steps with
    cond: dict[str, torch.Tensor]  # the conditioning, (B, ...) per key (embeds, pooled, ...)
    rewards: torch.Tensor  # (B,) this process's rewards (NaN where a reward gave none)
    prompts: list[str]  # (B,)
    reward_info: dict[str, float]  # the reward's own stats, averaged over sampling batches
    advantages: torch.Tensor | None = None  # (B,) set by ``advantages`` (a new Rollout); None before
    means: torch.Tensor | None = None  # (B, T, ...) each step's mean μ_old (trust_region: kl only)
    # (B, T') each sample's trained steps where the sampler draws them (a random SDE window); None: the adapter's
    trained_steps: torch.Tensor | None = None


class LOOP:
    """collect / advantages / minibatches / loss / evaluate / export for the engine."""

    curve = ("progress/images", "reward/mean")
    stat_reductions = {
        "progress/images": "mean",
        "reward/nan_count": "sum",
        "reward/zero_std_groups": "sum",
        "reward/dropped_zero_adv": "sum",
    }

    def __init__(self, recipe: "Recipe", runtime: "Runtime", loss_terms: "LossTerms", setup: LoopSetup):
        from rlprox.zoo.build import resolve_path

        cfg = self.cfg = recipe.loop
        self.recipe, self.runtime, self.loss_terms = recipe, runtime, loss_terms
        self.device = runtime.device
        self.path = resolve_path(cfg.pipeline)
        adapter, options = setup.adapter, setup.options
        if adapter is None:  # a hub id: its class is known once it is in the cache
            class_name = pipeline_class(self.path, hub=True)
            if class_name is None:
                raise RecipeError(
                    "loop.pipeline",
                    f"no diffusers pipeline {cfg.pipeline!r} in the offline cache (no model_index.json); no downloads "
                    "at run time: give a local folder or a hub id already in the cache",
                )
            adapter = _resolve_adapter(cfg, class_name)
            options = adapter.resolve_options(setup.sampling, cfg.sampling)
        adapter.check_config(self.path, setup.sampling, options)  # a zoo model's folder exists now; no weights yet
        try:
            self.adapter = adapter.load(self.path, setup.sampling, options)
        except RecipeError:
            raise
        except (OSError, ValueError) as err:
            raise RecipeError(
                "loop.pipeline",
                f"cannot load a diffusers pipeline from {cfg.pipeline!r} "
                f"({str(err).strip().splitlines()[0][:160]}); no downloads at "
                "run time: give a local folder or a hub id already in the cache",
            ) from None
        self.adapter.check_memory(cfg.sample_batch_size, self.device)
        self.denoiser = self.adapter.prepare_denoiser(cfg.finetune, cfg.lora, cfg.gradient_checkpointing)
        self.modules = {self.adapter.denoiser_name: self.denoiser}
        # the reference policy's step means, only when a loss term (kl_ref) uses them
        self.needs_reference = loss_terms.needs("ref_mean")
        self.needs_flow_grpo_std = loss_terms.needs("flow_grpo_std")
        self.ema: dict[str, torch.Tensor] | None = None  # name -> θ̄, set by the first after_update
        self.ema_updates = 0
        self.frozen = dict(self.adapter.frozen)
        self.base_denoiser = None  # full fine-tuning: a frozen copy for base-vs-tuned evaluation, built on demand
        self.reward = self.eval_reward = None  # eval_reward: what evaluation scores with
        if runtime.scoring:
            for section in ("reward", "eval_reward"):
                spec = getattr(setup, section)
                if section == "eval_reward" and spec is None:
                    continue
                try:
                    built = build_reward(spec, device=self.device, media=self.adapter.media)
                except (ValueError, RegistryError) as err:
                    raise RecipeError(section, str(err)) from None
                setattr(self, section, built)
            if self.eval_reward is None:
                self.eval_reward = self.reward
        self.prompts, self.metadata = setup.prompts
        self.eval_prompt_list = setup.eval_prompts
        self.prompt_stats = PromptStats(cfg.prompt_stats_buffer_size, cfg.prompt_stats_min_count)
        self.images_seen = 0  # all processes
        # the steps an update draws from: the sampler's trained ones (ppo), or every noise level of the schedule
        # (nft: its forward process noises the clean samples afresh at each)
        self.train_steps = (torch.arange(cfg.num_steps) if cfg.objective == "nft" else self.adapter.trained_steps).to(
            self.device
        )
        self.nft_old: dict[str, torch.Tensor] | None = None  # objective nft: θ_old, set at the first collect
        self.optimizer_steps = 0  # objective nft: the old policy's decay schedule counts them
        per_sample = trained_timesteps(len(self.train_steps), cfg.timestep_fraction)
        if per_sample % cfg.steps_per_pass:
            raise RecipeError(
                "loop.steps_per_pass",
                f"{cfg.steps_per_pass} does not divide the {per_sample} steps trained per sample "
                "(the sde_window's steps × timestep_fraction)",
            )
        self.steps_per_sample = per_sample
        self.micro_steps = per_sample // cfg.steps_per_pass  # loss calls per minibatch
        self.update_epochs = cfg.update_epochs
        self.pool = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlprox-score")
            if cfg.score_in_background
            else None
        )

    # ------------------------------------------------------------------ helpers
    def _denoiser(self):
        return self.runtime.unwrap(self.modules[self.adapter.denoiser_name])

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning (tensors (B, ...)), computed once per distinct prompt (frozen encoders)."""
        unique = list(dict.fromkeys(prompts))
        cond = self.adapter.encode(unique, self.device)
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        return {k: v.index_select(0, index) for k, v in cond.items()}

    def _negative(self, n: int) -> dict[str, torch.Tensor] | None:
        return self.adapter.negative(n, self.device)

    def _score(self, latents: torch.Tensor, prompts: list[str], metadata: list[dict]):
        images = self.adapter.decode(latents)
        rewards, info = self.reward(images, prompts, metadata)
        return rewards.float().cpu(), info

    # ------------------------------------------------------------------ COLLECT
    @torch.no_grad()
    def collect(self) -> Rollout:
        cfg, rng = self.cfg, self.runtime.np_rng
        K, P = cfg.num_samples_per_prompt, cfg.prompts_per_iteration
        chosen = rng.integers(len(self.prompts), size=P)
        prompts = [self.prompts[i] for i in chosen for _ in range(K)]  # group p = samples p·K .. p·K+K−1
        metadata = [self.metadata[i] for i in chosen for _ in range(K)]
        cond = self._embed(prompts)
        denoiser = self.modules[self.adapter.denoiser_name]
        x_T = None
        if cfg.shared_initial_noise:  # one x_T per prompt group, for its K samples
            gen = self.runtime.generator
            x_T = torch.randn((P, *self.adapter.latent_shape), generator=gen, device=gen.device)
            x_T = x_T.to(self.device).repeat_interleave(K, 0)
        batches, pending = [], []
        for start in range(0, len(prompts), cfg.sample_batch_size):
            sl = slice(start, start + cfg.sample_batch_size)
            sample = self._sample_old if cfg.objective == "nft" else self.adapter.sample
            extra = {"keep_means": True} if cfg.trust_region == "kl" else {}
            if x_T is not None:
                extra["x_T"] = x_T[sl]
            traj = sample(
                denoiser,
                {k: v[sl] for k, v in cond.items()},
                self._negative(len(prompts[sl])),
                self.runtime.generator,
                autocast=self.runtime.autocast,
                **extra,
            )
            batches.append(traj)
            final = traj["latents"][:, -1]
            if self.pool is not None:  # score this batch while the next one denoises
                pending.append(self.pool.submit(self._score, final, prompts[sl], metadata[sl]))
            else:
                pending.append(self._score(final, prompts[sl], metadata[sl]))
        scored = [p.result() if isinstance(p, concurrent.futures.Future) else p for p in pending]
        rewards = torch.cat([r for r, _ in scored]).to(self.device)
        info = {k: float(np.mean([i[k] for _, i in scored])) for k in scored[0][1]} if scored and scored[0][1] else {}
        self.images_seen += len(prompts) * self.runtime.world
        return Rollout(
            latents=torch.cat([b["latents"] for b in batches]),
            log_probs=torch.cat([b["log_probs"] for b in batches]),
            noise_schedule=batches[0]["noise_schedule"],
            cond=cond,
            rewards=rewards,
            prompts=prompts,
            reward_info=info,
            means=torch.cat([b["means"] for b in batches]) if cfg.trust_region == "kl" else None,
            trained_steps=torch.cat([b["trained_steps"] for b in batches]) if "trained_steps" in batches[0] else None,
        )

    def _sample_old(self, model, cond, negative, generator, autocast=None) -> dict:
        """Objective nft: clean samples of the old policy θ_old with its sampler (the ODE by default),
        as a one-step trajectory (latents (B, 1, ...): the final latents; no log-probs)."""
        if self.nft_old is None:  # θ_old starts as the initial weights
            self.nft_old = {n: p.detach().float().clone() for n, p in self._trained_parameters().items()}
        ode = self.cfg.nft.ode
        shape = (cond["embeds"].shape[0], *((1,) if ode else self.adapter.noise_shape()[:1]))
        noise = torch.randn((*shape, *self.adapter.latent_shape), generator=generator, device=generator.device)
        with self._swapped_weights(self.nft_old):
            final = self.adapter.sample_with_noise(
                self._denoiser(), cond, negative, noise.to(self.device), ode, autocast=autocast
            )
        return {
            "latents": final[:, None],
            "log_probs": torch.zeros(len(final), 0, device=final.device),
            "noise_schedule": self.adapter.sigmas.to(final.device),
        }

    # ------------------------------------------------------------------ ADVANTAGE
    def advantages(self, batch: Rollout) -> Rollout:
        cfg = self.cfg
        K = cfg.num_samples_per_prompt
        rewards = batch.rewards
        if cfg.advantage == "loo":
            adv = objectives.leave_one_out(rewards.view(-1, K)).view(-1)
        elif cfg.advantage == "group_norm":  # each group's std, or the batch's (Flow-GRPO's global_std)
            std = self._batch_moments(rewards)[1].float() if cfg.advantage_std == "batch" else None
            adv = objectives.group_normalize(rewards.view(-1, K), eps=1e-4 if std is not None else 1e-8, std=std).view(
                -1
            )
        elif cfg.advantage == "prompt_stats":
            prompts, all_rewards = batch.prompts, rewards.cpu().numpy()
            if self.runtime.world > 1:  # the statistics see every process's prompts, in rank order
                from accelerate.utils import gather_object

                pairs = gather_object([(batch.prompts, all_rewards.tolist())])
                prompts = [p for ps, _ in pairs for p in ps]
                all_rewards = np.asarray([r for _, rs in pairs for r in rs])
            mean, std = self.prompt_stats.update(prompts, all_rewards)
            start = self.runtime.rank * len(batch.prompts)
            mine = slice(start, start + len(batch.prompts))
            adv = (rewards.cpu().numpy() - mean[mine]) / (std[mine] + 1e-6)
            adv = torch.as_tensor(np.where(np.isfinite(adv), adv, 0.0), dtype=torch.float32, device=self.device)
        else:  # batch_norm over all processes
            adv = self._batch_normalize(rewards)
        if cfg.advantage in ("loo", "group_norm"):  # a group with no reward spread carries no signal: exactly 0
            adv = torch.where(self._zero_spread(rewards).repeat_interleave(K), torch.zeros_like(adv), adv)
        if cfg.normalize_advantages and cfg.advantage != "batch_norm":
            adv = self._batch_normalize(adv, center=False)
        return dataclasses.replace(batch, advantages=adv.clamp(-cfg.adv_clip, cfg.adv_clip))

    def _zero_spread(self, rewards: torch.Tensor) -> torch.Tensor:
        """(P,) True for the prompt groups whose K rewards are all equal (finite ones; NaNs ignored)."""
        return objectives.zero_spread(rewards.view(-1, self.cfg.num_samples_per_prompt))

    def _batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, unbiased std) of the finite values of ``x`` over all processes, float64 scalars."""
        finite = torch.isfinite(x)
        v = torch.where(finite, x, torch.zeros_like(x)).double()
        s = torch.stack([v.sum(), (v * v).sum(), finite.sum().double()])
        if self.runtime.world > 1:
            s = self.runtime.accelerator.reduce(s, reduction="sum")
        n = s[2].clamp_min(2)
        mean = s[0] / n
        return mean, ((s[1] - n * mean * mean) / (n - 1)).clamp_min(0).sqrt()

    def _batch_normalize(self, x: torch.Tensor, center: bool = True) -> torch.Tensor:
        finite = torch.isfinite(x)
        mean, std = self._batch_moments(x)
        v = torch.where(finite, x, torch.zeros_like(x)).double()
        out = ((v - mean) if center else v) / (std + 1e-8)
        return torch.where(finite, out, torch.zeros_like(out)).float()

    def _kept(self, advantages: torch.Tensor) -> int:
        """Samples an update keeps with ``drop_zero_advantage``: those with a non-zero advantage,
        padded with zero-advantage ones to a multiple of the minibatch count (at least one each),
        so every process takes the same number of optimizer steps."""
        M = len(advantages) // self.cfg.minibatch_size
        n = int((advantages != 0).sum())
        return max(M, -(-n // M) * M)

    # ------------------------------------------------------------------ UPDATE
    def minibatches(self, batch: Rollout, epoch: int):
        """``TimestepSlice``s of each minibatch of samples: a minibatch of ``train_batch_size``
        samples with T' trained steps each is T'/k ``loss`` calls of k = ``steps_per_pass``
        steps per sample (one denoiser pass over b·k items), whose gradients the engine sums
        into one optimizer step (times run.gradient_accumulation_steps). Each sample's steps
        are a random subset of the pipeline's trained steps (all T for DDIM, the sde_window's
        for flow matching, or the sample's own random window's: ``Rollout.trained_steps``), or
        their first ones (``timestep_subset: first``). With ``drop_zero_advantage`` the
        minibatches are as many, each of the kept samples only."""
        cfg, gen = self.cfg, self.runtime.generator
        B = batch.latents.shape[0]
        own = batch.trained_steps  # (B, T') or None: every sample's are self.train_steps (T',)
        T = self.train_steps.shape[0] if own is None else own.shape[1]
        order = torch.randperm(B, generator=gen, device=gen.device).to(self.device)
        size = cfg.minibatch_size
        if cfg.drop_zero_advantage:  # non-zero advantages first, then zero ones to pad, each in random order
            kept = self._kept(batch.advantages)
            zero = (batch.advantages[order] == 0).long()
            order = order[torch.sort(zero, stable=True).indices][:kept]
            order = order[torch.randperm(kept, generator=gen, device=gen.device).to(self.device)]
            size = kept // (B // cfg.minibatch_size)
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            trainable = self.train_steps if own is None else own[idx]  # (T',) or (b, T')
            if cfg.timestep_subset == "first":  # Flow-GRPO: the first steps, in order
                steps = trainable[..., : self.steps_per_sample].expand(len(idx), -1)
            else:  # DDPO: a random subset per sample
                picks = torch.stack([torch.randperm(T, generator=gen, device=gen.device) for _ in range(len(idx))])
                picks = picks.to(self.device)
                steps = trainable[picks] if own is None else trainable.gather(1, picks)
            k = self.cfg.steps_per_pass
            for j in range(0, self.steps_per_sample, k):
                yield TimestepSlice(batch, idx.repeat(k), steps[:, j : j + k].T.reshape(-1))

    def loss(self, item: "TimestepSlice"):
        if self.cfg.objective == "nft":
            return self._nft_loss(item)
        batch, idx, step = item
        cfg = self.cfg
        x_t = batch.latents[idx, step]  # (b, C, H, W)
        x_next = batch.latents[idx, step + 1]
        cond, negative = {k: v[idx] for k, v in batch.cond.items()}, self._negative(len(idx))
        model = self.modules[self.adapter.denoiser_name]
        logp, mean, std = self.adapter.step_distribution(
            model, cond, negative, batch.noise_schedule, x_t, x_next, step
        )  # (b,), (b, ...), std
        old = batch.log_probs[idx, step]
        adv = batch.advantages[idx]
        trust = {}
        if cfg.trust_region == "kl":
            step_kl = objectives.gaussian_step_kl(mean, batch.means[idx, step], std)
            loss, ratio, masked = objectives.kl_masked_surrogate(logp, old, adv, step_kl, cfg.kl_threshold)
            trust = {"policy/step_kl": step_kl.detach().mean(), "policy/masked_frac": masked.float().mean()}
        else:
            loss, ratio = objectives.clipped_surrogate(logp, old, adv, cfg.clip_coef)
        tensors = {"mean": mean, "std": std}
        if self.needs_flow_grpo_std:
            tensors["flow_grpo_std"] = self.adapter.flow_grpo_std(batch.noise_schedule, step, mean)
        if self.needs_reference:  # the reference's step mean at the same x: the base model (LoRA off), no gradient
            with torch.no_grad(), self._base_model() as reference:
                _, tensors["ref_mean"], _ = self.adapter.step_distribution(
                    reference, cond, negative, batch.noise_schedule, x_t, x_next, step
                )
        penalty, penalty_stats = self.loss_terms(**tensors)
        with torch.no_grad():
            stats = {
                "loss/policy": loss.detach(),
                "policy/approx_kl": objectives.kl_k3(old, logp),
                "policy/clip_frac": objectives.clip_fraction(ratio, cfg.clip_coef),
                "policy/ratio_max": ratio.max(),
                "policy/ratio_mean": ratio.mean(),
                **trust,
                **penalty_stats,
            }
        return loss + penalty, stats

    def _nft_loss(self, item: "TimestepSlice"):
        """DiffusionNFT on step ``step``'s noise level t = σ_step: fresh noise ε, x_t = (1−t)·x0 + t·ε
        from the clean sample x0, the old and current velocities there (``objectives.nft_loss``); the
        KL to the base (kl_ref) is the official code's mean (v_θ − v_ref)²."""
        batch, idx, step = item
        cfg, gen = self.cfg, self.runtime.generator
        x0 = batch.latents[idx, -1].float()
        t = batch.noise_schedule[step].float()  # (b,)
        eps = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.device)
        x_t = (1 - t.view(-1, *([1] * (x0.ndim - 1)))) * x0 + t.view(-1, *([1] * (x0.ndim - 1))) * eps
        cond = {k: v[idx] for k, v in batch.cond.items()}
        autocast = self.runtime.autocast
        with torch.no_grad(), self._swapped_weights(self.nft_old):
            v_old = self.adapter.predict_velocity(self._denoiser(), cond, x_t, t, autocast)
        v = self.adapter.predict_velocity(self.modules[self.adapter.denoiser_name], cond, x_t, t)
        r = objectives.nft_optimality(batch.advantages[idx], cfg.adv_clip)
        loss = objectives.nft_loss(
            v, v_old, x0, x_t, t, r, cfg.nft.mix, cfg.nft.adaptive_weight, scale=cfg.adv_clip
        ).float()
        # kl_ref's Gaussian form with std² = ½ is the official KL term, mean (v_θ − v_ref)²
        tensors = {"mean": v, "std": 0.5**0.5}
        if self.needs_reference:
            with torch.no_grad(), self._base_model() as reference:
                tensors["ref_mean"] = self.adapter.predict_velocity(reference, cond, x_t, t, autocast)
        penalty, penalty_stats = self.loss_terms(**tensors)
        with torch.no_grad():
            stats = {
                "loss/policy": loss.detach(),
                "policy/old_deviation": (v.detach() - v_old).pow(2).mean(),  # mean (v_θ − v_old)²
                "policy/optimality_mean": r.mean(),
                **penalty_stats,
            }
        return loss + penalty, stats

    # ------------------------------------------------------------------ LOG
    def iteration_stats(self, batch: Rollout, elapsed: float) -> dict:
        r = batch.rewards.float()
        finite = torch.isfinite(r)
        stats = {
            "reward/mean": float(r[finite].mean()) if finite.any() else float("nan"),
            "reward/std": float(r[finite].std()) if finite.sum() > 1 else float("nan"),
            # prompt groups whose K rewards are all equal (zero advantage under loo / group_norm), all processes
            "reward/zero_std_groups": int(self._zero_spread(r).sum()) if self.cfg.num_samples_per_prompt > 1 else 0,
            "reward/nan_count": int((~finite).sum()),
            "progress/images": self.images_seen,
            "perf/images_per_s": len(r) * self.runtime.world / max(elapsed, 1e-9),
        }
        if self.cfg.drop_zero_advantage and batch.advantages is not None:  # left out of the update, this process
            stats["reward/dropped_zero_adv"] = len(r) - self._kept(batch.advantages)
        if self.cfg.advantage == "prompt_stats":  # how often DDPO's baseline is the prompt's own, not the batch's
            stats["reward/prompt_stats_tracked"] = self.prompt_stats.tracked_fraction
        stats.update({f"reward/{k}": v for k, v in batch.reward_info.items()})
        return stats

    # ------------------------------------------------------------------ EVALUATE
    @torch.no_grad()
    def evaluate(self, request: "EvalRequest") -> "EvalShard":
        """Item i: prompt i mod #prompts with its own fixed noise (seeded by (seed, i)),
        sampled by the tuned model with the trained sampler (DDIM η, or the flow sampler on
        its window) and, per the config, deterministically (DDIM η = 0 / the flow ODE) and by
        the base model with the same noise. Values: reward, base_reward and the deterministic
        sampler's reward_eta0, base_reward_eta0 (DDIM) or reward_ode, base_reward_ode (flow)."""
        from rlprox.images import grid_columns
        from rlprox.runtime import EvalShard

        cfg = self.cfg
        prompts, metadata = (
            (request.prompts, [{} for _ in request.prompts]) if request.prompts else self.eval_prompt_list
        )
        items = range(request.start, request.start + request.num)
        chosen_prompts = [prompts[i % len(prompts)] for i in items]
        chosen_meta = [metadata[i % len(prompts)] for i in items]
        noise = []
        for i in items:
            g = torch.Generator().manual_seed(request.seed * 1_000_003 + i)
            noise.append(torch.randn(self.adapter.noise_shape(), generator=g))
        noise = torch.stack(noise).to(self.device)  # (n, T+1, C, H, W): x_T and each step's z
        cond = self._embed(chosen_prompts)
        values, images = {}, {}
        variants = [("", False)] + ([(self.adapter.deterministic_suffix, True)] if cfg.eval_deterministic else [])
        models = [("", self._denoiser())] + ([("base_", None)] if cfg.eval_base else [])
        for prefix, denoiser in models:
            for suffix, deterministic in variants:
                finals = []
                for start in range(0, len(items), cfg.sample_batch_size):
                    sl = slice(start, start + cfg.sample_batch_size)
                    with self._base_model() if denoiser is None else self._tuned_model() as model:
                        final = self.adapter.sample_with_noise(
                            model,
                            {k: v[sl] for k, v in cond.items()},
                            self._negative(len(noise[sl])),
                            noise[sl],
                            deterministic,
                            autocast=self.runtime.autocast,
                        )
                    finals.append(final)
                latents = torch.cat(finals)
                imgs = self.adapter.decode(latents)
                rewards, _ = self.eval_reward(imgs, chosen_prompts, chosen_meta)
                values[f"{prefix}reward{suffix}"] = rewards.float().cpu().tolist()
                if suffix == "":
                    images[prefix or "tuned"] = imgs.cpu()
        shown = [k for k, i in enumerate(items) if i < cfg.eval_grid_size]
        grid = {}
        if shown:
            prefixes = ["base_", ""] if cfg.eval_base else [""]
            columns = [images[p or "tuned"][shown] for p in prefixes]
            captions = [
                [chosen_prompts[k], "reward " + " | ".join(f"{values[f'{p}reward'][k]:.3g}" for p in prefixes)]
                for k in shown
            ]
            name = "base_vs_tuned" if cfg.eval_base else "tuned"
            grid[name] = self.adapter.eval_grid(columns, [p.rstrip("_") or "tuned" for p in prefixes], captions)
        return EvalShard(
            values=values,
            images=grid,
            grid_cols=grid_columns(min(cfg.eval_grid_size, request.total)),
            info={"prompts": len(prompts)},
        )

    def _tuned_model(self):
        """The tuned denoiser for evaluation and export: with its EMA weights when there is an EMA."""

        @contextlib.contextmanager
        def tuned():
            with self._ema_weights():
                yield self._denoiser()

        return tuned()

    def _base_model(self):
        """The base denoiser: the LoRA model with its adapters off, or (full fine-tuning) a
        frozen copy loaded from the pipeline folder on first use."""
        denoiser = self._denoiser()
        if self.cfg.finetune == "lora":

            @contextlib.contextmanager
            def adapters_off():
                denoiser.disable_adapters()
                try:
                    yield denoiser
                finally:
                    denoiser.enable_adapters()

            return adapters_off()
        if self.base_denoiser is None:
            # the tuned denoiser's dtype: the base runs exactly as the tuned one does (under run.frozen_dtype
            # bfloat16 without autocast, a bf16 copy met fp32 latents)
            dtype = next(denoiser.parameters()).dtype
            with torch.enable_grad():  # a late build never runs under the eval hook's no_grad
                base = self.adapter.load_base_denoiser(self.path, dtype)
            self.base_denoiser = base.to(self.device).eval().requires_grad_(False)
        return contextlib.nullcontext(self.base_denoiser)

    # ------------------------------------------------------------------ EXPORT
    def export(self, out_dir: Path) -> list[Path]:
        """LoRA: the adapter in the diffusers format that the pipeline's
        ``load_lora_weights(out_dir)`` reads; full fine-tuning: the whole pipeline with the
        tuned denoiser (``save_pretrained``). Prints the diffusers call that loads it."""
        out_dir = Path(out_dir)
        lora = self.cfg.finetune == "lora"
        with self._tuned_model() as denoiser:
            if lora:
                self.adapter.save_lora(out_dir, denoiser)
            else:
                self.adapter.save_full(out_dir, self.path, denoiser)
        print(f"load with: {self.adapter.load_hint(out_dir, str(self.path), lora)}")
        return [out_dir / "pytorch_lora_weights.safetensors"] if lora else [out_dir]

    # ------------------------------------------------------------------ EMA
    def after_update(self) -> None:
        """θ̄ ← d·θ̄ + (1−d)·θ over the trained weights, d = min(ema_decay, (1+n)/(10+n)) at the
        n-th update (θ̄ starts at the weights after the first update); nothing without ema_decay.
        Objective nft: then θ_old ← d·θ_old + (1−d)·θ (``NFTSpec``'s schedule of optimizer steps)."""
        cfg = self.cfg
        B = cfg.num_samples_per_prompt * cfg.prompts_per_iteration
        self.optimizer_steps += (
            self.update_epochs * (B // cfg.minibatch_size) // self.recipe.run.gradient_accumulation_steps
        )
        if cfg.objective == "nft" and self.nft_old is not None:
            o = cfg.nft
            steps = self.optimizer_steps - o.old_decay_start
            decay = 0.0 if steps < 0 else min(steps * o.old_decay_rate, o.old_decay_max)
            for name, p in self._trained_parameters().items():
                self.nft_old[name].lerp_(p.detach().float(), 1 - decay)
        if not self.cfg.ema_decay:
            return
        params = self._trained_parameters()
        if self.ema is None:
            self.ema = {n: p.detach().float().clone() for n, p in params.items()}
        else:
            decay = min(self.cfg.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
            for name, p in params.items():
                self.ema[name].lerp_(p.detach().float(), 1 - decay)
        self.ema_updates += 1

    def _trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self._denoiser().named_parameters() if p.requires_grad}

    def _ema_weights(self):
        """The trained weights replaced by their EMA inside the block (when there is one), restored after."""
        return self._swapped_weights(self.ema)

    @contextlib.contextmanager
    def _swapped_weights(self, weights: dict[str, torch.Tensor] | None):
        """The trained weights replaced by ``weights`` (name -> tensor) inside the block, restored
        after; nothing when ``weights`` is None."""
        if weights is None:
            yield
            return
        params = self._trained_parameters()
        live = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(live[name])

    # ------------------------------------------------------------------ STATE
    def state_dict(self):
        tensors = {f"ema.{n}": t for n, t in (self.ema or {}).items()}
        tensors.update({f"nft_old.{n}": t for n, t in (self.nft_old or {}).items()})
        return tensors, {
            "prompt_stats": self.prompt_stats.state_dict(),
            "images_seen": self.images_seen,
            "ema_updates": self.ema_updates,
            "optimizer_steps": self.optimizer_steps,
        }

    def load_state_dict(self, tensors: dict, state: dict) -> None:
        self.prompt_stats.load_state_dict(state.get("prompt_stats", {}))
        self.images_seen = int(state.get("images_seen", 0))
        self.ema_updates = int(state.get("ema_updates", 0))
        ema = {n[len("ema.") :]: t.to(self.device) for n, t in tensors.items() if n.startswith("ema.")}
        self.ema = ema or None
        old = {n[len("nft_old.") :]: t.to(self.device) for n, t in tensors.items() if n.startswith("nft_old.")}
        self.nft_old = old or None
        self.optimizer_steps = int(state.get("optimizer_steps", 0))

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def build(recipe: "Recipe", runtime: "Runtime", loss_terms: "LossTerms") -> LOOP:
    """The trainer from the recipe's ``LoopSetup`` (resolved when the recipe was validated)."""
    return LOOP(recipe, runtime, loss_terms, recipe.setup or validate(recipe, scoring=runtime.scoring))


register_trainer(
    TrainerSpec(
        name="loop",
        build=build,
        # eval_reward: what evaluation scores with, when not the training reward (e.g. a gold reward
        # beside a proxy, or a control trained on noise judged on the real task); None: the reward
        sections={"loop": LoopConfig, "reward": RewardSpec, "eval_reward": Optional[RewardSpec]},
        validate=validate,
        counts=tuple(
            f"loop.{key}"
            for key in (
                "num_samples_per_prompt",
                "prompts_per_iteration",
                "num_steps",
                "sample_batch_size",
                "update_epochs",
                "minibatch_size",
                "prompt_stats_buffer_size",
                "steps_per_pass",
            )
        ),
        minibatches_per_epoch=lambda recipe: (
            recipe.loop.num_samples_per_prompt * recipe.loop.prompts_per_iteration // recipe.loop.minibatch_size
        ),
        description="LOOP / DDPO / REINFORCE-LOO fine-tuning of diffusers text-to-image pipelines",
        loss_inputs=("mean", "ref_mean", "std", "flow_grpo_std"),
        eval_unit="samples",
        eval_flags=("prompts",),
        resume_keys=("loop.finetune",),
    )
)
