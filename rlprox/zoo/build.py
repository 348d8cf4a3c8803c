"""Build, cache and resolve the digits-world models.

Names: ``digits-classifier``, ``digits-sd``, ``digits-sd3``, ``digits-qwen``, ``digits-wan``, ``digits-vq``,
``digits-gpt`` (the GPT is trained on digits-vq tokens of the same seed, which is built first if missing).

A model lives in ``<cache>/<name>-seed<S>/`` (``-micro`` appended for micro builds),
where ``<cache>`` is ``$RLPROX_CACHE/zoo``, else ``$XDG_CACHE_HOME/rlprox/zoo``, else
``~/.cache/rlprox/zoo``. A build trains
in a temporary sibling directory and renames it into place, so a directory that exists
is complete. Each model directory also holds ``build_info.json`` (steps, seconds,
held-out metrics) and, for the generators, ``samples.png`` (prompts × seeds).

Builds are deterministic for a seed on CPU and default to one thread: on a shared
2-core box, two OpenMP threads were measured ≈6× slower than one. A build trains with
autograd on whatever mode its caller is in (``torch.no_grad``, ``inference_mode``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlprox.errors import RegistryError
from rlprox.registry import Registry, check_kwargs

MODELS = Registry("zoo model")
# the diffusers pipeline class of each zoo pipeline, known before it is built
PIPELINE_CLASSES = {
    "digits-sd": "StableDiffusionPipeline",
    "digits-sd3": "StableDiffusion3Pipeline",
    "digits-qwen": "QwenImagePipeline",
    "digits-wan": "WanPipeline",
}
GRID_SEEDS = 4
MICRO_FRACTION = 0.05
GPT_RECOMMENDED_CFG = 1.5


@dataclass
class BuildOptions:
    """Step counts (optimizer steps at ``batch_size``) and run settings for a build."""

    classifier_steps: int = 450  # ≈8 epochs of the 7,185 training images
    vae_steps: int = 200
    unet_steps: int = 600  # UNet + text encoder jointly
    sd3_steps: int = 700  # digits-sd3: SD3 transformer + both CLIP text encoders jointly
    qwen_steps: int = 700  # digits-qwen: the Qwen-Image transformer (its text encoder frozen)
    wan_vae_steps: int = 400  # digits-wan: its video VAE, 16 clips cropped to 16×16 a step
    wan_steps: int = 1200  # digits-wan: the Wan transformer and its UMT5 encoder jointly, on the clips' latents
    vq_steps: int = 300
    gpt_steps: int = 800
    batch_size: int = 128
    micro: bool = False  # ~5 % of every step count: exercises the code, not the quality
    threads: int = 1  # torch intra-op threads during the build
    progress: bool = True  # tqdm bars on stderr

    def steps(self, field: str) -> int:
        n = getattr(self, field)
        return max(2, round(n * MICRO_FRACTION)) if self.micro else n


def cache_root() -> Path:
    if os.environ.get("RLPROX_CACHE"):
        return Path(os.environ["RLPROX_CACHE"]) / "zoo"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rlprox" / "zoo"


# bumped when a model's architecture or training changes, so an older cached build is
# never loaded into the new classes (v2: LlamaGen's attention at the VQ's lowest level,
# k-means codebook init and dead-code restarts)
MODEL_VERSIONS = {"digits-vq": 2, "digits-gpt": 2}


def model_dir(name: str, seed: int = 0, micro: bool = False) -> Path:
    _check_name(name)
    version = f"-v{MODEL_VERSIONS[name]}" if name in MODEL_VERSIONS else ""
    return cache_root() / f"{name}{version}-seed{seed}{'-micro' if micro else ''}"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or ":" in name:
        raise ValueError(f"zoo model must be one of {', '.join(MODELS.names())} (got {name!r})")
    try:
        MODELS.get(name)
    except RegistryError as err:
        raise ValueError(str(err).replace(", or 'module:attr'", "")) from None


def check_spec(spec: str | Path, fits: tuple[str, ...] = ()) -> None:
    """For recipe validation, building nothing: a one-line ValueError when ``spec`` is
    ``zoo:NAME`` and NAME is no zoo model, or not one of ``fits`` (the models the field
    takes). Anything else (a path, a hub id) passes."""
    if not str(spec).startswith("zoo:"):
        return
    name = str(spec)[4:]
    _check_name(name)
    if fits and name not in fits:
        raise ValueError(f"zoo:{name} is not a model this field takes; use {' or '.join('zoo:' + n for n in fits)}")


def resolve(spec: str, seed: int = 0, micro: bool = False, **options) -> Path:
    """Local directory of a zoo model, building it on first use.

    ``spec`` is ``"zoo:digits-sd"`` or ``"digits-sd"``; ``options`` are
    :class:`BuildOptions` fields used only if a build is needed.
    """
    name = spec[4:] if spec.startswith("zoo:") else spec
    path = model_dir(name, seed, micro)
    if path.is_dir():
        return path
    return build(name, seed=seed, micro=micro, **options)


def resolve_path(spec: str | Path, seed: int = 0, micro: bool = False) -> Path:
    """The one place where a model spec becomes a local path: ``zoo:NAME`` is resolved
    (built on first use), anything else is taken as a path. Loaders take paths."""
    if str(spec).startswith("zoo:"):
        return resolve(str(spec), seed=seed, micro=micro)
    return Path(spec)


def load_gpt_and_vq(path: str | Path):
    """A digits-gpt directory (or ``zoo:digits-gpt``) and the digits-vq it was trained on."""
    from rlprox.models.llamagen import Transformer, VQModel

    path = resolve_path(path)
    info = build_info(path)
    vq_path = resolve(info["vq"], seed=info["vq_seed"], micro=info["options"]["micro"])
    return Transformer.from_pretrained(path), VQModel.from_pretrained(vq_path)


def build(name: str, seed: int = 0, micro: bool = False, force: bool = False, **options) -> Path:
    """Train ``name`` and write it atomically into the cache; returns its directory."""
    _check_name(name)
    try:
        check_kwargs(BuildOptions, options, "zoo build", reserved=("micro",))
    except RegistryError as err:
        raise ValueError(str(err)) from None
    opts = BuildOptions(micro=micro, **options)
    final = model_dir(name, seed, micro)
    if final.is_dir() and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _one_builder(final):
        if final.is_dir() and not force:  # another process built it while this one waited
            return final
        return _build(name, seed, opts, final)


@contextlib.contextmanager
def _one_builder(final: Path):
    """Hold ``final``'s build lock: processes that reach an unbuilt model at once (parallel runs, the
    processes of one launch) build it once; the others wait, then read the build. The lock file is
    removed after the build; a waiter that held the removed file re-checks the cache, so it never builds
    twice. Without ``fcntl`` (Windows) concurrent builds race and the first rename wins."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = final.parent / f".{final.name}.lock"
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"rlprox zoo: waiting for another process building {final.name}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(name: str, seed: int, opts: "BuildOptions", final: Path) -> Path:
    micro = opts.micro
    print(
        f"rlprox zoo: building {name} (seed {seed}{', micro' if micro else ''}) into {final}"
        f" — one-time, {'seconds' if micro else 'a few CPU-minutes'}",
        file=sys.stderr,
        flush=True,
    )
    old_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        start = time.perf_counter()
        # builds train (backward): a caller inside no_grad / inference_mode (an eval hook) must not leak into them
        with torch.inference_mode(False), torch.enable_grad():
            info = MODELS[name](tmp, seed, opts)
        info.update(
            name=name,
            seed=seed,
            build_seconds=round(time.perf_counter() - start, 1),
            options=dataclasses.asdict(opts),
            torch_version=torch.__version__,
        )
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():  # only with force: replace the old build
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent build won the race; its result is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(old_threads)
    print(f"rlprox zoo: {name} ready ({info['build_seconds']} s)", file=sys.stderr, flush=True)
    return final


