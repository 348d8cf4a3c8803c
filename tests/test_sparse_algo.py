"""algo: sparse — a few iterations through the Engine, compaction, recipe errors, resume."""

import pytest
import torch

from rlprox.engine import Engine
from rlprox.models.sparse_mlp import SparseMLP, compact, zero_neurons
from rlprox.recipe import RecipeError, load_recipe


def sparse_recipe(tmp_path, overrides=(), **run):
    data = {
        "algo": "sparse",
        "seed": 4,
        "run": {
            "name": "s",
            "output_dir": str(tmp_path),
            "iterations": 2,
            "eval_size": 1,
            "log_with": [],
            "progress": False,
            "plot": False,
            **run,
        },
        "sparse": {"hidden_sizes": [24, 16], "batch_size": 64},
        "optim": {"lr": 3e-3, "max_grad_norm": 0.0},
        "regularizers": [{"type": "wgsef", "params": "net.hidden.*.weight", "k": 8, "lam": 1.0, "exact_k": True}],
    }
    return load_recipe(data, list(overrides))


def test_few_iterations_prune_neurons(tmp_path):
    engine = Engine(sparse_recipe(tmp_path))
    net = engine.algo.modules["net"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stats = engine.fit()
    assert torch.isfinite(torch.tensor(stats["loss/ce"]))
    assert 0.0 <= stats["train/accuracy"] <= 1.0 and stats["eval/accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert zero_neurons(net) == [24 - 8, 16 - 8]  # exact_k: exactly k rows survive per layer
    assert stats["sparsity/hidden0_kept"] == 8 and stats["eval/compact_accuracy"] == stats["eval/accuracy"]
    report = engine.algo.model_stats(measure_latency=False)
    assert (
        report["compact/outputs_match"] and report["compact/hidden0_kept"] == 8 and report["compact/hidden1_kept"] == 8
    )
    assert report["compact/param_compression"] > 1.5


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_compact_preserves_outputs_and_shrinks(activation):
    torch.manual_seed(0)
    net = SparseMLP(6, [9, 7, 5], 3, activation)
    with torch.no_grad():
        net.hidden[0].weight[[1, 4, 8]] = 0  # constant neurons, folded into the next bias
        net.hidden[1].weight[2] = 0
        net.hidden[1].weight[5, [0, 2, 3, 5, 6, 7]] = 0  # only reads neurons 1, 4: becomes constant
        net.hidden[2].weight[:, 6] = 0  # hidden1 neuron 6 feeds nothing
        net.out.weight[:, 0] = 0  # hidden2 neuron 0 feeds nothing
    small = compact(net)
    assert small.hidden_sizes == [6, 4, 4]
    x = torch.randn(32, 6)
    torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-6)


def test_compact_removes_a_whole_layer():
    net = SparseMLP(4, [5], 2)
    with torch.no_grad():
        net.hidden[0].weight.zero_()
    small = compact(net)
    x = torch.randn(3, 4)
    assert small.hidden_sizes == [0]
    torch.testing.assert_close(small(x), net(x))


@pytest.mark.parametrize(
    "override, key",
    [
        ("sparse.batch_size=5000", "sparse.batch_size"),
        ("sparse.batch_size=0", "sparse.batch_size"),
        ("sparse.hidden_sizes=[]", "sparse.hidden_sizes"),
        ("sparse.hidden_sizes=[16, -1]", "sparse.hidden_sizes"),
        ("sparse.label_smoothing=1.0", "sparse.label_smoothing"),
        ("sparse.holdout_every=1", "sparse.holdout_every"),
        ("sparse.update_epochs=0", "sparse.update_epochs"),
        ("sparse.activation=gelu", "sparse.activation"),
        ("sparse.batch_sise=64", "sparse.batch_sise"),
        ("run.gradient_accumulation_steps=4", "run.gradient_accumulation_steps"),  # 23 minibatches per epoch
    ],
)
def test_bad_config_names_the_key(tmp_path, override, key):
    with pytest.raises(RecipeError) as err:
        sparse_recipe(tmp_path, [override])
    assert err.value.key == key


def test_resume_equals_uninterrupted(tmp_path):
    full = Engine(sparse_recipe(tmp_path / "a", iterations=3))
    full.fit()
    first = Engine(sparse_recipe(tmp_path / "b", iterations=1))
    first.fit()
    second = Engine(sparse_recipe(tmp_path / "b", iterations=3, resume="auto"))
    second.fit()
    assert second.state.iteration == 3
    for (name, a), b in zip(
        full.algo.modules["net"].state_dict().items(), second.algo.modules["net"].state_dict().values()
    ):
        assert torch.equal(a, b), name
