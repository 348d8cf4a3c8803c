"""What the engine hands a trainer: the accelerator and per-process sampling streams
(``Runtime``), and the evaluation request/response types (``EvalRequest``,
``EvalShard``). A leaf of the dependency graph, so trainers use these types without
importing the engine (``rlprox.engine`` re-exports them with the contract).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """What the engine hands a trainer's ``build``: the accelerator and per-process
    sampling streams. ``generator`` (torch, on the device) and ``np_rng`` are seeded
    from (recipe seed, rank): processes draw different noise, and both are saved in
    checkpoints, so a resumed run draws what an uninterrupted one would have. Frozen: what
    a trainer needs beyond these comes as an argument of its build."""

    accelerator: Accelerator
    generator: torch.Generator
    np_rng: np.random.Generator
    frozen_dtype: torch.dtype = torch.float32
    train: bool = True  # False when built for `rlprox eval` / export (no training envs, no data)
    scoring: bool = True  # False when built for `rlprox export`: nothing is scored, reward models are not built

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    def autocast(self):
        """The recipe's mixed precision for forward passes (also in collect)."""
        return self.accelerator.autocast()

    def main_process_first(self):
        """Rank 0 runs the block first (e.g. builds a zoo model), the others wait."""
        return self.accelerator.main_process_first()


def process_seed(seed: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed for (recipe seed, rank, stream)."""
    return int(np.random.SeedSequence([seed, rank, stream]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def make_runtime(
    accelerator: Accelerator, seed: int, frozen_dtype: str = "float32", train: bool = True, scoring: bool = True
) -> Runtime:
    rank = accelerator.process_index
    generator = torch.Generator(device=accelerator.device).manual_seed(process_seed(seed, rank))
    # [seed, rank]: the stream PPO has always used for its actions and minibatches
    return Runtime(accelerator, generator, np.random.default_rng([seed, rank]), DTYPES[frozen_dtype], train, scoring)


@dataclass
class EvalRequest:
    """One process's share of an evaluation. Items (episodes, samples, examples) are
    numbered 0..total-1 over all processes; this process evaluates
    ``range(start, start + num)``."""

    total: int
    num: int
    start: int
    seed: int
    rank: int = 0
    world: int = 1
    deterministic: bool | None = None  # None: the trainer's default
    prompts: list[str] | None = None  # generative trainers: evaluate on these prompts
    guidance_scale: float | None = None  # generative trainers: classifier-free guidance scale; None: the recipe's


@dataclass
class EvalShard:
    """What ``evaluate`` returns for its share. ``values``: per-item lists (scalars are
    averaged into ``eval/<key>`` and ``eval/<key>_std``; other items, such as feature
    vectors, go to ``summarize_eval`` only). ``images``: (N, 3, H, W) in [0, 1] per
    name, logged as grids with ``grid_cols`` columns (shards are concatenated in rank
    order, so rows stay whole). ``info``: JSON-able facts written to eval.json (taken
    from the main process)."""

    values: dict[str, list] = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    grid_cols: int = 0  # 0: near-square grid
    info: dict = field(default_factory=dict)


def shard(total: int, rank: int, world: int) -> tuple[int, int]:
    """(start, num) of process ``rank``'s contiguous share of ``total`` items."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, base + (rank < extra)
