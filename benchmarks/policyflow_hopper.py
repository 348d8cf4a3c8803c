"""PolicyFlow vs PPO on MuJoCo Hopper-v5 at the same env steps (needs the [mujoco] extra).

    python benchmarks/policyflow_hopper.py                       # 300k env steps, seeds 1-3
    python benchmarks/policyflow_hopper.py --iterations 20 --seeds 1   # quicker

recipes/policyflow/hopper.yaml and recipes/ppo/hopper.yaml share every setting the two
trainers have in common (1 env × 2048 steps, 32 minibatches, 10 epochs, lr 3e-4 linear,
obs/reward normalisation); both are cut to ``--iterations`` (146 ≈ 300k steps: a budget
that fits a 2-core machine; the recipes' own is 1M). Greedy evaluation: 10 episodes of
the final checkpoint. Time per iteration: median of the logged ``perf/iteration_s``.
Writes benchmarks/results/policyflow_hopper.md.
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
from harness import ROOT, train_and_eval  # noqa: E402

RECIPES = {"PPO": "recipes/ppo/hopper.yaml", "PolicyFlow": "recipes/policyflow/hopper.yaml"}


def run(method: str, seed: int, iterations: int, out: Path) -> dict:
    rows, ev = train_and_eval(RECIPES[method], [f"seed={seed}", f"run.iterations={iterations}", "run.eval_size=0"], out, f"{method}-s{seed}",
                              ["--episodes", "10", "--deterministic"])
    return {"method": method, "seed": seed, "steps": rows[-1]["progress/env_steps"], "return": ev["eval/return"],
            "iteration_s": statistics.median(r["perf/iteration_s"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=146)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "policyflow_hopper.md"))
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="pf_hopper_"))
    jobs = [(m, s) for s in range(1, args.seeds + 1) for m in RECIPES]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda j: run(*j, args.iterations, out), jobs))
    by = {m: [r for r in runs if r["method"] == m] for m in RECIPES}
    ppo_ret = statistics.mean(r["return"] for r in by["PPO"])
    ppo_time = statistics.median(r["iteration_s"] for r in by["PPO"])
    lines = [
        "# PolicyFlow vs PPO on Hopper-v5",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared, {args.parallel} runs at a time), python {platform.python_version()}; "
        f"`python benchmarks/policyflow_hopper.py --iterations {args.iterations} --seeds {args.seeds}`: {int(runs[0]['steps']):,} env steps per run.",
        "",
        "| method | greedy return (10 episodes, mean ± std over seeds) | per seed | time / iteration (× PPO) |",
        "|---|---|---|---|",
    ]
    for m, rs in by.items():
        rets = [r["return"] for r in rs]
        sd = f" ± {statistics.stdev(rets):.0f}" if len(rets) > 1 else ""
        lines.append(f"| {m} | {statistics.mean(rets):.0f}{sd} | {', '.join(f'{x:.0f}' for x in rets)} | "
                     f"{statistics.median(r['iteration_s'] for r in rs) / ppo_time:.2f} |")
    pf_ret = statistics.mean(r["return"] for r in by["PolicyFlow"])
    lines += ["", f"PolicyFlow / PPO mean return: {pf_ret / ppo_ret:.2f} (target: within 10%, i.e. ≥ 0.90).", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
