"""Why PolicyFlow learns Hopper slowly: two measurements along one training run.

    python benchmarks/policyflow_diagnostics.py                  # 146 iterations (300k env steps), lr 3e-4
    python benchmarks/policyflow_diagnostics.py --iterations 20 --at 1,10,19
    # other recipe values
    python benchmarks/policyflow_diagnostics.py --set policyflow.noise_scale=1 policyflow.init_log_std=-0.5

Trains recipes/policyflow/hopper.yaml with a checkpoint every iteration, then for
checkpoints k and k + 1 at the ``--at`` iterations, on 2048 (observation, z) pairs
(observations ~ N(0, I) in the normalised space the networks see):

1. Does the ratio see the policy change? ‖Δφ₁‖, the real change of the flow output
   φ₁(z; s) from k to k + 1, against ‖δv‖ = ‖v_{k+1} − v_k‖ at the ratio's sampled t
   on the straight path from z to φ̂₁, and their cosine. The velocity-difference ratio
   treats δv as the shift of the action mean.
2. Where is the exploration? The spread of φ₁(z; s) over z (std per action dimension,
   averaged over states and dimensions), which the ratio treats as given, against the
   learned Gaussian σ, which the ratio scores.

Writes benchmarks/results/policyflow_diagnostics.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path):
    from rlprox.engine import build_for_eval

    return build_for_eval(path)[3]


@torch.no_grad()
def measure(old, new, seed: int, n: int = 2048) -> dict:
    steps = old.cfg.flow_steps
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, old.obs_dim, generator=gen)
    z = old.cfg.noise_scale * torch.randn(n, old.action_dim, generator=gen)
    phi_old, phi_new = old.policy.flow(obs, z, steps), new.policy.flow(obs, z, steps)
    t = torch.randint(steps, (n,), generator=gen).float() / steps
    x_t = (1 - t[:, None]) * z + t[:, None] * phi_old
    dv = new.policy.velocity_field(x_t, t, obs) - old.policy.velocity_field(x_t, t, obs)
    dphi = phi_new - phi_old
    # spread over z at fixed states: 64 states × 256 draws of z
    states = torch.randn(64, old.obs_dim, generator=gen).repeat_interleave(256, 0)
    zs = old.cfg.noise_scale * torch.randn(len(states), old.action_dim, generator=gen)
    spread = old.policy.flow(states, zs, steps).view(64, 256, -1).std(1).mean()
    return {
        "dphi": float(dphi.norm(dim=1).mean()),
        "dv": float(dv.norm(dim=1).mean()),
        "cos": float(torch.nn.functional.cosine_similarity(dphi, dv, dim=1).mean()),
        "spread": float(spread),
        "sigma": float(old.policy.log_std().exp().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=146)
    parser.add_argument("--at", default="1,10,50,100,145")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra recipe overrides")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "policyflow_diagnostics.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="pf_diag_"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "rlprox",
        "train",
        str(ROOT / "recipes/policyflow/hopper.yaml"),
        f"run.iterations={args.iterations}",
        f"optim.lr={args.lr}",
        "run.save_every=1",
        f"run.keep_last={args.iterations}",
        "run.eval_size=0",
        f"run.output_dir={out}",
        "run.name=pf",
        "run.log_with=[]",
        "run.progress=false",
        "run.plot=false",
        *args.set,
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    ckpts = out / "pf" / "checkpoints"
    rows = []
    for k in (int(x) for x in args.at.split(",")):
        old, new = load(ckpts / f"iter-{k:06d}"), load(ckpts / f"iter-{k + 1:06d}")
        rows.append((k, measure(old, new, seed=k)))
    lines = [
        "# PolicyFlow on Hopper-v5: what the velocity-difference ratio sees",
        "",
        f"{datetime.date.today()}, {platform.node()}, python {platform.python_version()}; "
        f"`python benchmarks/policyflow_diagnostics.py --iterations {args.iterations} --at {args.at} --lr {args.lr:g}"
        + (f" --set {' '.join(args.set)}" if args.set else "")
        + "` "
        f"(recipes/policyflow/hopper.yaml{' with those overrides' if args.set else ''}, "
        "seed 1, a checkpoint every iteration).",
        "",
        "| iteration k | ‖Δφ₁‖ (real change of the flow output, k → k+1) | ‖δv‖ "
        "(the ratio's estimate) | cos(Δφ₁, δv) | spread of φ₁ over z | learned σ |",
        "|---|---|---|---|---|---|",
    ]
    for k, m in rows:
        lines.append(
            f"| {k} | {m['dphi']:.4f} | {m['dv']:.4f} | {m['cos']:.2f} | {m['spread']:.3f} | {m['sigma']:.3f} |"
        )
    lines += ["", "Spread and σ are per action dimension (averaged); Hopper's actions are clipped to [−1, 1].", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
