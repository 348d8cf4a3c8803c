"""GPU smoke test: the Hopper PPO recipe on CUDA for a few iterations, fp32 and bf16.

    python benchmarks/gpu_smoke.py                  # CUDA: 4 iterations per precision
    python benchmarks/gpu_smoke.py --iterations 2
    python benchmarks/gpu_smoke.py --allow-cpu      # no GPU: same code path on CPU, 1 iteration

Loads recipes/ppo/hopper.yaml with dotted overrides (``run.iterations=N``,
``run.mixed_precision=no|bf16``), trains, checks the policy lives on the expected device
and the last loss is finite, and prints steps/s per precision as a markdown table.
On CUDA the table is written to benchmarks/results/gpu_smoke.md. Without CUDA (and no
--allow-cpu) it prints "no CUDA device: skipped" and exits 0, writing nothing.

SPS: "steady" is the median of the per-iteration ``perf/sps`` after the first iteration
(the first pays CUDA/cuBLAS initialisation); "overall" is env steps / wall of ``fit()``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "ppo" / "hopper.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "gpu_smoke.md"
PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def run_one(precision: str, iterations: int, on_cpu: bool, out_dir: str) -> dict:
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    overrides = [
        f"run.iterations={iterations}",
        # quoted: the override value is YAML, where a bare `no` parses as False
        f'run.mixed_precision="{PRECISIONS[precision]}"',
        f"run.output_dir={out_dir}",
        f"run.name=gpu-smoke-{precision}",
        "run.log_with=[]",
        "run.progress=false",
        "run.plot=false",
        "run.eval_size=0",
        "run.save_every=0",
        "run.torch_threads=1",
        f"run.cpu={'true' if on_cpu else 'false'}",
    ]
    recipe = load_recipe(RECIPE, overrides)
    engine = Engine(recipe)
    device = next(engine.algo.policy.parameters()).device if hasattr(engine.algo, "policy") else engine.algo.device
    want = "cpu" if on_cpu else "cuda"
    if device.type != want:
        raise SystemExit(f"{precision}: policy is on {device}, expected {want}")
    steps = iterations * recipe.env.num_envs * recipe.ppo.num_steps
    if not on_cpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    stats = engine.fit()
    if not on_cpu:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_it = [r["perf/sps"] for r in rows if "perf/sps" in r]
    steady = per_it[1:] or per_it
    loss = stats.get("loss/total", float("nan"))
    peak_mem = torch.cuda.max_memory_allocated() / 2**20 if not on_cpu else None
    engine.close()
    if not math.isfinite(loss):
        raise SystemExit(f"{precision}: last loss is not finite ({loss})")
    return dict(precision=precision, device=str(device), mixed_precision=engine.accelerator.mixed_precision,
                iterations=iterations, steps=steps, wall=wall, overall_sps=steps / wall,
                steady_sps=statistics.median(steady), loss=loss, ret=stats.get("reward/episodic_return"),
                peak_mem_mb=peak_mem)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=None, help="iterations per precision (default 4 on CUDA, 1 on CPU)")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, run the same path on CPU (1 iteration) instead of skipping")
    p.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS.relative_to(ROOT)}, CUDA only)")
    p.add_argument("--worker", choices=list(PRECISIONS), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)

    if args.worker:
        on_cpu = not torch.cuda.is_available()
        out_dir = tempfile.mkdtemp(prefix="gpu_smoke_")
        try:
            r = run_one(args.worker, args.iterations or (1 if on_cpu else 4), on_cpu, out_dir)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        print("RESULT " + json.dumps(r), flush=True)
        return 0

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: skipped")
        return 0
    on_cpu = not cuda
    iterations = args.iterations or (1 if on_cpu else 4)
    device_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

    results = []
    for precision in PRECISIONS:
        # one fresh process per precision: accelerate's AcceleratorState is a process-wide
        # singleton and refuses a second Accelerator with another mixed_precision
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", precision, "--iterations", str(iterations)]
        cmd += ["--allow-cpu"] if on_cpu else []
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            print(f"{precision}: FAILED (rc {proc.returncode})")
            return 1
        r = json.loads(found[-1][len("RESULT "):])
        results.append(r)
        print(f"  {precision}: {r['steady_sps']:,.0f} steps/s steady, {r['overall_sps']:,.0f} overall, "
              f"loss {r['loss']:.4f}", flush=True)

    import gymnasium

    lines = [
        "# GPU smoke test: PPO Hopper-v5 (recipes/ppo/hopper.yaml)",
        "",
        f"Date {datetime.date.today().isoformat()}; device {device_name}; torch {torch.__version__}"
        f"{' (CUDA ' + str(torch.version.cuda) + ')' if cuda else ''}, gymnasium {gymnasium.__version__}; "
        f"1 torch thread. {iterations} iteration(s) × 1 env × 2048 steps per precision, run one after the other "
        "each in a fresh process. Steady SPS = median per-iteration `perf/sps` after the first iteration "
        "(all iterations when only one); overall = steps / wall of `Engine.fit()`. "
        "A smoke test, not a benchmark: the env is MuJoCo on the CPU, so the GPU mostly shows launch overhead.",
        "",
        "Command: `" + " ".join(["python benchmarks/gpu_smoke.py"] + sys.argv[1:]) + "`",
        "",
        "| precision | device | accelerate mixed_precision | iterations | env steps | steady SPS | overall SPS "
        "| last loss | peak CUDA mem MB |",
        "|" + "---|" * 9,
    ]
    for r in results:
        mem = "–" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {r['precision']} | {r['device']} | {r['mixed_precision']} | {r['iterations']} | {r['steps']:,} "
                     f"| {r['steady_sps']:,.0f} | {r['overall_sps']:,.0f} | {r['loss']:.4f} | {mem} |")
    body = "\n".join(lines) + "\n"
    print()
    print(body)
    out = args.out if args.out is not None else (RESULTS if cuda else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(body)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
