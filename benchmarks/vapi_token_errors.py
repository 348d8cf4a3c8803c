"""Can VA-π's reward see token errors? A check before any RL, on the digits world.

    python benchmarks/vapi_token_errors.py                      # digits-gpt over its digits-vq

For N held-out images x with classes c: z* = VQ.encode(x); one teacher-forced pass of the GPT on z*
gives logits at every position; G sequences ẑ are drawn from them (VA-π's COLLECT, ξ = 0). The reward
R(ẑ) = −MSE(D(ẑ), x) is compared with R(z*), the ground-truth tokens' reward:

- separation: P(R(z*) > R(ẑ)) over the N·G pairs (0.5: the reward cannot tell the ground truth from a
  sample; 1: it always can), and the fraction of images whose z* beats all G samples;
- how a token error shows: the within-image rank correlation of −R(ẑ) with the number of positions
  where ẑ ≠ z* (1: more wrong tokens, always a worse reward), and the mean token error rate;
- the reward gap per wrong token: the slope of R against the error count, pooled within images.

Prints a markdown table (one line per model) and appends it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch


def rank(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension (ties broken by order)."""
    return values.argsort(-1).argsort(-1).float()


@torch.no_grad()
def measure(gpt_spec: str, images: int, group: int, seed: int) -> dict:
    from rlprox.models.llamagen import group_sample
    from rlprox.zoo.build import load_gpt_and_vq
    from rlprox.zoo.data import load_digits_world

    gpt, vq = load_gpt_and_vq(gpt_spec)
    gpt.eval()
    held = load_digits_world("heldout")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(held), generator=g)[:images]
    x, c = held.images[pick], held.classes[pick]
    z = vq.encode(x)[2].flatten(1)  # (N, T)
    logits, _ = gpt(z[:, :-1], c)
    samples, _ = group_sample(logits, group, g)  # (N, G, T)
    decoded = vq.decode_code(samples.reshape(images * group, -1)).float().clamp(0, 1)
    reward = -((decoded - x.repeat_interleave(group, 0)) ** 2).mean(dim=(1, 2, 3)).view(images, group)
    truth = -((vq.decode_code(z).float().clamp(0, 1) - x) ** 2).mean(dim=(1, 2, 3))  # (N,)
    errors = (samples != z[:, None]).sum(-1).float()  # (N, G) wrong positions per sample
    rho = []
    for r, e in zip(reward, errors):
        if e.std() > 0 and r.std() > 0:
            rho.append(torch.corrcoef(torch.stack([rank(-r), rank(e)]))[0, 1])
    centred_e = errors - errors.mean(1, keepdim=True)
    centred_r = reward - reward.mean(1, keepdim=True)
    slope = float((centred_e * centred_r).sum() / (centred_e**2).sum().clamp_min(1e-12))
    return {
        "model": gpt_spec,
        "grid": f"{vq.token_grid}×{vq.token_grid}",
        "codes": vq.config["codebook_size"],
        "token_error_rate": float(errors.mean() / z.shape[1]),
        "separation": float((truth[:, None] > reward).float().mean()),
        "truth_beats_all": float((truth[:, None] > reward).all(1).float().mean()),
        "rank_corr": float(torch.stack(rho).mean()) if rho else float("nan"),
        "slope": slope,
        "truth_mse": float(-truth.mean()),
        "sample_mse": float(-reward.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt", nargs="+", default=["zoo:digits-gpt"], help="digits-gpt specs (zoo:NAME or folders)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        f"{datetime.date.today()}, {platform.node()}; `python benchmarks/vapi_token_errors.py --gpt "
        f"{' '.join(args.gpt)} --images {args.images} --group {args.group}`",
        "",
        "| model | token grid | codes | token error rate | P(R(z*) > R(ẑ)) | z* beats all G | "
        "rank corr(−R, #errors) | ΔR per wrong token | MSE of D(z*) | MSE of D(ẑ) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in args.gpt:
        m = measure(spec, args.images, args.group, args.seed)
        lines.append(
            f"| {m['model']} | {m['grid']} | {m['codes']} | {m['token_error_rate']:.3f} | {m['separation']:.3f} | "
            f"{m['truth_beats_all']:.3f} | {m['rank_corr']:.3f} | {m['slope']:.2e} | {m['truth_mse']:.4f} | "
            f"{m['sample_mse']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with Path(args.out).open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
