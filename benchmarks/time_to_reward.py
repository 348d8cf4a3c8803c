"""Time to reward on digits-sd3: how much wall time and how many images each objective needs to lift
held-out alignment, next to a random-reward control.

    python benchmarks/time_to_reward.py --stage grid       # each arm's lr grid on seed 1
    python benchmarks/time_to_reward.py --stage seeds      # each arm at its best lr, seeds 1-5, and the control
    python benchmarks/time_to_reward.py --stage seeds --max-runs 4   # at most 4 new runs, then the table
    python benchmarks/time_to_reward.py --stage grid --arms nft --lrs 1 --iterations 2 --eval-every 1 \\
        --eval-size 4 --fid-size 8 --runs /tmp/ttr --out /tmp/ttr.md          # smoke

Arms (every one the shipped recipe, digits-sd3, trained on digits-paraphrased-train and evaluated on the
10 (digit, colour) pairs it never sees, digits-paraphrased-test):

    loop        recipes/loop/digits-sd3-alignment.yaml   LOOP, leave-one-out advantages, SDE on every step
    grpo        recipes/loop/digits-sd3-grpo.yaml        GRPO with Flow-GRPO's settings (its KL scale, 9 steps)
    grpo-fast   recipes/loop/digits-sd3-grpo-fast.yaml   GRPO-Fast: a shared ODE prefix, 2 trained SDE steps
    nft         recipes/loop/digits-sd3-nft.yaml         DiffusionNFT's likelihood-free objective
    control     the loop arm trained on uniform random scores (benchmarks.loop_flow:uniform_reward) and
                evaluated on digits_alignment (``eval_reward``): what a run with no signal does

Each run is ``torchrun --nproc_per_node 2 -m rlprox train RECIPE`` (one torch thread per process) with an
evaluation every ``--eval-every`` iterations: ``--eval-size`` held-out items, the same fixed noise at every
evaluation, tuned and base model, ODE and the trained sampler. The measure is the ODE alignment of the
tuned model minus the base's on the same items (Δ). Wall time is the sum of the training iterations'
seconds (evaluations excluded), on 2 processes.

``--stage grid``: each arm (not the control) at its recipe's lr × ``--lrs`` on seed 1; an arm's best lr is the
one with the highest mean Δ over its run's evaluations (the area under its Δ curve: earlier and higher both
count). ``--stage seeds``: each arm at its best lr (the control at LOOP's) for seeds 1..``--seeds``. The table:
per arm the minutes and images to reach Δ ≥ +0.10 and ≥ +0.15 (linear between evaluations; "> run" when a run
never gets there, and then the arm's mean is a lower bound), Δ at 10 and 20 minutes, and the FID proxy of the
final model (EMA weights where the recipe keeps one) against real images of the held-out pairs, next to the
base's, each mean [Student-t 95% interval] over seeds (benchmarks/stats.py; exploratory below 5 seeds); the
same-seed ratio of minutes to +0.15 against the grpo arm; the curve (Δ vs minutes, mean over seeds) beside it.

Target (the NFT issue): rlprox's fastest recipe reaches +0.15 held-out in ≤ ⅓ of the grpo arm's wall time with
an FID proxy no worse than the base's + 10%.

Finished runs live in ``--runs`` (default benchmarks/results/runs/time_to_reward/, committed): each pruned to
its metrics.jsonl and the FID record once measured, and read back instead of trained again, so the grid (about
40 runs of 10-20 minutes on 2 processes) finishes over several sittings, on any machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import stats  # noqa: E402

ROOT = harness.ROOT
RESULTS = ROOT / "benchmarks" / "results"
CONTROL_REWARD = "benchmarks.loop_flow:uniform_reward"
ARMS = {
    "loop": ("LOOP (digits-sd3-alignment)", "recipes/loop/digits-sd3-alignment.yaml", []),
    "grpo": ("GRPO, Flow-GRPO's settings (digits-sd3-grpo)", "recipes/loop/digits-sd3-grpo.yaml", []),
    "grpo-fast": ("GRPO-Fast, 2 trained steps (digits-sd3-grpo-fast)", "recipes/loop/digits-sd3-grpo-fast.yaml", []),
    "nft": ("NFT (digits-sd3-nft)", "recipes/loop/digits-sd3-nft.yaml", []),
    "control": (
        "control: LOOP on uniform random scores",
        "recipes/loop/digits-sd3-alignment.yaml",
        [f"reward.name={CONTROL_REWARD}", "eval_reward=digits_alignment"],
    ),
}
REFERENCE = "grpo"  # the Flow-GRPO-settings arm the target compares with
GAINS = (0.10, 0.15)
AT_MINUTES = (10.0, 20.0)


def recipe_lr(recipe: str) -> float:
    import yaml

    return float(yaml.safe_load((ROOT / recipe).read_text())["optim"]["lr"])


def run_name(arm: str, lr: float, seed: int, args) -> str:
    return f"{arm}-lr{lr:g}-s{seed}-{args.iterations}it-e{args.eval_every}x{args.eval_size}"


def curve(rows: list[dict]) -> list[tuple[float, int, float]]:
    """(training minutes, images, Δ ODE alignment) at every in-run evaluation, (0, 0, 0) first."""
    out, seconds = [(0.0, 0, 0.0)], 0.0
    for r in rows:
        seconds += r["perf/iteration_s"]
        if "eval/reward_ode" in r:
            out.append((seconds / 60, int(r["progress/images"]), r["eval/reward_ode"] - r["eval/base_reward_ode"]))
    return out


def first_reach(points: list[tuple[float, int, float]], gain: float) -> tuple[float, float] | None:
    """(minutes, images) where Δ first reaches ``gain``, linear between evaluations; None if never."""
    for (m0, i0, d0), (m1, i1, d1) in zip(points, points[1:]):
        if d1 >= gain:
            f = 1.0 if d1 == d0 else max(0.0, min(1.0, (gain - d0) / (d1 - d0)))
            return m0 + f * (m1 - m0), i0 + f * (i1 - i0)
    return None


def at_minutes(points: list[tuple[float, int, float]], minutes: float) -> float | None:
    """Δ at ``minutes`` of training, linear between evaluations; None past the run's end."""
    for (m0, _, d0), (m1, _, d1) in zip(points, points[1:]):
        if m0 <= minutes <= m1:
            return d0 + (d1 - d0) * (minutes - m0) / max(m1 - m0, 1e-9)
    return None


