"""Tier 3: 2 CPU processes (gloo) give the same update as 1 process on the same global batch."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlprox.engine import Engine
from rlprox.recipe import load_recipe
from tests.conftest import ROOT

pytestmark = pytest.mark.distributed


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_launch_accident(output: str) -> bool:
    """Failures of a 2-process launch that are not the code under test, retried once:
    losing the race for the free port, and gloo's abort at interpreter exit after the
    script's work is done and its process group destroyed (std::terminate on a C++
    thread, seen in one or two of a hundred launches on a loaded 2-core machine). The
    script (tests/dist_update.py) only writes its outputs, so running it again is safe."""
    return "address already in use" in output.lower() or "terminate called without an active exception" in output


def launch(tmp_path, recipe: dict, *overrides):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    cmd = [
        accelerate,
        "launch",
        "--config_file",
        f"{ROOT}/recipes/accelerate/multi_cpu.yaml",
        "--main_process_port",
        str(free_port()),
        f"{ROOT}/tests/dist_update.py",
        str(tmp_path),
        str(path),
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and is_launch_accident(out.stdout + out.stderr):
        cmd[cmd.index("--main_process_port") + 1] = str(free_port())  # once more, on a fresh port
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)], path


@pytest.mark.parametrize("grad_sync", ["shm", "allreduce", "ddp", "fsdp"])
def test_two_processes_equal_one_process_on_concatenated_batch(tmp_path, tiny_recipe, grad_sync):
    # one minibatch per epoch (the whole local batch) and 2 epochs: the 1-process
    # minibatch is then exactly the union of the two ranks' minibatches
    # SGD: Adam's m/√v turns float-summation-order differences in near-zero gradient
    # components into ±lr steps, which would hide a real mismatch behind the tolerance
    recipe = tiny_recipe(
        ppo={"num_steps": 16, "minibatch_size": 32, "update_epochs": 2},
        env={"normalize_obs": True},
        optim={"name": "sgd", "lr": 0.05},
        run={"grad_sync": grad_sync},
    )
    ranks, path = launch(tmp_path, recipe)
    r0, r1 = ranks
    assert not torch.equal(r0["packed"], r1["packed"])  # each rank stepped its own envs
    params = [k for k in r0 if k.startswith("param.")]
    for k in params:
        assert torch.equal(r0[k], r1[k]), k  # identical parameters on both ranks

    engine = Engine(load_recipe(str(path), ["run.grad_sync=allreduce"]))
    before = {k: v.clone() for k, v in engine.algo.policy.state_dict().items()}
    engine.algo.sampler.size = 64  # one minibatch of the concatenated batch
    engine.update(torch.cat([r0["packed"], r1["packed"]]))
    after = engine.algo.policy.state_dict()
    for k in after:
        assert not torch.equal(before[k], after[k]) or "log_std" in k
        torch.testing.assert_close(after[k], r0[f"param.{k}"], rtol=1e-5, atol=1e-6)
    engine.close()


def test_torchrun_train_checkpoints_every_rank_and_resumes(tmp_path, tiny_recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(run={"iterations": 2, "save_every": 1})))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    base = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "rlprox", "train", str(path)]
    out = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = tmp_path / "t" / "checkpoints" / "iter-000002"
    assert (ckpt / "rank-0.json").exists() and (ckpt / "rank-1.json").exists()
    assert out.stdout.count("done:") == 1  # only the main process reports
    base[4] = str(free_port())
    out = subprocess.run(
        base + ["run.iterations=3", "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "t" / "checkpoints" / "iter-000003" / "rank-1.safetensors").exists()


def test_two_processes_with_regularizer_keep_identical_parameters_and_masks(tmp_path, tiny_recipe):
    recipe = tiny_recipe(ppo={"num_steps": 16, "minibatch_size": 8, "update_epochs": 2}, regularizers=None)
    recipe["regularizers"] = [
        {"type": "wgsef", "params": "policy.actor.[02].weight", "k": 8, "lam": 0.5, "exact_k": True}
    ]
    (r0, r1), _ = launch(tmp_path, recipe)
    for k in r0:
        if k.startswith("param."):
            assert torch.equal(r0[k], r1[k]), k
    for k in ("param.actor.0.weight", "param.actor.2.weight"):
        zero_rows = r0[k].abs().sum(1).eq(0)
        assert zero_rows.sum() == 64 - 8  # exactly k groups kept ...
        assert torch.equal(zero_rows, r1[k].abs().sum(1).eq(0))  # ... the same ones on both ranks


def test_two_processes_stop_epochs_together_on_target_kl(tmp_path, tiny_recipe):
    # a tiny target KL: the early stop must be decided on the all-reduced KL, or one
    # rank stops while the other waits in the next all-reduce forever
    import json

    recipe = tiny_recipe(ppo={"num_steps": 16, "minibatch_size": 8, "update_epochs": 8, "target_kl": 1e-4})
    (r0, r1), _ = launch(tmp_path, recipe)
    for k in r0:
        if k.startswith("param."):
            assert torch.equal(r0[k], r1[k]), k
    s0, s1 = (json.loads((tmp_path / f"stats{r}.json").read_text()) for r in range(2))
    assert s0 == s1  # update stats (the KL the stop is decided on) are global means
    assert s0["loss/epochs"] < 8


def torchrun(tmp_path, recipe: dict, *args):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [exe, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "rlprox", *args, str(path)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("grad_sync", ["auto", "allreduce", "ddp", "fsdp"])
def test_two_processes_lora_with_frozen_encoder(tmp_path, grad_sync):
    """No DDP error with a frozen module and a peft model; identical adapters on both
    ranks; different sampling noise per rank; logged stats = mean (or sum) over ranks."""
    pytest.importorskip("peft")
    import json

    from tests.toy_lora import toy_recipe

    recipe = toy_recipe(tmp_path, iterations=3, grad_sync=grad_sync)
    out = torchrun(tmp_path, recipe, "train")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run_dir = tmp_path / "toy"
    ranks = [[json.loads(line) for line in open(run_dir / f"toy-rank{r}.jsonl")] for r in range(2)]
    logged = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert len(logged) == len(ranks[0]) == len(ranks[1]) == 3
    for row, a, b in zip(logged, *ranks):
        assert a["toy/first_noise"] != b["toy/first_noise"]  # per-rank generators
        assert row["reward/mean"] == pytest.approx((a["reward/mean"] + b["reward/mean"]) / 2, rel=1e-6)
        assert row["toy/first_noise"] == pytest.approx((a["toy/first_noise"] + b["toy/first_noise"]) / 2, rel=1e-6)
        assert row["toy/samples"] == a["toy/samples"] + b["toy/samples"]  # a "sum" stat
    # both ranks save their streams; adapters identical: rank 0's checkpoint reloads on rank 1's files
    ckpt = run_dir / "checkpoints" / "iter-000003"
    g0, g1 = (load_file(str(ckpt / f"rank-{r}.safetensors"))["engine.generator"] for r in range(2))
    assert not torch.equal(g0, g1)
    assert (tmp_path / "toy" / "params-rank0.json").read_text() == (tmp_path / "toy" / "params-rank1.json").read_text()


def dist_run(tmp_path, recipe: dict, iterations: int = 2):
    """Run tests/dist_run.py under torchrun with 2 processes; each rank's parameters and
    first sample."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [
        exe,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        f"{ROOT}/tests/dist_run.py",
        str(tmp_path),
        str(path),
        str(iterations),
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]


