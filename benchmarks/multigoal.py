"""Multimodality on MultiGoal: PolicyFlow (a sweep over the Brownian weight), FPO with its
published settings and Gaussian PPO (a sweep over the entropy bonus), same env-step budget.

    python benchmarks/multigoal.py                             # 6 goals, 5 seeds
    python benchmarks/multigoal.py --goals 4 --seeds 3         # the 4-goal table
    python benchmarks/multigoal.py --seeds 1 --iterations 5    # smoke

Every run trains its shipped recipe (recipes/policyflow/multigoal.yaml, multigoal-fpo.yaml,
recipes/ppo/multigoal.yaml; all on the 6-goal env, ``--goals 4`` overrides env.id) with the
swept value overridden; each method's grid has 6 values (FPO runs its one published
setting). ``rlprox eval`` then runs 300 episodes with sampled actions on fresh envs and
reports, per run:

- success rate, the fraction of episodes ending at each goal, coverage (goals with ≥ 10%
  of the hits), the return of the successful episodes;
- the same episodes started from the exact origin (``init_std`` 0): goals covered from
  one start state, where a policy that picks its goal from the start-state noise covers one;
- action modes at the start state: 1,000 draws of the policy at s₀ = 0 (PolicyFlow and FPO:
  φ₁(z; s₀), the flow before the Gaussian head; PPO: its Gaussian), k-means for k = 1..8,
  the k with the best silhouette (k = 1 when none reaches 0.5), counting clusters with ≥ 10%
  of the draws.

Multimodal = coverage ≥ 4 of 6 and ≥ 3 action modes (4 goals: coverage ≥ 3 of 4 and ≥ 3
modes). Writes benchmarks/results/multigoal{6,4}.md and .png (coverage vs return: the
trade-off curve of each sweep) and _trajectories.png.
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
import stats  # noqa: E402
from harness import ROOT, iqm, train_and_eval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BROWNIAN = (0.0, 0.01, 0.03, 0.1, 0.25, 0.5)  # w_b with the released reduction (a mean over batch and action dims)
ENTROPY = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3)  # PPO's ent_coef, the same grid size
SETTINGS = [  # (method, label, recipe, overrides)
    *[
        (
            "PolicyFlow",
            f"w_b {w:g}",
            "recipes/policyflow/multigoal.yaml",
            [f"regularizers=[{{type: brownian, lam: {w}, reduction: mean}}]"],
        )
        for w in BROWNIAN
    ],
    (  # the paper's written norm (a sum over action dims) at its w_b
        "PolicyFlow",
        "w_b 0.25 sum",
        "recipes/policyflow/multigoal.yaml",
        ["regularizers=[{type: brownian, lam: 0.25, reduction: sum}]"],
    ),
    ("FPO (published settings)", "clip 0.05", "recipes/policyflow/multigoal-fpo.yaml", []),
    *[("Gaussian PPO", f"ent {e:g}", "recipes/ppo/multigoal.yaml", [f"ppo.ent_coef={e}"]) for e in ENTROPY],
]
# rows that explain a setting and do not compete for "best": the paper's w_g switched off
ABLATIONS = [
    (
        "PolicyFlow, w_g 0",
        f"w_b {w:g}",
        "recipes/policyflow/multigoal.yaml",
        [f"regularizers=[{{type: brownian, lam: {w}}}]", "policyflow.ent_coef=0.0"],
    )
    for w in (0.0, 0.25)
]
METHODS = ("PolicyFlow", "FPO (published settings)", "Gaussian PPO")
ENV_IDS = {6: "rlprox/MultiGoal6-v0", 4: "rlprox/MultiGoal-v0"}


def run(setting, seed: int, goals: int, iterations: int, episodes: int, out: Path, reuse: bool) -> dict:
    method, label, recipe, overrides = setting
    ablation = "" if method in METHODS else "-" + method.split(", ")[-1].replace(" ", "")
    name = f"g{goals}-{Path(recipe).parent.name}-{Path(recipe).stem}-{label.replace(' ', '')}{ablation}-s{seed}"
    overrides = [
        *overrides,
        f"env.id={ENV_IDS[goals]}",
        f"seed={seed}",
        "run.eval_size=0",
        *([f"run.iterations={iterations}"] if iterations else []),
    ]
    eval_args = ["--episodes", str(episodes), "--seed", "12345"]
    rows, ev = train_and_eval(recipe, overrides, out, name, eval_args, reuse=reuse)
    res = {
        "method": method,
        "label": label,
        "seed": seed,
        "env_steps": rows[-1]["progress/env_steps"],
        "iteration_s": statistics.median(r["perf/iteration_s"] for r in rows),
        "success": ev["eval/success_rate"],
        "return": ev["eval/return"],
        "success_return": ev["eval/success_return"],
        "coverage": ev["eval/goal_coverage"],
        "goals": [ev[f"eval/goal{g}_frac"] for g in range(goals)],
        "origin_coverage": ev["eval/origin_goal_coverage"],
        "origin_success": ev["eval/origin_success_rate"],
        "modes": ev["eval/action_modes"],
        "silhouette": ev["eval/action_modes_silhouette"],
        "plot": str(Path(ev["checkpoint"]) / "eval_trajectories.png"),
    }
    res["multimodal"] = res["coverage"] >= (4 if goals == 6 else 3) and res["modes"] >= 3
    return res


def ms(values, digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goals", type=int, choices=(6, 4), default=6)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=0, help="override the recipes' 100 iterations (200k steps)")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--runs", default="", help="keep runs here; with --reuse, finished runs are read back")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="METHOD/SETTING",
        help="run only these rows (e.g. 'PolicyFlow/w_b 0.25'); repeatable; default: every row",
    )
    args = parser.parse_args()
    known = {f"{m}/{label}" for m, label, _, _ in SETTINGS + ABLATIONS}
    unknown = [o for o in args.only if o not in known]
    if unknown:
        sys.exit(f"--only {unknown[0]!r}: not a row (rows: {', '.join(sorted(known))})")
    out_md = Path(args.out or RESULTS / f"multigoal{args.goals}.md")
    out = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="multigoal_"))
    out.mkdir(parents=True, exist_ok=True)
    rows = [s for s in SETTINGS + ABLATIONS if not args.only or f"{s[0]}/{s[1]}" in args.only]
    jobs = [(setting, seed) for seed in range(1, args.seeds + 1) for setting in rows]
    runs = []

    def one(job):
        return run(job[0], job[1], args.goals, args.iterations, args.episodes, out, args.reuse)

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for res in pool.map(one, jobs):
            runs.append(res)
            print(
                f"{res['method']} {res['label']} seed {res['seed']}: success {res['success']:.2f}, return "
                f"{res['return']:.1f}, coverage {res['coverage']:.0f}, origin coverage {res['origin_coverage']:.0f}, "
                f"modes {res['modes']:.0f}",
                flush=True,
            )
    text = report(runs, args)
    print(text)
    out_md.write_text(text)
    plot(runs, out_md.with_suffix(".png"), args.goals)
    trajectories(runs, out_md.with_name(out_md.stem + "_trajectories.png"))
    if not args.runs:
        shutil.rmtree(out, ignore_errors=True)


def group(runs, method, label):
    return [r for r in runs if (r["method"], r["label"]) == (method, label)]


def report(runs: list[dict], args) -> str:
    goals = args.goals
    need = "coverage ≥ 4 of 6" if goals == 6 else "coverage ≥ 3 of 4"
    ppo_times = [r["iteration_s"] for r in runs if r["method"] == "Gaussian PPO"]
    ppo_time = statistics.median(ppo_times) if ppo_times else float("nan")
    lines = [
        f"# Multimodality on MultiGoal ({goals} goals): PolicyFlow vs FPO vs Gaussian PPO",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared), python "
        f"{platform.python_version()}; `python benchmarks/multigoal.py --goals {goals} --seeds {args.seeds}"
        f"{f' --iterations {args.iterations}' if args.iterations else ''}"
        f"{''.join(f' --only {o!r}' for o in args.only)}` ({args.parallel} runs at a time).",
        "",
        f"Same budget for every run ({int(runs[0]['env_steps']):,} env steps: 8 envs × 256 steps × iterations, "
        "4 epochs of minibatch 512, Adam 3e-4 linear, reward normalisation). PolicyFlow: the paper's settings "
        "(z ~ N(0, I), w_g 0.001, the released code's 2K+1-point time grid) with w_b swept at the released "
        "reduction (a mean over batch and action dims, `F.mse_loss`), and w_b 0.25 as the paper's written sum "
        "over the 2 action dims; FPO: its code's defaults (clip 0.05, 8 (τ, ε) pairs, τ on the flow grid, ε-loss, "
        "no Gaussian "
        f"head); PPO: its entropy bonus swept. Evaluation: {args.episodes} episodes with sampled actions, "
        "the same number from the exact origin, 1,000 start-state draws. Coverage = goals with ≥ 10% of the "
        f"hits; **multimodal** = {need} and ≥ 3 action modes at the start. Mean ± std over seeds.",
        "",
        "| method | setting | success | return | return of successes | coverage | coverage from origin "
        "| action modes | multimodal | time / iteration (× PPO) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, label, _, _ in SETTINGS + ABLATIONS:
        rs = group(runs, method, label)
        if not rs:
            if not args.only:
                lines.append(f"| {method} | {label} | not run |  |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {method} | {label} | {ms([r['success'] for r in rs])} | {ms([r['return'] for r in rs], 1)} | "
            f"{ms([r['success_return'] for r in rs], 1)} | {ms([r['coverage'] for r in rs], 1)} | "
            f"{ms([r['origin_coverage'] for r in rs], 1)} | {ms([r['modes'] for r in rs], 1)} | "
            f"**{sum(r['multimodal'] for r in rs)}/{len(rs)}** | "
            f"{statistics.median(r['iteration_s'] for r in rs) / ppo_time:.2f} |"
        )
    lines += ["", "## Best setting of each method, paired by seed", ""]
    best = {}
    for method in METHODS:
        labels = [label for m, label, _, _ in SETTINGS if m == method and group(runs, m, label)]
        if labels:  # the most multimodal runs, then the higher mean return
            best[method] = max(
                labels,
                key=lambda lb: (
                    sum(r["multimodal"] for r in group(runs, method, lb)),
                    statistics.mean(r["return"] for r in group(runs, method, lb)),
                ),
            )
    lines.append(
        "Best = most multimodal runs, then the higher mean return. IQM over seeds where there are ≥ 5; paired "
        "differences (PolicyFlow's best − the other's best, same seed) with a Student-t 95% interval, the per-seed "
        "differences and the MDE; fewer than 5 seeds: exploratory."
    )
    lines += ["", "| method | best setting | multimodal | coverage (IQM) | action modes (IQM) | return (IQM) |"]
    lines.append("|---|---|---|---|---|---|")
    for method, label in best.items():
        rs = group(runs, method, label)
        lines.append(
            f"| {method} | {label} | {sum(r['multimodal'] for r in rs)}/{len(rs)} | "
            f"{iqm([r['coverage'] for r in rs]):.2f} | {iqm([r['modes'] for r in rs]):.2f} | "
            f"{iqm([r['return'] for r in rs]):.1f} |"
        )
    lines.append("")
    if "PolicyFlow" in best:
        mine = {r["seed"]: r for r in group(runs, "PolicyFlow", best["PolicyFlow"])}
        for other in METHODS[1:]:
            if other not in best:
                continue
            theirs = {r["seed"]: r for r in group(runs, other, best[other])}
            seeds = sorted(set(mine) & set(theirs))
            for key in ("coverage", "modes", "return"):
                diffs = [mine[s][key] - theirs[s][key] for s in seeds]
                if len(diffs) > 1:
                    lines.append(
                        f"- PolicyFlow ({best['PolicyFlow']}) − {other} ({best[other]}), {key}: "
                        f"{stats.paired(diffs).format(2)}"
                    )
    lines += ["", "Per run (success, return, coverage, coverage from origin, action modes, goal fractions):", ""]
    for r in runs:
        lines.append(
            f"- {r['method']} {r['label']} seed {r['seed']}: {r['success']:.2f}, {r['return']:.1f}, "
            f"{r['coverage']:.0f}, {r['origin_coverage']:.0f}, {r['modes']:.0f} (silhouette "
            f"{r['silhouette']:.2f}), [{', '.join(f'{g:.2f}' for g in r['goals'])}]"
        )
    stem = Path(args.out or RESULTS / f"multigoal{goals}.md").stem
    lines += ["", f"![coverage vs return]({stem}.png)", "", f"![trajectories]({stem}_trajectories.png)", ""]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, goals: int) -> None:
    """The trade-off: mean coverage vs mean return of every setting, one line per sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    markers = dict(zip(METHODS, "osD"))
    for i, method in enumerate(METHODS):
        pts = []
        for m, label, _, _ in SETTINGS:
            rs = group(runs, m, label) if m == method else []
            if rs:
                x, y = statistics.mean(r["return"] for r in rs), statistics.mean(r["coverage"] for r in rs)
                pts.append((x, y, label))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[method], color=f"C{i}", label=method)
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(4 if goals == 6 else 3, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("return (sampled actions, mean over seeds)")
    ax.set_ylabel(f"coverage (goals with ≥ 10% of hits, of {goals})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def trajectories(runs: list[dict], path: Path) -> None:
    """Seed 1 of each method's most multimodal setting, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    picks = []
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method and r["seed"] == 1 and Path(r["plot"]).is_file()]
        if rs:
            picks.append(max(rs, key=lambda r: (r["multimodal"], r["coverage"], r["modes"], r["return"])))
    if not picks:
        return
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4.2), dpi=100)
    for ax, r in zip(axes if len(picks) > 1 else [axes], picks):
        ax.imshow(mpimg.imread(r["plot"]))
        ax.set_title(
            f"{r['method']} ({r['label']})\ncoverage {r['coverage']:.0f}, modes {r['modes']:.0f}, "
            f"return {r['return']:.0f}",
            fontsize=9,
        )
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
