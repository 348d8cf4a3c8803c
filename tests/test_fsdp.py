"""FSDP (``run.grad_sync: fsdp``): the engine shards trained modules with torch FSDP2 on
2 CPU processes (gloo); checkpoints hold whole tensors and no pickle; resume is exact;
elementwise regularizers act on shards and the others are refused in one line."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlprox.cli import main
from rlprox.errors import RecipeError
from rlprox.prox.attach import attach_regularizers
from tests.conftest import ROOT
from tests.test_distributed import free_port, launch

pytestmark = pytest.mark.distributed


def train(tmp_path, recipe: dict, *args):
    path = tmp_path / f"{recipe['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [exe, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "rlprox", "train", str(path), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_fsdp_checkpoints_whole_adapters_without_pickle_and_resumes_exactly(tmp_path, capsys):
    pytest.importorskip("peft")
    from tests.toy_lora import toy_recipe

    # eval_size 1: rank 1 evaluates nothing while rank 0 runs forward passes, which
    # deadlocks unless evaluation runs on gathered parameters
    whole = toy_recipe(tmp_path, name="whole", iterations=4, save_every=1, grad_sync="fsdp", eval_size=1, eval_every=2)
    out = train(tmp_path, whole)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    ckpt = tmp_path / "whole" / "checkpoints" / "iter-000004"
    assert {p.suffix for p in ckpt.iterdir()} == {".json", ".safetensors", ".yaml"}  # no pickle anywhere

    # the same module built in one process, unsharded: the checkpoint holds its
    # trainable tensors whole (not one rank's shards), the adapter only
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    engine = Engine(
        load_recipe(str(ckpt / "recipe.yaml"), ["run.grad_sync=auto", f"run.output_dir={tmp_path / 'one'}"])
    )
    shapes = {f"policy.{n}": tuple(p.shape) for n, p in engine.algo.policy.named_parameters() if p.requires_grad}
    engine.close()
    weights = load_file(str(ckpt / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == shapes and all("lora" in k for k in weights)
    optim = load_file(str(ckpt / "optimizer.safetensors"))
    assert {k for k in optim if k.endswith("/exp_avg")} == {f"state/{k}/exp_avg" for k in shapes}
    for k in shapes:
        assert optim[f"state/{k}/exp_avg"].shape == weights[k].shape
    groups = json.loads((ckpt / "optimizer.json").read_text())["param_groups"]
    assert sorted(n for g in groups for n in g["params"]) == sorted(shapes)

    # stop after 2 iterations, resume to 4: bit-identical to the uninterrupted run
    split = toy_recipe(tmp_path, name="split", iterations=2, save_every=1, grad_sync="fsdp", eval_size=1, eval_every=2)
    out = train(tmp_path, split)
    assert out.returncode == 0, out.stderr[-3000:]
    out = train(tmp_path, split, "run.iterations=4", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = tmp_path / "split" / "checkpoints" / "iter-000004"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(ckpt / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # one process evaluates the FSDP checkpoint as any other
    assert main(["eval", str(ckpt), "--num-samples", "3"]) == 0
    assert json.loads((ckpt / "eval.json").read_text())["eval/count"] == 3


def test_fsdp_shards_a_trained_module_with_a_bf16_frozen_base(tmp_path):
    """LoRA adapters in float32 next to a bfloat16 base in one FSDP unit."""
    pytest.importorskip("peft")
    from tests.toy_lora import toy_recipe

    out = train(
        tmp_path,
        toy_recipe(
            tmp_path, name="bf16", iterations=2, grad_sync="fsdp", frozen_dtype="bfloat16", mixed_precision="bf16"
        ),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    weights = load_file(str(tmp_path / "bf16" / "checkpoints" / "iter-000002" / "model.safetensors"))
    assert weights and all("lora" in k and v.dtype == torch.float32 for k, v in weights.items())


def test_fsdp_with_wrapped_submodules_equals_one_process(tmp_path, tiny_recipe):
    """Each Sequential (actor, critic) a unit of its own: still the 1-process update on
    the concatenated batch (the same check as every other grad_sync)."""
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    recipe = tiny_recipe(
        ppo={"num_steps": 16, "minibatch_size": 32, "update_epochs": 2},
        optim={"name": "sgd", "lr": 0.05},
        run={"grad_sync": "fsdp", "fsdp": {"wrap": ["Sequential"]}},
    )
    (r0, r1), path = launch(tmp_path, recipe)
    engine = Engine(load_recipe(str(path), ["run.grad_sync=allreduce"]))
    engine.algo.sampler.size = 64
    engine.update(torch.cat([r0["packed"], r1["packed"]]))
    for k, v in engine.algo.policy.state_dict().items():
        torch.testing.assert_close(v, r0[f"param.{k}"], rtol=1e-5, atol=1e-6)
        assert torch.equal(r0[f"param.{k}"], r1[f"param.{k}"])
    engine.close()


def test_fsdp_l1_prox_on_shards_equals_the_unsharded_prox(tmp_path, tiny_recipe):
    recipe = tiny_recipe(
        ppo={"num_steps": 16, "minibatch_size": 32, "update_epochs": 2}, optim={"name": "sgd", "lr": 0.05}
    )
    recipe["regularizers"] = [{"type": "l1", "params": "policy.actor.0.weight", "lam": 2.0}]
    runs = {}
    for grad_sync in ("fsdp", "allreduce"):
        (tmp_path / grad_sync).mkdir()
        runs[grad_sync], _ = launch(
            tmp_path / grad_sync, {**recipe, "run": {**recipe["run"], "grad_sync": grad_sync, "name": grad_sync}}
        )
    sharded, plain = runs["fsdp"], runs["allreduce"]
    w = sharded[0]["param.actor.0.weight"]
    assert 0.2 < float(w.eq(0).float().mean()) < 1.0  # the prox zeroed entries of both shards' rows
    assert w[: w.shape[0] // 2].eq(0).any() and w[w.shape[0] // 2 :].eq(0).any()
    for k in (k for k in sharded[0] if k.startswith("param.")):
        torch.testing.assert_close(sharded[0][k], plain[0][k], rtol=1e-5, atol=1e-6)
        assert torch.equal(sharded[0][k], sharded[1][k])


@pytest.mark.parametrize(
    "spec,field,says",
    [
        (
            {"type": "wgsef", "params": "p.w", "k": 2, "lam": 1.0},
            "regularizers[0].type",
            "wgsef needs whole parameters",
        ),
        ({"type": "topk", "params": "p.w", "k": 2}, "regularizers[0].type", "topk needs whole parameters"),
        ({"type": "group_l2", "params": "p.w", "lam": 1.0}, "regularizers[0].type", "group_l2 needs whole parameters"),
        (
            {"type": "l1", "params": "p.w", "lam": 1.0, "mode": "penalty"},
            "regularizers[0].mode",
            "mode penalty is not supported on FSDP",
        ),
    ],
)
def test_structured_regularizers_are_refused_on_shards(spec, field, says):
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.SGD([w], lr=0.1)
    attach_regularizers(opt, {"p.w": w}, [spec])  # fine unsharded
    with pytest.raises(RecipeError) as err:
        attach_regularizers(opt, {"p.w": w}, [spec], sharded=True)
    assert (
        str(err.value).startswith(f"recipe error: {field}: ") and says in str(err.value) and "\n" not in str(err.value)
    )
    for ok in ("l1", "l0", "elastic_net"):
        attach_regularizers(opt, {"p.w": w}, [{"type": ok, "params": "p.w", "lam": 0.1}], sharded=True)


def test_fsdp_refusals_reach_the_cli_in_one_line(tmp_path, tiny_recipe):
    recipe = tiny_recipe(run={"grad_sync": "fsdp", "name": "g"})
    recipe["regularizers"] = [{"type": "wgsef", "params": "policy.actor.0.weight", "k": 8, "lam": 0.5}]
    out = train(tmp_path, recipe)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("recipe error:")]
    assert lines and lines[0] == lines[-1] and "regularizers[0].type: wgsef needs whole parameters" in lines[0]
    missing = tiny_recipe(run={"grad_sync": "fsdp", "name": "w", "fsdp": {"wrap": ["Block"]}})
    out = train(tmp_path, missing)
    assert "recipe error: run.fsdp.wrap: no trained submodule has class 'Block'" in out.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
