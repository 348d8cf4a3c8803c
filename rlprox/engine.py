"""The one on-policy training loop, on ``accelerate``, and the algorithm contract.

    for it in iterations:
        batch = algo.collect()                    # no grad; old log-probs stored
        batch = algo.advantages(batch)            # GAE / leave-one-out / group norm
        for epoch, minibatch in algo.minibatches(batch, epoch):
            loss, stats = algo.loss(minibatch) (+ regularizer penalties)
            optimizer_step(...)                   # backward, grad sync, clip, step, prox
        reduce stats over processes; track; maybe evaluate (sharded); maybe checkpoint

The engine knows nothing about gymnasium, images or tokens. An algorithm is built by
its trainer's ``build(recipe, runtime)`` (``rlprox.algos``) and is any object that
satisfies ``Algorithm`` below; every optional hook the engine, the checkpoint, the
tracker or the CLI may call is listed in ``AlgorithmHooks`` and read only through
``hook(algo, name)``, which refuses names not listed there. docs/algorithm-contract.md
says the same in prose, with the module roles and the per-rank services.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from torch import nn

from rlprox import checkpoint, tracking
from rlprox.errors import RecipeError
from rlprox.prox.regularizers import full_tensor
from rlprox.recipe import Recipe
from rlprox.runtime import EvalRequest, EvalShard, Runtime, make_runtime, shard  # noqa: F401  (the contract types, re-exported)

# ============================================================================ the contract


@runtime_checkable
class Algorithm(Protocol):
    """What every trainer's algorithm object must provide."""

    modules: dict[str, nn.Module]
    """Trained modules. Their trainable parameters (``requires_grad``) are optimized,
    gradient-synchronised across processes, seen by regularizers and saved in
    checkpoints with the modules' persistent buffers; parameters with
    ``requires_grad=False`` inside them (a LoRA base model) are cast to
    ``run.frozen_dtype`` and never saved. After the engine is built, an entry may be
    replaced by its DDP wrapper (``run.grad_sync: ddp``): call the entry for forward
    passes, and ``runtime.unwrap(module)`` to reach the module itself. Under
    ``run.grad_sync: fsdp`` entries stay the same objects, sharded in place (their
    parameters are DTensor shards outside ``collect``, ``advantages`` and ``evaluate``)."""

    def collect(self) -> Any:
        """Experience for one iteration (any type); runs under ``torch.no_grad``."""

    def loss(self, minibatch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """(scalar loss to minimise, stats). Stats: floats or 0-d tensors under the
        namespaces loss/, policy/, reward/, value/, perf/; averaged over minibatches
        and processes by the engine."""


class AlgorithmHooks(Protocol):
    """Optional hooks, with their exact signatures. The engine reads none but these."""

    frozen: dict[str, nn.Module]
    """Modules used but never trained (VAE, text encoder, tokenizer, reference policy,
    reward model): moved to the device, cast to ``run.frozen_dtype``, ``eval()``,
    ``requires_grad_(False)``; never wrapped, never in the optimizer, never in a
    checkpoint (the saved recipe says how to rebuild them)."""

    update_epochs: int
    """Passes over the batch per iteration (default 1)."""

    micro_steps: int
    """``loss`` calls whose gradients are summed into one minibatch's gradient
    (default 1), e.g. LOOP's trained denoising steps: the engine makes one optimizer
    step every ``micro_steps × run.gradient_accumulation_steps`` calls."""

    curve: tuple[str, str]
    """(x key, y key) of metrics.jsonl that learning_curve.png plots."""

    stat_reductions: dict[str, str]
    """How ``iteration_stats`` keys combine across processes: "mean" (default), "sum",
    "max", "min", or "mean:<weight key>" (mean weighted by another key's per-process
    value, e.g. episodic return by episode count)."""

    def advantages(self, batch: Any) -> Any:
        """Batch with advantages (default: unchanged); under ``torch.no_grad``."""

    def minibatches(self, batch: Any, epoch: int) -> Iterable[Any]:
        """Minibatches of one epoch (default: the whole batch once)."""

    def early_stop(self, epoch_stats: dict[str, float]) -> bool:
        """Stop the epochs after this one (e.g. PPO's target KL). ``epoch_stats`` are
        the epoch's update stats averaged over processes, so every rank agrees. Set
        the attribute to None when it can never fire (saves one all-reduce per epoch)."""

    def iteration_stats(self, elapsed: float) -> dict[str, float]:
        """This process's stats of the last collect (returns, rewards, env steps);
        every process must return the same keys (NaN where it has no value)."""

    def param_groups(self) -> list[dict]:
        """Optimizer groups: ``{"params": [...], "lr": ..., ...}`` covering every
        trainable parameter exactly once (default: one group, base lr). Weight decay
        is then split off biases, norms and embeddings unless ``optim.decay_all``."""

    def evaluate(self, request: EvalRequest) -> EvalShard:
        """Evaluate this process's share of ``request`` (never perturbs training
        state). The engine gathers the shards and summarises them."""

    def summarize_eval(self, values: dict[str, list]) -> dict[str, float]:
        """Metrics of the gathered per-item eval values that are not plain means
        (entropies, FID proxies, ...); keys without the "eval/" prefix."""

    def model_stats(self) -> dict[str, Any]:
        """Facts about the trained model printed by ``rlprox eval`` (sparsity, size)."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Per-process state beyond weights, RNGs and counters: (tensors, JSON)."""

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Restore ``state_dict``'s output (resume and eval)."""

    def export(self, out_dir: Path) -> list[Path]:
        """Write the trained model in its ecosystem's format (``rlprox export``)."""

    def close(self) -> None:
        """Release envs, threads, files."""


OPTIONAL_HOOKS = frozenset(name for name in AlgorithmHooks.__annotations__) | frozenset(
    name for name, value in vars(AlgorithmHooks).items() if callable(value) and not name.startswith("_")
)


def hook(algo: Any, name: str, default: Any = None) -> Any:
    """The optional hook ``name`` of ``algo``, or ``default``. Only hooks declared in
    ``AlgorithmHooks`` may be asked for: there are no hidden hooks."""
    if name not in OPTIONAL_HOOKS:
        raise AttributeError(f"{name!r} is not a hook of the algorithm contract (AlgorithmHooks)")
    return getattr(algo, name, default)


def run_evaluation(
    algo,
    accelerator: Accelerator,
    total: int,
    seed: int,
    deterministic: bool | None = None,
    prompts: list[str] | None = None,
):
    """Sharded evaluation: every process evaluates its share, shards are gathered;
    returns (stats with "eval/" keys, per-item values, images, info) on every rank.
    Scalar values become ``eval/<key>`` (mean) and ``eval/<key>_std``, except keys that
    start with "_" (per-item data only ``summarize_eval`` reads)."""
    evaluate = hook(algo, "evaluate")
    rank, world = accelerator.process_index, accelerator.num_processes
    start, num = shard(total, rank, world)
    request = EvalRequest(
        total=total,
        num=num,
        start=start,
        seed=seed,
        rank=rank,
        world=world,
        deterministic=deterministic,
        prompts=prompts,
    )
    result = evaluate(request) if num > 0 else EvalShard()
    shards = [result]
    if world > 1:
        from accelerate.utils import gather_object

        payload = {
            "values": result.values,
            "images": {k: v.detach().cpu() for k, v in result.images.items()},
            "info": result.info,
            "grid_cols": result.grid_cols,
        }
        shards = [EvalShard(**s) for s in gather_object([payload])]
    values: dict[str, list] = {}
    images: dict[str, list] = {}
    for s in shards:
        for k, v in s.values.items():
            values.setdefault(k, []).extend(list(v))
        for k, v in s.images.items():
            images.setdefault(k, []).append(v.detach().cpu())
    stats: dict[str, float] = {}
    for k, v in values.items():
        if not k.startswith("_") and v and all(isinstance(x, (int, float, bool, np.number)) for x in v):
            arr = np.asarray(v, np.float64)
            stats[f"eval/{k}"] = float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
            stats[f"eval/{k}_std"] = float(np.nanstd(arr)) if np.isfinite(arr).any() else float("nan")
    stats["eval/count"] = max((len(v) for v in values.values()), default=0)
    summarize = hook(algo, "summarize_eval")
    if summarize is not None:
        stats.update({f"eval/{k}": v for k, v in summarize(values).items()})
    grid_cols = next((s.grid_cols for s in shards if s.grid_cols), 0)
    return stats, values, {k: torch.cat(v) for k, v in images.items()}, {"grid_cols": grid_cols, **shards[0].info}


# ============================================================================ optimizer


def build_optimizer(groups, optim) -> torch.optim.Optimizer:
    """The base torch optimizer named by an ``OptimConfig`` over ``groups`` (a list of
    parameters or of param-group dicts)."""
    groups = list(groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = (
        {"fused": True}
        if params and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
        else {}
    )
    if optim.name == "adam":
        return torch.optim.Adam(
            groups, lr=optim.lr, eps=optim.eps, betas=tuple(optim.betas), weight_decay=optim.weight_decay, **fused
        )
    if optim.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=optim.lr, eps=optim.eps, betas=tuple(optim.betas), weight_decay=optim.weight_decay, **fused
        )
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def _no_decay_ids(modules: Iterable[nn.Module]) -> set[int]:
    """Biases, norm weights and embeddings: parameters weight decay should not shrink."""
    out = set()
    for module in modules:
        for sub in module.modules():
            kind = type(sub).__name__
            for name, p in sub.named_parameters(recurse=False):
                if (
                    p.ndim < 2
                    or name.endswith("bias")
                    or isinstance(sub, nn.Embedding)
                    or "Norm" in kind
                    or "Embedding" in kind
                ):
                    out.add(id(p))
    return out


def optimizer_groups(algo, optim) -> list[dict]:
    """The algorithm's parameter groups (or one group), checked to cover every trainable
    parameter exactly once, with weight decay split off biases/norms/embeddings."""
    modules = list(algo.modules.values())
    trainable = [p for m in modules for p in m.parameters() if p.requires_grad]
    custom = hook(algo, "param_groups")
    groups = [dict(g) for g in custom()] if custom is not None else [{"params": trainable}]
    seen: dict[int, int] = {}
    for i, g in enumerate(groups):
        g["params"] = list(g["params"])
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"param_groups(): a parameter is in groups {seen[id(p)]} and {i}")
            seen[id(p)] = i
    missing = [p for p in trainable if id(p) not in seen]
    if missing or len(seen) != len({id(p) for p in trainable}):
        raise ValueError(
            f"param_groups(): the groups must hold exactly the trainable parameters ({len(missing)} missing)"
        )
    if optim.decay_all:
        return groups
    no_decay = _no_decay_ids(modules)
    out = []
    for g in groups:
        wd = g.get("weight_decay", optim.weight_decay)
        keep = [p for p in g["params"] if id(p) not in no_decay or wd == 0]
        skip = [p for p in g["params"] if id(p) in no_decay and wd != 0]
        if keep:
            out.append({**g, "params": keep, "weight_decay": wd})
        if skip:
            out.append({**g, "params": skip, "weight_decay": 0.0})
    return out


