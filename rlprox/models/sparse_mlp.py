"""A plain MLP whose hidden neurons can be pruned by group sparsity, and its compaction.

Parameter names are ``hidden.<l>.weight`` / ``hidden.<l>.bias`` for the hidden layers and
``out.weight`` / ``out.bias`` for the classifier, so a recipe selects every hidden layer
with one glob: ``net.hidden.*.weight`` (one group = one row = one neuron's incoming
weights).

Compaction. A hidden neuron i of layer l whose incoming row W_l[i, :] is exactly zero
outputs the constant c_i = σ(b_l[i]) for every input. Removing it and adding
W_{l+1}[:, i]·c_i to b_{l+1} leaves the network's function unchanged (up to float
summation order). A neuron whose outgoing column W_{l+1}[:, i] is exactly zero feeds
nothing and is dropped as well. Layers are processed from the input side, so a row that
only read removed neurons becomes zero and is removed in turn.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
from torch import nn

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class SparseMLP(nn.Module):
    """x (B, in_dim) -> logits (B, out_dim) through ``hidden_sizes`` σ-layers."""

    def __init__(self, in_dim: int, hidden_sizes: list[int], out_dim: int, activation: str = "relu"):
        super().__init__()
        widths = [in_dim, *hidden_sizes]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], out_dim)
        self.activation = activation
        self._act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = self._act(layer(x))
        return self.out(x)

    @property
    def hidden_sizes(self) -> list[int]:
        return [layer.out_features for layer in self.hidden]


def num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def zero_neurons(net: SparseMLP) -> list[int]:
    """Per hidden layer, the number of neurons whose incoming weight row is exactly zero."""
    return [int(layer.weight.ne(0).sum(1).eq(0).sum()) for layer in net.hidden]


@torch.no_grad()
def compact(net: SparseMLP) -> SparseMLP:
    """A smaller SparseMLP computing the same function: hidden neurons with an all-zero
    incoming row are folded into the next layer's bias, neurons with an all-zero
    outgoing column are dropped (module docstring). ``net`` is not modified."""
    act = ACTIVATIONS[net.activation]
    layers = [(layer.weight.detach().clone(), layer.bias.detach().clone()) for layer in [*net.hidden, net.out]]
    for l in range(len(layers) - 1):
        W, b = layers[l]  # (n_l, n_{l-1}), (n_l,)
        W_next, b_next = layers[l + 1]  # (n_{l+1}, n_l), (n_{l+1},)
        constant = W.ne(0).sum(1).eq(0)  # σ(b_i) whatever the input
        unused = W_next.ne(0).sum(0).eq(0)  # read by nobody
        fold = constant & ~unused
        if fold.any():
            b_next = b_next + W_next[:, fold] @ act(b[fold])
        keep = ~(constant | unused)
        layers[l] = (W[keep], b[keep])
        layers[l + 1] = (W_next[:, keep], b_next)
    in_dim = layers[0][0].shape[1]
    with warnings.catch_warnings():  # a fully pruned layer has zero width; init is overwritten anyway
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        small = SparseMLP(in_dim, [W.shape[0] for W, _ in layers[:-1]], layers[-1][0].shape[0], net.activation)
    for layer, (W, b) in zip([*small.hidden, small.out], layers):
        layer.weight.copy_(W)
        layer.bias.copy_(b)
    return small.to(net.out.weight.device)


@torch.inference_mode()
def latency(net: nn.Module, x: torch.Tensor, repeats: int = 200, inner: int = 10, budget_s: float = 1.0) -> float:
    """Median seconds per forward pass of ``net(x)`` on one thread: up to ``repeats``
    timed blocks of ``inner`` calls each (a block smooths timer resolution at batch 1),
    stopping early (after at least 5 blocks) once ``budget_s`` seconds are spent."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(20):
            net(x)
        times = []
        deadline = time.perf_counter() + budget_s
        while len(times) < repeats and (len(times) < 5 or time.perf_counter() < deadline):
            start = time.perf_counter()
            for _ in range(inner):
                net(x)
            times.append((time.perf_counter() - start) / inner)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)
