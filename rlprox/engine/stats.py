"""Update and iteration stats: ``StatSums`` keeps per-minibatch values on the device
(no host sync per minibatch), ``reduce_stats`` combines every process's stats into
global values with one all-reduce.
"""

from __future__ import annotations

import zlib

import torch
from accelerate import Accelerator


class StatSums:
    """Per-minibatch stats, kept as lists of device tensors (no host sync and no
    arithmetic per minibatch); ``local_means`` averages each key over its own count (a
    key such as the grad norm may appear only on real optimizer steps) with one
    device-to-host copy."""

    def __init__(self):
        self.values: dict[str, list] = {}

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            if torch.is_tensor(v):
                v = v.detach()
            self.values.setdefault(k, []).append(v)

    def merge(self, other: "StatSums") -> None:
        for k, v in other.values.items():
            self.values.setdefault(k, []).extend(v)

    def local_means(self, device) -> dict[str, float]:
        if not self.values:
            return {}
        keys = sorted(self.values)
        vec = torch.stack(
            [
                torch.stack([torch.as_tensor(x, device=device).float().reshape(()) for x in self.values[k]]).mean()
                for k in keys
            ]
        )
        return dict(zip(keys, vec.tolist()))


def reduce_stats(stats: dict[str, float], reductions: dict[str, str], accelerator: Accelerator) -> dict[str, float]:
    """Combine every process's ``stats`` (same keys on every rank) into global values,
    with one all-reduce (a second one only when some key asks for max/min). Rules:
    "mean" (default), "sum", "max", "min", "mean:<weight key>" (Σ v·w / Σ w over
    processes with w > 0; NaN when Σ w = 0)."""
    keys = sorted(stats)
    world = accelerator.num_processes
    kinds = {k: reductions.get(k, "mean") for k in keys}
    for k, kind in kinds.items():
        if kind.startswith("mean:") and kind[5:] not in stats:
            raise KeyError(f"stat {k!r} is weighted by {kind[5:]!r}, which is not a stat")
    # sums: for each key its contribution, plus one weight per weighted key
    sum_keys = [k for k in keys if kinds[k] in ("mean", "sum") or kinds[k].startswith("mean:")]
    ext_keys = [k for k in keys if kinds[k] in ("max", "min")]
    sums = []
    for k in sum_keys:
        v = float(stats[k])
        if kinds[k].startswith("mean:"):
            w = float(stats[kinds[k][5:]])
            sums += [v * w if w > 0 else 0.0, w if w > 0 else 0.0]
        else:
            sums.append(v)
    ext = [float(stats[k]) if kinds[k] == "max" else -float(stats[k]) for k in ext_keys]
    # every rank must report the same keys: a small checksum of the key set and its
    # square ride along (W·Σc² = (Σc)² exactly when every rank has the same c)
    checksum = float(zlib.crc32("\n".join(keys).encode()) % 65521)
    sums_t = torch.tensor(sums + [checksum, checksum * checksum], dtype=torch.float64)
    ext_t = torch.tensor(ext, dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        device = accelerator.device
        sums_t = accelerator.reduce(sums_t.to(device), reduction="sum").cpu()
        if world * float(sums_t[-1]) != float(sums_t[-2]) ** 2:
            raise RuntimeError(
                "iteration stats differ in their keys across processes; every "
                "process must return the same keys (NaN where it has no value)"
            )
        if ext_keys:
            ext_t = ext_t.to(device)
            dist.all_reduce(ext_t, op=dist.ReduceOp.MAX)
            ext_t = ext_t.cpu()
    out: dict[str, float] = {}
    i = 0
    for k in sum_keys:
        if kinds[k].startswith("mean:"):
            total, weight = float(sums_t[i]), float(sums_t[i + 1])
            if weight > 0:  # no process had any (e.g. no episode ended): the key is left out
                out[k] = total / weight
            i += 2
        else:
            out[k] = float(sums_t[i]) / (world if kinds[k] == "mean" else 1)
            i += 1
    for j, k in enumerate(ext_keys):
        out[k] = float(ext_t[j]) if kinds[k] == "max" else -float(ext_t[j])
    return out