@pytest.mark.parametrize("advantage,grad_sync", [("loo", "auto"), ("prompt_stats", "auto"), ("loo", "fsdp")])
def test_two_processes_loop_keep_identical_lora_and_draw_different_noise(tmp_path, advantage, grad_sync):
    pytest.importorskip("peft")
    from tests.test_loop import loop_recipe
    from tests.toy_pipelines import untrained_sd_pipeline as untrained_pipeline

    pipe_dir = tmp_path / "tiny-sd"
    untrained_pipeline(seed=0).save_pretrained(str(pipe_dir))
    recipe = loop_recipe(tmp_path, pipe_dir, advantage=advantage, prompt_stats_min_count=1)
    recipe["run"]["grad_sync"] = grad_sync
    r0, r1 = dist_run(tmp_path, recipe)
    assert not torch.equal(r0["first_noise"], r1["first_noise"])  # per-rank generators
    params = [k for k in r0 if k.startswith("param.")]
    assert params and all("lora" in k for k in params)
    for k in params:
        assert torch.equal(r0[k], r1[k]), k


@pytest.mark.parametrize("grad_sync", ["auto", "fsdp"])
def test_two_processes_flow_loop_keep_identical_lora_and_draw_different_noise(tmp_path, grad_sync):
    """SD3 (flow SDE on a window, group-normalised advantages, kl_ref to the LoRA-off model);
    FSDP2 with the transformer's blocks as units."""
    pytest.importorskip("peft")
    from tests.test_loop_flow import flow_recipe, tiny_sd3_pipeline

    pipe_dir = tmp_path / "tiny-sd3"
    tiny_sd3_pipeline().save_pretrained(str(pipe_dir))
    recipe = flow_recipe(tmp_path, pipe_dir, advantage="group_norm", sde_window=[0, 3])
    recipe["regularizers"] = [{"type": "kl_ref", "lam": 0.1}]
    recipe["run"].update(grad_sync=grad_sync, fsdp={"wrap": ["JointTransformerBlock"]})
    r0, r1 = dist_run(tmp_path, recipe)
    assert not torch.equal(r0["first_noise"], r1["first_noise"])  # per-rank generators
    params = [k for k in r0 if k.startswith("param.")]
    assert params and all("lora" in k for k in params)
    for k in params:
        assert torch.equal(r0[k], r1[k]), k


