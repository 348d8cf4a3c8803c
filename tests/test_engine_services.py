"""The shared layer's smaller services: the registry idiom, recipe edge cases, lr
warm-up and parameter groups, atomic checkpoint pruning, refused topologies, the
trainer-neutral eval on a sparse checkpoint, and the runtime's main-process services."""

import json
import shutil

import pytest
import yaml
from torch import nn

from rlprox import checkpoint
from rlprox.cli import main
from rlprox.engine import Engine, lr_lambda, optimizer_groups
from rlprox.errors import RecipeError, RegistryError
from rlprox.recipe import OptimConfig, load_recipe
from rlprox.registry import Registry, check_kwargs


# ----------------------------------------------------------------------------- registry
def test_registry_names_plugins_options_and_errors():
    reg = Registry("widget")

    @reg.register("square")
    def square(x: int, scale: float = 1.0):
        """Square a number."""
        return scale * x * x

    assert "square" in reg and reg.names() == ["square"] and reg.describe() == {"square": "Square a number."}
    assert reg.build("square", {"x": 3}) == 9.0
    assert reg.bind("square", {"scale": 2.0}, reserved=("x",))(x=2) == 8.0
    assert reg.get("math:sqrt")(9.0) == 3.0  # "module:attr" plugin
    cases = [
        (lambda: reg.get("sqare"), "unknown widget 'sqare' (did you mean 'square'?)"),
        (
            lambda: reg.build("square", {"x": 1, "sacle": 2}),
            "widget 'square': unknown option 'sacle' (did you mean 'scale'?)",
        ),
        (lambda: reg.build("square", {}), "widget 'square': missing required option 'x'"),
        (lambda: reg.bind("square", {"x": 1}, reserved=("x",)), "unknown option 'x'"),
        (lambda: reg.get("no_such_module_q:f"), "cannot import module 'no_such_module_q'"),
        (lambda: reg.get("math:nope"), "module 'math' has no attribute 'nope'"),
        (lambda: reg.register("square", lambda x: x), "widget 'square' is already registered"),
    ]
    for call, message in cases:
        with pytest.raises(RegistryError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_lazy_entries_import_their_module_on_first_lookup():
    import sys

    reg = Registry("thing", lazy={"dec": "decimal"})
    sys.modules.pop("decimal", None)
    assert "dec" in reg and "decimal" not in sys.modules
    with pytest.raises(KeyError):  # the module imported but registered nothing under that name
        reg["dec"]
    assert "decimal" in sys.modules


def test_check_kwargs_ignores_reserved_and_var_kwargs():
    check_kwargs(
        lambda images, prompts, metadata, **kw: 0, {"anything": 1}, "r", reserved=("images", "prompts", "metadata")
    )
    with pytest.raises(RegistryError, match="unknown option 'images'"):
        check_kwargs(lambda images, k=1: 0, {"images": 1}, "r", reserved=("images",))


# ----------------------------------------------------------------------------- recipes
def test_empty_recipe_file_is_a_recipe_error(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"recipe error: {path}: the recipe file is empty") and "\n" not in err


def test_missing_algo_lists_the_trainers():
    with pytest.raises(RecipeError, match=r"algo: missing; one of: .*ppo.*sparse"):
        load_recipe({"seed": 1})


@pytest.mark.parametrize("kind", ["wgsef", "topk"])
def test_structural_size_k_is_required(tiny_recipe, kind):
    recipe = tiny_recipe()
    recipe["regularizers"] = [{"type": kind, "params": "policy.actor.0.weight", "lam": 1.0}]
    with pytest.raises(RecipeError, match=f"regularizer type '{kind}': missing required option 'k'"):
        load_recipe(recipe)


# ----------------------------------------------------------------------------- optimizer
def test_warmup_then_schedule():
    f = lr_lambda("linear", iterations=10, warmup=4)
    assert [round(f(i), 3) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 0.6, 0.5]
    assert lr_lambda("constant", 10)(7) == 1.0


def test_weight_decay_skips_biases_norms_and_embeddings():
    class Algo:
        def __init__(self):
            self.net = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4))
            self.modules = {"net": self.net}

    algo = Algo()
    groups = optimizer_groups(algo, OptimConfig(name="adamw", weight_decay=0.1))
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(algo.net[1].weight)}
    assert optimizer_groups(algo, OptimConfig(name="adamw", weight_decay=0.1, decay_all=True))[0]["params"] == list(
        algo.net.parameters()
    )

    class TwoRates(Algo):
        def param_groups(self):
            return [
                {"params": list(self.net[0].parameters()), "lr": 1e-2},
                {"params": list(self.net[1:].parameters())},
            ]

    groups = optimizer_groups(TwoRates(), OptimConfig(weight_decay=0.0))
    assert [g.get("lr") for g in groups] == [1e-2, None]

    class Missing(Algo):
        def param_groups(self):
            return [{"params": list(self.net[0].parameters())}]

    with pytest.raises(ValueError, match="exactly the trainable parameters"):
        optimizer_groups(Missing(), OptimConfig())


