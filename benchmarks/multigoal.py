"""Multimodality on MultiGoal: PolicyFlow (a sweep over w_b), the FPO ratio and Gaussian
PPO (a sweep over the entropy bonus), same env-step budget, side by side.

    python benchmarks/multigoal.py                         # 3 seeds, the sweeps below
    python benchmarks/multigoal.py --seeds 1 --iterations 5   # smoke

Every run trains its shipped recipe (recipes/policyflow/multigoal.yaml,
multigoal-fpo.yaml, recipes/ppo/multigoal.yaml) with the swept value overridden, then
``rlprox eval`` runs 100 episodes with sampled actions on fresh envs: success rate,
return, the distribution of goals reached (entropy normalised by log 4, coverage =
goals with >= 5% of the hits) and a trajectory plot.

Entropy counts only with competence: an untrained policy already scores entropy ~1
by wandering. A run is *competent* when its success rate is >= 0.9 and its return is
within 10% of the best PPO run's; *multimodal* when competent with normalised entropy
>= 0.5. Writes benchmarks/results/multigoal.md, multigoal.png (success vs entropy, every
run) and multigoal_trajectories.png (seed 1 of the best setting of each method).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, train_and_eval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

SETTINGS = [  # (method, label, recipe, overrides)
    *[
        (
            "PolicyFlow",
            f"w_b {w:g}",
            "recipes/policyflow/multigoal.yaml",
            [f"regularizers=[{{type: brownian, lam: {w}}}]"],
        )
        for w in (0.0, 0.1, 0.2, 0.5)
    ],
    ("FPO ratio", "w_b 0", "recipes/policyflow/multigoal-fpo.yaml", []),
    *[("Gaussian PPO", f"ent {e:g}", "recipes/ppo/multigoal.yaml", [f"ppo.ent_coef={e}"]) for e in (0.0, 0.01, 0.05)],
]


def run(setting, seed: int, iterations: int, episodes: int, out: Path) -> dict:
    method, label, recipe, overrides = setting
    name = f"{Path(recipe).parent.name}-{Path(recipe).stem}-{label.replace(' ', '')}-s{seed}"
    overrides = [
        *overrides,
        f"seed={seed}",
        "run.eval_size=0",
        *([f"run.iterations={iterations}"] if iterations else []),
    ]
    rows, ev = train_and_eval(recipe, overrides, out, name, ["--episodes", str(episodes), "--seed", "12345"])
    ckpt = Path(ev["checkpoint"])
    return {
        "method": method,
        "label": label,
        "seed": seed,
        "env_steps": rows[-1]["progress/env_steps"],
        "iteration_s": statistics.median(r["perf/iteration_s"] for r in rows),
        "success": ev["eval/success_rate"],
        "return": ev["eval/return"],
        "entropy": ev["eval/goal_entropy_normalized"],
        "coverage": ev["eval/goal_coverage"],
        "goals": [ev[f"eval/goal{g}_frac"] for g in range(4)],
        "plot": str(ckpt / "eval_trajectories.png"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--iterations", type=int, default=0, help="override the recipes' iterations (0: theirs, 200k env steps)"
    )
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "multigoal.md"))
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="multigoal_"))
    jobs = [(setting, seed) for seed in range(1, args.seeds + 1) for setting in SETTINGS]
    runs = []
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for res in pool.map(lambda job: run(job[0], job[1], args.iterations, args.episodes, out), jobs):
            runs.append(res)
            print(
                f"{res['method']} {res['label']} seed {res['seed']}: success {res['success']:.2f}, return "
                f"{res['return']:.1f}, entropy {res['entropy']:.2f}, coverage {res['coverage']:.0f}",
                flush=True,
            )
    ppo_best = max(r["return"] for r in runs if r["method"] == "Gaussian PPO")
    for r in runs:
        r["competent"] = r["success"] >= 0.9 and r["return"] >= ppo_best - 0.1 * abs(ppo_best)
        r["multimodal"] = r["competent"] and r["entropy"] >= 0.5
    ppo_time = statistics.median(r["iteration_s"] for r in runs if r["method"] == "Gaussian PPO")
    lines = [
        "# Multimodality on MultiGoal (4 goals): PolicyFlow vs FPO ratio vs Gaussian PPO",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} "
        f"CPUs (shared), python {platform.python_version()}; "
        "`python benchmarks/multigoal.py --seeds "
        f"{args.seeds}{f' --iterations {args.iterations}' if args.iterations else ''}` "
        f"({args.parallel} runs at a time).",
        "",
        f"Same budget for every run ({int(runs[0]['env_steps']):,} env steps: 8 envs × 256 steps "
        "× iterations, 4 epochs of minibatch 512, Adam 3e-4 linear, reward normalisation). "
        f"Evaluation: {args.episodes} episodes with sampled actions on fresh envs. Competent "
        f"= success ≥ 0.9 and return within 10% of the best PPO run ({ppo_best:.1f}); "
        "multimodal = competent and normalised goal entropy ≥ 0.5. Time per iteration relative to PPO's median.",
        "",
        "| method | setting | success | return | goal entropy (norm.) | "
        "coverage | competent | multimodal | time / iteration (× PPO) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(values):
        return (
            f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
            if len(values) > 1
            else f"{values[0]:.2f}"
        )

    for method, label, _, _ in SETTINGS:
        rs = [r for r in runs if r["method"] == method and r["label"] == label]
        lines.append(
            f"| {method} | {label} | {ms([r['success'] for r in rs])} | "
            f"{statistics.mean(r['return'] for r in rs):.1f} | {ms([r['entropy'] for r in rs])} | "
            f"{ms([r['coverage'] for r in rs])} | {sum(r['competent'] for r in rs)}/{len(rs)} "
            f"| **{sum(r['multimodal'] for r in rs)}/{len(rs)}** | "
            f"{statistics.median(r['iteration_s'] for r in rs) / ppo_time:.2f} |"
        )
    lines += ["", "Per run (success, return, normalised entropy, goal fractions):", ""]
    for r in runs:
        lines.append(
            f"- {r['method']} {r['label']} seed {r['seed']}: {r['success']:.2f}, "
            f"{r['return']:.1f}, {r['entropy']:.2f}, [{', '.join(f'{g:.2f}' for g in r['goals'])}]"
        )
    png = Path(args.out).with_suffix(".png")
    plot(runs, png)
    traj = Path(args.out).with_name(Path(args.out).stem + "_trajectories.png")
    trajectories(runs, traj)
    lines += ["", f"![success vs goal entropy]({png.name})", "", f"![trajectories]({traj.name})", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    shutil.rmtree(out, ignore_errors=True)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    markers = {"PolicyFlow": "o", "FPO ratio": "s", "Gaussian PPO": "^"}
    labels = sorted({(r["method"], r["label"]) for r in runs}, key=lambda ml: [s[:2] for s in SETTINGS].index(ml))
    for i, (method, label) in enumerate(labels):
        rs = [r for r in runs if (r["method"], r["label"]) == (method, label)]
        ax.scatter(
            [r["success"] for r in rs],
            [r["entropy"] for r in rs],
            marker=markers[method],
            color=f"C{i}",
            label=f"{method}, {label}",
            s=40,
            alpha=0.8,
        )
    ax.axvline(0.9, color="grey", lw=0.8, ls="--")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("success rate (sampled actions)")
    ax.set_ylabel("goal entropy / log 4")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def trajectories(runs: list[dict], path: Path) -> None:
    """Seed 1 of each method's best setting (most multimodal, then most successful), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    picks = []
    for method in ("PolicyFlow", "FPO ratio", "Gaussian PPO"):
        rs = [r for r in runs if r["method"] == method and r["seed"] == 1 and Path(r["plot"]).is_file()]
        if rs:
            picks.append(max(rs, key=lambda r: (r["multimodal"], r["competent"], r["entropy"] * r["success"])))
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4.2), dpi=100)
    for ax, r in zip(axes if len(picks) > 1 else [axes], picks):
        ax.imshow(mpimg.imread(r["plot"]))
        ax.set_title(
            f"{r['method']} ({r['label']})\nsuccess {r['success']:.2f}, entropy {r['entropy']:.2f}", fontsize=9
        )
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