def build_info(path: str | Path) -> dict:
    return json.loads((Path(path) / "build_info.json").read_text())


# ----------------------------------------------------------------------------- builders
def _build_classifier(out: Path, seed: int, opts: BuildOptions) -> dict:
    from rlprox.zoo.classifier import accuracy, train_classifier
    from rlprox.zoo.data import load_digits_world

    model = train_classifier(
        load_digits_world("train"),
        opts.steps("classifier_steps"),
        opts.batch_size,
        seed=seed,
        progress=opts.progress,
    )
    model.save_pretrained(out)
    return {"heldout": accuracy(model, load_digits_world("heldout"))}


def _save_pipeline_grid(pipe, out: Path, guidance_scale: float, sample=None) -> dict:
    """``samples.png``: the grid prompts × GRID_SEEDS seeds through the pipeline's own call (``sample``, default
    digits-sd's ``sample_sd``); returns its legend."""
    from rlprox.images import save_image_grid
    from rlprox.zoo.data import grid_prompts
    from rlprox.zoo.sd import sample_sd

    prompts = grid_prompts()
    sample = sample or sample_sd
    per_seed = [sample(pipe, prompts, seed=s, guidance_scale=guidance_scale) for s in range(GRID_SEEDS)]
    save_image_grid(torch.stack(per_seed, dim=1).flatten(0, 1), out / "samples.png", rows=len(prompts), scale=4)
    return {"rows": prompts, "cols": [f"seed {s}" for s in range(GRID_SEEDS)]}


