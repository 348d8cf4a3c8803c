"""The one on-policy training loop, on ``accelerate``.

    for it in iterations:
        batch = algo.collect()                    # no grad; old log-probs stored
        batch = algo.advantages(batch)            # GAE / leave-one-out / group norm
        for epoch, minibatch in algo.minibatches(batch):
            loss, stats = algo.loss(minibatch) (+ regularizer penalties)
            optimizer_step(...)                   # backward, clip, step, prox
        track(stats); maybe evaluate; maybe checkpoint

An *algorithm* is any object with

    modules: dict[str, nn.Module]        trained modules; the engine replaces each entry
                                         with its ``accelerator.prepare``-d version
    collect() -> batch                   experience for one iteration (any type)
    loss(minibatch) -> (loss, stats)     stats: dict[str, float | Tensor]

and optionally

    update_epochs: int                   passes over the batch (default 1)
    advantages(batch) -> batch           default: identity
    minibatches(batch, epoch) -> iter    default: the whole batch once
    early_stop(epoch_stats) -> bool      stop the epochs early (e.g. PPO's target KL)
    evaluate(episodes) -> dict           evaluation stats ("eval/..." keys)
    iteration_stats() -> dict            stats of the last collect (returns, env steps...)
    state_dict() / load_state_dict()     non-module state: (tensors, json) per process
    curve: (x_key, y_key)                what the learning-curve PNG plots
    close()

The engine knows nothing about gymnasium, images or tokens; tests/test_engine.py
drives it with a multi-armed bandit defined in the test file.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from rlprox.recipe import Recipe


def build_optimizer(params, optim) -> torch.optim.Optimizer:
    """The base torch optimizer named by an ``OptimConfig``."""
    params = list(params)
    if optim.name == "adam":
        kwargs = {"fused": True} if _fused_ok(params) else {}
        return torch.optim.Adam(params, lr=optim.lr, eps=optim.eps, betas=tuple(optim.betas), weight_decay=optim.weight_decay, **kwargs)
    if optim.name == "adamw":
        kwargs = {"fused": True} if _fused_ok(params) else {}
        return torch.optim.AdamW(params, lr=optim.lr, eps=optim.eps, betas=tuple(optim.betas), weight_decay=optim.weight_decay, **kwargs)
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def _fused_ok(params) -> bool:
    # Fused Adam is the fastest CPU/GPU path for float32 params (notes/ppo-cpu-throughput.md).
    return all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


def lr_lambda(schedule: str, iterations: int) -> Callable[[int], float]:
    """Multiplier of the base lr at iteration ``it`` (0-based, stepped once per iteration).

    "linear" is PPO's annealing: lr_it = lr · (1 − it / iterations).
    """
    if schedule == "linear":
        return lambda it: max(0.0, 1.0 - it / iterations)
    if schedule == "cosine":
        return lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, iterations) / iterations))
    return lambda it: 1.0


def optimizer_step(accelerator: Accelerator, loss: torch.Tensor, modules, optimizer, max_grad_norm: float, params: list | None = None) -> float | None:
    """The one place that does backward + grad clipping + optimizer step.

    Runs under ``accelerator.accumulate``: with N accumulation steps, N calls make one
    optimizer step on the mean gradient (accelerate divides the loss by N), and the
    prox (ProxOptimizer) runs only on that real step. Returns the pre-clip grad norm on
    real steps, else None. ``params`` (all trainable parameters of ``modules``) may be
    passed in to save walking the module tree on every step.
    """
    if params is None:
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
    grad_norm = None
    if _direct_step_ok(accelerator):
        # No accumulation, no loss scaling, DDP or single process: accelerate's
        # wrappers reduce to exactly these calls, minus ~2 ms of bookkeeping per step
        # that dominates small-policy updates on CPU.
        loss.backward()
        if max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm, foreach=True)
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.step()
        inner.zero_grad(set_to_none=True)
        return grad_norm
    with accelerator.accumulate(*modules):
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            params = [p for p in params if p.grad is not None]
            if _plain_clip_ok(accelerator):
                # same result as accelerator.clip_grad_norm_ here, without its
                # per-call sharding checks (~1 ms per step on small policies)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
            else:  # FSDP / DeepSpeed / fp16 loss scaling need accelerate's version
                grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _direct_step_ok(accelerator: Accelerator) -> bool:
    return accelerator.gradient_accumulation_steps == 1 and _plain_clip_ok(accelerator)


def _plain_clip_ok(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    return accelerator.distributed_type in plain and getattr(accelerator, "scaler", None) is None


class StatSums:
    """Per-minibatch stats, kept as lists of device tensors (no host sync and no
    arithmetic per minibatch); ``means`` averages each key over its own count (a key
    such as the grad norm may appear only on real optimizer steps) and over processes,
    with one device-to-host copy."""

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

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        if not self.values:
            return {}
        keys = sorted(self.values)
        device = accelerator.device
        vec = torch.stack([torch.stack([torch.as_tensor(x, device=device).float().reshape(()) for x in self.values[k]]).mean() for k in keys])
        if accelerator.num_processes > 1:
            vec = accelerator.reduce(vec, reduction="mean")
        return dict(zip(keys, vec.tolist()))


@dataclass
class TrainState:
    """Counters saved with every checkpoint."""

    iteration: int = 0  # completed iterations
    optimizer_steps: int = 0
    wall_time: float = 0.0
    extra: dict = field(default_factory=dict)


class Engine:
    """Builds the accelerator, the algorithm, optimizer and schedule from a recipe and
    runs the loop. ``algo_builder(recipe, accelerator) -> algorithm`` defaults to the
    recipe's registered trainer."""

    def __init__(self, recipe: Recipe, algo_builder: Callable[[Recipe, Accelerator], Any] | None = None):
        from rlprox import tracking

        self.recipe = recipe
        run = recipe.run
        torch.set_num_threads(run.torch_threads)
        self.run_dir = recipe.run_dir
        _claim_run_dir(recipe)
        self.accelerator = Accelerator(
            mixed_precision=run.mixed_precision,
            gradient_accumulation_steps=run.gradient_accumulation_steps,
            # without a GPU, cpu=True is what makes accelerate pick up a torchrun/MPI
            # world (MULTI_CPU, gloo); otherwise every process would train alone
            cpu=run.cpu or not torch.cuda.is_available(),
            log_with=list(run.log_with) or None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        # Same seed on every rank for module init (DDP also broadcasts rank 0's
        # weights); each algorithm derives per-rank seeds for its own sampling.
        set_seed(recipe.seed)
        if algo_builder is None:
            import importlib

            from rlprox.recipe import ALGORITHMS

            algo_builder = importlib.import_module(ALGORITHMS[recipe.algo][0]).build
        self.algo = algo_builder(recipe, self.accelerator)
        names = list(self.algo.modules)
        modules = [self.algo.modules[n] for n in names]
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.base_optimizer = build_optimizer(params, recipe.optim)
        self.optimizer = self._wrap_regularizers(self.base_optimizer, modules)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(recipe.optim.schedule, run.iterations))
        prepared = self.accelerator.prepare(*modules, self.optimizer)
        if not isinstance(prepared, (list, tuple)):
            prepared = [prepared]
        *prepared_modules, self.optimizer = prepared
        for name, module in zip(names, prepared_modules):
            self.algo.modules[name] = module
        self.state = TrainState()
        self.tracker = tracking.Tracker(self.accelerator, self.run_dir, recipe, curve=getattr(self.algo, "curve", None))

    # ------------------------------------------------------------------ regularizers
    def _wrap_regularizers(self, optimizer, modules):
        """Attach the recipe's ``regularizers:`` (rlprox.prox) to the optimizer."""
        if not self.recipe.regularizers:
            self.regularizers = []
            return optimizer
        from rlprox.prox.attach import attach_regularizers

        from accelerate.utils import DistributedType

        from rlprox.recipe import RecipeError

        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise RecipeError("regularizers", f"not supported with {self.accelerator.distributed_type.value} yet (the prox needs whole, unsharded parameters); use DDP")
        named = {f"{name}.{pname}": p for name, m in self.algo.modules.items() for pname, p in m.named_parameters()}
        optimizer, self.regularizers = attach_regularizers(optimizer, named, self.recipe.regularizers)
        return optimizer

    # ------------------------------------------------------------------ the loop
    def update(self, batch) -> dict[str, float]:
        """Epochs × minibatches of loss/backward/clip/step; returns mean stats, averaged
        over minibatches and over processes (so every rank decides early stops alike)."""
        algo, acc = self.algo, self.accelerator
        modules = list(algo.modules.values())
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        epochs = getattr(algo, "update_epochs", 1)
        minibatches = getattr(algo, "minibatches", None)
        early_stop = getattr(algo, "early_stop", None)
        total = StatSums()
        for epoch in range(epochs):
            epoch_stats = StatSums()
            for mb in minibatches(batch, epoch) if minibatches else [batch]:
                with acc.autocast() if self.recipe.run.mixed_precision != "no" else contextlib.nullcontext():
                    loss, stats = algo.loss(mb)
                    for reg in self.regularizers:
                        penalty = reg.loss_penalty()
                        if penalty is not None:
                            loss = loss + penalty
                grad_norm = optimizer_step(acc, loss, modules, self.optimizer, self.recipe.optim.max_grad_norm, params)
                if acc.sync_gradients:
                    self.state.optimizer_steps += 1
                stats = dict(stats)
                stats["loss/total"] = loss.detach()
                if grad_norm is not None:
                    stats["loss/grad_norm"] = grad_norm
                epoch_stats.add(stats)
            total.merge(epoch_stats)
            if early_stop is not None and early_stop(epoch_stats.means(acc)):
                break
        out = total.means(acc)
        out["loss/epochs"] = epoch + 1
        return out

    def fit(self) -> dict[str, float]:
        from rlprox import checkpoint

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
        stats: dict[str, float] = {}
        while self.state.iteration < run.iterations:
            it = self.state.iteration + 1
            start = time.perf_counter()
            for reg in self.regularizers:  # λ schedules are per iteration
                reg.set_iteration(it - 1)
            # ---- COLLECT / ADVANTAGE (no grad)
            with torch.no_grad():
                batch = algo.collect()
                if hasattr(algo, "advantages"):
                    batch = algo.advantages(batch)
            collect_time = time.perf_counter() - start
            # ---- UPDATE
            stats = self.update(batch)
            self.scheduler.step()
            elapsed = time.perf_counter() - start
            self.state.iteration = it
            self.state.wall_time += elapsed
            # ---- LOG
            if hasattr(algo, "iteration_stats"):
                stats.update(algo.iteration_stats(elapsed))
            for reg in self.regularizers:
                stats.update(reg.stats())
            stats["perf/iteration_s"] = elapsed
            stats["perf/collect_fraction"] = collect_time / max(elapsed, 1e-9)
            stats["optim/lr"] = self.scheduler.get_last_lr()[0]
            stats["progress/iteration"] = it
            last = it == run.iterations
            if run.eval_episodes and hasattr(algo, "evaluate") and ((run.eval_every and it % run.eval_every == 0) or last):
                stats.update(algo.evaluate(run.eval_episodes))
            self.tracker.log(stats, step=it)
            # ---- CHECKPOINT
            if (run.save_every and it % run.save_every == 0) or last:
                path = checkpoint.save(self)
                self.tracker.last_checkpoint = path
        self.tracker.finish()
        return stats

    def close(self):
        if hasattr(self.algo, "close"):
            self.algo.close()
        self.accelerator.end_training()


