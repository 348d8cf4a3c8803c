"""Learning results of the shipped PPO recipes: train, then evaluate the final checkpoint.

    python benchmarks/ppo_recipes.py            # CartPole and CartPole-sparse on seeds 1-3,
                                                # Pendulum (seed 1), Hopper 60 iterations (seed 1)
    python benchmarks/ppo_recipes.py --quick    # CartPole seed 1 only

Each run goes through the CLI exactly as a user would (`rlprox train RECIPE`, then
`rlprox eval CHECKPOINT --episodes 20`), with 1 torch thread. Prints a markdown table
with PASS/FAIL lines for the CartPole targets (greedy return >= 475 within 100k env
steps on 3 of 3 seeds; sparse recipe additionally >= 50% of the actor's hidden neurons
exactly zero) and writes it to benchmarks/results/ppo_recipes.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ppo_recipes.md"

# (label, recipe, seeds, extra overrides)
RUNS = [
    ("CartPole", "recipes/ppo/cartpole.yaml", (1, 2, 3), []),
    ("CartPole, WGSEF sparse actor", "recipes/ppo/cartpole-sparse.yaml", (1, 2, 3), []),
    ("Pendulum", "recipes/ppo/pendulum.yaml", (1,), []),
    ("Hopper-v5, first 60 iterations", "recipes/ppo/hopper.yaml", (1,), ["run.iterations=60"]),
]


def run_one(recipe: str, seed: int, extra: list[str], out: str) -> dict:
    from rlprox.cli import main

    args = [
        "train",
        str(ROOT / recipe),
        f"seed={seed}",
        f"run.output_dir={out}",
        "run.name=r",
        "run.log_with=[]",
        "run.progress=false",
        "run.eval_size=0",
        *extra,
    ]
    start = time.perf_counter()
    assert main(args) == 0, args
    train_s = time.perf_counter() - start
    rows = [json.loads(line) for line in open(Path(out) / "r" / "metrics.jsonl")]
    assert main(["eval", f"{out}/r", "--episodes", "20", "--deterministic"]) == 0
    result = json.loads(next((Path(out) / "r" / "checkpoints").glob("iter-*/eval.json")).read_text())
    return {
        "seed": seed,
        "env_steps": int(rows[-1]["progress/env_steps"]),
        "train_s": train_s,
        "eval": result["eval/return"],
        "eval_std": result["eval/return_std"],
        "train_return": next(
            (r["reward/episodic_return"] for r in reversed(rows) if "reward/episodic_return" in r), float("nan")
        ),
        "zero_neurons": result.get("sparsity/actor_hidden_neurons_zero_fraction"),
    }


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CartPole seed 1 only; no results file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [("CartPole", "recipes/ppo/cartpole.yaml", (1,), [])] if args.quick else RUNS
    lines = [
        "| recipe | seed | env steps | greedy eval return (20 ep.) | "
        "last training return | actor hidden neurons zero | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for label, recipe, seeds, extra in runs:
        results = []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as out:
                r = run_one(recipe, seed, extra, out)
            results.append(r)
            zero = "–" if r["zero_neurons"] is None else f"{100 * r['zero_neurons']:.0f}%"
            lines.append(
                f"| {label} (`{recipe}`) | {seed} | {r['env_steps']:,} | {r['eval']:.1f} ± "
                f"{r['eval_std']:.1f} | {r['train_return']:.1f} | {zero} | {r['train_s']:.0f} |"
            )
            print(lines[-1], flush=True)
        if recipe.endswith("cartpole.yaml") or recipe.endswith("cartpole-sparse.yaml"):
            ok = all(r["eval"] >= 475 and r["env_steps"] <= 100_000 for r in results)
            if recipe.endswith("sparse.yaml"):
                ok = ok and all((r["zero_neurons"] or 0) >= 0.5 for r in results)
            verdicts.append(
                f"- **{'PASS' if ok else 'FAIL'}**: `{recipe}` greedy return >= 475 within 100k "
                f"env steps on {sum(r['eval'] >= 475 for r in results)}/{len(results)} seeds"
                + (" with >= 50% of actor hidden neurons exactly zero" if recipe.endswith("sparse.yaml") else "")
            )
    import gymnasium

    header = [
        "# PPO recipes: learning results",
        "",
        f"`python benchmarks/ppo_recipes.py` — {datetime.date.today()}, torch {torch.__version__}, "
        f"gymnasium {gymnasium.__version__}, 1 torch thread, 2-core CPU shared with other jobs "
        "(train times are indicative). Each run: `rlprox train RECIPE seed=S`, then `rlprox eval "
        "CHECKPOINT --episodes 20 --deterministic` on the final checkpoint.",
        "",
    ]
    text = "\n".join(header + lines + [""] + verdicts) + "\n"
    print("\n".join(verdicts))
    if not args.quick:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
