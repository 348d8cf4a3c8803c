"""The algorithm contract: what a trainer's algorithm object must provide
(``Algorithm``), every optional hook the engine, the checkpoint, the tracker or the CLI
may call (``AlgorithmHooks``), and ``hook(algo, name)``, the only way they read a hook:
it refuses names not declared here. docs/algorithm-contract.md says the same in prose.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from rlprox.runtime import EvalRequest, EvalShard


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
        namespaces loss/, policy/, value/, penalty/ (``loss_terms``' values); averaged over
        minibatches and processes by the engine."""


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

    def after_update(self) -> None:
        """Once per iteration after the update's last optimizer step, under
        ``torch.no_grad`` (e.g. an EMA of the trained weights)."""

    def early_stop(self, epoch_stats: dict[str, float]) -> bool:
        """Stop the epochs after this one (e.g. PPO's target KL). ``epoch_stats`` are
        the epoch's update stats averaged over processes, so every rank agrees. Set
        the attribute to None when it can never fire (saves one all-reduce per epoch)."""

    def iteration_stats(self, batch: Any, elapsed: float) -> dict[str, float]:
        """This process's stats of the iteration's ``batch`` (what ``advantages`` returned:
        returns, rewards, env steps); every process must return the same keys (NaN where it
        has no value)."""

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
