"""PolicyFlow vs PPO on MuJoCo Hopper-v5 at the same env steps (needs the [mujoco] extra).

    python benchmarks/policyflow_hopper.py                       # 300k env steps, seeds 1-3
    python benchmarks/policyflow_hopper.py --iterations 20 --seeds 1   # quicker
    python benchmarks/policyflow_hopper.py --lrs 3e-4,1e-3 --parallel 2  # the same lr sweep for both
    python benchmarks/policyflow_hopper.py --lrs 3e-4,1e-3 --explore 1,0.37  # and the same exploration sweep
    python benchmarks/policyflow_hopper.py --ablate policyflow.noise_scale=1  # plus a PolicyFlow-only ablation row
    python benchmarks/policyflow_hopper.py --lrs 3e-4,5e-4 --reuse /tmp/pf_hopper_x  # add cells to an earlier
                                                                                     # call's runs
    python benchmarks/policyflow_hopper.py --envs 1,16,64 --pf 'policyflow.noise_scale=1'  # the parallel regime
    python benchmarks/policyflow_hopper.py --arm sum 'regularizers=[{type: brownian, lam: 0.25, reduction: sum}]'
                                                     # a second PolicyFlow arm that competes like the first

recipes/policyflow/hopper.yaml and recipes/ppo/hopper.yaml share every setting the two
trainers have in common (1 env × 2048 steps, 32 minibatches, 10 epochs, lr 3e-4 linear,
obs/reward normalisation); both are cut to ``--iterations`` (146 ≈ 300k steps: a budget
that fits a 2-core machine; the recipes' own is 1M). Greedy evaluation: 10 episodes of
the final checkpoint. Time per iteration: median of the logged ``perf/iteration_s``.
``--lrs`` gives both methods the same lr sweep (``optim.lr``, actor and critic);
``--explore`` the same sweep of the initial exploration noise, as factors on its std:
PPO's σ (``ppo.init_log_std`` + log f) and PolicyFlow's base noise and σ together
(``policyflow.noise_scale`` × f, ``policyflow.init_log_std`` + log f). The target
compares each method's best setting. ``--envs`` sweeps the envs per process for both
methods at the same env steps (``env.num_envs`` = n, ``num_steps`` = 2048 / n: 2048
transitions and 32 minibatches per iteration whatever n); the best setting and the
PolicyFlow / PPO ratio are then given per n. ``--pf`` adds recipe overrides to every
PolicyFlow run (e.g. unit base noise). ``--ablate`` adds PolicyFlow rows with extra recipe
overrides (at the first lr, f 1) that explain a setting; they do not compete for "best".
Writes benchmarks/results/policyflow_hopper.md and a learning-curve PNG beside it
(training episodic return vs env steps, mean over seeds, each method's best setting,
the first lr at f 1 (the recipes' own setting at the default --lrs) and the ablations).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import math
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, paired_difference, train_and_eval  # noqa: E402

RECIPES = {"PPO": "recipes/ppo/hopper.yaml", "PolicyFlow": "recipes/policyflow/hopper.yaml"}


def recipe_of(method: str) -> str:
    """The recipe of a method: PPO's, or PolicyFlow's for every PolicyFlow arm."""
    return RECIPES["PPO" if method == "PPO" else "PolicyFlow"]


def explore_overrides(method: str, factor: float) -> list[str]:
    """Scale the initial exploration std by ``factor`` (the recipes' values at 1)."""
    if factor == 1.0:
        return []
    recipe = yaml.safe_load((ROOT / recipe_of(method)).read_text())
    if method == "PPO":
        return [f"ppo.init_log_std={recipe['ppo'].get('init_log_std', 0.0) + math.log(factor)}"]
    section = recipe["policyflow"]
    return [
        f"policyflow.noise_scale={section.get('noise_scale', 1.0) * factor}",
        f"policyflow.init_log_std={section['init_log_std'] + math.log(factor)}",
    ]


def run(
    method: str,
    lr: float,
    factor: float,
    seed: int,
    iterations: int,
    out: Path,
    ablation: str = "",
    reuse: bool = False,
    envs: int = 1,
    pf: tuple[str, ...] = (),
    arm: tuple[str, ...] = (),
) -> dict:
    extra = ablation.split() if ablation else []
    section = "ppo" if method == "PPO" else "policyflow"
    parallel = [f"env.num_envs={envs}", f"{section}.num_steps={2048 // envs}"] if envs != 1 else []
    common = [*pf, *arm] if method != "PPO" else []
    tag = "-".join(re.sub(r"[^A-Za-z0-9._]", "", o) for o in [*common, *extra])
    rows, ev = train_and_eval(
        recipe_of(method),
        [
            f"seed={seed}",
            f"run.iterations={iterations}",
            "run.eval_size=0",
            f"optim.lr={lr}",
            *explore_overrides(method, factor),
            *parallel,
            *common,
            *extra,
        ],
        out,
        f"{method.split(',')[0]}-lr{lr:g}-x{factor:g}{f'-n{envs}' if envs != 1 else ''}"
        f"{'-' + tag if tag else ''}-s{seed}",
        ["--episodes", "10", "--deterministic"],
        reuse,
    )
    curve = [(r["progress/env_steps"], r["reward/episodic_return"]) for r in rows if "reward/episodic_return" in r]
    return {
        "method": method,
        "lr": lr,
        "explore": factor,
        "envs": envs,
        "ablation": ablation,
        "seed": seed,
        "steps": rows[-1]["progress/env_steps"],
        "return": ev["eval/return"],
        "iteration_s": statistics.median(r["perf/iteration_s"] for r in rows),
        "curve": curve,
    }


def plot(groups: dict[str, list[dict]], path: Path) -> None:
    """Training episodic return vs env steps, mean over seeds (binned), one line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, rs in groups.items():
        top = min(max(s for s, _ in r["curve"]) for r in rs)
        edges = np.linspace(0, top, 31)
        means = []
        for r in rs:
            steps, rets = np.array(r["curve"]).T
            means.append(
                [
                    rets[(steps > lo) & (steps <= hi)].mean() if ((steps > lo) & (steps <= hi)).any() else np.nan
                    for lo, hi in zip(edges[:-1], edges[1:])
                ]
            )
        ax.plot(edges[1:], np.nanmean(np.array(means), 0), label=label)
    ax.set_xlabel("env steps")
    ax.set_ylabel("training episodic return (mean over seeds)")
    ax.set_title("Hopper-v5: PolicyFlow vs PPO")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=146)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--lrs", default="3e-4", help="comma-separated optim.lr values, the same for both methods")
    parser.add_argument(
        "--explore",
        default="1",
        help="comma-separated factors on the initial exploration std, the same for both methods",
    )
    parser.add_argument("--envs", default="1", help="comma-separated envs per process, the same for both methods")
    parser.add_argument(
        "--pf", action="append", default=[], help="a recipe override for every PolicyFlow run; repeatable"
    )
    parser.add_argument(
        "--arm",
        action="append",
        nargs="+",
        default=[],
        metavar="LABEL OVERRIDE",
        help="another PolicyFlow method, 'PolicyFlow, LABEL', with these overrides; repeatable",
    )
    parser.add_argument(
        "--ablate",
        action="append",
        default=[],
        help="extra PolicyFlow overrides (space-separated) for an ablation row at the first lr, f 1; repeatable",
    )
    parser.add_argument(
        "--reuse",
        metavar="DIR",
        help="run in DIR and read back the runs an earlier call finished there with the same arguments",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "policyflow_hopper.md"))
    args = parser.parse_args()
    out = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="pf_hopper_"))
    lrs = [float(x) for x in args.lrs.split(",")]
    factors = [float(x) for x in args.explore.split(",")]
    env_counts = [int(x) for x in args.envs.split(",")]
    bad = [n for n in env_counts if n < 1 or 2048 % n]
    if bad:
        sys.exit(f"--envs: {bad[0]} does not divide the 2048 steps per iteration")
    settings = [(lr, f) for lr in lrs for f in factors]
    seeds = range(1, args.seeds + 1)
    bad = [a for a in args.arm if len(a) < 2]
    if bad:
        sys.exit(f"--arm {bad[0][0]}: give a label and at least one override")
    methods = {"PPO": (), "PolicyFlow": (), **{f"PolicyFlow, {a[0]}": tuple(a[1:]) for a in args.arm}}
    jobs = [(m, lr, f, s, "", n) for n in env_counts for s in seeds for lr, f in settings for m in methods]
    jobs += [("PolicyFlow", lrs[0], 1.0, s, a, env_counts[0]) for s in range(1, args.seeds + 1) for a in args.ablate]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        runs = list(
            pool.map(
                lambda j: run(
                    *j[:4], args.iterations, out, j[4], bool(args.reuse), envs=j[5], pf=args.pf, arm=methods[j[0]]
                ),
                jobs,
            )
        )
    by = {
        (m, lr, f, n): [
            r for r in runs if (r["method"], r["lr"], r["explore"], r["envs"]) == (m, lr, f, n) and not r["ablation"]
        ]
        for n in env_counts
        for lr, f in settings
        for m in methods
    }
    ablations = {a: [r for r in runs if r["ablation"] == a] for a in args.ablate}
    mean_return = {key: statistics.mean(r["return"] for r in rs) for key, rs in by.items()}
    best = {
        (m, n): max(((m, lr, f, n) for lr, f in settings), key=lambda k: mean_return[k])
        for n in env_counts
        for m in methods
    }
    ppo_time = statistics.median(r["iteration_s"] for r in runs if r["method"] == "PPO")
    lines = [
        "# PolicyFlow vs PPO on Hopper-v5",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared, "
        f"{args.parallel} runs at a time), python {platform.python_version()}; "
        f"`python benchmarks/policyflow_hopper.py --iterations {args.iterations} "
        f"--seeds {args.seeds} --lrs {args.lrs} --explore {args.explore}"
        + (f" --envs {args.envs}" if args.envs != "1" else "")
        + "".join(f" --pf '{o}'" for o in args.pf)
        + "".join(" --arm " + " ".join(f"'{x}'" for x in a) for a in args.arm)
        + "".join(f" --ablate '{a}'" for a in args.ablate)
        + (" --reuse DIR" if args.reuse else "")
        + f"`: {int(runs[0]['steps']):,} env steps per run"
        + (
            " (with --reuse, runs an earlier call finished in DIR with the same arguments are read back, not rerun)."
            if args.reuse
            else "."
        ),
        "Exploration factor f scales the initial exploration std: "
        "PPO's σ, PolicyFlow's base noise z and σ (1 = the recipes"
        + (f"; PolicyFlow runs also set `{' '.join(args.pf)}`" if args.pf else "")
        + "). Envs: per process, with 2048 / envs steps each per iteration.",
        "",
        "| method | envs | lr | exploration f | greedy return (10 episodes, "
        "mean ± std over seeds) | per seed | time / iteration (× PPO) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [(m, n, lr, f, rs) for (m, lr, f, n), rs in by.items()] + [
        (f"PolicyFlow, ablation: `{a}`", env_counts[0], lrs[0], 1.0, rs) for a, rs in ablations.items()
    ]
    for m, n, lr, f, rs in rows:
        rets = [r["return"] for r in rs]
        sd = f" ± {statistics.stdev(rets):.0f}" if len(rets) > 1 else ""
        lines.append(
            f"| {m} | {n} | {lr:g} | {f:g} | {statistics.mean(rets):.0f}{sd} | "
            f"{', '.join(f'{x:.0f}' for x in rets)} | "
            f"{statistics.median(r['iteration_s'] for r in rs) / ppo_time:.2f} |"
        )
    lines.append("")
    for n in env_counts:
        name = {m: f"lr {best[(m, n)][1]:g}, f {best[(m, n)][2]:g}" for m in methods}
        for m in list(methods)[1:]:
            ratio = mean_return[best[(m, n)]] / mean_return[best[("PPO", n)]]
            gap = paired_difference(by[best[(m, n)]], by[best[("PPO", n)]], "return", digits=0)
            lines.append(
                f"- {n} env(s) per process: {m} / PPO mean return, each at its best setting "
                f"({m} {name[m]}; PPO {name['PPO']}): **{ratio:.2f}** (target: within 10%, i.e. ≥ 0.90)"
                f"; {m} − PPO, same seed: {gap}."
            )
        for m in list(methods)[2:]:
            gap = paired_difference(by[best[(m, n)]], by[best[("PolicyFlow", n)]], "return", digits=0)
            lines.append(f"- {n} env(s) per process: {m} − PolicyFlow, same seed, each at its best setting: {gap}.")
    lines.append("")
    png = Path(args.out).with_suffix(".png")
    n0 = env_counts[0]
    groups = {}
    for n in env_counts:
        tag = f", {n} envs" if len(env_counts) > 1 else ""
        for m in methods:
            groups[f"{m}, best (lr {best[(m, n)][1]:g}, f {best[(m, n)][2]:g}){tag}"] = by[best[(m, n)]]
    groups |= {
        f"{m} (lr {lrs[0]:g}, f 1)": by[(m, lrs[0], 1.0, n0)]
        for m in methods
        if (m, lrs[0], 1.0, n0) in by and best[(m, n0)] != (m, lrs[0], 1.0, n0)
    }
    groups |= {f"PolicyFlow, {a}": rs for a, rs in ablations.items()}
    plot(groups, png)
    lines += [f"Learning curves: `{png.name}` (training episodic return with exploration noise, mean over seeds).", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
