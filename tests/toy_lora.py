"""A test trainer with every module role: a frozen encoder and a peft LoRA adapter on a
tiny trained MLP. Registered through the registry as ``toy_lora`` and reachable from a
recipe as ``algo: tests.toy_lora:SPEC`` (so subprocesses and `rlprox eval` find it).

collect: x ~ N(0, I) from the engine's per-rank generator; the policy maps enc(x) to a
target (a fixed permutation of x); the loss is the mean squared error. Each process
appends its local stats to ``<run_dir>/toy-rank<r>.jsonl`` so tests can compare the
logged (reduced) stats with the per-rank ones.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from rlprox.algos import TrainerSpec, register_trainer
from rlprox.prox.regularizers import full_tensor
from rlprox.runtime import EvalShard


@dataclass
class ToyConfig:
    dim: int = 6  # input/output width
    batch: int = 8  # samples per process per iteration
    lora_rank: int = 2
    minibatches: int = 2


class ToyLoRA:
    curve = ("progress/iteration", "reward/mean")
    stat_reductions = {"toy/samples": "sum"}

    def __init__(self, recipe, runtime, loss_terms=None):
        from peft import LoraConfig, get_peft_model

        cfg = self.cfg = recipe.toy
        self.recipe, self.runtime = recipe, runtime
        self.encoder = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.Tanh())
        base = nn.Sequential(OrderedDict(inp=nn.Linear(cfg.dim, 16), act=nn.Tanh(), out=nn.Linear(16, cfg.dim)))
        self.policy = get_peft_model(
            base,
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=2 * cfg.lora_rank,
                target_modules=["inp", "out"],
                init_lora_weights="gaussian",
            ),
        )
        self.modules = {"policy": self.policy}
        self.frozen = {"encoder": self.encoder}
        self.perm = torch.arange(cfg.dim).flip(0)

    def _encode(self, x):
        return self.encoder(x.to(self.runtime.frozen_dtype)).float()

    def collect(self):
        x = torch.randn(self.cfg.batch, self.cfg.dim, generator=self.runtime.generator, device=self.runtime.device)
        with self.runtime.autocast():
            err = (self.modules["policy"](self._encode(x)).float() - x[:, self.perm]).pow(2).mean(1)
        self._local = {
            "reward/mean": float(-err.mean()),
            "toy/first_noise": float(x[0, 0]),
            "toy/samples": self.cfg.batch,
        }
        return x

    def minibatches(self, x, epoch):
        return x.chunk(self.cfg.minibatches)

    def loss(self, x):
        pred = self.modules["policy"](self._encode(x)).float()
        loss = (pred - x[:, self.perm]).pow(2).mean()
        return loss, {"loss/mse": loss.detach()}

    def iteration_stats(self, batch, elapsed):
        if self.runtime.train:
            run_dir, rank = self.recipe.run_dir, self.runtime.rank
            with open(run_dir / f"toy-rank{rank}.jsonl", "a") as f:
                f.write(json.dumps(self._local) + "\n")
            trained = {
                n: full_tensor(p.detach()).flatten().tolist()
                for n, p in self.runtime.unwrap(self.policy).named_parameters()
                if p.requires_grad
            }
            (run_dir / f"params-rank{rank}.json").write_text(json.dumps(trained))
        return dict(self._local)

    @torch.no_grad()
    def evaluate(self, request):
        gen = torch.Generator().manual_seed(request.seed * 1000 + request.start)
        x = torch.randn(request.num, self.cfg.dim, generator=gen)
        pred = self.modules["policy"](self._encode(x)).float()
        err = (pred - x[:, self.perm]).pow(2).mean(1)
        images = torch.sigmoid(pred[:, :3, None, None]).expand(-1, 3, 4, 4)  # (N, 3, 4, 4) in [0, 1]
        return EvalShard(values={"reward": (-err).tolist()}, images={"samples": images})

    def export(self, out_dir):
        self.runtime.unwrap(self.modules["policy"]).save_pretrained(str(out_dir))
        return [out_dir]


SPEC = register_trainer(
    TrainerSpec(
        name="toy_lora",
        build=ToyLoRA,
        sections={"toy": ToyConfig},
        eval_unit="samples",
        description="test trainer: frozen encoder + LoRA",
    )
)


def toy_recipe(tmp_path, **run) -> dict:
    return {
        "algo": "tests.toy_lora:SPEC",
        "seed": 5,
        "run": {
            "name": "toy",
            "output_dir": str(tmp_path),
            "iterations": 4,
            "log_with": [],
            "progress": False,
            "plot": False,
            **run,
        },
        "optim": {"name": "adam", "lr": 1e-2, "max_grad_norm": 1.0},
        "toy": {},
    }
