"""VA-π: pixel-aligned RL tuning of an autoregressive image generator ("Variational
Policy Alignment for Pixel-Aware Autoregressive Generation", arXiv 2512.19680).

The generator (a LlamaGen GPT over a frozen VQ tokenizer's codes) is the policy. Per
iteration, each process:

    COLLECT    B images x with classes c; z* = VQ.encode(x); ONE teacher-forced pass of
               the GPT on z* (each context token replaced by a uniform random code with
               probability ξ: "noisy context") gives logits for every position; G token
               sequences per image are drawn from those logits, every position
               independently (no free-running rollout), with the engine's per-rank
               generator; their per-token log-probs are π_old.
    SCORE      R = reward(D(ẑ), x): by default −(w_mse·MSE(D(ẑ), x) + w_ssim·(1 − SSIM))
               against the ORIGINAL image (``pixel_reconstruction``; any reward plugin
               receives x as ``metadata[i]["reference"]``).
    ADVANTAGE  normalised within each image's group of G, clipped to ±adv_clip.
    UPDATE     per-token PPO clip on ρ = exp(log π_θ − log π_old) (same context as the
               rollout), mean over tokens and sequences, plus the recipe's loss-side
               regularizers: ``prior_ce`` (β·CE(logits, z*), the ELBO's prior term) and
               optionally ``kl_ref`` (k3 KL to a frozen reference, built only then).
               One optimizer step per epoch: micro-batches accumulate (``micro_steps``).

``sample_train_mode`` / ``update_train_mode`` say whether dropout and class-label
dropout are active while sampling and while updating; the default (both off) makes ρ ≡ 1
before the first update. (VA-π's released code samples in eval mode and trains in train
mode: set ``update_train_mode: true`` for that.)
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from rlprox import objectives
from rlprox.algos import TrainerSpec, register_trainer
from rlprox.errors import RecipeError, RegistryError
from rlprox.models.llamagen import group_sample, noisy_context, token_logp
from rlprox.rewards import RewardSpec, build_reward

if TYPE_CHECKING:
    from rlprox.prox.attach import LossTerms
    from rlprox.recipe import Recipe
    from rlprox.runtime import EvalRequest, EvalShard, Runtime

EVAL_BATCH = 64  # evaluation samples drawn together (each from its own seeded generator: the batch changes nothing)


@dataclass
class ModelSpec:
    """The generator and its tokenizer: the digits world, or LlamaGen checkpoints."""

    # zoo:digits-gpt or zoo:digits-gpt-coarse (its digits-vq comes along), or a LlamaGen GPT checkpoint file
    gpt: str = "zoo:digits-gpt"
    vq: str = ""  # LlamaGen VQ checkpoint file (not with zoo:digits-gpt)
    config: str = ""  # LlamaGen GPT config for checkpoint files: GPT-B | GPT-L | GPT-XL | GPT-XXL
    vq_config: str = "VQ-16"  # LlamaGen VQ config: VQ-16 | VQ-8
    image_size: int = 256  # LlamaGen checkpoints: image side in pixels
    num_classes: int = 1000  # LlamaGen checkpoints: classes of the class-conditional GPT
    gpt_kwargs: dict = field(
        default_factory=dict
    )  # overrides of the GPT config's constructor keywords (dropouts, sizes)
    vq_kwargs: dict = field(default_factory=dict)  # overrides of the VQ config's


@dataclass
class VapiConfig:
    """VA-π hyperparameters ("per process" counts are multiplied by the process count)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "clip_range": "clip_coef",
        "num_inner_epochs": "update_epochs",
        "eval_cfg_scale": "eval_guidance_scale",
    }

    # "digits" (the digits world's training split), an image folder with one sub-folder per
    # class, or "hf:PATH" (a datasets.save_to_disk folder with image and label columns)
    data: str = "digits"
    images_per_iteration: int = 32  # B, per process
    group_size: int = 8  # G, token sequences sampled per image
    noise_prob: float = 0.0  # ξ: probability of replacing each context token by a random code
    clip_coef: float = 0.2  # PPO ratio clip range ε, per token (VA-π's code: clip_range)
    adv_clip: float = 5.0  # group-normalised advantages clipped to ±adv_clip
    update_epochs: int = 1  # epochs over each round's samples, one optimizer step each (VA-π's code: num_inner_epochs)
    # gradient-accumulation slice: images per forward/backward pass, per process; an epoch's one optimizer
    # step accumulates images_per_iteration / micro_batch_size of them (memory, not the gradient)
    micro_batch_size: int = 32
    sample_train_mode: bool = False  # dropout and class dropout active while sampling
    update_train_mode: bool = False  # dropout and class dropout active in the update (VA-π's code: true)
    eval_guidance_scale: float = (
        1.5  # evaluation sampling: classifier-free guidance scale (rlprox eval --guidance-scale)
    )
    eval_temperature: float = 1.0  # evaluation sampling: softmax temperature of the token logits
    eval_top_k: int = 0  # evaluation sampling: keep the k most likely tokens (0: all)
    eval_base: bool = True  # evaluation also samples the base model (same seeds)
    eval_grid_size: int = 20  # items in the base-vs-tuned grid
    eval_classifier: str = (
        "zoo:digits-classifier"  # digits world: the classifier behind the FID/IS proxies and accuracies
    )


