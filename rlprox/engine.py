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
    passes, and ``runtime.unwrap(module)`` to reach the module itself."""

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


def run_evaluation(algo, accelerator: Accelerator, total: int, seed: int, deterministic: bool | None = None, prompts: list[str] | None = None):
    """Sharded evaluation: every process evaluates its share, shards are gathered;
    returns (stats with "eval/" keys, per-item values, images, info) on every rank."""
    evaluate = hook(algo, "evaluate")
    rank, world = accelerator.process_index, accelerator.num_processes
    start, num = shard(total, rank, world)
    request = EvalRequest(total=total, num=num, start=start, seed=seed, rank=rank, world=world, deterministic=deterministic, prompts=prompts)
    result = evaluate(request) if num > 0 else EvalShard()
    shards = [result]
    if world > 1:
        from accelerate.utils import gather_object

        payload = {"values": result.values, "images": {k: v.detach().cpu() for k, v in result.images.items()}, "info": result.info, "grid_rows": result.grid_rows}
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
        if v and all(isinstance(x, (int, float, bool, np.number)) for x in v):
            arr = np.asarray(v, np.float64)
            stats[f"eval/{k}"] = float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
            stats[f"eval/{k}_std"] = float(np.nanstd(arr)) if np.isfinite(arr).any() else float("nan")
    stats["eval/count"] = max((len(v) for v in values.values()), default=0)
    summarize = hook(algo, "summarize_eval")
    if summarize is not None:
        stats.update({f"eval/{k}": v for k, v in summarize(values).items()})
    grid_rows = next((s.grid_rows for s in shards if s.grid_rows), 0)
    return stats, values, {k: torch.cat(v) for k, v in images.items()}, {"grid_rows": grid_rows, **shards[0].info}


# ============================================================================ optimizer


def build_optimizer(groups, optim) -> torch.optim.Optimizer:
    """The base torch optimizer named by an ``OptimConfig`` over ``groups`` (a list of
    parameters or of param-group dicts)."""
    groups = list(groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = {"fused": True} if params and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params) else {}
    if optim.name == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, eps=optim.eps, betas=tuple(optim.betas), weight_decay=optim.weight_decay, **fused)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, eps=optim.eps, betas=tuple(optim.betas), weight_decay=optim.weight_decay, **fused)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def _no_decay_ids(modules: Iterable[nn.Module]) -> set[int]:
    """Biases, norm weights and embeddings: parameters weight decay should not shrink."""
    out = set()
    for module in modules:
        for sub in module.modules():
            kind = type(sub).__name__
            for name, p in sub.named_parameters(recurse=False):
                if p.ndim < 2 or name.endswith("bias") or isinstance(sub, nn.Embedding) or "Norm" in kind or "Embedding" in kind:
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
        raise ValueError(f"param_groups(): the groups must hold exactly the trainable parameters ({len(missing)} missing)")
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


def all_reduce_gradients(params: list[torch.nn.Parameter], world: int, bucket_numel: int = 1 << 26) -> None:
    """Average the gradients of ``params`` over processes: one flat all-reduce per
    bucket (one in all for small models). A parameter without a gradient on this
    process contributes zeros, so ranks never disagree on the buffer layout."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[tuple, list] = {}
    for p in params:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        bucket, size = [], 0
        for p in [*group, None]:
            if p is not None and (size + p.numel() <= bucket_numel or not bucket):
                bucket.append(p)
                size += p.numel()
                continue
            grads = [q.grad for q in bucket]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(world)
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
            if p is not None:
                bucket, size = [p], p.numel()