def _claim_run_dir(recipe: Recipe) -> None:
    """A fresh run never mixes with (or prunes) an earlier run's files: starting one in
    a folder that holds checkpoints is an error unless ``run.overwrite`` says to delete
    them. Runs on every rank before any work; only rank 0 deletes."""
    import os
    import shutil

    from rlprox.checkpoint import checkpoint_dir, list_checkpoints
    from rlprox.recipe import RecipeError

    run_dir = recipe.run_dir
    holds_run = bool(list_checkpoints(run_dir)) or (run_dir / "metrics.jsonl").exists() or (run_dir / "logs").exists()
    if recipe.run.resume != "never" or not holds_run:
        return
    if not recipe.run.overwrite:
        raise RecipeError("run.name", f"{run_dir} already holds a run; continue it with --resume (run.resume=auto), start another with run.name=NEW, or replace it with run.overwrite=true")
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
        shutil.rmtree(run_dir / "logs", ignore_errors=True)
        for name in ("metrics.jsonl", "learning_curve.png"):
            (run_dir / name).unlink(missing_ok=True)


def _item(v) -> float:
    return float(v.item()) if torch.is_tensor(v) else float(v)


def rng_state() -> dict:
    """Process-global RNG states (python, numpy legacy, torch CPU/CUDA) as JSON + tensors."""
    np_state = np.random.get_state()
    state = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return {"json": state, "tensors": tensors}


def set_rng_state(json_state: dict, tensors: dict) -> None:
    random.setstate(_from_json(json_state["python"]))
    kind, keys, *rest = json_state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _to_json(obj):
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(x) for x in obj]}
    return obj


def _from_json(obj):
    if isinstance(obj, dict) and "__tuple__" in obj:
        return tuple(_from_json(x) for x in obj["__tuple__"])
    return obj