def validate(recipe: "Recipe") -> None:
    cfg, model = recipe.vapi, recipe.model
    if cfg.group_size < 2:
        raise RecipeError("vapi.group_size", f"must be >= 2 for the group-normalised advantage (got {cfg.group_size})")
    if cfg.images_per_iteration % cfg.micro_batch_size:
        raise RecipeError(
            "vapi.micro_batch_size",
            f"{cfg.micro_batch_size} does not divide vapi.images_per_iteration ({cfg.images_per_iteration})",
        )
    if not 0 <= cfg.noise_prob < 1:
        raise RecipeError("vapi.noise_prob", f"must be in [0, 1) (got {cfg.noise_prob})")
    from rlprox.zoo.build import DIGITS_GPTS, check_spec

    for key, spec, fits in (
        ("model.gpt", model.gpt, DIGITS_GPTS),
        ("vapi.eval_classifier", cfg.eval_classifier, ("digits-classifier",)),
    ):
        try:
            check_spec(spec, fits)
        except ValueError as err:
            raise RecipeError(key, str(err)) from None
    if cfg.data == "digits" and not cfg.eval_classifier.startswith("zoo:") and not Path(cfg.eval_classifier).is_dir():
        raise RecipeError(
            "vapi.eval_classifier", f"not a digits-classifier folder nor zoo:NAME: {cfg.eval_classifier!r}"
        )
    if model.gpt.startswith("zoo:"):
        if model.vq:
            raise RecipeError("model.vq", f"{model.gpt} brings its own digits-vq; leave model.vq empty")
    else:
        from rlprox.models.llamagen import GPT_CONFIGS, VQ_CONFIGS

        for key, value in (("model.gpt", model.gpt), ("model.vq", model.vq)):
            if not value or not Path(value).is_file():
                raise RecipeError(key, f"LlamaGen checkpoint file not found: {value!r}")
        if model.config not in GPT_CONFIGS:
            raise RecipeError(
                "model.config",
                f"must be one of {', '.join(GPT_CONFIGS)} for a LlamaGen checkpoint (got {model.config!r})",
            )
        if model.vq_config not in VQ_CONFIGS:
            raise RecipeError("model.vq_config", f"must be one of {', '.join(VQ_CONFIGS)} (got {model.vq_config!r})")
    if cfg.data.startswith("hf:"):
        import importlib.util

        if importlib.util.find_spec("datasets") is None:
            raise RecipeError("vapi.data", "hf: sources need the datasets package (pip install datasets)")
        if not Path(cfg.data[3:]).is_dir():
            raise RecipeError("vapi.data", f"not a datasets.save_to_disk folder: {cfg.data[3:]!r}")
    elif cfg.data != "digits" and not Path(cfg.data).is_dir():
        raise RecipeError("vapi.data", f"not 'digits', an image folder nor hf:PATH: {cfg.data!r}")
    try:
        build_reward(recipe.reward, check_only=True)
    except (ValueError, RegistryError) as err:
        raise RecipeError("reward", str(err)) from None


# ----------------------------------------------------------------------------- data


