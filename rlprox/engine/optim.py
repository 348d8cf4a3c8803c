"""The optimizer side of an update: the base torch optimizer a recipe names, the
parameter groups (weight decay split off biases, norms and embeddings), the lr
schedule's multiplier, and ``optimizer_step``, the one place that runs backward,
gradient sync, clipping and the optimizer step (with the prox) for every trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from rlprox.engine.contract import hook
from rlprox.prox.regularizers import full_tensor

if TYPE_CHECKING:
    from rlprox.engine.grad_sync import GradientAverager


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
        # these calls, minus per-step bookkeeping that dominates small-policy updates
        # on CPU.
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


@torch.no_grad()
def update_norm(params: list, previous: list) -> torch.Tensor:
    """The step just taken, ‖θ − θ_prev‖₂ over all of ``params`` (in float32); then θ_prev ← θ in place."""
    total = torch.zeros((), device=params[0].device if params else None)
    for p, q in zip(params, previous):
        total += (p.detach().float() - q.float()).pow(2).sum()
        q.copy_(p.detach())
    return total.sqrt()


def _plain_clip_ok(accelerator: Accelerator) -> bool:
    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    return accelerator.distributed_type in plain and getattr(accelerator, "scaler", None) is None


def attach_recipe_regularizers(optimizer, algo, specs: list[dict], sharded: bool = False):
    """The recipe's ``regularizers:`` (rlprox.prox) attached to ``optimizer`` over the
    algorithm's trainable parameters, named "<module>.<param>": (optimizer, wrapped in a
    ProxOptimizer when there are any, [AttachedRegularizer])."""
    if not specs:
        return optimizer, []
    from rlprox.prox.attach import attach_regularizers

    named, frozen_names = {}, []
    for name, module in algo.modules.items():
        for pname, p in module.named_parameters():
            if p.requires_grad:
                named[f"{name}.{pname}"] = p
            else:
                frozen_names.append(f"{name}.{pname}")
    frozen = hook(algo, "frozen") or {}
    frozen_names += [f"{name}.{pname}" for name, m in frozen.items() for pname, _ in m.named_parameters()]
    return attach_regularizers(optimizer, named, specs, frozen_names, sharded=sharded)
