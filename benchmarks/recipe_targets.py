"""Does a generative recipe reach its target? The shipped recipe on 2 processes, seeds 1..N, next to a control
that trains the same recipe on random scores, both judged by the recipe's reward on its evaluation prompts.

    python benchmarks/recipe_targets.py recipes/loop/digits-qwen-alignment.yaml          # 5 seeds + control
    python benchmarks/recipe_targets.py recipes/loop/digits-wan-motion.yaml --minutes 25
    python benchmarks/recipe_targets.py recipes/loop/digits-qwen-alignment.yaml --seeds 1 \\
        --set run.iterations=2 --set run.eval_size=4 --runs /tmp/rt --out /tmp/rt.md     # smoke

Each run is ``torchrun --nproc_per_node 2 -m rlprox train RECIPE seed=S`` (one torch thread per process,
``--set`` overrides on top, the same for both arms). The control replaces the reward with uniform scores in
[0, 1) drawn from a hash of each sample (no information about the image or clip) and keeps the recipe's
reward as ``eval_reward``, so both arms are judged alike: Δ = the final evaluation's reward of the tuned model
minus the base's on the same items and noise, with the trained sampler and the deterministic one. Minutes:
the training iterations' seconds summed (evaluations excluded).

The table: Δ per seed for both arms, mean [Student-t 95% interval] over seeds, the same-seed difference
recipe − control with its interval and MDE (benchmarks/stats.py), and the verdict of the target (the model
families issue): mean Δ ≥ ``--gain`` with the trained sampler, every seed within ``--minutes``, and the
interval of recipe − control above ``--margin``; below 5 seeds exploratory, no verdict word. Finished runs
live in ``--runs`` (default benchmarks/results/runs/recipe_targets/, committed), pruned to metrics.jsonl, and
are read back instead of trained again.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import stats  # noqa: E402

ROOT = harness.ROOT
RESULTS = ROOT / "benchmarks" / "results"
CONTROL = "benchmarks.recipe_targets:uniform_scores"


def uniform_scores(media, prompts: list[str], metadata: list[dict]):
    """The control's reward: a uniform score in [0, 1) per image or clip from a SHA-256 of its prompt and
    pixels, i.i.d. noise that carries no information about what was made (and is reproducible)."""
    import torch

    scores = []
    for item, prompt in zip(media, prompts):
        digest = hashlib.sha256(prompt.encode() + item.detach().float().cpu().numpy().tobytes()).digest()
        scores.append(int.from_bytes(digest[:8], "little") / 2**64)
    return torch.tensor(scores)


uniform_scores.media = "any"  # scores images and clips alike


def recipe_reward(recipe: str):
    import yaml

    return yaml.safe_load((ROOT / recipe).read_text())["reward"]


def run(recipe: str, arm: str, seed: int, args, train: bool) -> dict | None:
    overrides = [f"seed={seed}", *args.set]
    if arm == "control":
        overrides += [f"reward={json.dumps({'name': CONTROL})}", f"eval_reward={json.dumps(recipe_reward(recipe))}"]
    stem = Path(recipe).stem
    name = f"{stem}-{arm}-s{seed}" + (
        f"-{hashlib.sha1(' '.join(args.set).encode()).hexdigest()[:8]}" if args.set else ""
    )
    out = Path(args.runs)
    if not harness.torchrun_finished(recipe, overrides, out, name):
        if not train:
            return None
        harness.torchrun_run(recipe, overrides, out, name)
        harness.prune(out / name)
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval/reward" in r][-1]
    deterministic = next(
        (k[len("eval/reward") :] for k in last if k.startswith("eval/reward_") and not k.endswith("_std")), None
    )
    return {
        "arm": arm,
        "seed": seed,
        "minutes": sum(r["perf/iteration_s"] for r in rows) / 60,
        "images": int(rows[-1]["progress/images"]),
        "base": last["eval/base_reward"],
        "delta": last["eval/reward"] - last["eval/base_reward"],
        "delta0": (last[f"eval/reward{deterministic}"] - last[f"eval/base_reward{deterministic}"])
        if deterministic
        else float("nan"),
        "deterministic": deterministic or "",
    }


def summary(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.3f} (n = 1)" if values else "—"
    lo, hi = stats.mean_interval(values)
    tag = ", exploratory" if stats.is_exploratory(len(values)) else ""
    return f"{statistics.fmean(values):+.3f} [{lo:+.3f}, {hi:+.3f}] (n = {len(values)}{tag})"


def table(recipe: str, runs: dict, args, missing: list[str]) -> str:
    mine, control = runs["recipe"], runs["control"]
    det = next((r["deterministic"] for r in mine + control if r["deterministic"]), "")
    det_label = {"_ode": "ODE", "_eta0": "η = 0"}.get(det, det.strip("_") or "deterministic")
    lines = [
        f"# Recipe target: {recipe}",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"`python benchmarks/recipe_targets.py {' '.join(sys.argv[1:])}`.",
        "",
        "Each run: the recipe on 2 processes (torchrun, one torch thread each)"
        + (f", with {', '.join(f'`{s}`' for s in args.set)}" if args.set else "")
        + "; Δ = the final evaluation's reward, tuned − base, same items and noise, with the trained sampler "
        f"and the {det_label} one. Control: the same recipe trained on uniform random scores and evaluated on the "
        "recipe's reward. Minutes: training only, on 2 processes.",
        "",
        f"| arm | seed | images | minutes | base | Δ trained sampler | Δ {det_label} |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, rs in (("recipe", mine), ("control", control)):
        for r in rs:
            lines.append(
                f"| {arm} | {r['seed']} | {r['images']:,} | {r['minutes']:.1f} | {r['base']:.3f} | "
                f"{r['delta']:+.3f} | {r['delta0']:+.3f} |"
            )
    lines += ["", f"| | Δ trained sampler | Δ {det_label} |", "|---|---|---|"]
    for arm, rs in (("recipe", mine), ("control", control)):
        lines.append(f"| {arm} | {summary([r['delta'] for r in rs])} | {summary([r['delta0'] for r in rs])} |")
    paired = [(a, b) for a in mine for b in control if a["seed"] == b["seed"]]
    left, right = [a for a, _ in paired], [b for _, b in paired]
    cells = [harness.paired_difference(left, right, key) if paired else "—" for key in ("delta", "delta0")]
    lines.append(f"| recipe − control, same seed | {cells[0]} | {cells[1]} |")
    n = len(paired)
    if stats.is_exploratory(n):
        verdict = f"exploratory (n = {n}; a verdict needs {stats.MIN_SEEDS_FOR_VERDICT} paired seeds)"
    else:
        diffs = [a["delta"] - b["delta"] for a, b in paired]
        lo, _ = stats.mean_interval(diffs)
        gained = statistics.fmean(r["delta"] for r in mine) >= args.gain
        in_time = all(r["minutes"] <= args.minutes for r in mine)
        met = gained and in_time and lo > args.margin
        verdict = (
            f"**{'met' if met else 'not met'}** (mean Δ ≥ +{args.gain:.2f}: {'yes' if gained else 'no'}; every seed "
            f"within {args.minutes:g} min: {'yes' if in_time else 'no'}; recipe − control lower end {lo:+.3f} > "
            f"+{args.margin:.2f}: {'yes' if lo > args.margin else 'no'})"
        )
    lines += ["", f"Target (Δ ≥ +{args.gain:.2f} in ≤ {args.minutes:g} min, above the control): {verdict}."]
    if missing:
        lines += ["", f"Not run yet ({len(missing)}): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a generative recipe under recipes/ (relative to the checkout)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--gain", type=float, default=0.15)
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--margin", type=float, default=0.05, help="recipe − control's lower end must exceed it")
    parser.add_argument("--set", action="append", default=[], help="a recipe override for both arms (repeatable)")
    parser.add_argument("--max-runs", type=int, default=None, help="train at most N new runs, then write the table")
    parser.add_argument("--runs", default=str(RESULTS / "runs" / "recipe_targets"))
    parser.add_argument("--out", default=None, help="default: results/recipe_target_<recipe>.md")
    args = parser.parse_args(argv)
    if not (ROOT / args.recipe).is_file():
        parser.error(f"recipe: {args.recipe} is not a file under {ROOT}")
    out = Path(args.out or RESULTS / f"recipe_target_{Path(args.recipe).stem}.md")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    runs, missing, trained = {"recipe": [], "control": []}, [], 0
    for seed in range(1, args.seeds + 1):
        for arm in runs:
            done = run(args.recipe, arm, seed, args, train=False)
            if done is None and (args.max_runs is None or trained < args.max_runs):
                done = run(args.recipe, arm, seed, args, train=True)
                trained += 1
                print(f"{arm} seed {seed}: Δ {done['delta']:+.3f} in {done['minutes']:.1f} min", flush=True)
            if done is None:
                missing.append(f"{arm} seed {seed}")
            else:
                runs[arm].append(done)
    if not runs["recipe"] and not runs["control"]:
        print("no finished run yet", flush=True)
        return
    text = table(args.recipe, runs, args, missing)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
