"""LOOP vs DDPO vs REINFORCE-LOO on digits alignment, same images sampled, side by side.

    python benchmarks/loop_vs_ddpo.py                      # 3 methods × lr sweep × 3 seeds
    python benchmarks/loop_vs_ddpo.py --seeds 1 --lrs 1e-4 --iterations 10   # smoke
    python benchmarks/loop_vs_ddpo.py --target             # the shipped LOOP recipe on 2 processes (torchrun),
                                                           # seeds 1-3

Each method runs its shipped recipe (recipes/loop/digits-alignment.yaml,
digits-ddpo.yaml, digits-reinforce-loo.yaml: the same pipeline, prompts, K = 4,
16 prompts per round, 20 DDIM steps, η = 1, cfg 1, full UNet) with the same
``--iterations`` (so the same number of sampled images) and the same small sweep over
``--lrs`` (every method gets every lr; nothing is tuned for one method only).
Alignment is measured by the trainer's own evaluation on a fixed set: all 50 prompts ×
2 noises (item i: prompt i mod 50, noise seeded by i), with the sampler that is trained
(DDIM η = 1) and with deterministic DDIM (η = 0), for the base and the tuned UNet.

Every run is a fresh ``rlprox train`` process (``--parallel`` at a time, 1 torch thread
each). ``--target`` instead runs recipes/loop/digits-alignment.yaml as shipped (150 rounds
of 16 prompts × K = 4 per process) with 2 processes on the 2 cores, the setting of the
"+0.15 within 20 minutes on 2 CPU cores" target, and writes loop_target.md. Writes
benchmarks/results/loop_vs_ddpo.md and loop_vs_ddpo.png (training reward vs images
sampled, mean over seeds, per method and lr).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = harness.ROOT
RESULTS = ROOT / "benchmarks" / "results"
METHODS = {
    "LOOP (K=4, PPO clip)": "recipes/loop/digits-alignment.yaml",
    "DDPO (per-prompt tracker)": "recipes/loop/digits-ddpo.yaml",
    "REINFORCE-LOO (1 step/round)": "recipes/loop/digits-reinforce-loo.yaml",
}


def worker(argv: list[str]) -> None:
    """Run `rlprox train ARGS` in this process, then print peak RSS (MB)."""
    from rlprox.cli import main

    code = main(["train", *argv])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"code": code, "rss_mb": rss}), flush=True)


def run(recipe: str, lr: float, seed: int, iterations: int, out: Path) -> dict:
    name = f"{Path(recipe).stem}-lr{lr:g}-s{seed}"
    args = [
        str(ROOT / recipe),
        f"seed={seed}",
        f"optim.lr={lr}",
        f"run.iterations={iterations}",
        f"run.output_dir={out}",
        f"run.name={name}",
        "run.log_with=[]",
        "run.progress=false",
        "run.plot=false",
        f"run.eval_every={iterations}",
        "run.eval_size=100",
        "run.save_every=0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines or json.loads(lines[-1][7:])["code"]:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    images = last["progress/images"]
    wall = sum(r["perf/iteration_s"] for r in rows)
    return {
        "name": name,
        "recipe": recipe,
        "lr": lr,
        "seed": seed,
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "rss_mb": json.loads(lines[-1][7:])["rss_mb"],
        "base_eta1": last["eval/base_reward"],
        "tuned_eta1": last["eval/reward"],
        "base_eta0": last["eval/base_reward_eta0"],
        "tuned_eta0": last["eval/reward_eta0"],
        "curve": [(r["progress/images"], r["reward/mean"]) for r in rows],
    }


def target_check(seeds: int, out_path: Path) -> None:
    """The shipped LOOP recipe, 2 processes (torchrun), seeds 1..seeds, one after another."""
    harness.target_check(
        "recipes/loop/digits-alignment.yaml",
        seeds,
        out_path,
        title="# LOOP, the shipped recipe on 2 CPU processes: does η = 1 alignment rise by ≥ 0.15 within 20 minutes?",
        command=f"python benchmarks/loop_vs_ddpo.py --target --seeds {seeds}",
        setup="recipes/loop/digits-alignment.yaml unchanged (150 rounds × 16 "
        "prompts × K = 4 per process, full UNet, lr 1e-4, clip 1e-4) under "
        "`torchrun --nproc_per_node 2`; minutes = summed iteration wall time (training and the in-run evaluations).",
    )


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", default="1e-4,3e-4", help="the lr sweep every method gets")
    parser.add_argument("--iterations", type=int, default=100, help="rounds per run (64 images each)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    parser.add_argument("--out", default=str(RESULTS / "loop_vs_ddpo.md"))
    parser.add_argument(
        "--target",
        action="store_true",
        help="run the shipped LOOP recipe on 2 processes instead (writes loop_target.md)",
    )
    args = parser.parse_args()
    if args.target:
        target_check(args.seeds, RESULTS / "loop_target.md")
        return
    lrs = [float(x) for x in args.lrs.split(",")]
    out = Path(tempfile.mkdtemp(prefix="loop_vs_ddpo_"))
    jobs = [(m, r, lr, s) for s in range(1, args.seeds + 1) for lr in lrs for m, r in METHODS.items()]
    results: dict[tuple, list] = {}
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(run, r, lr, s, args.iterations, out): (m, lr) for m, r, lr, s in jobs}
        for fut in concurrent.futures.as_completed(futures):
            res = fut.result()
            results.setdefault(futures[fut], []).append(res)
            print(
                f"{res['name']}: eta1 {res['base_eta1']:.3f} -> {res['tuned_eta1']:.3f}, eta0 "
                f"{res['base_eta0']:.3f} -> {res['tuned_eta0']:.3f}, {res['images_per_s']:.1f} images/s",
                flush=True,
            )
    lines = [
        "# LOOP vs DDPO vs REINFORCE-LOO: digits alignment (digits-sd, cfg 1)",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} "
        f"CPUs (shared), python {platform.python_version()}; "
        f"`python benchmarks/loop_vs_ddpo.py --seeds {args.seeds} --lrs "
        f"{args.lrs} --iterations {args.iterations} --parallel {args.parallel}`.",
        "",
        f"Each run: {args.iterations} rounds × 16 prompts × K = 4 = {args.iterations * 64:,} "
        "images sampled, 20 DDIM steps (all trained), η = 1, cfg 1, "
        "full UNet, AdamW, clip 1e-4, 1 torch thread, one process. Alignment = "
        "digits_alignment on the fixed evaluation set (50 prompts × 2 fixed noises), "
        "base → tuned, with the trained sampler (DDIM η = 1) and "
        "with deterministic DDIM (η = 0); mean ± std over seeds. "
        "images/s counts sampled images per second of training (collect + update); runs shared the 2 cores "
        f"({args.parallel} at a time), so compare images/s within this table only.",
        "",
        "| method | lr | seeds | η = 1: base → tuned | Δ η = 1 | seeds with "
        "Δ ≥ 0.15 | η = 0: base → tuned | Δ η = 0 | images/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, lr), runs in sorted(results.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1])):
        d1 = [r["tuned_eta1"] - r["base_eta1"] for r in runs]
        d0 = [r["tuned_eta0"] - r["base_eta0"] for r in runs]
        lines.append(
            f"| {method} | {lr:g} | {len(runs)} | {mean_sd([r['base_eta1'] for r in runs])} "
            f"→ {mean_sd([r['tuned_eta1'] for r in runs])} | "
            f"**{mean_sd(d1)}** | {sum(d >= 0.15 for d in d1)}/{len(runs)} | "
            f"{mean_sd([r['base_eta0'] for r in runs])} → {mean_sd([r['tuned_eta0'] for r in runs])} | "
            f"{mean_sd(d0)} | {statistics.mean(r['images_per_s'] for r in runs):.1f} "
            f"| {max(r['rss_mb'] for r in runs):.0f} |"
        )
    lines += ["", "Per run (Δ η = 1, Δ η = 0, minutes):", ""]
    for (method, lr), runs in sorted(results.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1])):
        lines.append(
            f"- {method}, lr {lr:g}: "
            + ", ".join(
                f"seed {r['seed']}: {r['tuned_eta1'] - r['base_eta1']:+.3f} / "
                f"{r['tuned_eta0'] - r['base_eta0']:+.3f} / {r['wall_s'] / 60:.1f} min"
                for r in sorted(runs, key=lambda r: r["seed"])
            )
        )
    png = Path(args.out).with_suffix(".png")
    plot(results, png)
    lines += ["", f"![training reward vs images sampled]({png.name})", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for (method, lr), runs in sorted(results.items()):
        n = min(len(r["curve"]) for r in runs)
        x = np.array([p[0] for p in runs[0]["curve"][:n]])
        y = np.mean([[p[1] for p in r["curve"][:n]] for r in runs], axis=0)
        k = max(1, n // 20)  # moving average over ~5% of the run
        y = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], y, label=f"{method}, lr {lr:g}")
    ax.set_xlabel("images sampled")
    ax.set_ylabel("training reward (digits_alignment, η = 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
