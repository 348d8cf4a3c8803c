"""PPO from pixels, learning: the Breakout and Pong recipes for their first N env steps, 3 seeds each.

    python benchmarks/ppo_atari_learning.py                       # 100,352 steps × 2 games × 3 seeds
    python benchmarks/ppo_atari_learning.py --steps 2000000      # a longer budget (a GPU, or many CPU-hours)
    python benchmarks/ppo_atari_learning.py --games Pong --seeds 1 --steps 2048 --out /tmp/a.md   # smoke

Each run is ``rlprox train recipes/ppo/<game>.yaml seed=S run.stop_after=I`` in a fresh process (one torch
thread, ``--parallel`` at a time): the first I iterations (8 envs × 128 agent steps each) of the recipe's
10M-step run, so the lr is annealed as in the full run (CleanRL's schedule at that step count), then
``rlprox eval --episodes E --stochastic`` of the last checkpoint: full games, unclipped score, actions
sampled from the policy as in training. Steps are agent (env) steps; one step is 4 frames (frame skip 4).

The table: per game and seed the training return (full games, unclipped, as CleanRL logs it: the mean of
the episodes that ended in the last 20% of the steps), the evaluation return, minutes; mean ± sd over
seeds, exploratory (3 seeds carry no verdict). Beside them: random play (Mnih et al. 2015, Nature,
Extended Data Table 2: Breakout 1.7, Pong −20.7) and CleanRL's published ``ppo_atari.py`` return at 10M
steps (docs/rl-algorithms/ppo.md: Breakout 414.66 ± 28.09, Pong 20.36 ± 0.20, 3 seeds); CleanRL publishes
the earlier part of its runs as curves (images) only, so there is no number at this budget to cite.
The curve beside the table: training return vs env steps, mean over seeds.

Finished runs live in ``--runs`` (default benchmarks/results/runs/ppo_atari_learning/, committed), pruned
to metrics.jsonl and eval.json, and are read back instead of trained again.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = harness.ROOT
RESULTS = ROOT / "benchmarks" / "results"
RECIPES = {"Breakout": "recipes/ppo/breakout.yaml", "Pong": "recipes/ppo/pong.yaml"}
STEPS_PER_ITERATION = 8 * 128
RANDOM = {"Breakout": 1.7, "Pong": -20.7}  # Mnih et al. 2015, Extended Data Table 2
CLEANRL_10M = {"Breakout": "414.66 ± 28.09", "Pong": "20.36 ± 0.20"}  # CleanRL docs, ppo_atari.py, 3 seeds
LATE = 0.2  # the training return: episodes that ended in the last 20% of the steps


def run(game: str, seed: int, iterations: int, args) -> dict:
    overrides = [f"seed={seed}", f"run.stop_after={iterations}", "run.eval_size=0"]
    name = f"{game.lower()}-s{seed}-{iterations}it"
    eval_args = ["--episodes", str(args.eval_episodes), "--stochastic"]
    rows, ev = harness.train_and_eval(
        RECIPES[game], overrides, Path(args.runs), name, eval_args, reuse=True, keep_weights=False
    )
    episodes = [
        (r["progress/env_steps"], r["reward/episodic_return"]) for r in rows if r.get("reward/episodic_length", 0) > 0
    ]
    steps = int(rows[-1]["progress/env_steps"])
    late = [ret for s, ret in episodes if s > (1 - LATE) * steps] or [ret for _, ret in episodes[-1:]]
    return {
        "game": game,
        "seed": seed,
        "steps": steps,
        "training": statistics.fmean(late) if late else float("nan"),  # nan: no game ended yet
        "eval": ev["eval/return"],
        "minutes": sum(r["perf/iteration_s"] for r in rows) / 60,
        "curve": episodes,
    }


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def plot(runs: list[dict], games: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(games), figsize=(5 * len(games), 3.6), squeeze=False)
    for ax, game in zip(axes[0], games):
        mine = [r for r in runs if r["game"] == game]
        steps = max(r["steps"] for r in mine)
        edges = np.linspace(0, steps, 11)
        centres, means = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            per_seed = [[ret for s, ret in r["curve"] if lo < s <= hi] for r in mine]
            per_seed = [statistics.fmean(v) for v in per_seed if v]
            if per_seed:
                centres.append((lo + hi) / 2)
                means.append(statistics.fmean(per_seed))
        for r in mine:
            ax.plot([s for s, _ in r["curve"]], [x for _, x in r["curve"]], ".", ms=2, alpha=0.3)
        ax.plot(centres, means, "k-", lw=2, label=f"mean over {len(mine)} seeds")
        ax.axhline(RANDOM[game], color="grey", ls="--", lw=1, label="random play")
        ax.set(title=f"{game}: PPO (recipe), first {steps:,} steps", xlabel="env steps", ylabel="episodic return")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(runs: list[dict], games: list[str], args, command: str) -> str:
    lines = [
        "# PPO from pixels: learning on Breakout and Pong at a CPU budget (exploratory)",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs ({args.parallel} runs at a time), "
        f"python {platform.python_version()}; `{command}`.",
        "",
        f"Each run: the first {runs[0]['steps']:,} agent steps (= {4 * runs[0]['steps']:,} frames) of "
        "recipes/ppo/<game>.yaml (CleanRL's ppo_atari settings, lr annealed over the full 10M-step run), one "
        "process, one torch thread, CPU. Training return: full games, unclipped, the mean of the episodes that "
        f"ended in the last {LATE:.0%} of the steps; evaluation: {args.eval_episodes} full games of the last "
        "checkpoint, actions sampled. mean ± sd over seeds; 3 seeds are exploratory: no verdict.",
        "",
        "| game | seeds | training return, per seed | training return | evaluation return, per seed | "
        "evaluation return | random play | CleanRL ppo_atari at 10M steps | minutes per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for game in games:
        mine = [r for r in runs if r["game"] == game]
        training = ", ".join(f"{r['training']:.1f}" for r in mine)
        evaluation = ", ".join(f"{r['eval']:.1f}" for r in mine)
        lines.append(
            f"| {game} | {len(mine)} | {training} | "
            f"{mean_sd([r['training'] for r in mine])} | {evaluation} | "
            f"{mean_sd([r['eval'] for r in mine])} | {RANDOM[game]} | {CLEANRL_10M[game]} | "
            f"{statistics.median(r['minutes'] for r in mine):.0f} |"
        )
    lines += [
        "",
        "CleanRL publishes its returns before 10M steps only as curves (images), so the column beside these "
        "runs is its final return, not one at this step count.",
        "",
        f"![training return vs env steps]({Path(args.out).with_suffix('.png').name})",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", default="Breakout,Pong", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100_000, help="agent steps per run (rounded up to 1,024)")
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--runs", default=str(RESULTS / "runs" / "ppo_atari_learning"))
    parser.add_argument("--out", default=str(RESULTS / "ppo_atari_learning.md"))
    args = parser.parse_args(argv)
    games = [g for g in args.games.split(",") if g]
    unknown = [g for g in games if g not in RECIPES]
    if unknown:
        parser.error(f"--games: unknown {', '.join(unknown)} (known: {', '.join(RECIPES)})")
    iterations = -(-args.steps // STEPS_PER_ITERATION)
    jobs = [(game, seed) for seed in range(1, args.seeds + 1) for game in games]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: run(*job, iterations, args), jobs))
    for r in runs:
        print(f"{r['game']} seed {r['seed']}: training {r['training']:.1f}, eval {r['eval']:.1f}", flush=True)
    command = "python benchmarks/ppo_atari_learning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(runs, games, args, command.strip())
    Path(args.out).write_text(text)
    plot(runs, games, Path(args.out).with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