def _build_sd(out: Path, seed: int, opts: BuildOptions) -> dict:
    from rlprox.zoo.data import load_digits_world
    from rlprox.zoo.sd import RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS, train_sd_pipeline, vae_reconstruction_mse

    pipe = train_sd_pipeline(
        load_digits_world("train"),
        opts.steps("vae_steps"),
        opts.steps("unet_steps"),
        opts.batch_size,
        seed=seed,
        progress=opts.progress,
    )
    pipe.save_pretrained(str(out))
    grid = _save_pipeline_grid(pipe, out, RECOMMENDED_GUIDANCE)
    return {
        "vae_heldout_mse": vae_reconstruction_mse(pipe, load_digits_world("heldout")),
        "recommended_guidance_scale": RECOMMENDED_GUIDANCE,
        "recommended_num_inference_steps": RECOMMENDED_STEPS,
        "grid": grid,
    }


def _build_sd3(out: Path, seed: int, opts: BuildOptions) -> dict:
    from rlprox.zoo.data import load_digits_world
    from rlprox.zoo.sd import vae_reconstruction_mse
    from rlprox.zoo.sd3 import RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS, heldout_flow_loss, train_sd3_pipeline

    pipe, train_loss = train_sd3_pipeline(
        load_digits_world("train"),
        opts.steps("vae_steps"),
        opts.steps("sd3_steps"),
        opts.batch_size,
        seed=seed,
        progress=opts.progress,
    )
    pipe.save_pretrained(str(out))
    grid = _save_pipeline_grid(pipe, out, RECOMMENDED_GUIDANCE)
    held = load_digits_world("heldout")
    return {
        "vae_heldout_mse": vae_reconstruction_mse(pipe, held),
        "flow_loss_train_last": round(train_loss, 5),
        "flow_loss_heldout": round(heldout_flow_loss(pipe, held, seed=seed), 5),
        "recommended_guidance_scale": RECOMMENDED_GUIDANCE,
        "recommended_num_inference_steps": RECOMMENDED_STEPS,
        "grid": grid,
    }


def _build_wan(out: Path, seed: int, opts: BuildOptions) -> dict:
    from rlprox.images import save_image_grid
    from rlprox.zoo.data import CLIP_FRAMES, CLIP_SIZE
    from rlprox.zoo.wan import (
        MAX_SEQUENCE_LENGTH,
        RECOMMENDED_GUIDANCE,
        RECOMMENDED_STEPS,
        grid_prompts,
        sample_clips,
        train_wan_pipeline,
    )

    pipe, stats = train_wan_pipeline(
        opts.steps("wan_vae_steps"),
        opts.steps("wan_steps"),
        clips=64 if opts.micro else 2000,
        batch_size=opts.batch_size // 2,
        seed=seed,
        progress=opts.progress,
    )
    pipe.save_pretrained(str(out))
    prompts = grid_prompts()
    per_seed = [sample_clips(pipe, prompts, seed=s) for s in range(2)]  # (8, T, 3, H, W) each
    save_image_grid(torch.stack(per_seed, dim=1).flatten(0, 1), out / "samples.png", cols=2, scale=2)
    return {
        **{k: round(v, 5) for k, v in stats.items()},
        "frames": CLIP_FRAMES,
        "size": CLIP_SIZE,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "recommended_guidance_scale": RECOMMENDED_GUIDANCE,
        "recommended_num_inference_steps": RECOMMENDED_STEPS,
        "grid": {"rows": prompts, "cols": ["seed 0", "seed 1"], "files": ["samples.png", "samples.gif"]},
    }


