"""VA-π on the digits world: base vs VA-π-tuned digits-gpt, with the paper's ablations.

    python benchmarks/vapi.py                 # 3 seeds of VA-π, the ablations, the base
    python benchmarks/vapi.py --seeds 1 --iterations 20   # smoke

Rows (recipes/vapi/digits.yaml with one change each; same rounds, same seeds):
- VA-π: reward −MSE against the original image + prior term β·CE (β = 0.1);
- reward only (β = 0): the paper reports that training without the prior term diverges;
- prior only: reward weight 0 (every group has zero spread, so A = 0: only β·CE acts).

Each run is evaluated by ``rlprox eval`` on 500 class-conditional samples (cfg 1.5,
temperature 1, the same seeds for base and tuned): the FID proxy against the held-out
split, the IS proxy, the classifier's conditional digit/colour accuracy, and the
teacher-forced reconstruction MSE of held-out images (one sampled sequence each). The
tokenizer floor, the FID proxy of real held-out images' own VQ reconstructions, is
printed next to every FID: no token sequence of this VQ can do better. Writes
benchmarks/results/vapi.md.
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

RESULTS = ROOT / "benchmarks" / "results"
RECIPE = "recipes/vapi/digits.yaml"
ROWS = {
    "VA-π (reward + prior, β = 0.1)": [],
    "reward only (β = 0)": ["regularizers=[]"],
    "prior only (reward weight 0)": ["reward.kwargs.mse_weight=0.0"],
}


def run(label: str, overrides: list[str], seed: int, iterations: int, samples: int, out: Path) -> dict:
    name = f"vapi-{list(ROWS).index(label)}-s{seed}"
    extra = [f"seed={seed}", "run.eval_size=0", *([f"run.iterations={iterations}"] if iterations else []), *overrides]
    rows, ev = train_and_eval(RECIPE, extra, out, name, ["--num-samples", str(samples), "--seed", "777"])
    wall = sum(r["perf/iteration_s"] for r in rows)
    return {
        "label": label,
        "seed": seed,
        "minutes": wall / 60,
        **{k[5:]: v for k, v in ev.items() if k.startswith("eval/")},
        "reward_first": rows[0]["reward/mean"],
        "reward_last": rows[-1]["reward/mean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ablation-seeds", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=0, help="override the recipe's rounds (0: its 300)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "vapi.md"))
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="vapi_"))
    jobs = [
        (label, seed)
        for label in ROWS
        for seed in range(1, (args.seeds if label.startswith("VA") else args.ablation_seeds) + 1)
    ]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: run(job[0], ROWS[job[0]], job[1], args.iterations, args.samples, out), jobs))
    for r in runs:
        print(
            f"{r['label']} seed {r['seed']}: FID {r['base_fid_proxy']:.1f} -> "
            f"{r['fid_proxy']:.1f}, digit acc {r['base_digit_acc']:.3f} -> {r['digit_acc']:.3f}, "
            f"tf MSE {r['base_tf_mse']:.4f} -> {r['tf_mse']:.4f}",
            flush=True,
        )

    def ms(values):
        return (
            f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
            if len(values) > 1
            else f"{values[0]:.3f}"
        )

    def mf(values):
        return (
            f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
            if len(values) > 1
            else f"{values[0]:.1f}"
        )

    base = [r for r in runs if r["label"].startswith("VA")]
    floor = statistics.mean(r["tokenizer_floor_fid_proxy"] for r in runs)
    lines = [
        "# VA-π on the digits world: base vs tuned digits-gpt",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} "
        f"CPUs (shared), python {platform.python_version()}; "
        "`python benchmarks/vapi.py --seeds "
        f"{args.seeds}{f' --iterations {args.iterations}' if args.iterations else ''}` "
        f"({args.parallel} runs at a time).",
        "",
        "recipes/vapi/digits.yaml: B = 32 images × G = 8 sequences per round, one AdamW step per "
        "round (lr 1e-5; the update in train mode, as VA-π's code), ε = 0.2, reward −MSE(D(ẑ), x). "
        f"Evaluation: {args.samples} samples (cfg 1.5) per model, same seeds for "
        "base and tuned; FID/IS proxies on the digits classifier's features "
        "against the held-out split. **Tokenizer floor** (FID proxy "
        f"of held-out images' own VQ reconstructions): {floor:.1f}.",
        "",
        "| model | seeds | FID proxy ↓ | IS proxy | digit acc | "
        "colour acc | teacher-forced recon MSE ↓ | CPU minutes |",
        "|---|---|---|---|---|---|---|---|",
        f"| base digits-gpt | – | {mf([r['base_fid_proxy'] for r in base])} | "
        f"{mf([r['base_is_proxy'] for r in base])} | {ms([r['base_digit_acc'] for r in base])} | "
        f"{ms([r['base_colour_acc'] for r in base])} | {ms([r['base_tf_mse'] for r in base])} | – |",
    ]
    for label in ROWS:
        rs = [r for r in runs if r["label"] == label]
        lines.append(
            f"| {label} | {len(rs)} | {mf([r['fid_proxy'] for r in rs])} | "
            f"{mf([r['is_proxy'] for r in rs])} | {ms([r['digit_acc'] for r in rs])} | "
            f"{ms([r['colour_acc'] for r in rs])} | {ms([r['tf_mse'] for r in rs])} "
            f"| {statistics.mean(r['minutes'] for r in rs):.1f} |"
        )
    drop = [1 - r["fid_proxy"] / r["base_fid_proxy"] for r in base]
    acc_ok = [r["digit_acc"] >= r["base_digit_acc"] for r in base]
    lines += [
        "",
        f"- FID proxy change, VA-π vs base: {', '.join(f'{-d:+.0%}' for d in drop)} (seeds "
        f"1..{len(base)}); target −30% or better with conditional accuracy not lower: "
        f"**{'met' if all(d >= 0.30 for d in drop) and all(acc_ok) else 'not met'}** "
        f"({sum(d >= 0.30 and a for d, a in zip(drop, acc_ok))}/{len(base)} seeds).",
        "",
        "Per run:",
        "",
    ]
    for r in runs:
        lines.append(
            f"- {r['label']} seed {r['seed']}: FID {r['base_fid_proxy']:.1f} → "
            f"{r['fid_proxy']:.1f}, IS {r['base_is_proxy']:.2f} → {r['is_proxy']:.2f}, "
            f"digit acc {r['base_digit_acc']:.3f} → {r['digit_acc']:.3f}, "
            f"tf MSE {r['base_tf_mse']:.4f} → {r['tf_mse']:.4f}, "
            f"training reward {r['reward_first']:.4f} → {r['reward_last']:.4f}, {r['minutes']:.1f} min"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