def lr_lambda(schedule: str, iterations: int, warmup: int = 0) -> Callable[[int], float]:
    """Multiplier of the base lr at iteration ``it`` (0-based, stepped once per iteration).

    Warm-up: (it + 1) / warmup for it < warmup. Then "linear" is PPO's annealing
    lr_it = lr · (1 − it / iterations); "cosine" is ½(1 + cos(π·it/iterations)).
    """

    def base(it: int) -> float:
        if schedule == "linear":
            return max(0.0, 1.0 - it / iterations)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(it, iterations) / iterations))
        return 1.0

    if warmup <= 0:
        return base
    return lambda it: (it + 1) / warmup if it < warmup else base(it)


class GradientAverager:
    """Averages gradients over processes with one flat all-reduce per optimizer step
    (per dtype and device; chunked above ``bucket_numel`` elements).

    Every parameter's ``.grad`` is bound once as a view into a flat buffer, so autograd
    accumulates straight into it and the all-reduce runs on that buffer with no
    flatten/unflatten copies; after the step the buffer is zeroed in place (the views
    stay). A parameter that got no gradient on this process contributes zeros, so
    ranks never disagree on the layout. If something rebinds a ``.grad`` (e.g. a
    ``zero_grad(set_to_none=True)``), it is copied back into the buffer first.
    """

    def __init__(self, params: list[torch.nn.Parameter], world: int, bucket_numel: int = 1 << 26):
        self.world, self.bucket_numel = world, bucket_numel
        self.params = list(params)
        self.buffers: list[torch.Tensor] = []
        self.slots: list[tuple[torch.nn.Parameter, torch.Tensor, int, int]] = []  # (param, buffer, offset, numel)
        by_kind: dict[tuple, list] = {}
        for p in self.params:
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), group in by_kind.items():
            flat = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=device)
            self.buffers.append(flat)
            offset = 0
            for p in group:
                self.slots.append((p, flat, offset, p.numel()))
                offset += p.numel()
        self.bind()

    def bind(self) -> None:
        for p, flat, offset, n in self.slots:
            view = flat[offset : offset + n]
            if p.grad is not None:
                if p.grad.data_ptr() == view.data_ptr():
                    continue
                view.copy_(p.grad.reshape(-1))
            else:
                view.zero_()
            p.grad = view.view_as(p)

    def __call__(self) -> None:
        self.bind()
        for flat in self.buffers:
            for start in range(0, flat.numel(), self.bucket_numel):
                self._average(flat[start : start + self.bucket_numel])

    def _average(self, chunk: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(chunk)
        chunk.div_(self.world)

    def zero(self) -> None:
        for flat in self.buffers:
            flat.zero_()

    def close(self) -> None:
        pass


class SharedMemoryAverager(GradientAverager):
    """``GradientAverager`` for processes on one x86-64 host, CPU tensors: each process
    writes its gradient into its slot of a shared-memory buffer and publishes a step
    counter; every process then sums the slots in rank order (identical results on
    every rank). A gloo all-reduce of a small policy's gradient costs ~1–1.7 ms when
    interleaved with compute on a 2-core machine, this ~0.1–0.3 ms
    (benchmarks/ppo_scaling.py). Slots are double-buffered: a process can only start
    writing step k + 2 after every process has published step k + 1, i.e. finished
    reading step k. Publishing relies on x86's ordered stores; other CPUs use
    ``GradientAverager``. The segment is unlinked as soon as every process has mapped
    it, so nothing is left in /dev/shm even after a crash. A process that waits more
    than ``timeout`` seconds for the others raises.
    """

    def __init__(self, params: list[torch.nn.Parameter], world: int, rank: int, timeout: float = 600.0):
        super().__init__(params, world, bucket_numel=1 << 62)
        from multiprocessing import shared_memory

        import torch.distributed as dist

        self.rank, self.timeout = rank, timeout
        numel = [flat.numel() for flat in self.buffers]
        data_bytes = 2 * world * sum(n * flat.element_size() for n, flat in zip(numel, self.buffers))
        data_bytes = -(-data_bytes // 64) * 64
        names = [f"rlprox-{os.getpid()}-{int(time.time() * 1e6) % 10**9}" if rank == 0 else None]
        if rank == 0:
            self.shm = shared_memory.SharedMemory(name=names[0], create=True, size=data_bytes + 64 * world)
        dist.broadcast_object_list(names, src=0)
        if rank != 0:
            self.shm = shared_memory.SharedMemory(name=names[0])
            _untrack(self.shm)  # rank 0's unlink() below unregisters its own
        # one cache line per process for its step counter
        self.seq = np.ndarray((world, 8), np.int64, self.shm.buf, data_bytes)
        self.seq[rank, 0] = 0
        self.slots_shared = []
        offset = 0
        for flat in self.buffers:
            nbytes = 2 * world * flat.numel() * flat.element_size()
            view = torch.frombuffer(self.shm.buf, dtype=flat.dtype, count=2 * world * flat.numel(), offset=offset)
            self.slots_shared.append(view.view(2, world, flat.numel()))
            offset += nbytes
        self.step = 0
        dist.barrier()
        if rank == 0:
            self.shm.unlink()  # mapped by everyone: the segment lives until the last process unmaps it

    @staticmethod
    def usable(params: list[torch.nn.Parameter], world: int) -> bool:
        import platform

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        return (
            world > 1
            and local == world
            and platform.machine().lower() in ("x86_64", "amd64")
            and all(p.device.type == "cpu" for p in params)
            and sum(p.numel() for p in params) <= 1 << 26
        )

    def __call__(self) -> None:
        self.bind()
        self.step += 1
        k = self.step
        for flat, shared in zip(self.buffers, self.slots_shared):
            shared[k % 2, self.rank].copy_(flat)
        self.seq[self.rank, 0] = k  # publish after the data (x86 stores stay ordered)
        self._wait(k)
        for flat, shared in zip(self.buffers, self.slots_shared):
            slot = shared[k % 2]
            flat.copy_(slot[0])
            for j in range(1, self.world):
                flat.add_(slot[j])
            flat.div_(self.world)

    def _wait(self, k: int) -> None:
        seq = self.seq
        spins, start = 0, None
        for j in range(self.world):
            while seq[j, 0] < k:
                spins += 1
                if spins > 2000:  # the other process is far behind: stop burning its core
                    os.sched_yield()
                    if start is None:
                        start = time.monotonic()
                    elif spins % 4096 == 0 and time.monotonic() - start > self.timeout:
                        raise RuntimeError(
                            f"process {j} did not reach gradient step {k} within {self.timeout:.0f} s (it died or hangs)"
                        )

    def close(self) -> None:
        self.slots_shared, self.seq = [], None
        try:
            self.shm.close()
        except BufferError:  # a tensor view still alive; the OS unmaps at exit
            pass


def _untrack(shm) -> None:
    """Python < 3.13 registers every attached segment with the resource tracker, which
    would unlink it (and warn) when any one process exits; we unlink it ourselves."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")
    except Exception:  # noqa: BLE001  (3.13+: not registered)
        pass


def optimizer_step(
    accelerator: Accelerator,
    loss: torch.Tensor,
    modules,
    optimizer,
    max_grad_norm: float,
    params: list | None = None,
    sync: GradientAverager | None = None,
) -> torch.Tensor | None:
    """The one place that does backward + gradient sync + grad clipping + optimizer step.

    Runs under ``accelerator.accumulate``: with N accumulation steps, N calls make one
    optimizer step on the mean gradient (accelerate divides the loss by N), and the
    prox (ProxOptimizer) runs only on that real step. ``sync`` averages the gradients
    over processes on real steps (a ``GradientAverager``; None with one process or
    under DDP, which syncs in backward). Returns the pre-clip grad norm on real steps,
    else None.
    """
    if params is None:
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
    grad_norm = None
    if accelerator.gradient_accumulation_steps == 1 and _plain_clip_ok(accelerator):
        # No accumulation, no loss scaling: accelerate's wrappers reduce to exactly
        # these calls, minus ~2 ms of bookkeeping per step that dominates small-policy
        # updates on CPU.
        loss.backward()
        if sync is not None:
            sync()
        if max_grad_norm > 0:
            grad_norm = full_tensor(
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm, foreach=True)
            )
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.step()
        if sync is not None:
            sync.zero()
        else:
            inner.zero_grad(set_to_none=True)
        return grad_norm
    with accelerator.accumulate(*modules):
        for module in modules:  # FSDP: reduce-scatter gradients on real steps only
            if hasattr(module, "set_requires_gradient_sync"):
                module.set_requires_gradient_sync(accelerator.sync_gradients)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if sync is not None:
                sync()
            if max_grad_norm > 0:
                with_grad = [p for p in params if p.grad is not None]
                if _plain_clip_ok(accelerator):
                    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm, foreach=True))
                else:  # fp16 loss scaling needs accelerate's version (unscales first)
                    grad_norm = accelerator.clip_grad_norm_(with_grad, max_grad_norm)
        optimizer.step()
        if sync is not None and accelerator.sync_gradients:
            sync.zero()
        else:
            optimizer.zero_grad(set_to_none=sync is None)
    return grad_norm


def _plain_clip_ok(accelerator: Accelerator) -> bool:
    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    return accelerator.distributed_type in plain and getattr(accelerator, "scaler", None) is None


# ============================================================================ stats


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
                "iteration stats differ in their keys across processes; every process must return the same keys (NaN where it has no value)"
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


# ============================================================================ the engine


@dataclass
class TrainState:
    """Counters saved with every checkpoint."""

    iteration: int = 0  # completed iterations
    optimizer_steps: int = 0
    wall_time: float = 0.0
    extra: dict = field(default_factory=dict)


def make_accelerator(run, project_dir: Path | None = None) -> Accelerator:
    """The accelerator for a recipe's ``run`` section. Refuses topologies the engine
    does not support with one line (before any work)."""
    from accelerate.utils import DistributedDataParallelKwargs

    use_cpu = run.cpu or not torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise RecipeError(
            "run",
            "accelerate's FSDP launch config is not used: launch with recipes/accelerate/multi_gpu.yaml (or multi_cpu.yaml) and set run.grad_sync=fsdp; the engine shards the trained modules itself (torch FSDP2)",
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise RecipeError(
            "run",
            "DeepSpeed is not supported by the rlprox engine; use run.grad_sync=fsdp to shard parameters, gradients and optimizer state",
        )
    # A process may build several engines (tests, notebooks, benchmarks) with different
    # precision settings: start from a clean accelerator state each time, keeping the
    # distributed one (PartialState).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    kwargs = {}
    if run.grad_sync == "ddp":
        ddp = run.ddp
        kwargs["kwargs_handlers"] = [
            DistributedDataParallelKwargs(
                find_unused_parameters=ddp.find_unused_parameters,
                bucket_cap_mb=ddp.bucket_cap_mb,
                static_graph=ddp.static_graph,
                gradient_as_bucket_view=ddp.gradient_as_bucket_view,
            )
        ]
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        # without a GPU, cpu=True is what makes accelerate pick up a torchrun world
        # (MULTI_CPU, gloo); otherwise every process would train alone
        cpu=use_cpu,
        log_with=list(run.log_with) or None,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "logs"))
        if project_dir
        else None,
        **kwargs,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RecipeError(
            "run",
            f"{launched} processes were launched but accelerate joined {accelerator.num_processes} (distributed type {accelerator.distributed_type.value}); use recipes/accelerate/multi_cpu.yaml or multi_gpu.yaml",
        )
    return accelerator


def place_modules(algo, runtime: Runtime) -> None:
    """Module roles: trained modules to the device, their frozen parameters in the
    frozen dtype; frozen modules to the device in the frozen dtype, eval, no grad."""
    device, dtype = runtime.device, runtime.frozen_dtype
    frozen = hook(algo, "frozen") or {}
    trained_ids = {id(p) for m in algo.modules.values() for p in m.parameters()}
    for name, module in frozen.items():
        if any(id(p) in trained_ids for p in module.parameters()):
            raise ValueError(f"frozen module {name!r} shares parameters with a trained module")
        module.requires_grad_(False).eval().to(device)
        if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
            module.to(dtype)
    for name, module in algo.modules.items():
        module.to(device)
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"trained module {name!r} has no trainable parameters; put it in `frozen`")
        if dtype != torch.float32:
            for p in module.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(dtype)


# Library classes whose public methods are not forward passes of a trained module (a
# diffusers UNet's set_attn_processor, peft's save_pretrained, ...).
_LIBRARY_PACKAGES = frozenset({"torch", "peft", "diffusers", "transformers", "accelerate", "huggingface_hub"})


def forward_methods(module: nn.Module) -> list[str]:
    """Public methods a trained module's own classes define besides ``forward`` (a
    policy's ``act``/``value``, a GPT's ``setup_caches``): under FSDP they gather the
    module's parameters the way ``forward`` does."""
    import inspect

    names = set()
    for cls in type(module).__mro__:
        if cls is nn.Module or cls.__module__.split(".")[0] in _LIBRARY_PACKAGES:
            continue
        names |= {
            name
            for name, value in vars(cls).items()
            if inspect.isfunction(value) and not name.startswith("_") and name != "forward"
        }
    return sorted(names)


def shard_modules(algo, run, accelerator: Accelerator) -> bool:
    """``run.grad_sync: fsdp`` with several processes: shard every trained module with
    torch FSDP2 (``fully_shard``) over all processes, submodules whose class is named in
    ``run.fsdp.wrap`` as units of their own. Parameters, gradients and optimizer state
    are then split across processes; forward passes (and ``forward_methods``) gather
    the parameters, backward reduce-scatters the mean gradient. Device-neutral (tested on
    gloo, CPU). The modules stay the same objects (FSDP2 changes them in place).
    Returns whether anything was sharded."""
    if run.grad_sync != "fsdp" or accelerator.num_processes == 1:
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    wrap = set(run.fsdp.wrap)
    found = set()
    for module in algo.modules.values():
        methods = forward_methods(module)
        for sub in reversed(list(module.modules())[1:]):  # FSDP2 shards bottom-up
            if type(sub).__name__ in wrap:
                found.add(type(sub).__name__)
                fully_shard(sub, mesh=mesh, reshard_after_forward=run.fsdp.reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=run.fsdp.reshard_after_forward)
        for name in methods:
            register_fsdp_forward_method(module, name)
    missing = sorted(wrap - found)
    if missing:
        raise RecipeError("run.fsdp.wrap", f"no trained submodule has class {missing[0]!r}")
    return True


@contextlib.contextmanager
def gathered(modules: Iterable[nn.Module], reshard_after_forward: bool = True):
    """FSDP-sharded modules hold their whole parameters inside the block, and forward
    passes run without collectives: what sampling and sharded evaluation need, where
    processes may make different numbers of forward passes (episodes of different
    lengths, uneven eval shares). Afterwards the wrapped units reshard after forward
    again as ``reshard_after_forward`` says (the roots never do: FSDP2's default). A
    no-op for modules that are not sharded."""
    from torch.distributed.fsdp import FSDPModule

    roots = list(modules)
    units = [(u, any(u is r for r in roots)) for m in roots for u in m.modules() if isinstance(u, FSDPModule)]
    if not units:
        yield
        return
    for unit, _ in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, is_root in units:
            unit.reshard()
            unit.set_reshard_after_forward(False if is_root else reshard_after_forward, recurse=False)


class Engine:
    """Builds the accelerator, the algorithm, optimizer and schedule from a recipe and
    runs the loop. ``algo_builder(recipe, runtime) -> algorithm`` defaults to the
    recipe's registered trainer."""

    def __init__(self, recipe: Recipe, algo_builder: Callable[[Recipe, Runtime], Any] | None = None):
        from rlprox.algos import trainer_spec

        self.recipe = recipe
        run = recipe.run
        torch.set_num_threads(run.torch_threads)
        self.run_dir = recipe.run_dir
        _claim_run_dir(recipe)
        self.accelerator = acc = make_accelerator(run, self.run_dir)
        # Same seed on every rank for module init (identical initial weights); each
        # process samples from its own runtime streams.
        set_seed(recipe.seed)
        self.runtime = make_runtime(acc, recipe.seed, run.frozen_dtype)
        builder = algo_builder or trainer_spec(recipe.algo).build
        with acc.main_process_first():  # zoo builds and model loading: once, by rank 0 first
            self.algo = builder(recipe, self.runtime)
        place_modules(self.algo, self.runtime)
        self.fsdp = shard_modules(self.algo, run, acc)
        acc.gradient_accumulation_steps = run.gradient_accumulation_steps * hook(self.algo, "micro_steps", 1)
        self.names = list(self.algo.modules)
        self.frozen = hook(self.algo, "frozen") or {}
        self.base_optimizer = build_optimizer(optimizer_groups(self.algo, recipe.optim), recipe.optim)
        self.optimizer = self._wrap_regularizers(self.base_optimizer)
        self.runtime.loss_regularizers = [r for r in self.regularizers if r.mode == "loss"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(recipe.optim.schedule, run.iterations, recipe.optim.warmup_iterations)
        )
        self.ddp = run.grad_sync == "ddp" and acc.num_processes > 1
        if self.ddp:
            prepared = acc.prepare(*[self.algo.modules[n] for n in self.names], self.optimizer)
            *wrapped, self.optimizer = prepared
            for name, module in zip(self.names, wrapped):
                self.algo.modules[name] = module
        else:
            self.optimizer = acc.prepare(self.optimizer)
        self.params = [p for n in self.names for p in self.algo.modules[n].parameters() if p.requires_grad]
        self._sync = None
        if not self.ddp and not self.fsdp and acc.num_processes > 1:
            use_shm = run.grad_sync == "shm" or (
                run.grad_sync == "auto" and SharedMemoryAverager.usable(self.params, acc.num_processes)
            )
            if run.grad_sync == "shm" and not SharedMemoryAverager.usable(self.params, acc.num_processes):
                raise RecipeError(
                    "run.grad_sync",
                    "shm needs every process on one x86-64 host with CPU parameters; use auto or allreduce",
                )
            self._sync = (
                SharedMemoryAverager(self.params, acc.num_processes, acc.process_index)
                if use_shm
                else GradientAverager(self.params, acc.num_processes)
            )
        self.state = TrainState()
        self.tracker = tracking.Tracker(acc, self.run_dir, recipe, curve=hook(self.algo, "curve"))

    # ------------------------------------------------------------------ regularizers
    def _wrap_regularizers(self, optimizer):
        """Attach the recipe's ``regularizers:`` (rlprox.prox) to the optimizer."""
        self.regularizers = []
        if not self.recipe.regularizers:
            return optimizer
        from rlprox.prox.attach import attach_regularizers

        named = {
            f"{name}.{pname}": p
            for name, m in self.algo.modules.items()
            for pname, p in m.named_parameters()
            if p.requires_grad
        }
        frozen_names = [
            f"{name}.{pname}"
            for name, m in self.algo.modules.items()
            for pname, p in m.named_parameters()
            if not p.requires_grad
        ]
        frozen_names += [f"{name}.{pname}" for name, m in self.frozen.items() for pname, _ in m.named_parameters()]
        optimizer, self.regularizers = attach_regularizers(
            optimizer, named, self.recipe.regularizers, frozen_names, sharded=self.fsdp
        )
        return optimizer

    # ------------------------------------------------------------------ the loop
    def update(self, batch) -> dict[str, float]:
        """Epochs × minibatches of loss/backward/sync/clip/step; returns this process's
        mean stats (``fit`` reduces them over processes with the iteration stats)."""
        algo, acc = self.algo, self.accelerator
        modules = [algo.modules[n] for n in self.names]
        epochs = hook(algo, "update_epochs", 1)
        minibatches = hook(algo, "minibatches")
        early_stop = hook(algo, "early_stop")
        autocast = acc.autocast if self.recipe.run.mixed_precision != "no" else contextlib.nullcontext
        total = StatSums()
        epoch = 0
        for epoch in range(epochs):
            epoch_stats = StatSums()
            for mb in minibatches(batch, epoch) if minibatches else [batch]:
                with autocast():
                    loss, stats = algo.loss(mb)
                    for reg in self.regularizers:
                        penalty = reg.loss_penalty()
                        if penalty is not None:
                            loss = loss + penalty
                grad_norm = optimizer_step(
                    acc, loss, modules, self.optimizer, self.recipe.optim.max_grad_norm, self.params, self._sync
                )
                if acc.sync_gradients:
                    self.state.optimizer_steps += 1
                stats = dict(stats)
                stats["loss/total"] = loss.detach()
                if grad_norm is not None:
                    stats["loss/grad_norm"] = grad_norm
                epoch_stats.add(stats)
            total.merge(epoch_stats)
            if early_stop is not None:
                means = epoch_stats.local_means(acc.device)
                if early_stop(reduce_stats(means, {}, acc)):
                    break
        out = total.local_means(acc.device)
        out["loss/epochs"] = epoch + 1
        return out

    def gathered(self):
        """Whole parameters for sampling (``gathered``); a no-op unless FSDP shards them."""
        return (
            gathered(self.algo.modules.values(), self.recipe.run.fsdp.reshard_after_forward)
            if self.fsdp
            else contextlib.nullcontext()
        )

    def evaluate(self, total: int, step: int | None = None) -> dict[str, float]:
        with self.gathered():
            stats, _, images, info = run_evaluation(self.algo, self.accelerator, total, self.recipe.seed)
        if images and step is not None:
            self.tracker.log_images(images, step, cols=info.get("grid_cols", 0))
        return stats

    def fit(self) -> dict[str, float]:
        run = self.recipe.run
        algo, acc = self.algo, self.accelerator
        if run.resume != "never":
            path = checkpoint.find_latest(self.run_dir) if run.resume == "auto" else Path(run.resume)
            if path is not None:
                checkpoint.load(self, path)
                self.tracker.truncate(self.state.iteration)
                if acc.is_main_process:
                    moved = checkpoint.set_aside_newer(self.run_dir, self.state.iteration)
                    if moved:
                        self.tracker.message(f"moved {len(moved)} newer checkpoint(s) to {moved[0].parent}")
                self.tracker.message(f"resumed from {path} (iteration {self.state.iteration})")
            else:
                self.tracker.truncate(0)  # a run killed before its first checkpoint
                self.tracker.message("run.resume=auto: no checkpoint found, starting fresh")
        self.tracker.start(total=run.iterations, initial=self.state.iteration)
        iteration_stats = hook(algo, "iteration_stats")
        advantages = hook(algo, "advantages")
        reductions = dict(hook(algo, "stat_reductions") or {})
        can_evaluate = hook(algo, "evaluate") is not None and run.eval_size > 0
        stats: dict[str, float] = {}
        while self.state.iteration < run.iterations:
            it = self.state.iteration + 1
            start = time.perf_counter()
            for reg in self.regularizers:  # λ schedules are per iteration
                reg.set_iteration(it - 1)
            # ---- COLLECT / ADVANTAGE (no grad)
            with torch.no_grad(), self.gathered():
                batch = algo.collect()
                if advantages is not None:
                    batch = advantages(batch)
            collect_time = time.perf_counter() - start
            # ---- UPDATE
            local = self.update(batch)
            self.scheduler.step()
            elapsed = time.perf_counter() - start
            self.state.iteration = it
            self.state.wall_time += elapsed
            # ---- LOG: one reduction over processes for update and iteration stats
            if iteration_stats is not None:
                local.update(iteration_stats(elapsed))
            local["perf/iteration_s"] = elapsed
            local["perf/collect_fraction"] = collect_time / max(elapsed, 1e-9)
            stats = reduce_stats(local, reductions, acc)
            for reg in self.regularizers:
                stats.update(reg.stats())
            stats["optim/lr"] = self.scheduler.get_last_lr()[0]
            stats["progress/iteration"] = it
            last = it == run.iterations
            if can_evaluate and ((run.eval_every and it % run.eval_every == 0) or last):
                stats.update(self.evaluate(run.eval_size, step=it))
            self.tracker.log(stats, step=it)
            # ---- CHECKPOINT
            if (run.save_every and it % run.save_every == 0) or last:
                path = checkpoint.save(self)
                self.tracker.last_checkpoint = path
        self.tracker.finish()
        return stats

    def algo_state(self) -> tuple[dict, dict]:
        """The algorithm's per-process state for a checkpoint: (tensors, JSON)."""
        state_dict = hook(self.algo, "state_dict")
        return state_dict() if state_dict is not None else ({}, {})

    def load_algo_state(self, tensors: dict, state: dict) -> None:
        loader = hook(self.algo, "load_state_dict")
        if loader is not None:
            loader(tensors, state)

    def close(self):
        closer = hook(self.algo, "close")
        if closer is not None:
            closer()
        if self._sync is not None:
            self._sync.close()
        self.accelerator.end_training()


def _claim_run_dir(recipe: Recipe) -> None:
    """A fresh run never mixes with (or prunes) an earlier run's files: starting one in
    a folder that holds checkpoints is an error unless ``run.overwrite`` says to delete
    them. Runs on every rank before any work; only rank 0 deletes."""
    import shutil

    run_dir = recipe.run_dir
    holds_run = (
        bool(checkpoint.list_checkpoints(run_dir))
        or (run_dir / "metrics.jsonl").exists()
        or (run_dir / "logs").exists()
    )
    if recipe.run.resume != "never" or not holds_run:
        return
    if not recipe.run.overwrite:
        raise RecipeError(
            "run.name",
            f"{run_dir} already holds a run; continue it with --resume (run.resume=auto), start another with run.name=NEW, or replace it with run.overwrite=true",
        )
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(checkpoint.checkpoint_dir(run_dir), ignore_errors=True)
        shutil.rmtree(run_dir / "logs", ignore_errors=True)
        shutil.rmtree(run_dir / "samples", ignore_errors=True)
        for name in ("metrics.jsonl", "learning_curve.png"):
            (run_dir / name).unlink(missing_ok=True)


def build_for_eval(path: Path, cpu: bool | None = None):
    """(recipe, accelerator, runtime, algorithm) rebuilt from a checkpoint folder with
    its trained weights and rank-0 algorithm state loaded: what ``rlprox eval`` and
    ``rlprox export`` run on. Works under ``accelerate launch`` (each process builds)."""
    from rlprox.algos import trainer_spec

    recipe = checkpoint.read_recipe(path, ["run.log_with=[]"])
    torch.set_num_threads(recipe.run.torch_threads)
    run = recipe.run
    if cpu is not None:
        run.cpu = cpu
    accelerator = make_accelerator(run)
    set_seed(recipe.seed)
    runtime = make_runtime(accelerator, recipe.seed, run.frozen_dtype, train=False)
    with accelerator.main_process_first():
        algo = trainer_spec(recipe.algo).build(recipe, runtime)
    place_modules(algo, runtime)
    checkpoint.load_for_eval(path, algo.modules, hook(algo, "load_state_dict"))
    return recipe, accelerator, runtime, algo
