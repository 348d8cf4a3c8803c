"""VA-π with a treatment that acts: does any setting move VA-π's own reward, and then does VA-π beat the
random-reward control on more seeds and two independent zoo builds?

    python benchmarks/vapi_treatment.py --sweep                 # lr × β (× rounds) at 1 seed: the treatment check
    python benchmarks/vapi_treatment.py --sweep --lrs 1e-4,3e-4 --betas 0.1,0.01 --cells 1e-4:0.1:900
                                                               # the grid that ran, with one longer cell
    python benchmarks/vapi_treatment.py --verdict --lr 1e-4 --beta 0.01 --rounds 300
                                                               # 5 seeds × 2 zoo builds, VA-π vs control, 2,000
                                                               # samples, the prior ablation on 5 seeds
    python benchmarks/vapi_treatment.py --sweep --lrs 1e-5 --betas 0.1 --samples 100 --out /tmp/v.md   # smoke

Every run is recipes/vapi/digits.yaml (digits-gpt, B = 32 × G = 8, one AdamW step per round, reward −MSE,
prior β·CE) with the lr, β (`regularizers[0].lam`) and rounds of its cell; the control is the same with the
reward shuffled between images (`reward.kwargs.shuffle_seed`, as benchmarks/vapi.py). The advantage is
group-normalised, so a reward scale would change nothing: β, the prior's weight against the normalised
reward, is the knob that scaling the reward would turn.

**Treatment check** (``--sweep``, one training seed): the teacher-forced reconstruction MSE of held-out
images (`eval/tf_mse`, the quantity the reward pushes down) relative to the base, and the FID proxy against
the control's at the same cell; a cell "acts" when the MSE falls ≥ 30% while the FID proxy stays within
10% of the base's FID of the control's. **Verdict** (``--verdict``): at one cell, VA-π and the control on
seeds 1..5 of each of two independent digits-gpt builds (zoo seeds 0 and 1, each with its own digits-vq),
evaluated on one set of ``--samples`` samples at cfg 1.0; VA-π − control paired by (build, seed), a
Student-t 95% interval over the 10 pairs with the per-pair differences and the MDE at 80% power; the
per-build means show the build's share of the spread. The prior ablation (reward only, β = 0) against
VA-π on build 0's 5 seeds. Writes benchmarks/results/vapi_treatment_sweep.md / vapi_treatment.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402
from harness import ROOT, evaluate_run, train_run  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RECIPE = "recipes/vapi/digits.yaml"
EVAL_SEED = 777
ACTS_MSE_DROP = 0.30  # the treatment acts: tf MSE at least 30% below the base's
NEAR_FID = 0.10  # ... while the FID proxy stays within 10% of the base's FID of the control's
ARMS = {"vapi": [], "control": ["reward.kwargs.shuffle_seed=0"], "reward-only": ["regularizers=[]"]}


def gpt_of(build: int) -> str:
    """model.gpt of a zoo build: the recipe's own for build 0, the folder of ``rlprox zoo build --seed B``."""
    if build == 0:
        return "zoo:digits-gpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "rlprox", "zoo", "build", "digits-gpt", "--seed", str(build)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def one_run(arm: str, lr: float, beta: float, rounds: int, seed: int, build: int, gpt: str, args, out: Path) -> dict:
    name = f"{arm}-lr{lr:g}-b{beta:g}-r{rounds}-build{build}-s{seed}"
    overrides = [
        f"seed={seed}",
        f"optim.lr={lr}",
        f"run.iterations={rounds}",
        "run.eval_size=0",
        f"model.gpt={gpt}",
        *([] if arm == "reward-only" else [f"regularizers=[{{type: prior_ce, lam: {beta}}}]"]),
        *ARMS[arm],
    ]
    rows = train_run(RECIPE, overrides, out, name, reuse=True)
    ev = evaluate_run(
        out / name,
        ["--num-samples", str(args.samples), "--seed", str(EVAL_SEED), "--guidance-scale", "1.0"],
        f"n{args.samples}",
        reuse=True,
    )
    print(
        f"{name}: FID {ev['eval/fid_proxy']:.1f} (base {ev['eval/base_fid_proxy']:.1f}), tf MSE "
        f"{ev['eval/tf_mse']:.4f} (base {ev['eval/base_tf_mse']:.4f})",
        flush=True,
    )
    return {
        "arm": arm, "lr": lr, "beta": beta, "rounds": rounds, "seed": seed, "build": build,
        "fid": ev["eval/fid_proxy"], "base_fid": ev["eval/base_fid_proxy"],
        "mse": ev["eval/tf_mse"], "base_mse": ev["eval/base_tf_mse"],
        "acc": ev["eval/digit_acc"], "base_acc": ev["eval/base_digit_acc"],
        "reward_first": rows[0]["reward/mean"], "reward_last": rows[-1]["reward/mean"],
        "minutes": sum(r["perf/iteration_s"] for r in rows) / 60,
    }  # fmt: skip