class ImageSource:
    """Training images with classes: ``len``, ``class_names`` and ``take(indices) ->
    (images (n, 3, S, S) in [0, 1], classes (n,))``. "digits" is the digits world's
    training split in memory (class = digit·5 + colour); a folder with one sub-folder
    per class (sorted names = class ids, ImageNet's layout) and a ``datasets`` folder
    ("hf:PATH", ``image`` and ``label`` columns) are read lazily, each image resized to
    ``image_size``."""

    def __init__(self, spec: str, image_size: int):
        self.image_size, self.dataset = image_size, None
        if spec.startswith("hf:"):
            import datasets

            try:
                self.dataset = datasets.load_from_disk(spec[3:])
            except (OSError, ValueError) as err:
                raise RecipeError("vapi.data", f"cannot load {spec}: {str(err).splitlines()[0][:160]}") from None
            if len(self.dataset) == 0:
                raise RecipeError("vapi.data", f"{spec[3:]} holds no rows")
            missing = [c for c in ("image", "label") if c not in self.dataset.column_names]
            if missing:
                raise RecipeError(
                    "vapi.data",
                    f"{spec[3:]} has no {missing[0]!r} column (columns: {', '.join(self.dataset.column_names)})",
                )
            labels = self.dataset.features["label"]
            self.classes = torch.tensor(self.dataset["label"])
            self.class_names = (
                list(labels.names)
                if hasattr(labels, "names")
                else [str(c) for c in range(int(self.classes.max()) + 1)]
            )
            self.files = None
            return
        if spec == "digits":
            from rlprox.zoo.data import COLOUR_NAMES, DIGIT_WORDS, load_digits_world, prompt_for

            train = load_digits_world("train")
            self.images, self.classes, self.files = train.images, train.classes, None
            self.class_names = [
                prompt_for(c // len(COLOUR_NAMES), c % len(COLOUR_NAMES))
                for c in range(len(DIGIT_WORDS) * len(COLOUR_NAMES))
            ]
            return
        root = Path(spec)
        self.class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
        files = [
            (path, c)
            for c, name in enumerate(self.class_names)
            for path in sorted((root / name).iterdir())
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp")
        ]
        if not files:
            raise RecipeError("vapi.data", f"no images under {root}/<class>/*.png|jpg")
        self.files = [f for f, _ in files]
        self.classes = torch.tensor([c for _, c in files])

    def __len__(self) -> int:
        return len(self.classes)

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.files is None and self.dataset is None:
            return self.images[indices], self.classes[indices]
        from PIL import Image

        out = []
        for i in indices.tolist():
            img = self.dataset[i]["image"] if self.dataset is not None else Image.open(self.files[i])
            img = (
                (img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8)))
                .convert("RGB")
                .resize((self.image_size, self.image_size), Image.BICUBIC)
            )
            out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0)
        return torch.stack(out), self.classes[indices]


# ----------------------------------------------------------------------------- the trainer