def test_two_processes_nft_keep_identical_lora_and_old_policy(tmp_path):
    """LOOP's objective nft: LoRA weights identical on both ranks after rounds that sample the old policy."""
    pytest.importorskip("peft")
    from tests.test_loop_flow import flow_recipe, tiny_sd3_pipeline

    pipe_dir = tmp_path / "tiny-sd3"
    tiny_sd3_pipeline().save_pretrained(str(pipe_dir))
    recipe = flow_recipe(tmp_path, pipe_dir, objective="nft", guidance_scale=1.0, advantage="group_norm")
    recipe["regularizers"] = [{"type": "kl_ref", "lam": 0.1}]
    r0, r1 = dist_run(tmp_path, recipe)
    params = [k for k in r0 if k.startswith("param.")]
    assert params and all("lora" in k for k in params)
    for k in params:
        assert torch.equal(r0[k], r1[k]), k


def test_two_processes_policyflow_keep_identical_parameters(tmp_path):
    from tests.test_policyflow import pf_recipe

    r0, r1 = dist_run(tmp_path, pf_recipe(tmp_path))
    assert not torch.equal(r0["first_noise"], r1["first_noise"])  # each rank its own envs and noise
    for k in (k for k in r0 if k.startswith("param.")):
        assert torch.equal(r0[k], r1[k]), k


@pytest.mark.parametrize("grad_sync", ["auto", "fsdp"])
def test_two_processes_vapi_keep_identical_parameters(tmp_path, grad_sync):
    from tests.test_vapi import tiny_models, vapi_recipe

    gpt, vq = tiny_models()
    torch.save({"model": gpt.state_dict()}, tmp_path / "gpt.pt")
    torch.save({"model": vq.state_dict()}, tmp_path / "vq.pt")
    recipe = vapi_recipe(tmp_path, (tmp_path,))
    recipe["run"].update(
        grad_sync=grad_sync, fsdp={"wrap": ["TransformerBlock"]}
    )  # the fsdp options, used only by fsdp
    r0, r1 = dist_run(tmp_path, recipe)
    assert not torch.equal(r0["first_noise"], r1["first_noise"])  # each rank its own images
    for k in (k for k in r0 if k.startswith("param.")):
        assert torch.equal(r0[k], r1[k]), k


def test_eval_under_two_processes_shards_the_episodes(tmp_path, tiny_recipe):
    import json

    engine = Engine(load_recipe(tiny_recipe(run={"iterations": 1})))
    engine.fit()
    engine.close()
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [
        exe,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "rlprox",
        "eval",
        str(engine.run_dir),
        "--episodes",
        "5",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("written") == 1  # the main process reports
    result = json.loads((engine.run_dir / "checkpoints" / "iter-000001" / "eval.json").read_text())
    assert result["eval/count"] == 5 and len(result["values"]["return"]) == 5  # 3 + 2 episodes, gathered


def test_two_processes_recurrent_equal_one_process_on_concatenated_envs(tmp_path, tiny_recipe):
    """ppo.lstm over 2 processes: each rank's envs and LSTM states, one minibatch of whole sequences per
    epoch; the update equals 1 process's on both ranks' envs (their rows interleaved step by step, the
    packed rollout's time-major order)."""
    steps = 8
    recipe = tiny_recipe(
        env={"id": "rlprox/MaskedCartPole-v1", "num_envs": 2},
        ppo={"num_steps": steps, "minibatch_size": 2 * steps, "update_epochs": 2, "lstm": {"hidden_size": 8}},
        optim={"name": "sgd", "lr": 0.05},
        run={"grad_sync": "allreduce"},
    )
    (r0, r1), path = launch(tmp_path, recipe)
    assert not torch.equal(r0["packed"], r1["packed"])
    for k in (k for k in r0 if k.startswith("param.")):
        assert torch.equal(r0[k], r1[k]), k

    engine = Engine(load_recipe(str(path)))
    before = {k: v.clone() for k, v in engine.algo.policy.state_dict().items()}
    rows = [torch.cat([a, b]) for a, b in zip(r0["packed"].split(2), r1["packed"].split(2))]  # step t: 4 envs
    engine.algo.sampler.envs = 4  # one minibatch of the 4 envs
    engine.update(torch.cat(rows))
    after = engine.algo.policy.state_dict()
    for k in after:
        assert not torch.equal(before[k], after[k]), k
        torch.testing.assert_close(after[k], r0[f"param.{k}"], rtol=1e-5, atol=1e-6)
    engine.close()
