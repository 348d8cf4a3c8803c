"""Does WGSEF reach its sparsity by itself? Accuracy / return against the fraction of
hidden neurons removed, for WGSEF with and without the hard top-k, under Adam's lr and
under a decoupled prox step, against the simple baselines with the same budget.

    python benchmarks/sparse_pareto.py                  # digits + CartPole, 3 seeds
    python benchmarks/sparse_pareto.py --tasks digits --seeds 1   # quicker

Digits: recipes/sparse/digits-wgsef.yaml (MLP 256-256, Adam 1e-3 cosine, 40 epochs,
k = 96 of 256 neurons per layer), held-out accuracy of the compacted network.
CartPole: recipes/ppo/cartpole-sparse.yaml (actor 64-64, k = 16), greedy return over 20
episodes, the fraction of the actor's hidden neurons removed.

Methods (every one with the recipe's own budget and optimizer):
- dense: no regularizer;
- top-k projection alone: ``wgsef`` with λ = 0 and ``exact_k`` (a hard top-k on the
  groups after every step, no WGSEF at all);
- WGSEF + exact_k (the shipped recipes);
- WGSEF without exact_k, prox step = the optimizer's lr (Adam: the step the paper's
  theory does not cover), over a λ sweep;
- WGSEF without exact_k, decoupled prox step (``prox_lr`` 0.01, constant), over a λ sweep;
- group-L2 (group lasso), both ways, over λ sweeps;
(each sweep spans from almost no pruning to almost all: a first run with λ ∈ {1..30} for
the decoupled path pruned everything, so its range moved down, as the table says);
- magnitude pruning after dense training: the dense runs' hidden neurons with the
  smallest incoming-weight norms zeroed (keeping k, and other budgets), no fine-tuning.
Writes benchmarks/results/sparse_pareto.md and sparse_pareto.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, train_and_eval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TASKS = {
    "digits": dict(recipe="recipes/sparse/digits-wgsef.yaml", params="net.hidden.*.weight", k=96, width=256, eval=[]),
    "cartpole": dict(
        recipe="recipes/ppo/cartpole-sparse.yaml",
        params="policy.actor.[02].weight",
        k=16,
        width=64,
        eval=["--episodes", "20", "--deterministic"],
    ),
}
PROX_LR = 0.01  # the decoupled prox step (the same for every method that uses one)


def methods(task: str) -> list[tuple[str, str, list[dict]]]:
    t = TASKS[task]
    base = {"type": "wgsef", "params": t["params"], "k": t["k"]}
    rows = [
        ("dense", "–", []),
        ("top-k projection alone", "λ 0 + exact_k", [{**base, "lam": 0.0, "exact_k": True}]),
        ("WGSEF + exact_k", "λ 1", [{**base, "lam": 1.0, "exact_k": True}]),
    ]
    group = {"type": "group_l2", "params": t["params"]}
    # λ sweeps wide enough to go from (almost) no pruning to (almost) all, for every method
    rows += [("WGSEF, prox step = Adam lr", f"λ {lam:g}", [{**base, "lam": lam}]) for lam in (1.0, 10.0, 30.0, 100.0)]
    rows += [
        ("WGSEF, prox_lr 0.01", f"λ {lam:g}", [{**base, "lam": lam, "prox_lr": PROX_LR}])
        for lam in (0.01, 0.03, 0.1, 0.3, 1.0)
    ]
    rows += [("group-L2, prox step = Adam lr", f"λ {lam:g}", [{**group, "lam": lam}]) for lam in (0.05, 0.5, 5.0)]
    rows += [
        ("group-L2, prox_lr 0.01", f"λ {lam:g}", [{**group, "lam": lam, "prox_lr": PROX_LR}])
        for lam in (0.001, 0.003, 0.01, 0.03)
    ]
    return rows


def score(task: str, ev: dict) -> tuple[float, float]:
    """(quality, fraction of hidden neurons removed) from an eval.json."""
    if task == "digits":
        return 100 * ev["compact/compact_accuracy"], ev["compact/hidden_removed_fraction"]
    return ev["eval/return"], ev.get("sparsity/actor_hidden_neurons_zero_fraction", 0.0)


def run(task: str, method: str, setting: str, regs: list[dict], seed: int, out: Path) -> dict:
    t = TASKS[task]
    row = [(m, st) for m, st, _ in methods(task)].index((method, setting))
    name = f"{task}-m{row:02d}-s{seed}"
    overrides = [f"seed={seed}", f"regularizers={json.dumps(regs)}", "run.eval_size=0"]
    _, ev = train_and_eval(t["recipe"], overrides, out, name, t["eval"])
    quality, removed = score(task, ev)
    return {
        "task": task,
        "method": method,
        "setting": setting,
        "seed": seed,
        "quality": quality,
        "removed": removed,
        "checkpoint": ev["checkpoint"],
    }


def magnitude_pruning(task: str, dense: dict, keep: int) -> dict:
    """Zero all but the ``keep`` largest-norm incoming rows of every regularized hidden
    layer of a dense checkpoint; evaluate without fine-tuning."""
    import fnmatch

    import torch

    from rlprox.engine import build_for_eval, hook, run_evaluation

    recipe, accelerator, _, algo = build_for_eval(Path(dense["checkpoint"]))
    pattern = TASKS[task]["params"]
    zero, total = 0, 0
    with torch.no_grad():
        for mname, module in algo.modules.items():
            for pname, p in module.named_parameters():
                if fnmatch.fnmatchcase(f"{mname}.{pname}", pattern):
                    drop = p.norm(dim=1).argsort()[: p.shape[0] - keep]
                    p[drop] = 0.0
                    zero, total = zero + len(drop), total + p.shape[0]
    removed = zero / total
    if task == "digits":
        quality = 100 * hook(algo, "model_stats")(measure_latency=False)["compact/compact_accuracy"]
    else:
        stats, _, _, _ = run_evaluation(algo, accelerator, 20, recipe.seed, deterministic=True)
        quality = stats["eval/return"]
    return {
        "task": task,
        "method": "magnitude pruning (dense, no fine-tune)",
        "setting": f"keep {keep}",
        "seed": dense["seed"],
        "quality": quality,
        "removed": removed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,cartpole")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "sparse_pareto.md"))
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="sparse_pareto_"))
    tasks = args.tasks.split(",")
    jobs = [
        (task, m, s, regs, seed) for task in tasks for seed in range(1, args.seeds + 1) for m, s, regs in methods(task)
    ]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda j: run(*j, out), jobs))
    for r in runs:
        print(
            f"{r['task']} {r['method']} {r['setting']} seed {r['seed']}: "
            f"{r['quality']:.2f} at {r['removed']:.1%} removed",
            flush=True,
        )
    for task in tasks:
        width, k = TASKS[task]["width"], TASKS[task]["k"]
        for dense in [r for r in runs if r["task"] == task and r["method"] == "dense"]:
            for keep in sorted({k, width // 2, width // 4, width // 8}):
                runs.append(magnitude_pruning(task, dense, keep))
    lines = [
        "# Sparse core: WGSEF vs top-k projection, group lasso and magnitude pruning",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} "
        f"CPUs (shared), python {platform.python_version()}; "
        f"`python benchmarks/sparse_pareto.py --tasks {args.tasks} "
        f"--seeds {args.seeds}`. Decoupled prox step prox_lr = {PROX_LR}.",
        "",
        "Quality: digits = held-out accuracy (%) of the compacted network; CartPole = greedy return (20 episodes). "
        "Removed = fraction of hidden neurons (digits: both layers; CartPole: the "
        "actor's) whose incoming weights are exactly zero. Mean ± std over seeds.",
        "",
    ]
    dense_quality = {}
    for task in tasks:
        lines += [f"## {task}", "", "| method | setting | quality | removed | seeds |", "|---|---|---|---|---|"]
        groups: dict[tuple, list] = {}
        for r in runs:
            if r["task"] == task:
                groups.setdefault((r["method"], r["setting"]), []).append(r)
        for (method, setting), rs in groups.items():
            q, rm = [r["quality"] for r in rs], [r["removed"] for r in rs]
            sd = f" ± {statistics.stdev(q):.2f}" if len(q) > 1 else ""
            lines.append(
                f"| {method} | {setting} | {statistics.mean(q):.2f}{sd} | {statistics.mean(rm):.1%} | {len(rs)} |"
            )
        dense_quality[task] = statistics.mean(r["quality"] for r in groups[("dense", "–")])
        lines.append("")
    if "digits" in tasks:
        target = []
        for (method, setting), rs in {
            (r["method"], r["setting"]): None
            for r in runs
            if r["task"] == "digits" and "WGSEF" in r["method"] and "exact_k" not in r["method"]
        }.items():
            rs = [r for r in runs if r["task"] == "digits" and (r["method"], r["setting"]) == (method, setting)]
            ok = [r["removed"] >= 0.6 and r["quality"] >= dense_quality["digits"] - 1.0 for r in rs]
            target.append(f"{method} {setting}: {sum(ok)}/{len(ok)} seeds")
        lines += [
            "**Target** (WGSEF without the hard top-k removes ≥ 60% of hidden "
            "neurons on digits within 1 point of dense accuracy, 3 of 3 seeds): " + "; ".join(target),
            "",
        ]
    png = Path(args.out).with_suffix(".png")
    plot(runs, tasks, png)
    lines += [f"![Pareto fronts]({png.name})", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


def plot(runs: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), dpi=100, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        names = list(dict.fromkeys(r["method"] for r in runs if r["task"] == task))
        for i, method in enumerate(names):
            rs = [r for r in runs if r["task"] == task and r["method"] == method]
            ax.scatter(
                [r["removed"] for r in rs], [r["quality"] for r in rs], s=22, color=f"C{i}", label=method, alpha=0.8
            )
        ax.set_xlabel("hidden neurons removed")
        ax.set_ylabel("held-out accuracy (%)" if task == "digits" else "greedy return")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