# ----------------------------------------------------------------------------- checkpoints
def test_pruning_never_leaves_a_checkpoint_shaped_folder_half_deleted(tiny_recipe, monkeypatch):
    recipe = load_recipe(tiny_recipe(run={"iterations": 3, "save_every": 1, "keep_last": 1}))
    real_rmtree = shutil.rmtree
    deleted = []

    def rmtree_dies_midway(path, ignore_errors=False):
        deleted.append(str(path))
        if str(path).endswith(".del.tmp") and len(deleted) < 3:
            (checkpoint.Path(path) / "model.safetensors").unlink(
                missing_ok=True
            )  # deletion got this far, then the kill
            return None
        return real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree_dies_midway)
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    for ckpt in checkpoint.list_checkpoints(recipe.run_dir):  # everything named iter-N loads
        checkpoint.load_weights(ckpt, engine.algo.modules)
    assert [p.name for p in checkpoint.list_checkpoints(recipe.run_dir)] == ["iter-000003"]
    assert any(name.endswith("iter-000001.del.tmp") for name in deleted)


@pytest.mark.parametrize(
    "env,says",
    [("ACCELERATE_USE_FSDP", "set run.grad_sync=fsdp"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed is not supported")],
)
def test_accelerate_fsdp_and_deepspeed_launch_configs_are_refused_in_one_line(
    tiny_recipe, monkeypatch, tmp_path, capsys, env, says
):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()))
    monkeypatch.setenv(env, "true")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recipe error: run: ") and says in err and "\n" not in err


def test_a_world_accelerate_did_not_join_is_refused(tiny_recipe, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. torchrun processes that accelerate ran as independent
    with pytest.raises(RecipeError, match="2 processes were launched but accelerate joined 1"):
        Engine(load_recipe(tiny_recipe()))


# ----------------------------------------------------------------------------- eval
def test_eval_cli_on_a_sparse_checkpoint(tmp_path, capsys):
    recipe = load_recipe(
        {
            "algo": "sparse",
            "seed": 1,
            "sparse": {"hidden_sizes": [16]},
            "run": {
                "name": "s",
                "output_dir": str(tmp_path),
                "iterations": 2,
                "log_with": [],
                "progress": False,
                "plot": False,
            },
        }
    )
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    assert main(["eval", str(recipe.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "compact/param_compression" in out and "pruning" in out and "none (dense)" in out
    result = json.loads((checkpoint.find_latest(recipe.run_dir) / "eval.json").read_text())
    assert result["unit"] == "examples" and result["eval/count"] == 360 and 0.1 < result["eval/accuracy"] <= 1.0
    assert main(["eval", str(recipe.run_dir), "--episodes", "3"]) == 2
    assert "it always evaluates its whole held-out set" in capsys.readouterr().err


def test_hooks_outside_the_contract_are_refused():
    from rlprox.engine import OPTIONAL_HOOKS, hook

    assert {"frozen", "evaluate", "param_groups", "stat_reductions", "export", "state_dict"} <= OPTIONAL_HOOKS
    with pytest.raises(AttributeError, match="not a hook of the algorithm contract"):
        hook(object(), "secret_hook")


def test_describe_pruning_names_what_sets_the_sparsity():
    from rlprox.prox.attach import describe_pruning

    assert (
        describe_pruning([{"type": "wgsef", "k": 96, "lam": 1.0, "exact_k": True}])
        == "wgsef λ=1.0 + hard top-k (k=96): the top-k projection sets the sparsity"
    )
    assert (
        describe_pruning([{"type": "wgsef", "k": 96, "lam": 10.0, "prox_lr": 0.01}])
        == "wgsef λ=10.0, prox step 0.01: the regularizer alone"
    )


# ----------------------------------------------------------------------------- runtime
def test_runtime_main_process_services_in_one_process():
    """``is_main`` and ``main_process_first`` are offered to user trainers (docs/algorithm-contract.md)."""
    from accelerate import Accelerator

    from rlprox.engine import make_runtime

    runtime = make_runtime(Accelerator(cpu=True), seed=0)
    assert runtime.world == 1 and runtime.rank == 0 and runtime.is_main
    ran = []
    with runtime.main_process_first():
        ran.append(runtime.rank)
    assert ran == [0]
