"""GPU smoke test: the Hopper PPO recipe on CUDA for a few iterations, fp32 and bf16;
and the generative trainers at real scale with random weights.

    python benchmarks/gpu_smoke.py                  # CUDA: 4 iterations per precision
    python benchmarks/gpu_smoke.py --iterations 2
    python benchmarks/gpu_smoke.py --allow-cpu      # no GPU: same code path on CPU, 1 iteration
    python benchmarks/gpu_smoke.py --case loop      # LOOP on an SD-1.5-size pipeline (512 px, 50 DDIM steps, CFG,
                                                    # LoRA r4, bf16)
    python benchmarks/gpu_smoke.py --case vapi      # VA-π on GPT-B + VQ-16 (256 px, 16×16 tokens, bf16)
    python benchmarks/gpu_smoke.py --case loop --size tiny --allow-cpu   # check the script on CPU

The loop case matches the naive diffusers anchor's round (32 images, micro-batch 16, all
timesteps trained): run both in one GPU session and quote the ratio.

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


def run_generative(case: str, size: str, iterations: int, on_cpu: bool, out_dir: str) -> dict:
    """A few rounds of LOOP or VA-π at real scale (random weights), bf16 on CUDA."""
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    out = Path(out_dir)
    common = [
        f"run.iterations={iterations}",
        f"run.output_dir={out}",
        f"run.name=gpu-{case}",
        "run.log_with=[]",
        "run.progress=false",
        "run.plot=false",
        "run.eval_size=0",
        "run.save_every=0",
        f"run.cpu={'true' if on_cpu else 'false'}",
        f'run.mixed_precision="{"no" if on_cpu else "bf16"}"',
        f"run.frozen_dtype={'float32' if on_cpu else 'bfloat16'}",
    ]
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
            "loop.train_batch_size=16",
            "loop.timestep_fraction=1.0",
            "loop.eval_base=false",
            "reward=jpeg_compressibility",
        ]
        recipe = load_recipe(ROOT / "recipes" / "loop" / "sd15-aesthetic.yaml", common + overrides)
    else:
        overrides = random_llamagen(out, size) + [
            "vapi.images_per_iteration=16",
            "vapi.group_size=8",
            "vapi.micro_batch_size=8",
            "vapi.eval_base=false",
        ]
        recipe = load_recipe(ROOT / "recipes" / "vapi" / "digits.yaml", common + overrides + ["model.vq_config=VQ-16"])
    engine = Engine(recipe)
    if not on_cpu:
        torch.cuda.reset_peak_memory_stats()
    stats = engine.fit()
    rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_round = [r["perf/images_per_s"] for r in rows]
    engine.close()
    loss = stats.get("loss/total", float("nan"))
    if not math.isfinite(loss):
        raise SystemExit(f"{case}: last loss is not finite ({loss})")
    return dict(
        case=case,
        size=size,
        iterations=iterations,
        images_per_round=rows[-1]["progress/images"] // iterations,
        images_per_s=statistics.median(per_round[1:] or per_round),
        loss=loss,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if not on_cpu else None,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=["ppo", "loop", "vapi"], default="ppo")
    p.add_argument(
        "--size",
        choices=["full", "tiny"],
        default="full",
        help="loop/vapi: real-scale models (full) or toy ones to check the script (tiny)",
    )
    p.add_argument(
        "--iterations", type=int, default=None, help="iterations per precision (default 4 on CUDA, 1 on CPU)"
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
        print(body)
        out = (
            args.out
            if args.out is not None
            else (RESULTS.with_name(f"gpu_smoke_{args.case}.md") if cuda and args.size == "full" else None)
        )
        if out is not None:
            out.write_text(body)
            print(f"wrote {out}")
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
    print(body)
    out = args.out if args.out is not None else (RESULTS if cuda else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(body)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
