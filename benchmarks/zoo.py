"""Build the digits-world models and report their quality.

    python benchmarks/zoo.py            # build all for real (≈13–20 min on 2 CPU cores before digits-qwen, ≈5 more)
    python benchmarks/zoo.py --reuse    # reuse cached builds, only evaluate

Prints a markdown table and writes it to benchmarks/results/zoo.md; copies the sample
grids to docs/zoo/. FID/KID proxies use digits-classifier features against all 1,800
held-out images, with the real-vs-real floor at the same N (see rlprox.zoo.metrics).

A second table judges every text-conditioned generator where the recipes judge it: on the
(digit, colour) pairs the recipes hold out of training (``digits-paraphrased-test``; for
digits-wan the (digit, direction) pairs of ``digits-motion-test``), at each recipe's guidance:
the base's alignment there and its headroom (1 − alignment), what RL fine-tuning can gain.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlprox.models.llamagen import Transformer, VQModel, generate  # noqa: E402
from rlprox.zoo.build import build, build_info, build_order, model_dir  # noqa: E402
from rlprox.zoo.classifier import DigitsClassifier  # noqa: E402
from rlprox.zoo.data import load_digits_world  # noqa: E402
from rlprox.zoo.metrics import (  # noqa: E402
    conditional_accuracy,
    fid_floor,
    fid_proxy,
    is_proxy,
    kid_proxy,
    real_like,
)
from rlprox.zoo.qwen import load_qwen_pipeline, sample_qwen  # noqa: E402
from rlprox.zoo.sd import load_sd_pipeline, sample_sd  # noqa: E402
from rlprox.zoo.sd3 import load_sd3_pipeline  # noqa: E402
from rlprox.zoo.vq import encode_tokens  # noqa: E402
from rlprox.zoo.wan import sample_clips  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="reuse cached builds")
    parser.add_argument("--micro", action="store_true", help="micro builds (smoke test only)")
    parser.add_argument("--n", type=int, default=500, help="samples per evaluation")
    parser.add_argument("--n-video", type=int, default=200, help="digits-wan clips on held-out pairs")
    parser.add_argument("--sd-cfg", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--sd3-cfg", type=float, nargs="+", default=[1.0, 1.5, 3.0])
    parser.add_argument("--qwen-cfg", type=float, nargs="+", default=[1.0, 1.5, 3.0])
    parser.add_argument("--gpt-cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/zoo.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/zoo")
    args = parser.parse_args()
    torch.set_num_threads(1)

    # ------------------------------------------------------------------ BUILD
    paths, seconds = {}, {}
    total_start = time.perf_counter()
    for name in build_order():  # dependencies first (digits-vq before digits-gpt)
        cached = model_dir(name, args.seed, args.micro).is_dir()
        paths[name] = build(name, seed=args.seed, micro=args.micro, force=not args.reuse)
        seconds[name] = build_info(paths[name])["build_seconds"]
        print(f"{name}: {'reused' if args.reuse and cached else 'built'} ({seconds[name]} s)", flush=True)
    wall = time.perf_counter() - total_start

    # ------------------------------------------------------------------ EVALUATE
    clf = DigitsClassifier.from_pretrained(paths["digits-classifier"])
    train, held = load_digits_world("train"), load_digits_world("heldout")
    gen = torch.Generator().manual_seed(1234)
    pick = torch.randperm(len(held), generator=gen)[: args.n]  # held-out (digit, colour) mix
    prompts = [held.prompts[i] for i in pick]
    digits, colours = held.digits[pick], held.colours[pick]
    classes = digits * 5 + colours
    real = real_like(train, classes, seed=args.seed)  # what a perfect generator would give
    floor = fid_proxy(held.images, real, clf)
    floor_random = fid_floor(clf, held, train, n=args.n, seed=args.seed)

    rows = []

    def evaluate(model: str, setting: str, images: torch.Tensor, ms_per_image: float):
        acc = conditional_accuracy(images, digits, colours, clf)
        rows.append(
            (
                model,
                setting,
                f"{acc['alignment']:.3f}",
                f"{acc['digit_acc']:.3f}",
                f"{acc['colour_acc']:.3f}",
                f"{fid_proxy(held.images, images, clf):.1f}",
                f"{kid_proxy(held.images, images, clf):.3f}",
                f"{is_proxy(images, clf):.2f}",
                f"{ms_per_image:.1f}",
            )
        )
        print(" | ".join(rows[-1]), flush=True)

    pipe = load_sd_pipeline(paths["digits-sd"])
    for cfg in args.sd_cfg:
        t = time.perf_counter()
        images = sample_sd(pipe, prompts, seed=args.seed, guidance_scale=cfg)
        evaluate("digits-sd", f"cfg {cfg:g}, 20 DDIM steps", images, 1000 * (time.perf_counter() - t) / args.n)

    pipe = load_sd3_pipeline(paths["digits-sd3"])
    for cfg in args.sd3_cfg:  # the pipeline's defaults otherwise: 256 (zero) T5 tokens
        t = time.perf_counter()
        images = sample_sd(pipe, prompts, seed=args.seed, guidance_scale=cfg)
        ms = 1000 * (time.perf_counter() - t) / args.n
        evaluate("digits-sd3", f"cfg {cfg:g}, 20 flow-match Euler steps", images, ms)

    pipe = load_qwen_pipeline(paths["digits-qwen"])
    for cfg in args.qwen_cfg:  # true CFG against " " above 1
        t = time.perf_counter()
        images = sample_qwen(pipe, prompts, seed=args.seed, guidance_scale=cfg)
        ms = 1000 * (time.perf_counter() - t) / args.n
        evaluate("digits-qwen", f"cfg {cfg:g}, 20 flow-match Euler steps", images, ms)

    vq = VQModel.from_pretrained(paths["digits-vq"])
    gpt = Transformer.from_pretrained(paths["digits-gpt"])
    with torch.no_grad():
        recon = vq.decode_code(encode_tokens(vq, held.images))
    vq_recon_acc = conditional_accuracy(recon, held.digits, held.colours, clf)["digit_acc"]
    for cfg in args.gpt_cfg:
        t = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed)
        images = vq.decode_code(generate(gpt, classes, cfg_scale=cfg, generator=g))
        evaluate("digits-gpt", f"cfg {cfg:g}, temperature 1", images, 1000 * (time.perf_counter() - t) / args.n)
    evaluate("real train images", "same classes = the floor", real, 0.0)
    with torch.no_grad():
        real_recon = vq.decode_code(encode_tokens(vq, real))
    evaluate("digits-vq reconstructions", "of those real images: the tokenizer floor", real_recon, 0.0)

    # ------------------------------------------------------------------ HELD-OUT PAIRS
    held_rows = held_out_pairs(paths, clf, train, args)

    # ------------------------------------------------------------------ REPORT
    clf_info = build_info(paths["digits-classifier"])["heldout"]
    vq_info = build_info(paths["digits-vq"])
    sd_info = build_info(paths["digits-sd"])
    sd3_info = build_info(paths["digits-sd3"])
    qwen_info = build_info(paths["digits-qwen"])
    lines = [
        "# digits world (rlprox.zoo)",
        "",
        f"`python benchmarks/zoo.py{' --reuse' if args.reuse else ''}` — seed {args.seed}, "
        f"torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs; wall times are approximate).",
        "",
        "## Builds",
        "",
        "| model | build s | held-out quality |",
        "|---|---|---|",
        f"| digits-classifier | {seconds['digits-classifier']} | digit acc {clf_info['digit_acc']:.4f}, "
        f"colour acc {clf_info['colour_acc']:.4f} |",
        f"| digits-sd | {seconds['digits-sd']} | VAE recon MSE {sd_info['vae_heldout_mse']:.5f} |",
        f"| digits-sd3 | {seconds['digits-sd3']} | VAE recon MSE {sd3_info['vae_heldout_mse']:.5f}, "
        f"held-out flow loss {sd3_info['flow_loss_heldout']:.4f} |",
        f"| digits-qwen | {seconds['digits-qwen']} | VAE recon MSE {qwen_info['vae_heldout_mse']:.5f}, "
        f"held-out flow loss {qwen_info['flow_loss_heldout']:.4f} |",
        f"| digits-vq | {seconds['digits-vq']} | recon MSE {vq_info['heldout_recon_mse']:.5f}, "
        f"{vq_info['codes_used_heldout']}/{vq.config['codebook_size']} codes used, "
        f"classifier digit acc on reconstructions {vq_recon_acc:.3f} |",
        f"| digits-gpt | {seconds['digits-gpt']} | (below) |",
        f"| **all** | **{sum(seconds.values()):.0f}** | "
        + (
            "(cached builds reused; this run built nothing)"
            if args.reuse and wall < 60
            else f"wall for this run's builds: {wall:.0f} s"
        )
        + " |",
        "",
        f"## Generators (N = {args.n} held-out prompts/classes)",
        "",
        "FID/KID/IS are offline proxies on digits-classifier features against all 1,800 "
        "held-out images (not comparable with published numbers). Real-vs-real floor at "
        f"N = {args.n}, real training images of the same classes as the prompts: "
        f"**FID proxy {floor:.1f}** (last row). {args.n} random training images score "
        f"{floor_random:.1f}: the proxy is dominated by class proportions, so compare "
        "generators only at the same N and conditioning.",
        "",
        "| model | sampling | alignment | digit acc | colour acc | FID proxy | KID proxy | IS proxy | ms/image |",
        "|---|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "alignment = mean P(prompted digit)·P(prompted colour) (the `digits_alignment` reward).",
        "",
        "## On the held-out pairs: the base models the recipes start from",
        "",
        f"Images: {args.n} items of the 140 digits-paraphrased-test prompts (the 10 (digit, colour) pairs every "
        "digits recipe holds out of training, in all 14 phrasings; digits-sd, whose recipe judges it on their "
        "plain phrasing, digits-test, on that), 20 sampler steps, FID proxy against real "
        f"training images of the same classes. Clips: {args.n_video} items of the 50 digits-motion-test prompts "
        "(the (digit, direction) pairs digits-wan-motion holds out, every colour), scored by "
        "`digits_video_alignment`. Guidance: each model's digits recipe's.",
        "",
        "| model | recipe | guidance | alignment | headroom (1 − alignment) | FID proxy |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in held_rows),
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.docs.mkdir(parents=True, exist_ok=True)
    for name in ("digits-sd", "digits-sd3", "digits-qwen", "digits-vq", "digits-gpt"):
        shutil.copy(paths[name] / "samples.png", args.docs / f"{name}.png")
    return 0


def held_out_pairs(paths: dict, clf, train, args) -> list[tuple[str, ...]]:
    """Rows of the held-out-pairs table: each text-conditioned base model at its recipe's guidance."""
    from rlprox.algos.loop import load_prompts
    from rlprox.rewards import build_reward

    prompts, meta = load_prompts("digits-paraphrased-test")
    take = [i % len(prompts) for i in range(args.n)]
    chosen = [prompts[i] for i in take]
    digits = torch.tensor([meta[i]["digit"] for i in take])
    colours = torch.tensor([meta[i]["colour"] for i in take])
    real = real_like(train, digits * 5 + colours, seed=args.seed)
    rows = []

    def row(model: str, recipe: str, cfg: str, images: torch.Tensor) -> None:
        align = conditional_accuracy(images, digits, colours, clf)["alignment"]
        rows.append((model, recipe, cfg, f"{align:.3f}", f"{1 - align:.3f}", f"{fid_proxy(real, images, clf):.1f}"))
        print(" | ".join(rows[-1]), flush=True)

    # digits-alignment judges digits-sd on the plain phrasing of the held-out pairs (digits-test)
    plain, plain_meta = load_prompts("digits-test")
    by_pair = {(m["digit"], m["colour"]): p for p, m in zip(plain, plain_meta)}
    plain_chosen = [by_pair[(int(d), int(c))] for d, c in zip(digits, colours)]
    images = sample_sd(load_sd_pipeline(paths["digits-sd"]), plain_chosen, seed=args.seed, guidance_scale=1.0)
    row("digits-sd", "digits-alignment (digits-test)", "1", images)
    pipe = load_sd3_pipeline(paths["digits-sd3"])
    images = sample_sd(pipe, chosen, seed=args.seed, guidance_scale=1.0, max_sequence_length=8)
    row("digits-sd3", "digits-sd3-alignment", "1", images)
    images = sample_qwen(load_qwen_pipeline(paths["digits-qwen"]), chosen, seed=args.seed, guidance_scale=1.0)
    row("digits-qwen", "digits-qwen-alignment", "1", images)
    row("real train images", "same classes: the ceiling", "—", real)

    from diffusers import WanPipeline

    motion, motion_meta = load_prompts("digits-motion-test")
    take = [i % len(motion) for i in range(args.n_video)]
    wan = WanPipeline.from_pretrained(str(paths["digits-wan"]))
    wan.set_progress_bar_config(disable=True)
    clips = torch.cat(
        [
            sample_clips(wan, [motion[i] for i in take[k : k + 50]], seed=args.seed + k, guidance_scale=3.0)
            for k in range(0, len(take), 50)
        ]
    )
    judge = {"name": "digits_video_alignment", "kwargs": {"classifier": str(paths["digits-classifier"])}}
    reward = build_reward(judge)
    scores, _ = reward(clips, [motion[i] for i in take], [motion_meta[i] for i in take])
    align = float(scores.mean())
    rows.append(("digits-wan", "digits-wan-motion", "3", f"{align:.3f}", f"{1 - align:.3f}", "—"))
    print(" | ".join(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
