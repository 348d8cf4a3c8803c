"""GPU smoke test: the Hopper PPO recipe on CUDA for a few iterations, fp32 and bf16;
and the generative trainers at real scale with random weights.

    python benchmarks/gpu_smoke.py                  # CUDA: 4 iterations per precision
    python benchmarks/gpu_smoke.py --iterations 2
    python benchmarks/gpu_smoke.py --allow-cpu      # no GPU: same code path on CPU, 1 iteration
    python benchmarks/gpu_smoke.py --case loop      # LOOP on an SD-1.5-size pipeline (512 px, 50 DDIM steps, CFG,
                                                    # LoRA r4, bf16)
    python benchmarks/gpu_smoke.py --case vapi      # VA-π on GPT-B + VQ-16 (256 px, 16×16 tokens, bf16)
    python benchmarks/gpu_smoke.py --case flow      # LOOP vs a naive Flow-GRPO-style loop on an SD3.5-Medium-size
                                                    # pipeline (512 px, 10 SDE steps, K 8, LoRA r32, bf16):
                                                    # images/s and peak memory of each, one process
    python benchmarks/gpu_smoke.py --case flow --iterations 5   # 5 rounds per block (the first a warm-up)
    python benchmarks/gpu_smoke.py --case nft       # LOOP's objective nft vs GRPO (objective ppo) on the same
                                                    # SD3.5-Medium-size pipeline and batch: images/s, peak memory
    python benchmarks/gpu_smoke.py --case qwen      # LOOP on a Qwen-Image-width pipeline (8 of its 60 blocks, 512 px,
                                                    # true CFG 4, LoRA r64, bf16, gradient checkpointing)
    python benchmarks/gpu_smoke.py --case wan       # LOOP on a Wan 2.1 T2V 1.3B-size pipeline (wan21-t2v.yaml:
                                                    # 240x416 x 33 frames, 20 SDE steps, CFG 4.5, K 4, LoRA r32,
                                                    # bf16, gradient checkpointing, KL to the base), random weights
    python benchmarks/gpu_smoke.py --case loop --size tiny --allow-cpu   # check the script on CPU
    python benchmarks/gpu_smoke.py --case flow --size tiny --allow-cpu --iterations 2
    python benchmarks/gpu_smoke.py --case atari     # PPO, Nature CNN at CleanRL's Atari shape (8 envs × 128 steps,
                                                    # 4 minibatches, 4 epochs, 4×84×84 uint8 frames), run.compile
                                                    # off vs on: env steps/s, update seconds, peak memory
    python benchmarks/gpu_smoke.py --case atari --size tiny --allow-cpu

The loop case matches the naive diffusers anchor's round (32 images, micro-batch 16, all
timesteps trained): run both in one GPU session and quote the ratio.

The atari case steps ALE/Breakout-v5 (env.preprocessing: atari, recipes/ppo/breakout.yaml's env) where ale-py imports,
else ``StackedFrames``, a synthetic env of the same observation shape (always at --size tiny, 36×36 frames). Table:
benchmarks/results/gpu_smoke_atari.md.

The flow case runs both loops itself, in this one process on the same GPU, on the same
random-weight pipeline (``random_sd3_pipeline``) and batch: rlprox = ``Engine`` on
recipes/loop/sd35-pickscore.yaml with the overrides of ``flow_overrides`` (CFG, KL and EMA
off, 16 images per round, jpeg_compressibility), naive = ``NaiveFlowGRPO`` of
benchmarks/loop_flow.py with the same settings. Blocks run one after the other, rlprox,
naive, rlprox, naive (each a fresh run: its own model load, ``--iterations`` rounds, the
first a warm-up); images/s is the median over the timed rounds of both blocks, peak memory
is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the block's
start (model load included), the larger of the two blocks. Table:
benchmarks/results/gpu_smoke_flow.md.

Loads recipes/ppo/hopper.yaml with dotted overrides (``run.iterations=N``,
``run.mixed_precision=no|bf16``), trains, checks the policy lives on the expected device
and the last loss is finite, and prints steps/s per precision as a markdown table.
On CUDA the table is written to benchmarks/results/gpu_smoke.md. Without CUDA (and no
--allow-cpu) it prints "no CUDA device: skipped" and exits 0, writing nothing.

SPS: "steady" is the median of the per-iteration ``perf/sps`` after the first iteration
(the first pays CUDA/cuBLAS initialisation); "overall" is env steps / wall of ``fit()``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gymnasium  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "ppo" / "hopper.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "gpu_smoke.md"
PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def run_one(precision: str, iterations: int, on_cpu: bool, out_dir: str) -> dict:
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    overrides = [
        f"run.iterations={iterations}",
        # quoted: the override value is YAML, where a bare `no` parses as False
        f'run.mixed_precision="{PRECISIONS[precision]}"',
        f"run.output_dir={out_dir}",
        f"run.name=gpu-smoke-{precision}",
        "run.log_with=[]",
        "run.progress=false",
        "run.plot=false",
        "run.eval_size=0",
        "run.save_every=0",
        "run.torch_threads=1",
        f"run.cpu={'true' if on_cpu else 'false'}",
    ]
    recipe = load_recipe(RECIPE, overrides)
    engine = Engine(recipe)
    device = next(engine.algo.policy.parameters()).device if hasattr(engine.algo, "policy") else engine.algo.device
    want = "cpu" if on_cpu else "cuda"
    if device.type != want:
        raise SystemExit(f"{precision}: policy is on {device}, expected {want}")
    steps = iterations * recipe.env.num_envs * recipe.ppo.num_steps
    if not on_cpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    stats = engine.fit()
    if not on_cpu:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_it = [r["perf/sps"] for r in rows if "perf/sps" in r]
    steady = per_it[1:] or per_it
    loss = stats.get("loss/total", float("nan"))
    peak_mem = torch.cuda.max_memory_allocated() / 2**20 if not on_cpu else None
    engine.close()
    if not math.isfinite(loss):
        raise SystemExit(f"{precision}: last loss is not finite ({loss})")
    return dict(
        precision=precision,
        device=str(device),
        mixed_precision=engine.accelerator.mixed_precision,
        iterations=iterations,
        steps=steps,
        wall=wall,
        overall_sps=steps / wall,
        steady_sps=statistics.median(steady),
        loss=loss,
        ret=stats.get("reward/episodic_return"),
        peak_mem_mb=peak_mem,
    )


def random_sd_pipeline(out: Path, size: str) -> Path:
    """An SD-1.5-size StableDiffusionPipeline with random weights (same compute as the
    real model; the digits world's tiny tokenizer, 8 tokens per prompt) saved to ``out``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rlprox.zoo.sd import SCHEDULER_KWARGS, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    if size == "tiny":
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=8,
            )
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=8,
            )
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
        )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_KWARGS),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(str(out))
    return out