def fid_of(pipeline: Path, args) -> float:
    """FID proxy of ``--fid-size`` ODE samples of a digits-sd3 pipeline folder on the held-out pairs' prompts
    (one noise each, seeded) against real images of the same (digit, colour) classes, in a fresh process."""
    cmd = [sys.executable, __file__, "--fid-worker", str(pipeline), "--fid-size", str(args.fid_size)]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("FID ")]
    if done.returncode or not lines:
        raise RuntimeError(f"FID of {pipeline} failed:\n{done.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def fid_worker(pipeline: str, n: int) -> None:
    import torch

    from rlprox.algos.loop import load_prompts
    from rlprox.zoo.build import build
    from rlprox.zoo.classifier import DigitsClassifier
    from rlprox.zoo.data import load_digits_world
    from rlprox.zoo.metrics import fid_proxy, real_like
    from rlprox.zoo.sd import sample_sd
    from rlprox.zoo.sd3 import load_sd3_pipeline

    torch.set_num_threads(1)
    prompts, metadata = load_prompts("digits-paraphrased-test")
    chosen = [i % len(prompts) for i in range(n)]
    classes = torch.tensor([metadata[i]["digit"] * 5 + metadata[i]["colour"] for i in chosen])
    pipe = load_sd3_pipeline(pipeline)
    images = sample_sd(
        pipe, [prompts[i] for i in chosen], seed=0, guidance_scale=1.0, num_inference_steps=10, max_sequence_length=8
    )
    clf = DigitsClassifier.from_pretrained(build("digits-classifier"))
    real = real_like(load_digits_world("heldout"), classes, seed=0)
    print(f"FID {fid_proxy(real, images, clf):.3f}", flush=True)


def train(arm: str, lr: float, seed: int, args, run: bool = True) -> dict | None:
    """One run, trained (or read back) and measured: its curve, minutes, images and final FID proxy."""
    label, recipe, extra = ARMS[arm]
    out, name = Path(args.runs), run_name(arm, lr, seed, args)
    overrides = [
        f"seed={seed}",
        f"optim.lr={lr:g}",
        f"run.iterations={args.iterations}",
        f"run.eval_every={args.eval_every}",
        f"run.eval_size={args.eval_size}",
        "run.save_every=0",
        *extra,
    ]
    measured = out / name / "benchmark-fid.json"
    if not (measured.exists() and harness.torchrun_finished(recipe, overrides, out, name)):
        if not run:
            return None
        harness.torchrun_run(recipe, overrides, out, name, reuse=True)
        export = out / name / "export"
        cli = [sys.executable, "-m", "rlprox", "export", str(out / name), str(export)]
        done = subprocess.run(cli, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{name}: rlprox export failed:\n{done.stderr[-2000:]}")
        measured.write_text(json.dumps({"fid": fid_of(export, args)}))
        shutil.rmtree(export)
        harness.prune(out / name)
        for grid in sorted((out / name / "samples").glob("*.png"))[:-1]:  # the last evaluation's grid stays
            grid.unlink()
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    points = curve(rows)
    return {
        "arm": arm,
        "lr": lr,
        "seed": seed,
        "points": points,
        "auc": statistics.fmean(d for _, _, d in points[1:]) if len(points) > 1 else float("nan"),
        "minutes": points[-1][0],
        "images": points[-1][1],
        "final": points[-1][2],
        "fid": json.loads(measured.read_text())["fid"],
    }


def base_fid(args) -> float:
    from rlprox.zoo.build import build

    cached = Path(args.runs) / f"base-fid-{args.fid_size}.json"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"fid": fid_of(build("digits-sd3"), args)}))
    return json.loads(cached.read_text())["fid"]


