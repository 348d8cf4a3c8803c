"""Recurrent PPO where memory is needed: CartPole without its velocities, the LSTM recipe
against the same recipe without the LSTM, at the same budget and seeds.

    python benchmarks/ppo_masked_cartpole.py                 # seeds 1-5, 500k env steps each
    python benchmarks/ppo_masked_cartpole.py --seeds 1 --iterations 50   # smoke

Both arms train ``recipes/ppo/cartpole-masked-lstm.yaml`` through ``rlprox train``; the
feed-forward arm sets ``ppo.lstm.hidden_size=0`` (the encoder MLP's 64 units feed the
heads directly: separate actor and critic MLPs). Each run's final checkpoint is judged by
``rlprox eval --episodes 20 --deterministic`` (the LSTM state carried through each
episode). Target (issue: recurrent PPO): the LSTM ≥ 475 greedy return on 5 of 5 seeds
where the feed-forward arm is not. Writes benchmarks/results/ppo_masked_cartpole.md with
the per-seed returns and the same-seed difference (Student-t 95%, benchmarks/stats.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402
from harness import ROOT, train_and_eval  # noqa: E402

RECIPE = "recipes/ppo/cartpole-masked-lstm.yaml"
ARMS = {"LSTM 64 (the recipe)": [], "no LSTM (MLP 64)": ["ppo.lstm.hidden_size=0"]}


def run(arm: str, seed: int, iterations: int, out: Path) -> dict:
    overrides = [f"seed={seed}", "run.eval_size=0", *ARMS[arm]]
    if iterations:
        overrides.append(f"run.iterations={iterations}")
    tag = "lstm" if not ARMS[arm] else "mlp"
    rows, ev = train_and_eval(RECIPE, overrides, out, f"{tag}-s{seed}", ["--episodes", "20", "--deterministic"])
    returns = [r["reward/episodic_return"] for r in rows if r.get("reward/episodic_length", 0) > 0]
    return {
        "arm": arm,
        "seed": seed,
        "steps": int(rows[-1]["progress/env_steps"]),
        "return": ev["eval/return"],
        "last_training": statistics.mean(returns[-50:]) if returns else float("nan"),
        "minutes": sum(r["perf/iteration_s"] for r in rows) / 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=0, help="override the recipe's 1953 iterations")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ppo_masked_cartpole.md"))
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="masked_cartpole_"))
    jobs = [(arm, seed) for seed in range(1, args.seeds + 1) for arm in ARMS]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda j: run(*j, args.iterations, out), jobs))
    by = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    lines = [
        "# Recurrent PPO on CartPole without velocities: LSTM vs no LSTM",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs ({args.parallel} runs at a time), python "
        f"{platform.python_version()}; `python benchmarks/ppo_masked_cartpole.py --seeds {args.seeds}"
        f"{f' --iterations {args.iterations}' if args.iterations else ''}`: {RECIPE} "
        f"({runs[0]['steps']:,} env steps per run), the no-LSTM arm with `ppo.lstm.hidden_size=0`. Greedy return of "
        "the final checkpoint over 20 episodes (the LSTM state carried per episode); training return: the mean of "
        "the last 50 iterations' finished episodes.",
        "",
        "| arm | greedy return, per seed | seeds ≥ 475 | mean | training return at the end | minutes per run |",
        "|---|---|---|---|---|---|",
    ]
    for arm, rs in by.items():
        rets = [r["return"] for r in rs]
        lines.append(
            f"| {arm} | {', '.join(f'{x:.0f}' for x in rets)} | {sum(x >= 475 for x in rets)}/{len(rets)} | "
            f"{statistics.mean(rets):.0f} | {statistics.mean(r['last_training'] for r in rs):.0f} | "
            f"{statistics.median(r['minutes'] for r in rs):.1f} |"
        )
    lstm, mlp = by.values()
    diffs = [a["return"] - b["return"] for a, b in zip(lstm, mlp)]
    passed = all(r["return"] >= 475 for r in lstm) and not all(r["return"] >= 475 for r in mlp)
    verdict = (
        f"exploratory (n = {len(lstm)})"
        if stats.is_exploratory(len(lstm))
        else f"**{'met' if passed else 'not met'}**"
    )
    lines += [
        "",
        f"- LSTM − no LSTM, same seed: {stats.paired(diffs).format(0) if len(diffs) > 1 else f'{diffs[0]:+.0f}'}.",
        f"- Target (the LSTM ≥ 475 on every seed, the feed-forward arm not): {verdict}.",
        "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
