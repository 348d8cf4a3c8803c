"""Supervised structured-sparse MLP on scikit-learn's digits (``algo: sparse``).

The smallest end-to-end use of the sparse-learning core: an MLP classifier trained by
minibatch cross-entropy, with the recipe's ``regularizers:`` (typically WGSEF over the
rows of ``net.hidden.*.weight``, one group = one hidden neuron) applied by the engine as
a proximal step after every optimizer step:

    W ← prox_{η·λ·WGSEF_k}(W − η·∇CE(W))          (rlprox.prox, never in this file)

Neurons whose incoming row ends exactly zero are then removed by ``compact`` (folding
their constant output σ(b_i) into the next layer's bias), which gives a smaller network
computing the same function; ``model_stats`` measures what that buys.

Data: ``sklearn.datasets.load_digits`` (1,797 8×8 images, 64 features, 10 classes).
Example i is held out iff ``i % holdout_every == 0`` (default 5: 360 held out, 1,437
train); features are standardised with the train split's mean and std.

One engine iteration = ``update_epochs`` passes over the training split; each
pass draws a fresh permutation from the algorithm's own generator (saved in
checkpoints, so a resumed run draws the same minibatches as an uninterrupted one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from rlprox.algos import TrainerSpec, register_trainer
from rlprox.errors import RecipeError
from rlprox.models.sparse_mlp import SparseMLP, compact, latency, num_params, zero_neurons

if TYPE_CHECKING:
    from rlprox.recipe import Recipe
    from rlprox.runtime import EvalRequest, EvalShard, Runtime

NUM_FEATURES, NUM_CLASSES, NUM_EXAMPLES = 64, 10, 1797


@dataclass
class SparseConfig:
    """The classifier and its minibatch schedule."""

    RENAMED: ClassVar[dict[str, str]] = {"epochs_per_iteration": "update_epochs"}

    hidden_sizes: list[int] = field(
        default_factory=lambda: [256, 256]
    )  # hidden widths; every hidden neuron is a prunable group
    activation: Literal["relu", "tanh"] = "relu"  # hidden nonlinearity σ
    batch_size: int = 64  # examples per minibatch, all processes together (each process takes every world-th one)
    update_epochs: int = 1  # passes over the training split per engine iteration (PPO's name for epochs)
    label_smoothing: float = 0.0  # cross-entropy label smoothing ε in [0, 1)
    holdout_every: int = 5  # example i is held out iff i % holdout_every == 0 (5: 20 %)
    standardize: bool = True  # z-score the 64 pixel features with the train split's statistics


def train_size(cfg: SparseConfig) -> int:
    return NUM_EXAMPLES - len(range(0, NUM_EXAMPLES, cfg.holdout_every))


def validate(recipe: "Recipe") -> None:
    cfg = recipe.sparse
    if not cfg.hidden_sizes or any(h <= 0 for h in cfg.hidden_sizes):
        raise RecipeError(
            "sparse.hidden_sizes", f"must be a non-empty list of positive widths (got {cfg.hidden_sizes})"
        )
    if cfg.holdout_every < 2:
        raise RecipeError(
            "sparse.holdout_every", f"must be >= 2 so that both splits are non-empty (got {cfg.holdout_every})"
        )
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise RecipeError("sparse.label_smoothing", f"must be in [0, 1) (got {cfg.label_smoothing})")
    n = train_size(cfg)
    if cfg.batch_size > n:
        raise RecipeError(
            "sparse.batch_size",
            f"{cfg.batch_size} is larger than the training split ({n} "
            f"examples with sparse.holdout_every={cfg.holdout_every})",
        )


def minibatches_per_epoch(recipe: "Recipe") -> int:
    return -(-train_size(recipe.sparse) // recipe.sparse.batch_size)


@lru_cache(maxsize=4)
def load_split(holdout_every: int, standardize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): float32 (N, 64) features, int64 (N,) labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    test = torch.arange(len(y)) % holdout_every == 0
    x_train, x_test = x[~test], x[test]
    if standardize:
        mean, std = x_train.mean(0), x_train.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant border pixels
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return x_train, y[~test], x_test, y[test]


class SparseClassifier:
    """collect / minibatches / loss / evaluate / model_stats for the engine."""

    curve = ("progress/iteration", "eval/accuracy")

    def __init__(self, recipe: "Recipe", runtime: "Runtime"):
        self.recipe, self.cfg = recipe, recipe.sparse
        self.runtime = runtime
        self.device = runtime.device
        self.rank, self.world = runtime.rank, runtime.world
        self.update_epochs = self.cfg.update_epochs
        split = load_split(self.cfg.holdout_every, self.cfg.standardize)
        self.x_train, self.y_train, self.x_test, self.y_test = (t.to(self.device) for t in split)
        self.net = SparseMLP(NUM_FEATURES, self.cfg.hidden_sizes, NUM_CLASSES, self.cfg.activation)
        self.modules = {"net": self.net}
        # deliberately NOT the engine's per-rank stream: all ranks draw the same
        # permutation and each takes its own slice of every minibatch, so N processes
        # == 1 process on the same batch
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.examples_seen = 0  # all processes

    def _unwrapped(self) -> SparseMLP:
        return self.runtime.unwrap(self.modules["net"])

    # ------------------------------------------------------------------ COLLECT
    def collect(self):
        """The training split itself (supervised: nothing to roll out)."""
        return self.x_train, self.y_train

    def minibatches(self, batch, epoch: int):
        """One epoch: a fresh permutation, ``batch_size`` examples per minibatch (the last
        one smaller when the split does not divide), this rank's share of each."""
        x, y = batch
        perm = torch.randperm(len(y), generator=self.gen).to(self.device)
        for start in range(0, len(y), self.cfg.batch_size):
            idx = perm[start : start + self.cfg.batch_size]
            self.examples_seen += len(idx)
            size = len(idx)
            idx = idx[self.rank :: self.world]
            yield x.index_select(0, idx), y.index_select(0, idx), size

    # ------------------------------------------------------------------ LOSS
    def loss(self, mb):
        x, y, size = mb  # (B, 64), (B,), examples in the minibatch over all processes
        logits = self.modules["net"](x)  # (B, 10)
        # sum over this rank's share / the global minibatch size, × world because DDP
        # averages the ranks' gradients: the update is that of the global mean CE even
        # when the last minibatch does not split evenly over the processes
        ce = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing, reduction="sum") / size * self.world
        with torch.no_grad():
            stats = {"loss/ce": ce.detach(), "train/accuracy": (logits.argmax(1) == y).float().mean()}
        return ce, stats

    # ------------------------------------------------------------------ LOG
    def iteration_stats(self, batch, elapsed: float) -> dict:
        n = train_size(self.cfg) * self.cfg.update_epochs
        stats = {"progress/examples": self.examples_seen, "perf/examples_per_s": n / max(elapsed, 1e-9)}
        for l, (zero, width) in enumerate(zip(zero_neurons(self._unwrapped()), self.cfg.hidden_sizes)):
            stats[f"sparsity/hidden{l}_kept"] = width - zero
        return stats

    # ------------------------------------------------------------------ EVALUATE
    @torch.no_grad()
    def evaluate(self, request: "EvalRequest") -> "EvalShard":
        """Held-out accuracy and cross-entropy of the current (dense, masked) network
        and accuracy of its compacted copy, per example. The whole held-out split is
        always used (``request.num`` does not apply to a classifier); process r takes
        every world-th example from the r-th."""
        from rlprox.runtime import EvalShard

        net = self._unwrapped()
        x, y = self.x_test[request.rank :: request.world], self.y_test[request.rank :: request.world]
        was_training = net.training
        net.eval()
        logits = net(x)
        net.train(was_training)
        small = compact(net)
        return EvalShard(
            values={
                "accuracy": (logits.argmax(1) == y).float().tolist(),
                "loss": F.cross_entropy(logits, y, reduction="none").tolist(),
                "compact_accuracy": (small(x).argmax(1) == y).float().tolist(),
            }
        )

    def summarize_eval(self, values: dict) -> dict:
        zero = zero_neurons(self._unwrapped())
        return {"hidden_removed_fraction": sum(zero) / sum(self.cfg.hidden_sizes)}

    @torch.no_grad()
    def model_stats(self, measure_latency: bool = True) -> dict:
        """Compaction report: kept neurons per hidden layer, removed fraction, parameter
        compression (dense / compacted parameter count), held-out accuracy dense vs
        compacted, the largest |logit difference| between them (and whether they are
        allclose), and median single-thread CPU latency of one forward pass dense vs
        compacted at batch 1 and 256."""
        net = self._unwrapped()
        small = compact(net)
        dense_logits, small_logits = net(self.x_test), small(self.x_test)
        zero = zero_neurons(net)
        from rlprox.prox.attach import describe_pruning

        stats = {"pruning": describe_pruning(self.recipe.regularizers)}
        stats.update({f"compact/hidden{l}_kept": w for l, w in enumerate(small.hidden_sizes)})
        stats["compact/hidden_removed_fraction"] = sum(zero) / sum(self.cfg.hidden_sizes)
        stats["compact/params_dense"] = num_params(net)
        stats["compact/params_compact"] = num_params(small)
        stats["compact/param_compression"] = num_params(net) / num_params(small)
        stats["compact/dense_accuracy"] = _accuracy(dense_logits, self.y_test)
        stats["compact/compact_accuracy"] = _accuracy(small_logits, self.y_test)
        stats["compact/max_abs_logit_diff"] = float((dense_logits - small_logits).abs().max())
        stats["compact/outputs_match"] = bool(torch.allclose(dense_logits, small_logits, rtol=1e-4, atol=1e-5))
        if measure_latency:
            dense_cpu, small_cpu = net.to("cpu"), small.to("cpu")
            for batch in (1, 256):
                x = self.x_test.cpu()[:batch].repeat(-(-batch // len(self.x_test)), 1)[:batch]
                t_dense, t_small = latency(dense_cpu, x), latency(small_cpu, x)
                stats[f"latency/dense_b{batch}_us"] = t_dense * 1e6
                stats[f"latency/compact_b{batch}_us"] = t_small * 1e6
                stats[f"latency/speedup_b{batch}"] = t_dense / t_small
            net.to(self.device)
        return stats

    # ------------------------------------------------------------------ STATE
    def state_dict(self):
        return {"generator": self.gen.get_state()}, {"examples_seen": self.examples_seen}

    def load_state_dict(self, tensors: dict, state: dict) -> None:
        self.gen.set_state(tensors["generator"])
        self.examples_seen = int(state["examples_seen"])


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


register_trainer(
    TrainerSpec(
        name="sparse",
        build=lambda recipe, runtime, loss_terms: SparseClassifier(recipe, runtime),
        sections={"sparse": SparseConfig},
        validate=validate,
        counts=("sparse.update_epochs", "sparse.batch_size"),
        minibatches_per_epoch=minibatches_per_epoch,
        description="structured-sparse supervised MLP on scikit-learn's digits, compacted after training",
        eval_unit="examples",
    )
)
