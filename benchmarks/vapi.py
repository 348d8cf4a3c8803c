"""VA-π on the digits world: base vs VA-π-tuned digits-gpt, a control without the reward signal,
a perceptual term, and the paper's ablations.

    python benchmarks/vapi.py --parallel 1            # 3 seeds of VA-π, the control, the perceptual row
    python benchmarks/vapi.py --seeds 1 --iterations 20 --ablation-seeds 0   # smoke
    python benchmarks/vapi.py --gpt zoo:digits-gpt-coarse --perceptual-seeds 0 --ablation-seeds 0
        # a token-error test bed (4×4 codes; or zoo:digits-gpt-k16, 16 codes): writes vapi_digits-gpt-coarse.md

Rows (recipes/vapi/digits.yaml with one change each; same rounds, same training seeds):
- VA-π: reward −MSE against the original image + prior term β·CE (β = 0.1);
- control: the same trainer with the reward signal removed and the prior kept: ``pixel_reconstruction``
  with ``shuffle_seed`` (each image gets another image's score: same scale, no information) + β 0.1;
- VA-π + perceptual: −(MSE + w_p·d_p), d_p an LPIPS-form distance in the digits-vq encoder's features
  (not the classifier the FID proxy uses); w_p = 0.025 makes the two terms' within-group spreads equal
  on base samples (0.0007 and 0.029), set before any run;
- reward only (β = 0): the paper reports that training without the prior term diverges;
- prior only: reward weight 0 (every group has zero spread, so A = 0: only β·CE acts).

Each run is evaluated by ``rlprox eval`` twice over: at cfg 1.0 (VA-π's evaluation samples without
guidance) and at cfg 1.5 (digits-gpt's recommended guidance), each on 3 evaluation seeds × 500
class-conditional samples (temperature 1). The base model is sampled with the same evaluation seeds
(once: it is the same for every run). Metrics: the FID proxy against the held-out split (per evaluation
seed), the IS proxy, the classifier's conditional digit/colour accuracy, and the teacher-forced
reconstruction MSE of held-out images. Paired differences (same training seed, same evaluation seed)
come with a nested percentile bootstrap interval (2.5th to 97.5th percentile) that resamples training seeds
and, within each, evaluation seeds. It is not a 95% interval at this project's seed counts: over 3 training
seeds a percentile bootstrap covers the mean well below 95% of the time (at n = 3 it is close to the
[min, max] of the seeds), so with fewer than 5 training seeds a row is exploratory and the target gets no
verdict (``stats.is_exploratory``). The tokenizer floor, the FID proxy of real held-out images' own VQ
reconstructions, is printed next to the FIDs: no token sequence of this VQ can do better. Writes
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402
from harness import ROOT, evaluate_run, train_run  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RECIPE = "recipes/vapi/digits.yaml"
PERCEPTUAL_WEIGHT = 0.025
ROWS = {  # key: (label, overrides)
    "vapi": ("VA-π (reward + prior, β = 0.1)", []),
    "control": ("control (shuffled reward + prior, β = 0.1)", ["reward.kwargs.shuffle_seed=0"]),
    "perceptual": (
        f"VA-π + perceptual (w_p = {PERCEPTUAL_WEIGHT})",
        [f"reward.kwargs.perceptual_weight={PERCEPTUAL_WEIGHT}"],
    ),
    "reward-only": ("reward only (β = 0)", ["regularizers=[]"]),
    "prior-only": ("prior only (reward weight 0)", ["reward.kwargs.mse_weight=0.0"]),
}
CFGS = (1.0, 1.5)  # VA-π's evaluation (no guidance) first
EVAL_SEEDS = (777, 778, 779)
METRICS = ("fid_proxy", "is_proxy", "digit_acc", "colour_acc", "tf_mse")
TARGET_ACC_DROP = 0.02
DEFAULT_GPT = "zoo:digits-gpt"  # the recipe's model.gpt


def bed_name(gpt: str) -> str:
    """The test bed's short name: the GPT's zoo name (or its folder's name)."""
    return Path(gpt.removeprefix("zoo:")).name


def run(key: str, seed: int, args, out: Path, with_base: bool) -> dict:
    """Train one run, evaluate it at every cfg × evaluation seed: {"evals": {(cfg, eval seed): eval.json}}."""
    name = f"vapi-{key}-s{seed}" if args.gpt == DEFAULT_GPT else f"vapi-{bed_name(args.gpt)}-{key}-s{seed}"
    extra = [f"seed={seed}", "run.eval_size=0", *([f"run.iterations={args.iterations}"] if args.iterations else [])]
    if args.gpt != DEFAULT_GPT:
        extra.append(f"model.gpt={args.gpt}")
    rows = train_run(RECIPE, extra + ROWS[key][1], out, name, reuse=True)
    evals = {}
    for cfg in CFGS:
        for eval_seed in EVAL_SEEDS:
            evals[(cfg, eval_seed)] = evaluate_run(
                out / name,
                ["--num-samples", str(args.samples), "--seed", str(eval_seed), "--guidance-scale", str(cfg)],
                f"cfg{cfg}-seed{eval_seed}",
                eval_overrides=[] if with_base else ["vapi.eval_base=false"],
                reuse=True,
            )
            print(f"{name} cfg {cfg} eval seed {eval_seed}: FID {evals[(cfg, eval_seed)]['eval/fid_proxy']:.1f}")
    return {
        "key": key,
        "seed": seed,
        "minutes": sum(r["perf/iteration_s"] for r in rows) / 60,
        "reward_first": rows[0]["reward/mean"],
        "reward_last": rows[-1]["reward/mean"],
        "mse_last": rows[-1].get("reward/mse", float("nan")),
        "evals": evals,
    }


def per_eval(run: dict, cfg: float, metric: str, prefix: str = "") -> dict[int, float]:
    return {e: run["evals"][(cfg, e)][f"eval/{prefix}{metric}"] for e in EVAL_SEEDS}


def bootstrap(diffs: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Nested percentile interval (2.5th to 97.5th percentile) of the mean of ``diffs`` (training seeds ×
    evaluation seeds), resampling training seeds and, within each resampled one, evaluation seeds (both with
    replacement). Its coverage is below 95% with few training seeds (module docstring)."""
    rng = np.random.default_rng(seed)
    s, e = diffs.shape
    rows = rng.integers(s, size=(n, s))
    cols = rng.integers(e, size=(n, s, e))
    means = diffs[rows[..., None], cols].mean(axis=(1, 2))
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired(mine: list[dict], theirs: list[dict] | dict, cfg: float, metric: str) -> tuple[float, float, float, int]:
    """(mean, low, high, training seeds) of ``mine`` − ``theirs`` in ``metric``, paired by training seed and
    evaluation seed; ``theirs`` a dict of base values per evaluation seed (the base) or runs."""
    by_seed = {r["seed"]: r for r in theirs} if isinstance(theirs, list) else None
    table = []
    for r in mine:
        if by_seed is not None and r["seed"] not in by_seed:
            continue
        other = per_eval(by_seed[r["seed"]], cfg, metric) if by_seed is not None else theirs
        table.append([per_eval(r, cfg, metric)[e] - other[e] for e in EVAL_SEEDS])
    if not table:
        return float("nan"), float("nan"), float("nan"), 0
    diffs = np.asarray(table)
    lo, hi = bootstrap(diffs)
    return float(diffs.mean()), lo, hi, len(table)


def mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return "did not run"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


DIGITS = {"fid_proxy": 1, "is_proxy": 2, "digit_acc": 3, "colour_acc": 3, "tf_mse": 4}


def cfg_section(cfg: float, runs: list[dict], base: dict, seeds: dict, bed: str) -> tuple[list[str], dict]:
    """The table and paired differences at one guidance scale; also the target's pieces at this scale."""
    lines = [
        "| model | training seeds | FID proxy ↓ | IS proxy | digit acc | colour acc | teacher-forced recon MSE ↓ "
        "| CPU minutes |",
        "|---|---|---|---|---|---|---|---|",
        f"| base {bed} | – ({len(EVAL_SEEDS)} eval seeds) | "
        + " | ".join(mean_sd(list(base[m].values()), DIGITS[m]) for m in METRICS)
        + " | – |",
    ]
    for key, (label, _) in ROWS.items():
        rs = [r for r in runs if r["key"] == key]
        cells = [mean_sd([statistics.mean(per_eval(r, cfg, m).values()) for r in rs], DIGITS[m]) for m in METRICS]
        minutes = f"{statistics.mean(r['minutes'] for r in rs):.1f}" if rs else "–"
        lines.append(f"| {label} | {len(rs)} of {seeds[key]} | " + " | ".join(cells) + f" | {minutes} |")
    by_key = {key: [r for r in runs if r["key"] == key] for key in ROWS}
    comparisons = [
        ("VA-π − base", "vapi", None),
        ("VA-π − control", "vapi", "control"),
        ("control − base", "control", None),
        ("VA-π + perceptual − base", "perceptual", None),
        ("VA-π + perceptual − control", "perceptual", "control"),
        ("VA-π + perceptual − VA-π", "perceptual", "vapi"),
    ]
    lines += [
        "",
        "Paired differences (same training seed, same evaluation seeds), mean [nested percentile bootstrap interval "
        "over training seeds and, within each, evaluation seeds; with fewer than 5 training seeds its coverage is "
        "below 95% and the row is exploratory]:",
        "",
        "| comparison | Δ FID proxy | Δ digit acc | training seeds |",
        "|---|---|---|---|",
    ]
    found = {}
    for label, mine, other in comparisons:
        cells = []
        for metric in ("fid_proxy", "digit_acc"):
            theirs = base[metric] if other is None else by_key[other]
            mean, lo, hi, n = paired(by_key[mine], theirs, cfg, metric)
            found[(label, metric)] = (mean, lo, hi, n)
            d = DIGITS[metric]
            cells.append(f"{mean:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]" if n else "did not run")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {found[(label, 'fid_proxy')][3]} |")
    return lines, found


def verdict(found: dict, mine: str) -> tuple[str, str]:
    """(status, why) of the target for the row ``mine`` ("VA-π" or "VA-π + perceptual"): FID proxy below base
    and below control beyond the interval, digit accuracy not lower by more than 0.02. The status is "target
    **met**" or "target **not met**" with at least 5 training seeds, "exploratory (n = N training seeds)" with
    fewer (no verdict), or "target did not run"."""
    vs_base, vs_control = found[(f"{mine} − base", "fid_proxy")], found[(f"{mine} − control", "fid_proxy")]
    acc = found[(f"{mine} − base", "digit_acc")]
    if not vs_base[3] or not vs_control[3]:
        return "target did not run", "a row is missing"
    parts = [
        f"FID vs base {vs_base[0]:+.1f} [{vs_base[1]:+.1f}, {vs_base[2]:+.1f}] "
        f"({'below' if vs_base[2] < 0 else 'not below'} beyond the interval)",
        f"vs control {vs_control[0]:+.1f} [{vs_control[1]:+.1f}, {vs_control[2]:+.1f}] "
        f"({'below' if vs_control[2] < 0 else 'not below'})",
        f"digit acc vs base {acc[0]:+.3f} ({'within' if acc[0] >= -TARGET_ACC_DROP else 'beyond'} −{TARGET_ACC_DROP})",
    ]
    met = vs_base[2] < 0 and vs_control[2] < 0 and acc[0] >= -TARGET_ACC_DROP
    n = min(vs_base[3], vs_control[3])
    if stats.is_exploratory(n):
        return f"exploratory (n = {n} training seeds)", "; ".join(parts)
    return f"target **{'met' if met else 'not met'}**", "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of VA-π and the control")
    parser.add_argument("--perceptual-seeds", type=int, default=3)
    parser.add_argument("--ablation-seeds", type=int, default=1, help="reward only / prior only")
    parser.add_argument("--iterations", type=int, default=0, help="override the recipe's rounds (0: its 300)")
    parser.add_argument("--samples", type=int, default=500, help="samples per model per evaluation seed")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--workdir", default="", help="runs folder; finished runs and evaluations there are reused")
    parser.add_argument("--gpt", default=DEFAULT_GPT, help="model.gpt: the test bed (its VQ comes with it)")
    parser.add_argument("--out", default="", help="default: results/vapi.md, or vapi_<bed>.md for another --gpt")
    args = parser.parse_args()
    bed = bed_name(args.gpt)
    args.out = args.out or str(RESULTS / ("vapi.md" if args.gpt == DEFAULT_GPT else f"vapi_{bed}.md"))
    out = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vapi_"))
    out.mkdir(parents=True, exist_ok=True)
    seeds = {
        "vapi": args.seeds,
        "control": args.seeds,
        "perceptual": args.perceptual_seeds,
        "reward-only": args.ablation_seeds,
        "prior-only": args.ablation_seeds,
    }
    jobs = [(key, seed) for key in ROWS for seed in range(1, seeds[key] + 1)]
    if not jobs:
        sys.exit("no runs asked for")
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: run(job[0], job[1], args, out, with_base=job == jobs[0]), jobs))
    carrier = runs[0]  # the base is sampled once, with the first run's evaluations
    floor = statistics.mean(ev["eval/tokenizer_floor_fid_proxy"] for ev in carrier["evals"].values())
    command = (
        f"python benchmarks/vapi.py --seeds {args.seeds} --perceptual-seeds {args.perceptual_seeds} "
        f"--ablation-seeds {args.ablation_seeds}{f' --iterations {args.iterations}' if args.iterations else ''} "
        f"--parallel {args.parallel}" + (f" --gpt {args.gpt}" if args.gpt != DEFAULT_GPT else "")
    )
    recipe = RECIPE if args.gpt == DEFAULT_GPT else f"{RECIPE} with model.gpt: {args.gpt}"
    lines = [
        f"# VA-π on the digits world: base vs tuned {bed}, with a control",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared), python "
        f"{platform.python_version()}; `{command}`.",
        "",
        f"{recipe}: B = 32 images × G = 8 sequences per round, one AdamW step per round "
        "(lr 1e-5; the update in train mode, as VA-π's code), ε = 0.2, reward −MSE(D(ẑ), x), prior β = 0.1. "
        "The control keeps everything but the reward signal (`reward.kwargs.shuffle_seed`: each image gets "
        "another image's score). The perceptual row adds w_p·d_p, an LPIPS-form distance in the digits-vq "
        f"encoder's features (w_p = {PERCEPTUAL_WEIGHT}, set from the two terms' spreads before any run). "
        f"Evaluation: every run at cfg 1.0 and at cfg 1.5, each on evaluation seeds {', '.join(map(str, EVAL_SEEDS))} "
        f"× {args.samples} samples; the base with the same seeds. A run's value is its mean over evaluation seeds; "
        "± is the standard deviation over training seeds (over evaluation seeds for the base). FID/IS proxies on "
        "the digits classifier's features against the held-out split. **Tokenizer floor** (FID proxy of held-out "
        f"images' own VQ reconstructions): {floor:.1f}.",
        "",
        f"Target (the paper's direction), at cfg 1.0: VA-π's FID proxy below the base's and below the control's, "
        "both beyond the nested bootstrap interval, with digit accuracy not lower than the base's by more than "
        f"{TARGET_ACC_DROP}; a verdict needs at least 5 training seeds.",
        "",
    ]
    verdicts = {}
    for cfg in CFGS:
        base = {m: per_eval(carrier, cfg, m, "base_") for m in METRICS}
        title = "no guidance, VA-π's evaluation" if cfg == 1.0 else "digits-gpt's recommended guidance"
        section, found = cfg_section(cfg, runs, base, seeds, bed)
        lines += [f"## cfg {cfg} ({title})", "", *section, ""]
        for mine in ("VA-π", "VA-π + perceptual"):
            verdicts[(cfg, mine)] = verdict(found, mine)
            status, why = verdicts[(cfg, mine)]
            lines.append(f"- {mine} at cfg {cfg}: {status}: {why}.")
        lines.append("")
    not_run = [ROWS[k][0] for k in ROWS if not seeds[k]]
    if not_run:
        lines += [f"Not run: {', '.join(not_run)} (0 seeds asked for).", ""]
    lines += ["Per run (mean over evaluation seeds):", ""]
    for r in runs:
        cells = []
        for cfg in CFGS:
            fid = statistics.mean(per_eval(r, cfg, "fid_proxy").values())
            acc = statistics.mean(per_eval(r, cfg, "digit_acc").values())
            cells.append(
                f"cfg {cfg}: FID {fid:.1f} (eval seeds: "
                + ", ".join(f"{v:.1f}" for v in per_eval(r, cfg, "fid_proxy").values())
                + f"), digit acc {acc:.3f}"
            )
        lines.append(
            f"- {ROWS[r['key']][0]} seed {r['seed']}: {'; '.join(cells)}; training reward "
            f"{r['reward_first']:.4f} → {r['reward_last']:.4f}, training MSE (last round) {r['mse_last']:.4f}, "
            f"{r['minutes']:.1f} min"
        )
    for cfg in CFGS:
        base_fids = per_eval(carrier, cfg, "fid_proxy", "base_")
        lines.append(f"- base at cfg {cfg}: FID per eval seed " + ", ".join(f"{v:.1f}" for v in base_fids.values()))
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
