"""PolicyFlow vs PPO on MuJoCo Hopper-v5 at the same env steps (needs the [mujoco] extra).

    python benchmarks/policyflow_hopper.py                       # 300k env steps, seeds 1-3
    python benchmarks/policyflow_hopper.py --iterations 20 --seeds 1   # quicker
    python benchmarks/policyflow_hopper.py --lrs 3e-4,1e-3 --parallel 2  # the same lr sweep for both

recipes/policyflow/hopper.yaml and recipes/ppo/hopper.yaml share every setting the two
trainers have in common (1 env × 2048 steps, 32 minibatches, 10 epochs, lr 3e-4 linear,
obs/reward normalisation); both are cut to ``--iterations`` (146 ≈ 300k steps: a budget
that fits a 2-core machine; the recipes' own is 1M). Greedy evaluation: 10 episodes of
the final checkpoint. Time per iteration: median of the logged ``perf/iteration_s``.
``--lrs`` gives both methods the same lr sweep (``optim.lr``, actor and critic); the
target compares each method's best lr.
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


def run(method: str, lr: float, seed: int, iterations: int, out: Path) -> dict:
    rows, ev = train_and_eval(RECIPES[method], [f"seed={seed}", f"run.iterations={iterations}", "run.eval_size=0", f"optim.lr={lr}"], out,
                              f"{method}-lr{lr:g}-s{seed}", ["--episodes", "10", "--deterministic"])
    return {"method": method, "lr": lr, "seed": seed, "steps": rows[-1]["progress/env_steps"], "return": ev["eval/return"],
            "iteration_s": statistics.median(r["perf/iteration_s"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=146)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--lrs", default="3e-4", help="comma-separated optim.lr values, the same for both methods")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "policyflow_hopper.md"))
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="pf_hopper_"))
    lrs = [float(x) for x in args.lrs.split(",")]
    jobs = [(m, lr, s) for s in range(1, args.seeds + 1) for lr in lrs for m in RECIPES]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda j: run(*j, args.iterations, out), jobs))
    by = {(m, lr): [r for r in runs if r["method"] == m and r["lr"] == lr] for lr in lrs for m in RECIPES}
    mean_return = {key: statistics.mean(r["return"] for r in rs) for key, rs in by.items()}
    best = {m: max(lrs, key=lambda lr: mean_return[(m, lr)]) for m in RECIPES}
    ppo_time = statistics.median(r["iteration_s"] for r in runs if r["method"] == "PPO")
    lines = [
        "# PolicyFlow vs PPO on Hopper-v5",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared, {args.parallel} runs at a time), python {platform.python_version()}; "
        f"`python benchmarks/policyflow_hopper.py --iterations {args.iterations} --seeds {args.seeds} --lrs {args.lrs}`: {int(runs[0]['steps']):,} env steps per run.",
        "",
        "| method | lr | greedy return (10 episodes, mean ± std over seeds) | per seed | time / iteration (× PPO) |",
        "|---|---|---|---|---|",
    ]
    for (m, lr), rs in by.items():
        rets = [r["return"] for r in rs]
        sd = f" ± {statistics.stdev(rets):.0f}" if len(rets) > 1 else ""
        lines.append(f"| {m} | {lr:g} | {statistics.mean(rets):.0f}{sd} | {', '.join(f'{x:.0f}' for x in rets)} | "
                     f"{statistics.median(r['iteration_s'] for r in rs) / ppo_time:.2f} |")
    ratio = mean_return[("PolicyFlow", best["PolicyFlow"])] / mean_return[("PPO", best["PPO"])]
    lines += ["", f"PolicyFlow / PPO mean return, each at its best lr (PolicyFlow {best['PolicyFlow']:g}, PPO {best['PPO']:g}): "
              f"{ratio:.2f} (target: within 10%, i.e. ≥ 0.90).", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