def optimizer_step(accelerator: Accelerator, loss: torch.Tensor, modules, optimizer, max_grad_norm: float, params: list | None = None, sync: Callable[[list], None] | None = None) -> torch.Tensor | None:
    """The one place that does backward + gradient sync + grad clipping + optimizer step.

    Runs under ``accelerator.accumulate``: with N accumulation steps, N calls make one
    optimizer step on the mean gradient (accelerate divides the loss by N), and the
    prox (ProxOptimizer) runs only on that real step. ``sync(params)`` averages the
    gradients over processes on real steps (``all_reduce_gradients``; None under DDP,
    which syncs in backward). Returns the pre-clip grad norm on real steps, else None.
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
            sync(params)
        if max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm, foreach=True)
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.step()
        inner.zero_grad(set_to_none=True)
        return grad_norm
    with accelerator.accumulate(*modules):
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if sync is not None:
                sync(params)
            if max_grad_norm > 0:
                with_grad = [p for p in params if p.grad is not None]
                if _plain_clip_ok(accelerator):
                    grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm, foreach=True)
                else:  # fp16 loss scaling needs accelerate's version (unscales first)
                    grad_norm = accelerator.clip_grad_norm_(with_grad, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
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
        vec = torch.stack([torch.stack([torch.as_tensor(x, device=device).float().reshape(()) for x in self.values[k]]).mean() for k in keys])
        return dict(zip(keys, vec.tolist()))


def reduce_stats(stats: dict[str, float], reductions: dict[str, str], accelerator: Accelerator) -> dict[str, float]:
    """Combine every process's ``stats`` (same keys on every rank) into global values,
    with one all-reduce (two when a key asks for max/min). Rules per key:
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
    # every rank must report the same keys: a checksum of the key set rides along
    checksum = float(zlib.crc32("\n".join(keys).encode()))
    sums_t = torch.tensor(sums + [checksum], dtype=torch.float64)
    ext_t = torch.tensor(ext + [checksum, -checksum], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        device = accelerator.device
        sums_t = accelerator.reduce(sums_t.to(device), reduction="sum").cpu()
        ext_t = ext_t.to(device)
        dist.all_reduce(ext_t, op=dist.ReduceOp.MAX)
        ext_t = ext_t.cpu()
        if ext_t[-2] != -ext_t[-1]:
            raise RuntimeError("iteration stats differ in their keys across processes; every process must return the same keys (NaN where it has no value)")
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
    requested = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and "FSDP" or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and "DeepSpeed" or None
    if requested:
        raise RecipeError("run", f"{requested} is not supported by the rlprox engine yet; use DDP (recipes/accelerate/multi_gpu.yaml) — LoRA adapters and the digits-world models fit on every GPU")
    # A process may build several engines (tests, notebooks, benchmarks) with different
    # precision settings: start from a clean accelerator state each time, keeping the
    # distributed one (PartialState).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    kwargs = {}
    if run.grad_sync == "ddp":
        ddp = run.ddp
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=ddp.find_unused_parameters, bucket_cap_mb=ddp.bucket_cap_mb, static_graph=ddp.static_graph, gradient_as_bucket_view=ddp.gradient_as_bucket_view)]
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        # without a GPU, cpu=True is what makes accelerate pick up a torchrun world
        # (MULTI_CPU, gloo); otherwise every process would train alone
        cpu=use_cpu,
        log_with=list(run.log_with) or None,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "logs")) if project_dir else None,
        **kwargs,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RecipeError("run", f"{launched} processes were launched but accelerate joined {accelerator.num_processes} (distributed type {accelerator.distributed_type.value}); use recipes/accelerate/multi_cpu.yaml or multi_gpu.yaml")
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
        module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    for name, module in algo.modules.items():
        module.to(device)
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"trained module {name!r} has no trainable parameters; put it in `frozen`")
        if dtype != torch.float32:
            for p in module.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(dtype)


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
        self.names = list(self.algo.modules)
        self.frozen = hook(self.algo, "frozen") or {}
        self.base_optimizer = build_optimizer(optimizer_groups(self.algo, recipe.optim), recipe.optim)
        self.optimizer = self._wrap_regularizers(self.base_optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(recipe.optim.schedule, run.iterations, recipe.optim.warmup_iterations))
        self.ddp = run.grad_sync == "ddp" and acc.num_processes > 1
        if self.ddp:
            prepared = acc.prepare(*[self.algo.modules[n] for n in self.names], self.optimizer)
            *wrapped, self.optimizer = prepared
            for name, module in zip(self.names, wrapped):
                self.algo.modules[name] = module
        else:
            self.optimizer = acc.prepare(self.optimizer)
        self.params = [p for n in self.names for p in self.algo.modules[n].parameters() if p.requires_grad]
        self._sync = None if (self.ddp or acc.num_processes == 1) else (lambda params: all_reduce_gradients(params, acc.num_processes))
        self.state = TrainState()
        self.tracker = tracking.Tracker(acc, self.run_dir, recipe, curve=hook(self.algo, "curve"))

    # ------------------------------------------------------------------ regularizers
    def _wrap_regularizers(self, optimizer):
        """Attach the recipe's ``regularizers:`` (rlprox.prox) to the optimizer."""
        self.regularizers = []
        if not self.recipe.regularizers:
            return optimizer
        from rlprox.prox.attach import attach_regularizers

        named = {f"{name}.{pname}": p for name, m in self.algo.modules.items() for pname, p in m.named_parameters() if p.requires_grad}
        frozen_names = [f"{name}.{pname}" for name, m in self.algo.modules.items() for pname, p in m.named_parameters() if not p.requires_grad]
        frozen_names += [f"{name}.{pname}" for name, m in self.frozen.items() for pname, _ in m.named_parameters()]
        optimizer, self.regularizers = attach_regularizers(optimizer, named, self.recipe.regularizers, frozen_names)
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
                grad_norm = optimizer_step(acc, loss, modules, self.optimizer, self.recipe.optim.max_grad_norm, self.params, self._sync)
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

    def evaluate(self, total: int, step: int | None = None) -> dict[str, float]:
        stats, _, images, info = run_evaluation(self.algo, self.accelerator, total, self.recipe.seed)
        if images and step is not None:
            self.tracker.log_images(images, step, rows=info.get("grid_rows", 0))
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
            with torch.no_grad():
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
            stats = reduce_stats(local, {"perf/iteration_s": "max", **reductions}, acc)
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
        self.accelerator.end_training()


def _claim_run_dir(recipe: Recipe) -> None:
    """A fresh run never mixes with (or prunes) an earlier run's files: starting one in
    a folder that holds checkpoints is an error unless ``run.overwrite`` says to delete
    them. Runs on every rank before any work; only rank 0 deletes."""
    import shutil

    run_dir = recipe.run_dir
    holds_run = bool(checkpoint.list_checkpoints(run_dir)) or (run_dir / "metrics.jsonl").exists() or (run_dir / "logs").exists()
    if recipe.run.resume != "never" or not holds_run:
        return
    if not recipe.run.overwrite:
        raise RecipeError("run.name", f"{run_dir} already holds a run; continue it with --resume (run.resume=auto), start another with run.name=NEW, or replace it with run.overwrite=true")
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