# variants meant as test beds where VA-π's pixel reward can see token errors: digits-vq-coarse has one more
# downsampling level (16×16 images -> 4×4 codes, each a 4×4-pixel patch); digits-vq-k16 keeps the 8×8 grid
# with 16 codes instead of 128, so two codes are rarely near-synonyms. Suffix: (VQ config overrides, what it is).
TEST_BED_VQS = {
    "coarse": (dict(ch_mult=[1, 2, 2]), "one more downsampling level: 16×16 image -> 4×4 codes, 128-entry codebook"),
    "k16": (dict(codebook_size=16), "a 16-entry codebook: 16×16 image -> 8×8 codes"),
}


def _build_qwen(out: Path, seed: int, opts: BuildOptions) -> dict:
    from rlprox.zoo.data import load_digits_world
    from rlprox.zoo.qwen import (
        RECOMMENDED_GUIDANCE,
        RECOMMENDED_STEPS,
        heldout_flow_loss,
        sample_qwen,
        train_qwen_pipeline,
        vae_reconstruction_mse,
    )

    pipe, train_loss = train_qwen_pipeline(
        load_digits_world("train"),
        opts.steps("vae_steps"),
        opts.steps("qwen_steps"),
        opts.batch_size,
        seed=seed,
        progress=opts.progress,
    )
    pipe.save_pretrained(str(out))
    grid = _save_pipeline_grid(pipe, out, RECOMMENDED_GUIDANCE, sample=sample_qwen)
    held = load_digits_world("heldout")
    return {
        "vae_heldout_mse": vae_reconstruction_mse(pipe.vae, held),
        "flow_loss_train_last": round(train_loss, 5),
        "flow_loss_heldout": round(heldout_flow_loss(pipe, held, seed=seed), 5),
        "recommended_guidance_scale": RECOMMENDED_GUIDANCE,
        "recommended_num_inference_steps": RECOMMENDED_STEPS,
        "grid": grid,
    }


# variants meant as test beds where VA-π's pixel reward can see token errors: digits-vq-coarse has one more
# downsampling level (16×16 images -> 4×4 codes, each a 4×4-pixel patch); digits-vq-k16 keeps the 8×8 grid
# with 16 codes instead of 128, so two codes are rarely near-synonyms. Suffix: (VQ config overrides, what it is).
TEST_BED_VQS = {
    "coarse": (dict(ch_mult=[1, 2, 2]), "one more downsampling level: 16×16 image -> 4×4 codes, 128-entry codebook"),
    "k16": (dict(codebook_size=16), "a 16-entry codebook: 16×16 image -> 8×8 codes"),
}


def _build_vq(out: Path, seed: int, opts: BuildOptions, config: dict | None = None) -> dict:
    from rlprox.images import save_image_grid
    from rlprox.zoo.data import COLOUR_NAMES, load_digits_world
    from rlprox.zoo.vq import encode_tokens, reconstruction_mse, train_vq

    model = train_vq(
        load_digits_world("train"),
        opts.steps("vq_steps"),
        opts.batch_size,
        seed=seed,
        progress=opts.progress,
        **(config or {}),
    )
    model.save_pretrained(out)
    held = load_digits_world("heldout")
    # ten held-out digits, one per colour in turn (held-out is base-image major, colour minor)
    stride = len(held) // 10
    sample = held.images[[i * stride + i % len(COLOUR_NAMES) for i in range(10)]]
    with torch.no_grad():
        recon = model.decode_code(encode_tokens(model, sample))
    save_image_grid(torch.cat([sample, recon]), out / "samples.png", rows=2, scale=4)
    used = encode_tokens(model, held.images).unique().numel()
    return {
        "heldout_recon_mse": reconstruction_mse(model, held.images),
        "codes_used_heldout": used,
        "grid": {"rows": ["held-out originals", "reconstructions"]},
    }