def interval(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n = 1)"
    lo, hi = stats.mean_interval(values)
    tag = ", exploratory" if stats.is_exploratory(len(values)) else ""
    return f"{statistics.fmean(values):.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] (n = {len(values)}{tag})"


def reach_text(runs: list[dict], gain: float, index: int, digits: int) -> str:
    """Mean [interval] of minutes (index 0) or images (1) to ``gain``; runs that never got there count at
    their end and the cell says how many (a lower bound)."""
    values, never = [], 0
    for r in runs:
        hit = first_reach(r["points"], gain)
        if hit is None:
            never += 1
            values.append(r["minutes"] if index == 0 else r["images"])
        else:
            values.append(hit[index])
    text = interval(values, digits)
    return text if not never else f"> {text}; {never} of {len(runs)} never got there"


def table(runs: list[dict], stage: str, args, base: float, missing: list[str]) -> str:
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    lines = [
        f"# Time to reward on digits-sd3, held-out pairs ({stage})",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"`python benchmarks/time_to_reward.py {' '.join(sys.argv[1:])}`.",
        "",
        f"Each run: the arm's recipe for {args.iterations} iterations on 2 processes (torchrun, one torch thread "
        f"each), evaluated every {args.eval_every} iterations on {args.eval_size} held-out items "
        "(digits-paraphrased-test, fixed noise); Δ = tuned − base ODE alignment on the same items; minutes = "
        f"training time on 2 processes, evaluations excluded. FID proxy: {args.fid_size} ODE samples of the final "
        f"model on the held-out pairs against real images of the same classes (base: {base:.2f}). Cells: mean "
        "[Student-t 95% interval] over seeds; exploratory below 5 seeds.",
        "",
        "| arm | lr | seeds | min to +0.10 | min to +0.15 | images to +0.15 | Δ at 10 min | Δ at 20 min | "
        "final Δ | FID proxy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        for lr in sorted({r["lr"] for r in mine}):
            cell = [r for r in mine if r["lr"] == lr]
            at = [[d for r in cell if (d := at_minutes(r["points"], m)) is not None] for m in AT_MINUTES]
            lines.append(
                f"| {ARMS[arm][0]} | {lr:g} | {len(cell)} | {reach_text(cell, GAINS[0], 0, 1)} | "
                f"{reach_text(cell, GAINS[1], 0, 1)} | {reach_text(cell, GAINS[1], 1, 0)} | "
                f"{interval(at[0], 3)} | {interval(at[1], 3)} | {interval([r['final'] for r in cell], 3)} | "
                f"{interval([r['fid'] for r in cell], 2)} |"
            )
    if stage == "seeds" and any(r["arm"] == REFERENCE for r in runs):
        lines += ["", f"Minutes to +0.15, same seed, arm / {REFERENCE} (only seeds where both got there):", ""]
        ref = {r["seed"]: first_reach(r["points"], GAINS[1]) for r in runs if r["arm"] == REFERENCE}
        for arm in arms:
            if arm in (REFERENCE, "control"):
                continue
            ratios = []
            for r in runs:
                hit = first_reach(r["points"], GAINS[1]) if r["arm"] == arm else None
                if hit is not None and ref.get(r["seed"]) is not None:
                    ratios.append(hit[0] / ref[r["seed"]][0])
            lines.append(f"- {ARMS[arm][0]}: {interval(ratios, 2) if ratios else 'no seed where both got there'}")
    if missing:
        lines += ["", f"Not run yet ({len(missing)}): {', '.join(missing)}."]
    lines += ["", f"![Δ vs minutes]({Path(args.out).with_suffix('.png').name})", ""]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in ARMS:
        for lr in sorted({r["lr"] for r in runs if r["arm"] == arm}):
            cell = [r for r in runs if r["arm"] == arm and r["lr"] == lr]
            grid = [m for m, _, _ in cell[0]["points"]]
            mean = [statistics.fmean(d for r in cell if (d := at_minutes(r["points"], m)) is not None) for m in grid]
            ax.plot(grid, mean, marker=".", label=f"{arm}, lr {lr:g} ({len(cell)} seeds)")
    for gain in GAINS:
        ax.axhline(gain, color="grey", ls=":", lw=1)
    ax.set(xlabel="training minutes on 2 processes", ylabel="Δ held-out ODE alignment", title="time to reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("grid", "seeds"), default="seeds")
    parser.add_argument("--arms", default=None, help=f"comma-separated, of {', '.join(ARMS)} (default: all)")
    parser.add_argument("--lrs", default="0.5,1,2", help="the grid: multiples of each recipe's lr")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=320, help="the recipes' own budget")
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--eval-size", type=int, default=140, help="held-out items per evaluation")
    parser.add_argument("--fid-size", type=int, default=560, help="samples for the final FID proxy")
    parser.add_argument("--max-runs", type=int, default=None, help="train at most N new runs, then write the table")
    parser.add_argument("--runs", default=str(RESULTS / "runs" / "time_to_reward"))
    parser.add_argument("--out", default=None, help="default: results/time_to_reward[_grid].md")
    parser.add_argument("--fid-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fid_worker:
        fid_worker(args.fid_worker, args.fid_size)
        return
    arms = args.arms.split(",") if args.arms else list(ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)} (known: {', '.join(ARMS)})")
    args.out = args.out or str(RESULTS / f"time_to_reward{'_grid' if args.stage == 'grid' else ''}.md")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    multiples = [float(x) for x in args.lrs.split(",")]
    if args.stage == "grid":
        jobs = [(a, recipe_lr(ARMS[a][1]) * m, 1) for a in arms if a != "control" for m in multiples]
    else:
        best = {}
        for arm in {("loop" if a == "control" else a) for a in arms}:
            grid = [train(arm, recipe_lr(ARMS[arm][1]) * m, 1, args, run=False) for m in multiples]
            grid = [g for g in grid if g is not None]
            best[arm] = max(grid, key=lambda g: g["auc"])["lr"] if grid else recipe_lr(ARMS[arm][1])
        lr_of = {a: best["loop" if a == "control" else a] for a in arms}
        jobs = [(a, lr_of[a], s) for s in range(1, args.seeds + 1) for a in arms]  # seed major
    runs, missing, trained = [], [], 0
    for arm, lr, seed in jobs:
        done = train(arm, lr, seed, args, run=False)
        if done is None and (args.max_runs is None or trained < args.max_runs):
            done = train(arm, lr, seed, args)
            trained += 1
            print(f"{arm} lr {lr:g} seed {seed}: Δ {done['final']:+.3f} in {done['minutes']:.1f} min", flush=True)
        if done is None:
            missing.append(f"{arm} lr {lr:g} seed {seed}")
        else:
            runs.append(done)
    if not runs:
        print("no finished run yet", flush=True)
        return
    text = table(runs, args.stage, args, base_fid(args), missing)
    Path(args.out).write_text(text)
    plot(runs, Path(args.out).with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