def run_all(jobs: list[tuple], args, out: Path) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        return list(pool.map(lambda job: one_run(*job, args, out), jobs))


def header(title: str, command: str) -> list[str]:
    return [
        f"# {title}",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared), python "
        f"{platform.python_version()}; `{command}`.",
        "",
    ]


def sweep(args, out: Path) -> str:
    cells = [(lr, beta, rounds) for rounds in args.rounds_grid for lr in args.lrs for beta in args.betas]
    cells += [cell for cell in args.cells if cell not in cells]
    gpt = gpt_of(0)
    runs = run_all([(arm, *cell, 1, 0, gpt) for cell in cells for arm in ("vapi", "control")], args, out)
    by = {(r["arm"], r["lr"], r["beta"], r["rounds"]): r for r in runs}
    command = (
        f"python benchmarks/vapi_treatment.py --sweep --lrs {','.join(map(str, args.lrs))} --betas "
        f"{','.join(map(str, args.betas))} --rounds-grid {','.join(map(str, args.rounds_grid))} "
        f"--samples {args.samples}"
        + (f" --cells {','.join(f'{a:g}:{b:g}:{r}' for a, b, r in args.cells)}" if args.cells else "")
    )
    lines = header("VA-π treatment check: does any lr × β × rounds move VA-π's own reward?", command)
    lines += [
        f"One training seed per cell (seed 1, zoo build 0), VA-π and the control; evaluation: {args.samples} "
        f"samples at cfg 1.0, evaluation seed {EVAL_SEED}, the base with the same seed. tf MSE: teacher-forced "
        "reconstruction MSE of held-out images, relative change against the base. A cell **acts** when tf MSE "
        f"falls ≥ {ACTS_MSE_DROP:.0%} while VA-π's FID proxy stays within {NEAR_FID:.0%} of the base's FID of "
        "the control's. One seed per cell: a screen, not a verdict.",
        "",
        "| lr | β | rounds | tf MSE vs base, VA-π | tf MSE vs base, control | FID VA-π | FID control | FID base "
        "| digit acc VA-π − base | acts |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    acting = []
    for lr, beta, rounds in cells:
        v, c = by[("vapi", lr, beta, rounds)], by[("control", lr, beta, rounds)]
        drop_v, drop_c = v["mse"] / v["base_mse"] - 1, c["mse"] / c["base_mse"] - 1
        acts = drop_v <= -ACTS_MSE_DROP and abs(v["fid"] - c["fid"]) <= NEAR_FID * v["base_fid"]
        if acts:
            acting.append((lr, beta, rounds))
        lines.append(
            f"| {lr:g} | {beta:g} | {rounds} | {drop_v:+.1%} | {drop_c:+.1%} | {v['fid']:.1f} | {c['fid']:.1f} "
            f"| {v['base_fid']:.1f} | {v['acc'] - v['base_acc']:+.3f} | {'yes' if acts else 'no'} |"
        )
    lines += [""]
    if acting:
        lines.append("Cells that act: " + ", ".join(f"lr {a:g}, β {b:g}, {r} rounds" for a, b, r in acting) + ".")
    else:
        best = min(cells, key=lambda cell: by[("vapi", *cell)]["mse"] / by[("vapi", *cell)]["base_mse"])
        v = by[("vapi", *best)]
        lines.append(
            f"No cell acts on this grid. The largest tf MSE drop: lr {best[0]:g}, β {best[1]:g}, {best[2]} rounds: "
            f"{v['mse'] / v['base_mse'] - 1:+.1%}, FID {v['fid']:.1f} against the control's "
            f"{by[('control', *best)]['fid']:.1f}."
        )
    lines += ["", "Per run: training reward first → last round, CPU minutes:", ""]
    lines += [
        f"- {r['arm']} lr {r['lr']:g} β {r['beta']:g} {r['rounds']} rounds: {r['reward_first']:.4f} → "
        f"{r['reward_last']:.4f}, {r['minutes']:.1f} min"
        for r in runs
    ]
    return "\n".join(lines) + "\n"


def verdict(args, out: Path) -> str:
    lr, beta, rounds = args.lr, args.beta, args.rounds
    gpts = {build: gpt_of(build) for build in (0, 1)}
    seeds = range(1, args.seeds + 1)
    jobs = [(arm, lr, beta, rounds, s, b, gpts[b]) for b in (0, 1) for s in seeds for arm in ("vapi", "control")]
    jobs += [("reward-only", lr, beta, rounds, s, 0, gpts[0]) for s in seeds]
    runs = run_all(jobs, args, out)
    get = {(r["arm"], r["build"], r["seed"]): r for r in runs}
    pairs = [(b, s) for b in (0, 1) for s in seeds]
    command = (
        f"python benchmarks/vapi_treatment.py --verdict --lr {lr:g} --beta {beta:g} --rounds {rounds} "
        f"--seeds {args.seeds} --samples {args.samples}"
    )
    lines = header("VA-π vs the random-reward control, 5 seeds × 2 zoo builds", command)
    lines += [
        f"recipes/vapi/digits.yaml at lr {lr:g}, β {beta:g}, {rounds} rounds (the treatment check's cell, "
        "benchmarks/results/vapi_treatment_sweep.md); two independent digits-gpt builds (zoo seeds 0 and 1, each "
        f"on its own digits-vq), training seeds 1..{args.seeds} on each; evaluation {args.samples} samples at "
        f"cfg 1.0, evaluation seed {EVAL_SEED}. Differences paired by (build, seed): mean [Student-t 95% interval "
        "over the pairs; per pair; MDE at 80% power].",
        "",
        "| comparison | metric | difference | per build (mean) |",
        "|---|---|---|---|",
    ]
    for label, mine, theirs, keys in (
        ("VA-π − control", "vapi", "control", pairs),
        ("VA-π − base", "vapi", None, pairs),
        ("control − base", "control", None, pairs),
        ("reward only (β = 0) − VA-π", "reward-only", "vapi", [(0, s) for s in seeds]),
    ):
        for metric, digits, base_key in (("fid", 1, "base_fid"), ("mse", 4, "base_mse"), ("acc", 3, "base_acc")):
            diffs = [
                get[(mine, b, s)][metric] - (get[(theirs, b, s)][metric] if theirs else get[(mine, b, s)][base_key])
                for b, s in keys
            ]
            result = stats.paired(diffs)
            builds = sorted({b for b, _ in keys})
            per_build = ", ".join(
                f"build {b}: {statistics.fmean(d for (bb, _), d in zip(keys, diffs) if bb == b):+.{digits}f}"
                for b in builds
            )
            name = {"fid": "FID proxy", "mse": "tf MSE", "acc": "digit acc"}[metric]
            lines.append(f"| {label} | {name} | {result.format(digits)} | {per_build} |")
    lines += ["", "Per run (FID proxy, tf MSE, digit acc; base in brackets):", ""]
    lines += [
        f"- {r['arm']} build {r['build']} seed {r['seed']}: FID {r['fid']:.1f} ({r['base_fid']:.1f}), tf MSE "
        f"{r['mse']:.4f} ({r['base_mse']:.4f}), acc {r['acc']:.3f} ({r['base_acc']:.3f}), {r['minutes']:.1f} min"
        for r in runs
    ]
    return "\n".join(lines) + "\n"


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sweep", action="store_true", help="the treatment check over lr × β × rounds")
    mode.add_argument("--verdict", action="store_true", help="VA-π vs control at one cell, seeds × 2 builds")
    parser.add_argument("--lrs", type=floats, default=[1e-5, 3e-5, 1e-4])
    parser.add_argument("--betas", type=floats, default=[0.1, 0.01])
    parser.add_argument("--rounds-grid", type=lambda t: [int(x) for x in t.split(",")], default=[300])
    parser.add_argument(
        "--cells",
        type=lambda t: [(float(c.split(":")[0]), float(c.split(":")[1]), int(c.split(":")[2])) for c in t.split(",")],
        default=[],
        help="extra sweep cells beyond the grid, lr:beta:rounds,... (e.g. 1e-4:0.1:900)",
    )
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=0, help="evaluation samples (default: sweep 500, verdict 2000)")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--workdir", default="", help="runs folder; finished runs and evaluations there are reused")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.samples = args.samples or (500 if args.sweep else 2000)
    out = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vapi_treatment_"))
    out.mkdir(parents=True, exist_ok=True)
    text = sweep(args, out) if args.sweep else verdict(args, out)
    print(text)
    default = "vapi_treatment_sweep.md" if args.sweep else "vapi_treatment.md"
    Path(args.out or RESULTS / default).write_text(text)


if __name__ == "__main__":
    main()