def _build_gpt(out: Path, seed: int, opts: BuildOptions, vq_name: str = "digits-vq") -> dict:
    from rlprox.images import save_image_grid
    from rlprox.models.llamagen import VQModel, generate
    from rlprox.zoo.data import grid_prompts, load_digits_world, parse_prompt
    from rlprox.zoo.gpt import train_gpt
    from rlprox.zoo.vq import encode_tokens

    vq_path = resolve(
        f"zoo:{vq_name}",
        seed=seed,
        micro=opts.micro,
        **{k: v for k, v in dataclasses.asdict(opts).items() if k != "micro"},
    )
    vq = VQModel.from_pretrained(vq_path)
    train = load_digits_world("train")
    tokens = encode_tokens(vq, train.images)  # (N, 16)
    model = train_gpt(
        tokens,
        train.classes,
        opts.steps("gpt_steps"),
        opts.batch_size,
        seed=seed,
        progress=opts.progress,
        vocab_size=vq.config["codebook_size"],
    )
    model.save_pretrained(out)
    prompts = grid_prompts()
    classes = torch.tensor([d * 5 + c for d, c in map(parse_prompt, prompts)])
    gen = torch.Generator().manual_seed(seed)
    per_seed = [
        vq.decode_code(generate(model, classes, cfg_scale=GPT_RECOMMENDED_CFG, generator=gen))
        for _ in range(GRID_SEEDS)
    ]
    save_image_grid(torch.stack(per_seed, dim=1).flatten(0, 1), out / "samples.png", rows=len(prompts), scale=4)
    return {
        "vq": f"zoo:{vq_name}",
        "vq_seed": seed,
        "recommended_cfg_scale": GPT_RECOMMENDED_CFG,
        "grid": {"rows": prompts, "cols": [f"sample {s}" for s in range(GRID_SEEDS)]},
    }


MODELS.register(
    "digits-classifier", _build_classifier, "CNN digit+colour classifier: reward model and FID-proxy features"
)
MODELS.register(
    "digits-sd", _build_sd, "diffusers StableDiffusionPipeline (tiny CLIP, VAE, UNet, DDIM), 16×16 text-to-image"
)
MODELS.register(
    "digits-sd3",
    _build_sd3,
    "diffusers StableDiffusion3Pipeline (tiny MM-DiT, 2 CLIP + zero T5, VAE, flow-match Euler), 16×16 text-to-image",
)
MODELS.register(
    "digits-qwen",
    _build_qwen,
    "diffusers QwenImagePipeline (tiny MMDiT, Qwen2.5-VL, causal VAE, flow-match Euler), 16×16 text-to-image",
)
MODELS.register(
    "digits-wan",
    _build_wan,
    "diffusers WanPipeline (tiny UMT5, Wan VAE, 3-D transformer, flow-match Euler), 9-frame 32×32 moving digits",
)
MODELS.register("digits-vq", _build_vq, "LlamaGen-style VQ tokenizer, 16×16 image -> 8×8 codes (128-entry codebook)")
MODELS.register(
    "digits-gpt", _build_gpt, "LlamaGen-style class-conditional GPT over digits-vq codes (50 classes + null)"
)


def _register_test_beds() -> None:
    for suffix, (config, what) in TEST_BED_VQS.items():
        MODELS.register(f"digits-vq-{suffix}", functools.partial(_build_vq, config=config), f"digits-vq with {what}")
        MODELS.register(
            f"digits-gpt-{suffix}",
            functools.partial(_build_gpt, vq_name=f"digits-vq-{suffix}"),
            f"digits-gpt over digits-vq-{suffix} codes",
        )


_register_test_beds()
# built by name only (``rlprox zoo build digits-gpt-k16``), not by "all": no shipped recipe or test needs them
TEST_BEDS = tuple(f"digits-{kind}-{suffix}" for suffix in TEST_BED_VQS for kind in ("vq", "gpt"))
DIGITS_GPTS = ("digits-gpt", *(f"digits-gpt-{suffix}" for suffix in TEST_BED_VQS))  # what VA-π's model.gpt takes
DIGITS_VQS = ("digits-vq", *(f"digits-vq-{suffix}" for suffix in TEST_BED_VQS))
# built on the other's outputs: build those first
DEPENDS = {gpt: (vq,) for gpt, vq in zip(DIGITS_GPTS, DIGITS_VQS)}


def build_order(names: list[str] | None = None) -> list[str]:
    """``names`` (default: every zoo model but the ``TEST_BEDS``) with each model's dependencies before it, so
    that a forced rebuild of all never trains a model on an old build of its dependency."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dep in DEPENDS.get(name, ()):
                visit(dep)
            order.append(name)

    for name in names if names is not None else [n for n in MODELS.names() if n not in TEST_BEDS]:
        visit(name)
    return [n for n in order if names is None or n in names]