class VAPi:
    """collect / advantages / minibatches / loss / evaluate for the engine."""

    curve = ("progress/images", "reward/mean")
    stat_reductions = {"progress/images": "mean", "reward/zero_std_groups": "sum"}

    def __init__(self, recipe: "Recipe", runtime: "Runtime", loss_terms: "LossTerms | None" = None):
        from rlprox.prox.attach import LossTerms

        cfg = self.cfg = recipe.vapi
        self.recipe, self.runtime, self.device = recipe, runtime, runtime.device
        self.loss_terms = loss_terms or LossTerms()
        self.gpt, self.vq, image_size = self._load_models(recipe.model)
        self.modules = {"gpt": self.gpt}
        self.frozen = {"vq": self.vq}
        if any(r.get("type") == "kl_ref" and float(r.get("lam", 0)) > 0 for r in recipe.regularizers):
            self.reference = copy.deepcopy(self.gpt).requires_grad_(False)
            self.frozen["reference"] = self.reference
        else:
            self.reference = None
        self.base_gpt = None  # a frozen copy for base-vs-tuned evaluation, loaded on first use
        try:
            self.reward = build_reward(recipe.reward, device=self.device)
        except (ValueError, RegistryError) as err:
            raise RecipeError("reward", str(err)) from None
        self.data = ImageSource(cfg.data, image_size) if runtime.train else None
        if self.data is not None and len(self.data.class_names) > self.gpt.num_classes:
            raise RecipeError(
                "vapi.data",
                f"{len(self.data.class_names)} classes, more than the generator's {self.gpt.num_classes}",
            )
        # resolved now (a zoo build trains; evaluate() runs under no_grad, and only on processes with items)
        evaluates = recipe.run.eval_size > 0 or not runtime.train
        self.classifier = self._load_classifier(cfg.eval_classifier) if cfg.data == "digits" and evaluates else None
        self.micro_steps = cfg.images_per_iteration // cfg.micro_batch_size
        self.update_epochs = cfg.update_epochs
        self.images_seen = 0
        self.grid = int(round(self.gpt.block_size**0.5))

    def _load_models(self, spec: ModelSpec):
        from rlprox.models import llamagen

        if spec.gpt.startswith("zoo:"):
            from rlprox.zoo.build import load_gpt_and_vq

            gpt, vq = load_gpt_and_vq(spec.gpt)
            return gpt.train(), vq, vq.config["image_size"]
        vq_kwargs = llamagen.vq_config(spec.vq_config, spec.image_size, **spec.vq_kwargs)
        downsample = 2 ** (len(vq_kwargs["ch_mult"]) - 1)
        gpt_kwargs = llamagen.gpt_config(
            spec.config,
            spec.image_size,
            downsample,
            num_classes=spec.num_classes,
            vocab_size=vq_kwargs["codebook_size"],
            **spec.gpt_kwargs,
        )
        try:
            gpt = llamagen.load_gpt(spec.gpt, gpt_kwargs)
            vq = llamagen.load_vq(spec.vq, vq_kwargs)
        except RuntimeError as err:  # a state dict of another config
            raise RecipeError(
                "model",
                f"the checkpoints do not match model.config {spec.config} "
                f"/ {spec.vq_config} ({str(err).splitlines()[0][:160]})",
            ) from None
        return gpt.train(), vq, spec.image_size

    def _load_classifier(self, spec: str):
        from rlprox.zoo.build import resolve_path
        from rlprox.zoo.classifier import DigitsClassifier

        try:
            classifier = DigitsClassifier.from_pretrained(resolve_path(spec))
        except (OSError, ValueError) as err:
            raise RecipeError(
                "vapi.eval_classifier", f"cannot load a digits-classifier: {str(err).splitlines()[0]}"
            ) from None
        return classifier.to(self.device).eval().requires_grad_(False)

    def _gpt(self):
        return self.runtime.unwrap(self.modules["gpt"])

    @contextlib.contextmanager
    def _mode(self, model, train: bool):
        was = model.training
        model.train(train)
        try:
            yield model
        finally:
            model.train(was)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """z* (B, T) token ids of images in [0, 1] (frozen tokenizer, its dtype)."""
        dtype = next(self.vq.parameters()).dtype
        return self.vq.encode(images.to(self.device, dtype))[2].flatten(1)

    @torch.no_grad()
    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vq.decode_code(tokens).float().clamp(0, 1)

    def _context(self, tokens: torch.Tensor) -> torch.Tensor:
        """The (noisy) context the teacher-forced passes see: tokens[:, :-1] with each
        entry replaced by a uniform random code with probability ξ."""
        vocab = self.gpt.tok_embeddings.num_embeddings
        return noisy_context(tokens, self.cfg.noise_prob, vocab, self.runtime.generator)

    # ------------------------------------------------------------------ COLLECT
    @torch.no_grad()
    def collect(self):
        cfg, rng, gen = self.cfg, self.runtime.np_rng, self.runtime.generator
        B, G = cfg.images_per_iteration, cfg.group_size
        x, c = self.data.take(torch.from_numpy(rng.integers(len(self.data), size=B)))
        x, c = x.to(self.device), c.to(self.device)
        z = self._encode(x)  # (B, T)
        context = self._context(z)
        with self._mode(self._gpt(), cfg.sample_train_mode) as gpt, self.runtime.autocast():
            logits, _ = gpt(context, c)  # (B, T, V): one teacher-forced pass
        samples, old_logp = group_sample(logits, G, gen)  # (B, G, T) each
        images = self._decode(samples.reshape(B * G, -1))
        reference = x.float().repeat_interleave(G, 0)
        names = [self.data.class_names[int(k)] for k in c.repeat_interleave(G).tolist()]
        metadata = [
            {"reference": reference[i], "class": int(k)} for i, k in enumerate(c.repeat_interleave(G).tolist())
        ]
        rewards, info = self.reward(images, names, metadata)
        rewards = rewards.to(self.device).view(B, G)
        self.images_seen += B * self.runtime.world
        return {
            "reward_info": info,  # the reward's own stats
            "tf_mse": float(((self._decode(z) - x.float()) ** 2).mean()),  # MSE of D(z*), the tokenizer's floor
            "x": x,
            "classes": c,
            "z": z,
            "context": context,
            "samples": samples,
            "old_logp": old_logp,
            "rewards": rewards,
        }

    # ------------------------------------------------------------------ ADVANTAGE
    def advantages(self, batch):
        batch["advantages"] = objectives.group_normalize(batch["rewards"], clip=self.cfg.adv_clip)  # (B, G)
        return batch

    def minibatches(self, batch, epoch: int):
        size = self.cfg.micro_batch_size
        for start in range(0, batch["z"].shape[0], size):
            yield {k: v[start : start + size] for k, v in batch.items() if torch.is_tensor(v)}

    # ------------------------------------------------------------------ UPDATE
    def loss(self, mb):
        cfg = self.cfg
        with self._mode(self._gpt(), cfg.update_train_mode):
            logits, _ = self.modules["gpt"](mb["context"], mb["classes"])  # (b, T, V)
        logp_all = torch.log_softmax(logits.float(), -1)
        logp = token_logp(logp_all, mb["samples"])  # (b, G, T)
        adv = mb["advantages"].unsqueeze(-1).expand_as(logp)
        pg_loss, ratio = objectives.clipped_surrogate(logp, mb["old_logp"], adv, cfg.clip_coef)
        tensors = {"logits": logits, "targets": mb["z"], "logp": logp}
        if self.reference is not None:
            with torch.no_grad():
                ref_logits, _ = self.reference(mb["context"], mb["classes"])
            tensors["ref_logp"] = token_logp(torch.log_softmax(ref_logits.float(), -1), mb["samples"])
        penalty, penalty_stats = self.loss_terms(**tensors)
        with torch.no_grad():
            stats = {
                "loss/policy": pg_loss.detach(),
                "policy/approx_kl": objectives.kl_k3(mb["old_logp"], logp),
                "policy/clip_frac": objectives.clip_fraction(ratio, cfg.clip_coef),
                "policy/ratio_max": ratio.max(),
                "policy/token_entropy": -(logp_all.exp() * logp_all).sum(-1).mean(),
                **penalty_stats,
            }
        return pg_loss + penalty, stats

    # ------------------------------------------------------------------ LOG
    def iteration_stats(self, batch: dict, elapsed: float) -> dict:
        r = batch["rewards"]
        stats = {
            "reward/mean": float(r.mean()),
            "reward/std": float(r.std()),
            "reward/zero_std_groups": int(objectives.zero_spread(r).sum()),  # images whose G rewards are all equal
            "reward/tokenizer_floor_mse": batch["tf_mse"],  # MSE of D(z*): the best any token sequence reaches
            "progress/images": self.images_seen,
            "perf/images_per_s": r.shape[0] * self.runtime.world / max(elapsed, 1e-9),
        }
        stats.update({f"reward/{k}": v for k, v in batch["reward_info"].items()})
        return stats

    # ------------------------------------------------------------------ EVALUATE
    @torch.no_grad()
    def evaluate(self, request: "EvalRequest") -> "EvalShard":
        """Item i: class i mod #classes, sampled with the KV cache (guidance scale — ``rlprox eval
        --guidance-scale`` or the config's —, temperature, top-k from the config) from its own generator seeded by
        (seed, i), ``EVAL_BATCH`` items per batch — for the tuned and
        (``eval_base``) the base model with the same seeds. Digits world: the classifier's
        digit/colour correctness and features (FID/IS proxies in ``summarize_eval``) and
        the teacher-forced reconstruction MSE of held-out image i (G = 1)."""
        from rlprox.models.llamagen import generate
        from rlprox.runtime import EvalShard

        cfg = self.cfg
        items = list(range(request.start, request.start + request.num))
        num_classes = self._gpt().num_classes
        classes = torch.tensor([i % num_classes for i in items], device=self.device)
        models = [("", self._gpt())] + ([("base_", self._base())] if cfg.eval_base else [])
        digits = cfg.data == "digits"
        values, images = {}, {}
        if digits:
            from rlprox.zoo.data import COLOUR_NAMES, load_digits_world, prompt_for

            held = load_digits_world("heldout")
            idx = torch.tensor([i % len(held) for i in items])
            held_x, held_c = held.images[idx].to(self.device), held.classes[idx].to(self.device)
        scale = cfg.eval_guidance_scale if request.guidance_scale is None else request.guidance_scale
        for prefix, gpt in models:
            with self._mode(gpt, False):
                tokens = []
                for first in range(0, len(items), EVAL_BATCH):
                    chunk = items[first : first + EVAL_BATCH]
                    seeds = [request.seed * 1_000_003 + i for i in chunk]
                    tokens.append(
                        generate(
                            gpt,
                            classes[first : first + EVAL_BATCH],
                            cfg_scale=scale,
                            temperature=cfg.eval_temperature,
                            top_k=cfg.eval_top_k,
                            generator=[torch.Generator(device=self.device).manual_seed(s) for s in seeds],
                        )
                    )
                samples = self._decode(torch.cat(tokens))
                images[prefix] = samples.cpu()
                if digits:
                    values.update(self._digits_values(prefix, samples, classes, COLOUR_NAMES))
                    g = torch.Generator(device=self.device).manual_seed(request.seed + request.start)
                    logits, _ = gpt(self._encode(held_x)[:, :-1], held_c)
                    drawn = torch.multinomial(
                        logits.float().softmax(-1).reshape(-1, logits.shape[-1]), 1, generator=g
                    ).view(len(items), -1)
                    values[f"{prefix}tf_mse"] = (
                        ((self._decode(drawn) - held_x.float()) ** 2).mean(dim=(1, 2, 3)).tolist()
                    )
        shown = [k for k, i in enumerate(items) if i < cfg.eval_grid_size]
        grid = {}
        if shown:
            from rlprox.images import caption_cells, grid_columns

            prefixes = ["base_", ""] if cfg.eval_base else [""]
            captions = []
            for k in shown:
                c = int(classes[k])
                lines = [prompt_for(c // len(COLOUR_NAMES), c % len(COLOUR_NAMES)) if digits else f"class {c}"]
                if digits:  # P(digit)·P(colour) of the asked class under the classifier
                    lines.append("P(class) " + " | ".join(f"{values[f'_{p}class_prob'][k]:.2f}" for p in prefixes))
                captions.append(lines)
            name = "base_vs_tuned" if cfg.eval_base else "samples"
            header = [p.rstrip("_") or "tuned" for p in prefixes]
            grid[name] = caption_cells([images[p][shown] for p in prefixes], header, captions)
        cols = grid_columns(min(cfg.eval_grid_size, request.total)) if cfg.eval_grid_size > 0 else 0
        return EvalShard(values=values, images=grid, grid_cols=cols, info={"guidance_scale": scale})

    def _digits_values(self, prefix, samples, classes, colour_names):
        from rlprox.zoo.metrics import classifier_features

        p_digit, p_colour = self.classifier.predict_proba(samples)
        digit, colour = classes // len(colour_names), classes % len(colour_names)
        feats = classifier_features(self.classifier, samples)
        out = {
            f"{prefix}digit_acc": (p_digit.argmax(-1) == digit).float().tolist(),
            f"{prefix}colour_acc": (p_colour.argmax(-1) == colour).float().tolist(),
            f"_{prefix}p_digit": p_digit.cpu().tolist(),
        }
        out[f"_{prefix}features"] = feats.cpu().tolist()
        asked = p_digit.gather(1, digit[:, None].to(p_digit.device)) * p_colour.gather(
            1, colour[:, None].to(p_colour.device)
        )
        out[f"_{prefix}class_prob"] = asked[:, 0].cpu().tolist()
        return out

    def summarize_eval(self, values: dict) -> dict:
        """FID and IS proxies of the samples (digits world), with the tokenizer floor:
        the FID proxy of real images' own VQ reconstructions, the best a generator of
        these tokens can reach."""
        if "_features" not in values:
            return {}
        from rlprox.zoo.data import load_digits_world
        from rlprox.zoo.metrics import classifier_features, fid_proxy

        held = self._heldout_features()
        out = {}
        for prefix in ("", "base_"):
            if f"_{prefix}features" in values:
                feats = torch.tensor(values[f"_{prefix}features"])
                out[f"{prefix}fid_proxy"] = fid_proxy(held, feats)
                p = torch.tensor(values[f"_{prefix}p_digit"], dtype=torch.float64).clamp_min(1e-12)
                marginal = p.mean(0, keepdim=True)
                out[f"{prefix}is_proxy"] = float(torch.exp((p * (p.log() - marginal.log())).sum(1).mean()))
        held_images = load_digits_world("heldout").images
        n = len(values["_features"])
        pick = torch.randperm(len(held_images), generator=torch.Generator().manual_seed(0))[:n]
        recon = self._decode(self._encode(held_images[pick].to(self.device)))
        out["tokenizer_floor_fid_proxy"] = fid_proxy(held, classifier_features(self.classifier, recon).cpu())
        return out

    def _heldout_features(self) -> torch.Tensor:
        if not hasattr(self, "_held_features"):
            from rlprox.zoo.data import load_digits_world
            from rlprox.zoo.metrics import classifier_features

            self._held_features = classifier_features(
                self.classifier, load_digits_world("heldout").images.to(self.device)
            ).cpu()
        return self._held_features

    def _base(self):
        if self.base_gpt is None:
            with torch.enable_grad():  # a late build never runs under the eval hook's no_grad
                base, _, _ = self._load_models(self.recipe.model)
            self.base_gpt = base.to(self.device).eval().requires_grad_(False)
        return self.base_gpt

    # ------------------------------------------------------------------ EXPORT
    def export(self, out_dir: Path) -> list[Path]:
        """The tuned GPT twice: ``config.json`` + ``model.safetensors``
        (``rlprox.models.llamagen.Transformer.from_pretrained(out_dir)``), and
        ``llamagen_gpt.pt`` in LlamaGen's checkpoint layout (``{"model": state dict}``,
        tensors only) for LlamaGen's sampling scripts, ``llamagen.load_gpt`` or a recipe's
        ``model.gpt``. The VQ tokenizer is frozen and is not exported."""
        import json

        from rlprox.models.llamagen import save_llamagen_checkpoint

        out, gpt, spec = Path(out_dir), self._gpt(), self.recipe.model
        gpt.save_pretrained(out)
        config_file = out / "config.json"
        config = json.loads(config_file.read_text())
        config["llamagen"] = {
            "checkpoint": "llamagen_gpt.pt",
            "tuned_from": spec.gpt,
            "gpt_config": spec.config or None,
            "vq": spec.vq or None,
            "vq_config": spec.vq_config if spec.vq else None,
            "image_size": self.vq.config["image_size"],
        }
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        pt = save_llamagen_checkpoint(gpt, out / "llamagen_gpt.pt")
        return [config_file, out / "model.safetensors", pt]

    # ------------------------------------------------------------------ STATE
    def state_dict(self):
        return {}, {"images_seen": self.images_seen}

    def load_state_dict(self, tensors: dict, state: dict) -> None:
        self.images_seen = int(state.get("images_seen", 0))


register_trainer(
    TrainerSpec(
        name="vapi",
        build=VAPi,
        sections={"model": ModelSpec, "vapi": VapiConfig, "reward": RewardSpec},
        validate=validate,
        counts=tuple(
            f"vapi.{key}" for key in ("images_per_iteration", "group_size", "update_epochs", "micro_batch_size")
        ),
        minibatches_per_epoch=lambda recipe: 1,  # one optimizer step per epoch: accumulate with vapi.micro_batch_size
        description="VA-π: pixel-aligned RL tuning of LlamaGen-style AR image generators",
        eval_unit="samples",
        eval_flags=("guidance_scale",),
        loss_inputs=("logits", "targets", "logp", "ref_logp"),
    )
)