def random_llamagen(out: Path, size: str) -> list[str]:
    """GPT-B + VQ-16 (256 px, 16×16 tokens) with random weights saved as LlamaGen
    checkpoints, and a folder of 64 random images in 4 classes: the vapi overrides."""
    from rlprox.models import llamagen

    torch.manual_seed(0)
    image = 32 if size == "tiny" else 256
    vq_kwargs = (
        dict(ch=16, num_res_blocks=1, z_channels=32, norm_groups=8, codebook_size=256) if size == "tiny" else {}
    )
    gpt_kwargs = dict(n_layer=2, n_head=2, dim=64, multiple_of=32) if size == "tiny" else {}
    vq = llamagen.VQModel(**llamagen.vq_config("VQ-16", image, **vq_kwargs))
    gpt = llamagen.Transformer(
        **llamagen.gpt_config("GPT-B", image, 16, num_classes=4, vocab_size=vq.config["codebook_size"], **gpt_kwargs)
    )
    torch.save({"model": gpt.state_dict()}, out / "gpt.pt")
    torch.save({"model": vq.state_dict()}, out / "vq.pt")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(4):
        (out / "images" / f"class{c}").mkdir(parents=True)
        for i in range(16):
            pixels = (torch.rand(image, image, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(out / "images" / f"class{c}" / f"{i}.png")
    import json as _json

    return [
        f"model.gpt={out / 'gpt.pt'}",
        f"model.vq={out / 'vq.pt'}",
        "model.config=GPT-B",
        f"model.image_size={image}",
        "model.num_classes=4",
        f"model.gpt_kwargs={_json.dumps(gpt_kwargs)}",
        f"model.vq_kwargs={_json.dumps(vq_kwargs)}",
        f"vapi.data={out / 'images'}",
    ]


def run_overrides(out: Path, iterations: int, on_cpu: bool, bf16: bool = True) -> list[str]:
    """The run fields of every generative case and of the atari case: quiet, no evaluation or checkpoints, bf16 on
    CUDA (unless ``bf16`` is False: fp32 everywhere)."""
    bf16 = bf16 and not on_cpu
    return [
        f"run.iterations={iterations}",
        f"run.output_dir={out}",
        "run.log_with=[]",
        "run.progress=false",
        "run.plot=false",
        "run.eval_size=0",
        "run.save_every=0",
        f"run.cpu={'true' if on_cpu else 'false'}",
        f'run.mixed_precision="{"bf16" if bf16 else "no"}"',
        f"run.frozen_dtype={'bfloat16' if bf16 else 'float32'}",
    ]


def run_generative(case: str, size: str, iterations: int, on_cpu: bool, out_dir: str) -> dict:
    """A few rounds of LOOP or VA-π at real scale (random weights), bf16 on CUDA."""
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    out = Path(out_dir)
    common = [*run_overrides(out, iterations, on_cpu), f"run.name=gpu-{case}"]
    if case == "loop":
        pipe = random_sd_pipeline(out / "pipeline", size)
        steps = 5 if size == "tiny" else 50
        overrides = [
            f"loop.pipeline={pipe}",
            "loop.prompts=digits",
            f"loop.num_steps={steps}",
            "loop.prompts_per_iteration=8",
            "loop.num_samples_per_prompt=4",
            "loop.sample_batch_size=16",
            "loop.minibatch_size=16",
            "loop.timestep_fraction=1.0",
            "loop.eval_base=false",
            "reward=jpeg_compressibility",
        ]
        recipe = load_recipe(ROOT / "recipes" / "loop" / "sd15-aesthetic.yaml", common + overrides)
    elif case == "wan":
        recipe = load_recipe(WAN_RECIPE, common + wan_overrides(out / "pipeline", size))
    else:
        overrides = random_llamagen(out, size) + [
            "vapi.images_per_iteration=16",
            "vapi.group_size=8",
            "vapi.micro_batch_size=8",
            "vapi.eval_base=false",
        ]
        recipe = load_recipe(ROOT / "recipes" / "vapi" / "digits.yaml", common + overrides + ["model.vq_config=VQ-16"])
    measured = fit_generative(Engine(recipe), case, iterations, on_cpu)
    return dict(case=case, size=size, iterations=iterations, **measured)


def fit_generative(engine, case: str, iterations: int, on_cpu: bool) -> dict:
    """Train a generative case's built engine: images per round, the median images/s of the rounds after the first
    (all rounds when there is one), the last loss (finite, or the case stops) and the peak CUDA memory of the fit."""
    if not on_cpu:
        torch.cuda.reset_peak_memory_stats()
    stats = engine.fit()
    rows = [json.loads(line) for line in (engine.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_round = [r["perf/images_per_s"] for r in rows]
    engine.close()
    loss = stats.get("loss/total", float("nan"))
    if not math.isfinite(loss):
        raise SystemExit(f"{case}: last loss is not finite ({loss})")
    return dict(
        images_per_round=int(rows[-1]["progress/images"]) // iterations,
        images_per_s=statistics.median(per_round[1:] or per_round),
        loss=loss,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if not on_cpu else None,
    )


def publish(body: str, out: Path | None, default: Path | None) -> None:
    """Print a case's table and write it to ``out`` (--out), else to ``default`` (None: nowhere, e.g. off CUDA)."""
    print(body)
    target = out if out is not None else default
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
        print(f"wrote {target}")


# ============================================================================ wan: LOOP on a Wan 2.1-size pipeline

WAN_RECIPE = ROOT / "recipes" / "loop" / "wan21-t2v.yaml"
WAN_CONFIGS = ROOT / "tests" / "wan21_t2v_1_3b"  # Wan 2.1 T2V 1.3B's published transformer and VAE configs


def random_wan_pipeline(out: Path, size: str) -> tuple[Path, int]:
    """A WanPipeline with random weights saved to ``out``, and its transformer's parameter count. full: the
    transformer and VAE of Wan 2.1 T2V 1.3B's configs (``WAN_CONFIGS``), a 1-layer UMT5 encoder of its width
    (4096) over the digits-wan tokenizer (UMT5-XXL's 24 layers would only add encoding time), Euler with shift 3.
    tiny: digits-wan's components at their smallest, to check the script on CPU."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from rlprox.zoo.wan import build_components, text_encoder_config

    if size == "full":
        parts = build_components(0, z_dim=4, vae_dim=4, heads=2, head_dim=12, layers=1)
        torch.manual_seed(0)
        parts["transformer"] = WanTransformer3DModel.from_config(
            WanTransformer3DModel.load_config(WAN_CONFIGS / "transformer")
        ).to(torch.bfloat16)
        parts["vae"] = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(WAN_CONFIGS / "vae"))
        config = text_encoder_config(parts["tokenizer"], 4096)
        config.num_heads, config.d_kv, config.d_ff = 64, 64, 10240
        parts["text_encoder"] = UMT5EncoderModel(config).to(torch.bfloat16)
    else:
        parts = build_components(0, z_dim=4, vae_dim=4, heads=2, head_dim=12, layers=1)
    WanPipeline(**parts).save_pretrained(str(out))
    return out, sum(p.numel() for p in parts["transformer"].parameters())


def wan_overrides(pipe: Path, size: str) -> list[str]:
    """The recipe's settings but a reward without weights (temporal_consistency), 8 videos a round (2 prompts ×
    K 4, one sampling batch, one minibatch) and, tiny, 16×16 × 5 frames at 4 steps."""
    path, _ = random_wan_pipeline(pipe, size)
    full = size == "full"
    return [
        f"loop.pipeline={path}",
        "loop.prompts=digits-motion",
        "loop.prompts_per_iteration=2",
        "loop.sample_batch_size=8",
        "loop.minibatch_size=8",
        "loop.eval_base=false",
        f"loop.num_steps={20 if full else 4}",
        f"loop.max_sequence_length={512 if full else 8}",
        *([] if full else ["loop.sampling.frames=5", "loop.sampling.height=16", "loop.sampling.width=16"]),
        "reward=temporal_consistency",
    ]


# ============================================================================ flow: rlprox vs naive Flow-GRPO

FLOW_RECIPE = ROOT / "recipes" / "loop" / "sd35-pickscore.yaml"
FLOW_REWARD = "jpeg_compressibility"  # needs no weights
CLIP_TOKENS = 77  # full size: SD3.5's CLIP length (the digits tokenizer pads to it)
T5_TOKENS = {"full": 256, "tiny": 8}  # T5's place in the context: zeros (text_encoder_3 = None)
FLOW_RESOLUTION = {"full": 512, "tiny": 32}


def random_sd3_pipeline(out: Path, size: str) -> tuple[Path, int]:
    """A StableDiffusion3Pipeline with random weights saved to ``out``, and its transformer's parameter count.
    full: the transformer of SD3.5-Medium's published config, SD3's VAE (16 latent channels, scaling 1.5305,
    shift 0.0609), two CLIPTextModelWithProjection encoders of SD3.5's widths (CLIP-L 768, CLIP-G 1280: pooled
    2048) but 2 layers each, over the digits world's tokenizer padded to 77 tokens, no T5 (the pipeline puts
    zeros of width joint_attention_dim in its place), FlowMatchEulerDiscreteScheduler(shift=3.0).
    tiny: the same structure with toy widths, to check the script on CPU."""
    import copy

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from rlprox.zoo.sd import build_tokenizer, clip_text_config

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    full = size == "full"
    if full:
        tokenizer.model_max_length = CLIP_TOKENS

    def clip(width: int):
        config = clip_text_config(tokenizer, width)  # 2 layers over the digits vocabulary
        if full:  # SD3.5's CLIP-L / CLIP-G layer shape: 64-wide heads, a 4× MLP, 77 positions
            config.num_attention_heads = width // 64
            config.intermediate_size = 4 * width
            config.max_position_embeddings = CLIP_TOKENS
        return CLIPTextModelWithProjection(config)

    if full:
        widths = (768, 1280)
        transformer = SD3Transformer2DModel(  # stabilityai/stable-diffusion-3.5-medium's transformer/config.json
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=sum(widths),
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        )
        blocks, layers, vae_size = (128, 256, 512, 512), 2, 1024
    else:
        widths = (32, 32)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=sum(widths),  # >= the CLIP sequences side by side, which the pipeline pads to it
            caption_projection_dim=16,
            pooled_projection_dim=sum(widths),
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        blocks, layers, vae_size = (32, 64), 1, 32
    vae = AutoencoderKL(
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        layers_per_block=layers,
        latent_channels=16,
        sample_size=vae_size,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip(widths[0]),
        tokenizer=tokenizer,
        text_encoder_2=clip(widths[1]),
        tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None,
        tokenizer_3=None,
    ).save_pretrained(str(out))
    return out, sum(p.numel() for p in transformer.parameters())


def flow_overrides(pipe: Path, size: str, iterations: int, on_cpu: bool, out: Path) -> list[str]:
    """recipes/loop/sd35-pickscore.yaml made the benchmark's batch: K = 8 × 2 prompts = 16 images per round,
    sampled 8 at a time, minibatches of 8 samples × all 10 steps (2 optimizer steps), no CFG, no KL, no EMA,
    plain leave-one-out advantages (the naive loop's), a reward that needs no weights; LoRA r32 α64, 10 SDE
    steps at noise 0.7 and AdamW as the recipe has them."""
    return [
        *run_overrides(out, iterations, on_cpu),
        f"loop.pipeline={pipe}",
        "loop.prompts=digits",
        f"loop.resolution={FLOW_RESOLUTION[size]}",
        f"loop.max_sequence_length={T5_TOKENS[size]}",
        "loop.num_samples_per_prompt=8",
        "loop.prompts_per_iteration=2",
        "loop.sample_batch_size=8",
        "loop.minibatch_size=8",
        "loop.timestep_fraction=1.0",
        "loop.guidance_scale=1.0",
        "loop.normalize_advantages=false",
        "loop.ema_decay=0.0",
        "loop.eval_base=false",
        "regularizers=[]",
        f"reward={FLOW_REWARD}",
    ]


def _rlprox_rounds(overrides: list[str], on_cpu: bool):
    """A fresh rlprox run: (seconds of each round after the first, last loss, weakref to its transformer).
    A round's seconds: from the previous round's log to its own, each taken after a CUDA synchronize."""
    import weakref

    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    engine = Engine(load_recipe(FLOW_RECIPE, overrides))
    ends = []
    log = engine.tracker.log

    def timed_log(*args, **kwargs):
        if not on_cpu:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return log(*args, **kwargs)

    engine.tracker.log = timed_log
    try:
        stats = engine.fit()
    finally:
        engine.close()
    return (
        [b - a for a, b in zip(ends, ends[1:])],
        stats.get("loss/total", float("nan")),
        weakref.ref(engine.algo.denoiser),
    )


def _naive_rounds(overrides: list[str], rounds: int, on_cpu: bool):
    """A fresh NaiveFlowGRPO run on the same recipe's settings: (seconds of each round after the first,
    last minibatch's loss, weakref to its transformer)."""
    import dataclasses
    import weakref

    from loop_flow import NaiveFlowGRPO

    from rlprox.recipe import load_recipe

    recipe = load_recipe(FLOW_RECIPE, overrides)
    cfg = dataclasses.asdict(recipe.loop)
    naive = NaiveFlowGRPO(
        cfg["pipeline"],
        cfg,
        dataclasses.asdict(recipe.optim),
        recipe.seed,
        device="cpu" if on_cpu else "cuda",
        lora_rank=recipe.loop.lora.rank,
        lora_alpha=recipe.loop.lora.alpha,
        mixed_precision=recipe.run.mixed_precision,
        reward=FLOW_REWARD,
    )
    try:
        naive.reset()
        seconds = [naive.round() for _ in range(rounds)]
    finally:
        naive.executor.shutdown()
    return seconds[1:], naive.logged["loss"], weakref.ref(naive.pipe.transformer)


def flow_block(which: str, run, on_cpu: bool) -> dict:
    """One block, from a clean GPU: ``run()`` -> (timed round seconds, last loss, weakref to the model);
    peak memory since the block's start (its model load included)."""
    import gc

    gc.collect()
    resident = None
    if not on_cpu:
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    seconds, loss, model = run()
    peak = torch.cuda.max_memory_allocated() / 2**30 if not on_cpu else None
    gc.collect()
    if not on_cpu:
        torch.cuda.empty_cache()
    if not math.isfinite(loss):
        raise SystemExit(f"flow {which}: last loss is not finite ({loss})")
    return dict(which=which, seconds=seconds, loss=loss, peak_gib=peak, resident_gib=resident, freed=model() is None)


def run_flow(size: str, iterations: int, on_cpu: bool, out_dir: str) -> dict:
    """rlprox's LOOP and the naive Flow-GRPO-style loop on one random-weight SD3 pipeline, in blocks
    rlprox, naive, rlprox, naive of ``iterations`` rounds each (the first a warm-up)."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    pipe, params = random_sd3_pipeline(out / "pipeline", size)
    built = time.perf_counter() - t0
    print(f"random pipeline: {params:,} transformer parameters, saved in {built:.0f} s", flush=True)
    overrides = flow_overrides(pipe, size, iterations, on_cpu, out)
    from rlprox.recipe import load_recipe

    recipe = load_recipe(FLOW_RECIPE, overrides)  # the settings both loops get, for the table
    blocks = {"rlprox": [], "naive": []}
    for b in range(2):
        for which in ("rlprox", "naive"):
            named = [*overrides, f"run.name=gpu-flow-{which}-{b}"]
            if which == "rlprox":
                r = flow_block(which, lambda: _rlprox_rounds(named, on_cpu), on_cpu)
            else:
                r = flow_block(which, lambda: _naive_rounds(named, iterations, on_cpu), on_cpu)
            blocks[which].append(r)
            mem = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.1f} GiB"
            print(
                f"block {b + 1} {which}: {', '.join(f'{s:.2f}' for s in r['seconds'])} s per round{mem}, "
                f"loss {r['loss']:.4f}" + ("" if r["freed"] else " (its model was not freed after the block)"),
                flush=True,
            )
    return dict(size=size, iterations=iterations, params=params, loop=recipe.loop, optim=recipe.optim, blocks=blocks)


def flow_table(r: dict, cuda: bool, device: str) -> str:
    import diffusers

    c, o = r["loop"], r["optim"]
    images = c.num_samples_per_prompt * c.prompts_per_iteration

    def summary(which):
        blocks = r["blocks"][which]
        rates = [images / s for b in blocks for s in b["seconds"]]
        return dict(
            ips=statistics.median(rates),
            rates=rates,
            peaks=[b["peak_gib"] for b in blocks],
            loss=blocks[-1]["loss"],
        )

    rl, nv = summary("rlprox"), summary("naive")
    if r["size"] == "full":
        model = (
            f"an SD3.5-Medium-size `SD3Transformer2DModel` with random weights ({r['params'] / 1e9:.2f} B "
            "parameters; SD3.5-Medium's config: 24 layers, 24 heads × 64, caption projection 1536, dual attention in "
            "layers 0–12, RMS qk-norm, patch 2), SD3's `AutoencoderKL` (16 latent channels, blocks 128/256/512/512, "
            "scaling 1.5305, shift 0.0609), two `CLIPTextModelWithProjection` encoders of SD3.5's widths (768 and "
            "1280, pooled 2048) but **only 2 layers each** (frozen, used only to encode prompts: rlprox once per "
            "round, the naive loop once per sampling batch) over the digits world's tokenizer padded to "
            f"{CLIP_TOKENS} tokens, no T5 (text_encoder_3 = None: {c.max_sequence_length} zero tokens of width 4096 "
            "in its place)"
        )
    else:
        model = f"a tiny SD3 pipeline of the same structure ({r['params']:,} transformer parameters)"
    precision = (
        "bf16: accelerate's autocast around the transformer calls, its frozen base, the VAE and the text encoders "
        "in bf16 (rlprox: run.frozen_dtype bfloat16), the LoRA weights, latents and log-probs fp32"
        if cuda
        else "fp32 on the CPU (no mixed precision)"
    )
    lines = [
        f"# GPU smoke test: flow ({r['size']}, random weights): rlprox LOOP vs a naive Flow-GRPO-style loop",
        "",
        f"Date {datetime.date.today().isoformat()}; device {device}; torch {torch.__version__}"
        f"{' (CUDA ' + str(torch.version.cuda) + ')' if cuda else ''}, diffusers {diffusers.__version__}. "
        f"Command: `python benchmarks/gpu_smoke.py {' '.join(sys.argv[1:])}`",
        "",
        f"Both loops in one process on the same device and the same pipeline: {model}; "
        f"FlowMatchEulerDiscreteScheduler(shift 3.0). {c.resolution} px, {c.num_steps} SDE steps (noise level "
        f"{c.sampling.get('noise_level', 0.7)}) all trained, K = {c.num_samples_per_prompt} samples × "
        f"{c.prompts_per_iteration} prompts = "
        f"{images} images per round sampled {c.sample_batch_size} at a time, minibatches of {c.minibatch_size} "
        f"samples × {c.num_steps} steps ({images // c.minibatch_size} AdamW steps per round, lr {o.lr:g}), clip "
        f"{c.clip_coef:g}, leave-one-out advantages, reward {FLOW_REWARD}, **guidance {c.guidance_scale:g}: CFG is "
        f"off in both loops**, no KL, no EMA. LoRA r {c.lora.rank} (α {c.lora.alpha:g}) on the joint attention's "
        f"projections of both streams; {precision}. rlprox = `Engine` on recipes/loop/sd35-pickscore.yaml with "
        "`flow_overrides` (benchmarks/gpu_smoke.py); naive = `NaiveFlowGRPO` in benchmarks/loop_flow.py (the "
        "structure of Flow-GRPO's scripts/train_sd3.py) with the same settings.",
        "",
        f"Blocks rlprox, naive, rlprox, naive, each a fresh run (model load, {r['iterations']} rounds, the first a "
        "warm-up). A round's images/s = images / its wall seconds, taken after a CUDA synchronize on a GPU (rlprox: "
        "from one iteration's log to the next; naive: the whole round); the median is over the timed rounds of both "
        "blocks. Peak memory: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` at the block's "
        "start (model load included), the larger block (each block's in brackets). Loss, a finite check: rlprox's "
        "last round's mean over minibatches (≈ 0: leave-one-out advantages sum to 0 over a round), the naive "
        "loop's last minibatch's.",
        "",
        "| loop | images/s, median | per timed round | peak GiB | loss |",
        "|---|---|---|---|---|",
    ]
    for label, v in (("rlprox LOOP (Engine)", rl), ("naive (Flow-GRPO structure)", nv)):
        mem = f"{max(v['peaks']):.1f} ({' / '.join(f'{p:.1f}' for p in v['peaks'])})" if cuda else "–"
        rates = ", ".join(f"{x:.2f}" for x in v["rates"])
        lines.append(f"| {label} | **{v['ips']:.2f}** | {rates} | {mem} | {v['loss']:.4f} |")
    mem_ratio = f"**{max(rl['peaks']) / max(nv['peaks']):.2f}×**" if cuda else "–"
    lines.append(f"| ratio rlprox / naive | **{rl['ips'] / nv['ips']:.2f}×** | | {mem_ratio} | |")
    every = [(w, i, b) for w in ("rlprox", "naive") for i, b in enumerate(r["blocks"][w])]
    resident = [b["resident_gib"] for _, _, b in every if b["resident_gib"] is not None]
    leaks = [f"{w} block {i + 1}" for w, i, b in every if not b["freed"]]
    if resident and max(resident) > 0.05:
        lines += ["", f"GPU memory still allocated at a block's start: up to {max(resident):.2f} GiB."]
    if leaks:
        lines += ["", f"Model not freed after: {', '.join(leaks)} (a later block's memory includes it)."]
    return "\n".join(lines) + "\n"


def flow_case(args, cuda: bool) -> int:
    iterations = args.iterations or (4 if cuda else 2)
    if iterations < 2:
        raise SystemExit("--case flow: --iterations must be >= 2 (the first round of each block is a warm-up)")
    out_dir = tempfile.mkdtemp(prefix="gpu_smoke_flow_")
    try:
        r = run_flow(args.size, iterations, not cuda, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    body = flow_table(r, cuda, device)
    publish(body, args.out, RESULTS.with_name("gpu_smoke_flow.md") if cuda and args.size == "full" else None)
    return 0


NFT_ARMS = {  # the flow case's batch (flow_overrides), group-normalised advantages, all 10 steps trained
    "GRPO (SDE steps, ratio)": ["loop.advantage=group_norm"],
    "NFT (old policy's ODE, no likelihood)": ["loop.advantage=group_norm", "loop.objective=nft"],
}


def nft_case(args, cuda: bool) -> int:
    """GRPO and NFT blocks, alternated (GRPO, NFT, GRPO, NFT), on one random-weight SD3 pipeline."""
    iterations = args.iterations or (4 if cuda else 2)
    if iterations < 2:
        raise SystemExit("--case nft: --iterations must be >= 2 (the first round of each block is a warm-up)")
    out = Path(tempfile.mkdtemp(prefix="gpu_smoke_nft_"))
    try:
        pipe, params = random_sd3_pipeline(out / "pipeline", args.size)
        base = flow_overrides(pipe, args.size, iterations, not cuda, out)
        blocks = {arm: [] for arm in NFT_ARMS}
        for b in range(2):
            for i, (arm, extra) in enumerate(NFT_ARMS.items()):
                named = [*base, *extra, f"run.name=gpu-nft-{i}-{b}"]
                r = flow_block(arm, lambda: _rlprox_rounds(named, not cuda), not cuda)
                blocks[arm].append(r)
                print(f"block {b + 1} {arm}: {', '.join(f'{s:.2f}' for s in r['seconds'])} s per round", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    images = 16  # flow_overrides: K 8 × 2 prompts
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"# GPU smoke test: nft ({args.size}, random weights): LOOP's objective nft vs GRPO",
        "",
        f"Date {datetime.date.today().isoformat()}; device {device}; torch {torch.__version__}. Command: "
        f"`python benchmarks/gpu_smoke.py {' '.join(sys.argv[1:])}`",
        "",
        f"One random-weight SD3 pipeline ({params:,} transformer parameters; `random_sd3_pipeline`), the flow case's "
        f"batch ({images} images per round, minibatches of 8 × 10 steps, LoRA r32, "
        f"{'bf16' if cuda else 'fp32'}, no CFG, no KL, no EMA), group-normalised advantages. GRPO samples 10 SDE "
        "steps and trains each step's clipped ratio (one transformer pass per trained step); NFT samples the old "
        "policy's ODE and trains the forward-process loss (two passes per trained step: the old and the current "
        "velocity). Blocks GRPO, NFT, GRPO, NFT, each a fresh run, the first round of each a warm-up; images/s is "
        "the median over the timed rounds of both blocks; peak memory as the flow case.",
        "",
        "| objective | images/s, median | per timed round | peak GiB | last loss |",
        "|---|---|---|---|---|",
    ]
    for arm, bs in blocks.items():
        rates = [images / s for blk in bs for s in blk["seconds"]]
        peak = f"{max(blk['peak_gib'] for blk in bs):.1f}" if cuda else "–"
        lines.append(
            f"| {arm} | **{statistics.median(rates):.2f}** | {', '.join(f'{x:.2f}' for x in rates)} | {peak} | "
            f"{bs[-1]['loss']:.4f} |"
        )
    body = "\n".join(lines) + "\n"
    publish(body, args.out, RESULTS.with_name("gpu_smoke_nft.md") if cuda and args.size == "full" else None)
    return 0


# ============================================================================ atari: Nature CNN PPO, compile off/on

ATARI_SHAPE = {  # CleanRL ppo_atari.py's batch: 8 envs × 128 steps in 4 minibatches, 4 epochs, 84×84 frames × 4
    "full": dict(num_envs=8, num_steps=128, minibatches=4, epochs=4, frame=84),
    "tiny": dict(num_envs=2, num_steps=16, minibatches=2, epochs=2, frame=36),  # 36: the Nature CNN's smallest
}
ATARI_PPO = ["ppo.gamma=0.99", "ppo.gae_lambda=0.95", "ppo.clip_coef=0.1", "ppo.ent_coef=0.01", "optim.lr=2.5e-4"]


class StackedFrames(gymnasium.Env):
    """A stand-in for Breakout after AtariPreprocessing and a 4-frame stack, where ale-py is missing: (4, size, size)
    uint8 observations (channels first, as FrameStackObservation gives them), 4 actions; each new frame holds one 8×8
    white block at a random place, reward 1 when the action names the quadrant of the newest frame's block; episodes
    are truncated after ``length`` steps. Only its shapes and its cost stand in for the game."""

    action_space = gymnasium.spaces.Discrete(4)

    def __init__(self, size: int = 84, length: int = 1000):
        self.size, self.length = size, length
        self.observation_space = gymnasium.spaces.Box(0, 255, (4, size, size), np.uint8)
        self.frames = np.zeros((4, size, size), np.uint8)
        self.t, self.block = 0, (0, 0)

    def _push_frame(self) -> np.ndarray:
        self.frames = np.roll(self.frames, -1, axis=0)
        self.frames[-1] = 0
        row, col = self.block = tuple(int(x) for x in self.np_random.integers(self.size - 8, size=2))
        self.frames[-1, row : row + 8, col : col + 8] = 255
        return self.frames.copy()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.frames[:] = 0
        return self._push_frame(), {}

    def step(self, action):
        half = self.size // 2
        reward = float(int(action) == 2 * (self.block[0] >= half) + (self.block[1] >= half))
        self.t += 1
        return self._push_frame(), reward, False, self.t >= self.length, {}


gymnasium.register("GPUSmoke/StackedFrames-v0", entry_point=StackedFrames)


def atari_env(size: str) -> tuple[list[str], str]:
    """(env overrides, description): real Breakout through rlprox's Atari preprocessing (recipes/ppo/breakout.yaml's
    env) at full size where ale-py imports, else ``StackedFrames``."""
    if size == "full":
        try:
            import ale_py  # noqa: F401

            env = ["env.id=ALE/Breakout-v5", "env.preprocessing=atari"]
            return env, "ALE/Breakout-v5, env.preprocessing: atari (84×84 grey, 4 stacked frames)"
        except ImportError:
            pass
    frame, why = ATARI_SHAPE[size]["frame"], "no ale-py" if size == "full" else "--size tiny"
    env = ["env.id=GPUSmoke/StackedFrames-v0", f"env.kwargs={json.dumps({'size': frame})}"]
    return env, f"StackedFrames, synthetic 4×{frame}×{frame} frames ({why})"


def run_atari(size: str, compiled: bool, iterations: int, on_cpu: bool, out_dir: str) -> dict:
    """``iterations`` PPO iterations of the Nature CNN policy at ``ATARI_SHAPE[size]`` (recipes/ppo/cartpole.yaml with
    the env, batch and CleanRL's Atari hyperparameters as overrides), fp32; per-iteration collect and update seconds
    from metrics.jsonl, peak CUDA memory from the block's start (model build included)."""
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    shape = ATARI_SHAPE[size]
    env, _ = atari_env(size)
    n, T = shape["num_envs"], shape["num_steps"]
    overrides = [
        *run_overrides(Path(out_dir), iterations, on_cpu, bf16=False),
        f"run.name=atari-compile-{compiled}",
        "run.torch_threads=1",
        f"run.compile={'true' if compiled else 'false'}",
        *env,
        f"env.num_envs={n}",
        f"ppo.num_steps={T}",
        f"ppo.minibatch_size={n * T // shape['minibatches']}",
        f"ppo.update_epochs={shape['epochs']}",
        *ATARI_PPO,
    ]
    if not on_cpu:
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(load_recipe(ROOT / "recipes" / "ppo" / "cartpole.yaml", overrides))
    encoders = [type(e).__name__ for e in engine.algo.policy.trunk.encoders]
    if encoders != ["NatureCNN"]:
        raise SystemExit(f"atari: expected the Nature CNN policy, got {encoders}")
    stats = engine.fit()
    if not on_cpu:
        torch.cuda.synchronize()
    rows = [json.loads(line) for line in (engine.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    engine.close()
    loss = stats.get("loss/total", float("nan"))
    if not math.isfinite(loss):
        raise SystemExit(f"atari, compile {compiled}: last loss is not finite ({loss})")
    collect = [r["perf/iteration_s"] * r["perf/collect_fraction"] for r in rows]
    update = [r["perf/iteration_s"] - c for r, c in zip(rows, collect)]
    timed = slice(1, None) if len(rows) > 1 else slice(None)  # the first iteration: warm-up (and compilation)
    return dict(
        compiled=compiled,
        first_s=rows[0]["perf/iteration_s"],
        collect_sps=statistics.median(n * T / c for c in collect[timed]),
        update_s=statistics.median(update[timed]),
        overall_sps=statistics.median(r["perf/sps"] for r in rows[timed]),
        loss=loss,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if not on_cpu else None,
    )


def atari_case(args, cuda: bool) -> int:
    iterations = args.iterations or (6 if cuda else 2)
    if iterations < 2:
        raise SystemExit("--case atari: --iterations must be >= 2 (the first iteration is a warm-up)")
    shape = ATARI_SHAPE[args.size]
    _, env_name = atari_env(args.size)
    out_dir = tempfile.mkdtemp(prefix="gpu_smoke_atari_")
    try:
        results = []
        for compiled in (False, True):
            r = run_atari(args.size, compiled, iterations, not cuda, out_dir)
            results.append(r)
            print(
                f"  compile {'on' if compiled else 'off'}: first iteration {r['first_s']:.2f} s, "
                f"{r['collect_sps']:,.0f} env steps/s collecting, update {r['update_s']:.3f} s",
                flush=True,
            )
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    n, T, frame = shape["num_envs"], shape["num_steps"], shape["frame"]
    lines = [
        f"# GPU smoke test: atari ({args.size}): PPO with the Nature CNN, run.compile off vs on",
        "",
        f"Date {datetime.date.today().isoformat()}; device {device}; torch {torch.__version__}"
        f"{' (CUDA ' + str(torch.version.cuda) + ')' if cuda else ''}, gymnasium {gymnasium.__version__}; "
        f"1 torch thread. Command: `python benchmarks/gpu_smoke.py {' '.join(sys.argv[1:])}`",
        "",
        f"Env: {env_name}. PPO (recipes/ppo/cartpole.yaml with overrides: CleanRL ppo_atari.py's batch and "
        f"hyperparameters): {n} envs × {T} steps = {n * T} env steps per iteration, {shape['minibatches']} "
        f"minibatches of {n * T // shape['minibatches']}, {shape['epochs']} epochs, Nature CNN on "
        f"4×{frame}×{frame} uint8 frames, fp32, sync vector env. Compile off, then on, each a fresh run of "
        f"{iterations} iterations in this process; "
        "the first iteration is a warm-up (with compile on it pays the compilation) and is shown apart; the other "
        "columns are medians over the rest. Collect env steps/s = env steps / the collect's seconds (env steps, the "
        "rollout's forward and GAE); update s = the iteration's seconds after the collect; overall = env steps / the "
        "iteration's seconds. Peak memory: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` "
        "before the run's build.",
        "",
        "| run.compile | first iteration s | collect env steps/s | update s | overall env steps/s | last loss "
        "| peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        lines.append(
            f"| {'on' if r['compiled'] else 'off'} | {r['first_s']:.2f} | {r['collect_sps']:,.0f} | "
            f"{r['update_s']:.3f} | {r['overall_sps']:,.0f} | {r['loss']:.4f} | {mem} |"
        )
    off, on = results
    lines.append(
        f"| on / off | | {on['collect_sps'] / off['collect_sps']:.2f}× | {on['update_s'] / off['update_s']:.2f}× | "
        f"{on['overall_sps'] / off['overall_sps']:.2f}× | | |"
    )
    body = "\n".join(lines) + "\n"
    publish(body, args.out, RESULTS.with_name("gpu_smoke_atari.md") if cuda and args.size == "full" else None)
    return 0


# ============================================================================ qwen: LOOP at Qwen-Image's widths

QWEN_RECIPE = ROOT / "recipes" / "loop" / "qwen-image-pickscore.yaml"
QWEN_LAYERS = {"full": 8, "tiny": 1}  # Qwen-Image has 60 dual-stream blocks: 8 keep one GPU's run short
QWEN_RESOLUTION = {"full": 512, "tiny": 16}


def random_qwen_pipeline(out: Path, size: str) -> tuple[Path, int]:
    """A QwenImagePipeline with random weights saved to ``out``, and its transformer's parameter count.
    full: Qwen-Image's widths at reduced depth: its transformer config (24 heads × 128, joint width 3584,
    64 packed channels) with ``QWEN_LAYERS`` blocks, its VAE config (tests/configs/qwen-image), a Qwen2.5-VL
    text encoder of its width (3584, 28 heads, 4 KV heads) with 2 layers over digits-qwen's tokenizer;
    Qwen-Image's scheduler. tiny: digits-qwen's architecture with one block, to check the script on CPU."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from rlprox.zoo.qwen import build_components, build_pipeline, build_tokenizer, text_encoder_config

    if size == "tiny":
        parts = build_components(0, num_layers=QWEN_LAYERS["tiny"])
    else:
        configs = ROOT / "tests" / "configs" / "qwen-image"
        torch.manual_seed(0)
        tokenizer = build_tokenizer()
        text = text_encoder_config(tokenizer, 3584, heads=28, kv_heads=4, sections=[16, 24, 24])  # Qwen2.5-VL-7B's
        transformer_config = QwenImageTransformer2DModel.load_config(configs / "transformer")
        parts = {
            "tokenizer": tokenizer,
            "text_encoder": Qwen2_5_VLForConditionalGeneration(text),
            "vae": AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(configs / "vae")),
            "transformer": QwenImageTransformer2DModel.from_config(transformer_config, num_layers=QWEN_LAYERS[size]),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(configs / "scheduler"),
        }
    build_pipeline(parts).save_pretrained(str(out))
    return out, sum(p.numel() for p in parts["transformer"].parameters())


def run_qwen(size: str, iterations: int, on_cpu: bool, out_dir: str) -> dict:
    """A few LOOP rounds of recipes/loop/qwen-image-pickscore.yaml (LoRA, true CFG 4, the 2-step SDE window,
    gradient checkpointing, bf16 on CUDA) on ``random_qwen_pipeline``: K 8 × 2 prompts = 16 images per round,
    sampled and trained 8 at a time, a reward that needs no weights."""
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    out = Path(out_dir)
    pipe, params = random_qwen_pipeline(out / "pipeline", size)
    steps = 10 if size == "full" else 4
    overrides = [
        *run_overrides(out, iterations, on_cpu),
        "run.name=gpu-qwen",
        f"loop.pipeline={pipe}",
        "loop.prompts=digits",
        f"loop.resolution={QWEN_RESOLUTION[size]}",
        f"loop.num_steps={steps}",
        f"loop.sampling.sde_window_range=[0, {steps // 2}]",
        "loop.max_sequence_length=32",
        "loop.num_samples_per_prompt=8",
        "loop.prompts_per_iteration=2",
        "loop.sample_batch_size=8",
        "loop.minibatch_size=8",
        "loop.eval_base=false",
        "reward=jpeg_compressibility",
    ]
    recipe = load_recipe(QWEN_RECIPE, overrides)
    engine = Engine(recipe)
    assert engine.algo.denoiser.is_gradient_checkpointing == (recipe.loop.gradient_checkpointing is True)
    measured = fit_generative(engine, "qwen", iterations, on_cpu)
    return dict(case="qwen", size=size, iterations=iterations, params=params, **measured)


def qwen_case(args, cuda: bool) -> int:
    iterations = args.iterations or 3
    out_dir = tempfile.mkdtemp(prefix="gpu_smoke_qwen_")
    try:
        r = run_qwen(args.size, iterations, not cuda, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    mem = "–" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
    body = (
        f"# GPU smoke test: qwen ({args.size}, random weights)\n\nDate {datetime.date.today().isoformat()}; device "
        f"{device}; torch {torch.__version__}. Command: `python benchmarks/gpu_smoke.py {' '.join(sys.argv[1:])}`\n\n"
        f"LOOP with recipes/loop/qwen-image-pickscore.yaml's settings (LoRA r64, true CFG 4: two transformer passes "
        f"a step, a 2-step SDE window trained, gradient checkpointing, {'bf16' if cuda else 'fp32'}) on a random "
        f"QwenImagePipeline of Qwen-Image's widths with {QWEN_LAYERS[args.size]} of its 60 blocks "
        f"({r['params']:,} transformer parameters), {QWEN_RESOLUTION[args.size]} px, 16 images a round. Images/s: "
        "the median round after the first; peak memory: `torch.cuda.max_memory_allocated()` over the rounds.\n\n"
        "| case | size | rounds | images per round | images/s | last loss | peak GiB |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| qwen | {r['size']} | {r['iterations']} | {r['images_per_round']} | {r['images_per_s']:.2f} "
        f"| {r['loss']:.4f} | {mem} |\n"
    )
    print(body)
    out = (
        args.out
        if args.out is not None
        else (RESULTS.with_name("gpu_smoke_qwen.md") if cuda and args.size == "full" else None)
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(body)
        print(f"wrote {out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=["ppo", "loop", "vapi", "flow", "nft", "atari", "qwen", "wan"], default="ppo")
    p.add_argument(
        "--size",
        choices=["full", "tiny"],
        default="full",
        help="loop/vapi/flow/atari: real-scale models (full) or toy ones to check the script (tiny)",
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="iterations per precision (default 4 on CUDA, 1 on CPU); loop/vapi: rounds (default 2); "
        "flow: rounds per block, the first a warm-up (default 4 on CUDA, 2 on CPU); atari: iterations per "
        "run.compile setting, the first a warm-up (default 6 on CUDA, 2 on CPU)",
    )
    p.add_argument(
        "--allow-cpu",
        action="store_true",
        help="without CUDA, run the same path on CPU (1 iteration) instead of skipping",
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"results file (default {RESULTS.relative_to(ROOT)}, CUDA only)"
    )
    p.add_argument("--worker", choices=list(PRECISIONS), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)

    if args.case != "ppo":
        cuda = torch.cuda.is_available()
        if not cuda and not args.allow_cpu:
            print("no CUDA device: skipped")
            return 0
        if args.case == "flow":
            return flow_case(args, cuda)
        if args.case == "nft":
            return nft_case(args, cuda)
        if args.case == "atari":
            return atari_case(args, cuda)
        if args.case == "qwen":
            return qwen_case(args, cuda)
        out_dir = tempfile.mkdtemp(prefix=f"gpu_smoke_{args.case}_")
        try:
            r = run_generative(args.case, args.size, args.iterations or 2, not cuda, out_dir)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        device = torch.cuda.get_device_name(0) if cuda else "CPU"
        mem = "–" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        body = (
            f"# GPU smoke test: {args.case} ({args.size}, random weights)\n\nDate "
            f"{datetime.date.today().isoformat()}; device {device}; torch {torch.__version__}. "
            f"Command: `python benchmarks/gpu_smoke.py {' '.join(sys.argv[1:])}`\n\n| "
            "case | size | rounds | images per round | images/s (median round after "
            "the first) | last loss | peak GiB |\n|---|---|---|---|---|---|---|\n"
            f"| {r['case']} | {r['size']} | {r['iterations']} | {r['images_per_round']} "
            f"| {r['images_per_s']:.2f} | {r['loss']:.4f} | {mem} |\n"
        )
        default = RESULTS.with_name(f"gpu_smoke_{args.case}.md") if cuda and args.size == "full" else None
        publish(body, args.out, default)
        return 0

    if args.worker:
        on_cpu = not torch.cuda.is_available()
        out_dir = tempfile.mkdtemp(prefix="gpu_smoke_")
        try:
            r = run_one(args.worker, args.iterations or (1 if on_cpu else 4), on_cpu, out_dir)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        print("RESULT " + json.dumps(r), flush=True)
        return 0

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: skipped")
        return 0
    on_cpu = not cuda
    iterations = args.iterations or (1 if on_cpu else 4)
    device_name = (
        torch.cuda.get_device_name(0)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )

    results = []
    for precision in PRECISIONS:
        # one fresh process per precision: accelerate's AcceleratorState is a process-wide
        # singleton and refuses a second Accelerator with another mixed_precision
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", precision, "--iterations", str(iterations)]
        cmd += ["--allow-cpu"] if on_cpu else []
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            print(f"{precision}: FAILED (rc {proc.returncode})")
            return 1
        r = json.loads(found[-1][len("RESULT ") :])
        results.append(r)
        print(
            f"  {precision}: {r['steady_sps']:,.0f} steps/s steady, {r['overall_sps']:,.0f} overall, "
            f"loss {r['loss']:.4f}",
            flush=True,
        )

    import gymnasium

    lines = [
        "# GPU smoke test: PPO Hopper-v5 (recipes/ppo/hopper.yaml)",
        "",
        f"Date {datetime.date.today().isoformat()}; device {device_name}; torch {torch.__version__}"
        f"{' (CUDA ' + str(torch.version.cuda) + ')' if cuda else ''}, gymnasium {gymnasium.__version__}; "
        f"1 torch thread. {iterations} iteration(s) × 1 env × 2048 steps per precision, run one after the other "
        "each in a fresh process. Steady SPS = median per-iteration `perf/sps` after the first iteration "
        "(all iterations when only one); overall = steps / wall of `Engine.fit()`. "
        "A smoke test, not a benchmark: the env is MuJoCo on the CPU, so the GPU mostly shows launch overhead.",
        "",
        "Command: `" + " ".join(["python benchmarks/gpu_smoke.py"] + sys.argv[1:]) + "`",
        "",
        "| precision | device | accelerate mixed_precision | iterations | env steps | steady SPS | overall SPS "
        "| last loss | peak CUDA mem MB |",
        "|" + "---|" * 9,
    ]
    for r in results:
        mem = "–" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(
            f"| {r['precision']} | {r['device']} | {r['mixed_precision']} | {r['iterations']} | {r['steps']:,} "
            f"| {r['steady_sps']:,.0f} | {r['overall_sps']:,.0f} | {r['loss']:.4f} | {mem} |"
        )
    body = "\n".join(lines) + "\n"
    print()
    publish(body, args.out, RESULTS if cuda else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
