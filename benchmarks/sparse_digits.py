"""Structured sparsity on digits: dense MLP vs WGSEF-pruned and compacted MLP.

    python benchmarks/sparse_digits.py     # prints a markdown table, writes benchmarks/results/sparse_digits.md

Trains recipes/sparse/digits-wgsef.yaml and the same recipe with ``regularizers=[]``
(the dense baseline) for 3 seeds each, then compacts the sparse networks and times one
forward pass of the full-width (masked dense) and the compacted network on one CPU
thread (median of many repeats). Targets: held-out accuracy within 1 point of the dense
baseline (means over seeds) with >= 50 % of hidden neurons removed, and the compacted
network faster than the dense one at batch 1 and 256.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rlprox.engine import Engine  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402

torch.set_num_threads(1)
RECIPE = ROOT / "recipes" / "sparse" / "digits-wgsef.yaml"
SEEDS = (1, 2, 3)


def train(overrides: list[str], seed: int, out: str) -> dict:
    quiet = [
        f"run.output_dir={out}",
        f"run.name=seed{seed}",
        f"seed={seed}",
        "run.log_with=[]",
        "run.progress=false",
        "run.plot=false",
    ]
    recipe = load_recipe(RECIPE, [*overrides, *quiet])
    start = time.perf_counter()
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    stats = engine.algo.model_stats()
    stats["train_s"] = time.perf_counter() - start
    return stats


def mean_std(values) -> str:
    values = list(values)
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        dense = [train(["regularizers=[]"], s, f"{tmp}/dense") for s in SEEDS]
        sparse = [train([], s, f"{tmp}/sparse") for s in SEEDS]
    recipe = load_recipe(RECIPE)
    widths = recipe.sparse.hidden_sizes
    layers = range(len(widths))
    acc_dense = [100 * r["compact/dense_accuracy"] for r in dense]
    acc_sparse = [100 * r["compact/dense_accuracy"] for r in sparse]
    acc_compact = [100 * r["compact/compact_accuracy"] for r in sparse]
    removed = [100 * r["compact/hidden_removed_fraction"] for r in sparse]
    kept = " / ".join(
        mean_std(r[f"compact/hidden{l}_kept"] for r in sparse).replace(".00", "") + f" of {widths[l]}" for l in layers
    )

    def lat(key):
        return mean_std(r[key] for r in sparse)

    speed1 = [r["latency/speedup_b1"] for r in sparse]
    speed256 = [r["latency/speedup_b256"] for r in sparse]
    gap = statistics.mean(acc_dense) - statistics.mean(acc_sparse)
    rows = [
        ("held-out accuracy, dense baseline (%)", mean_std(acc_dense)),
        ("held-out accuracy, WGSEF masked dense (%)", mean_std(acc_sparse)),
        ("held-out accuracy, WGSEF compacted (%)", mean_std(acc_compact)),
        ("accuracy gap dense − sparse (points)", f"{gap:.2f}"),
        ("hidden neurons kept per layer", kept),
        ("hidden neurons removed (%)", mean_std(removed)),
        (
            "parameters dense → compacted",
            f"{sparse[0]['compact/params_dense']:,} → "
            f"{statistics.mean(r['compact/params_compact'] for r in sparse):,.0f}",
        ),
        ("parameter compression (×)", mean_std(r["compact/param_compression"] for r in sparse)),
        (
            "compacted == masked dense (allclose)",
            f"{all(r['compact/outputs_match'] for r in sparse)} (max abs logit "
            f"difference {max(r['compact/max_abs_logit_diff'] for r in sparse):.1e})",
        ),
        ("latency batch 1, dense / compacted (µs)", f"{lat('latency/dense_b1_us')} / {lat('latency/compact_b1_us')}"),
        ("speed-up batch 1 (×)", mean_std(speed1)),
        (
            "latency batch 256, dense / compacted (µs)",
            f"{lat('latency/dense_b256_us')} / {lat('latency/compact_b256_us')}",
        ),
        ("speed-up batch 256 (×)", mean_std(speed256)),
        (
            "training time per run, dense / sparse (s)",
            f"{mean_std(r['train_s'] for r in dense)} / {mean_std(r['train_s'] for r in sparse)}",
        ),
    ]
    spec = ", ".join(f"{k}: {v}" for k, v in recipe.regularizers[0].items())
    lines = [
        "# Structured sparsity on digits: dense vs WGSEF-compacted MLP",
        "",
        f"`python benchmarks/sparse_digits.py` — recipe `recipes/sparse/digits-wgsef.yaml` "
        f"(MLP 64-{'-'.join(map(str, widths))}-10, {recipe.run.iterations} "
        f"epochs, {recipe.optim.name} lr {recipe.optim.lr:g} "
        f"{recipe.optim.lr_schedule}; regularizer `{spec}`) vs the same recipe with `regularizers=[]`; "
        f"seeds {', '.join(map(str, SEEDS))} (mean ± std). Held-out split: the 360 digits with index % 5 == 0. "
        f"Latency: one forward pass, CPU, 1 thread, median of timed blocks; dense = the full-width trained network "
        f"(zero rows still computed). torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, shared CPU.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        f"{'PASS' if gap <= 1.0 and min(removed) >= 50.0 else 'FAIL'}: accuracy within 1 point of dense "
        f"(gap {gap:.2f}) with >= 50 % hidden neurons removed (min over seeds {min(removed):.1f} %)",
        f"{'PASS' if min(speed1) > 1.0 and min(speed256) > 1.0 else 'FAIL'}: compacted faster than dense "
        f"(speed-up min over seeds: batch 1 {min(speed1):.2f}×, batch 256 {min(speed256):.2f}×)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "sparse_digits.md"
    out.write_text(text)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
