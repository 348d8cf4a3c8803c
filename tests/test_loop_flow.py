"""LOOP on a tiny random-weight StableDiffusion3Pipeline (flow matching, SDE / CPS policy):
ratio 1 before the first update, exact log-prob re-evaluation, LoRA-only updates, the SDE
window, base-vs-tuned evaluation, LoRA export, exact resume and one-line option errors."""

import json

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rlprox import checkpoint  # noqa: E402
from rlprox.cli import main  # noqa: E402
from rlprox.engine import Engine  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402
from tests.test_loop import loop_recipe  # noqa: E402


def tiny_sd3_pipeline(seed: int = 0):
    """A real StableDiffusion3Pipeline with random weights: two 2-layer CLIP encoders over the
    digits vocabulary, no T5 (text_encoder_3 = None: zeros in its place), a 2-layer SD3
    transformer on 8×8×4 latents, a 16×16 AutoencoderKL with a shift factor."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from rlprox.zoo.sd import build_tokenizer, clip_text_config

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(clip_text_config(tokenizer, 16))

    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # the CLIP-L/G states (16 + 16) padded to T5's width
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        scaling_factor=1.5,
        shift_factor=0.1,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip(),
        tokenizer=tokenizer,
        text_encoder_2=clip(),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny-sd3"
    tiny_sd3_pipeline().save_pretrained(str(path))
    return path


def flow_recipe(tmp_path, pipeline, **loop):
    recipe = loop_recipe(tmp_path, pipeline, num_steps=4, max_sequence_length=8, **loop)
    recipe["loop"].setdefault("sampling", {}).setdefault("noise_level", 0.7)
    return recipe


def assert_first_minibatches_recompute_the_stored_log_probs(algo, batch, count: int = 4) -> None:
    """Before any update: each of the first ``count`` minibatches' step log-prob equals the stored
    log-prob, and the loss's ratio is 1 (any flow family; under ``torch.no_grad``)."""
    for item in list(algo.minibatches(batch, 0))[:count]:
        _, idx, step = item
        logp = algo.adapter.step_distribution(
            algo.denoiser,
            {k: v[idx] for k, v in batch.cond.items()},
            algo._negative(len(idx)),
            batch.noise_schedule,
            batch.latents[idx, step],
            batch.latents[idx, step + 1],
            step,
        )[0]
        torch.testing.assert_close(logp, batch.log_probs[idx, step], rtol=0, atol=2e-5)
        _, stats = algo.loss(item)
        assert abs(float(stats["policy/ratio_max"]) - 1.0) < 1e-4 and float(stats["policy/approx_kl"]) < 1e-7


def _lora_and_base(model):
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    return lora, base


def test_flow_lora_runs_and_only_lora_moves(tmp_path, sd3_pipeline):
    engine = Engine(load_recipe(flow_recipe(tmp_path, sd3_pipeline)))
    transformer = engine.algo.denoiser
    lora, base = _lora_and_base(transformer)
    assert any("add_q_proj.lora_A" in n for n in lora) and any("to_q.lora_A" in n for n in lora)
    stats = engine.fit()
    engine.close()
    for key in ("reward/mean", "policy/approx_kl", "policy/ratio_max", "loss/policy"):
        assert key in stats and torch.isfinite(torch.tensor(stats[key])), key
    assert stats["progress/images"] == 2 * 4
    assert any(not torch.equal(p, lora[n]) for n, p in transformer.named_parameters() if "lora" in n)
    assert all(torch.equal(p, base[n]) for n, p in transformer.named_parameters() if "lora" not in n)
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint.find_latest(engine.run_dir) / "model.safetensors"))
    buffers = {f"transformer.{n}" for n, _ in transformer.named_buffers()}  # the positional table
    assert any("lora" in k for k in saved) and all(k in buffers or "lora" in k for k in saved)


@pytest.mark.parametrize("sampler", ["sde", "cps"])
def test_ratio_is_one_and_the_stored_log_prob_is_recomputed(tmp_path, sd3_pipeline, sampler):
    """fp32, guidance 2: the loss re-evaluates each stored step's log-prob exactly as sampled."""
    recipe = flow_recipe(tmp_path, sd3_pipeline, sampler=sampler, noise_level=0.5 if sampler == "cps" else 0.7)
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
        assert_first_minibatches_recompute_the_stored_log_probs(algo, batch)
    engine.close()
    if sampler == "cps":  # the default window leaves the last step (to σ = 0) to the ODE
        assert (batch.log_probs[:, -1] == 0).all() and (batch.log_probs[:, :-1] != 0).all()


def test_sde_window_trains_only_the_window_steps(tmp_path, sd3_pipeline):
    recipe = flow_recipe(tmp_path, sd3_pipeline, sde_window=[1, 3], timestep_fraction=0.5)
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    assert algo.micro_steps == 1 and algo.adapter.trained_steps.tolist() == [1, 2]
    trained = []
    loss = algo.loss

    def recording_loss(item):
        trained.extend(item.step.tolist())
        return loss(item)

    algo.loss = recording_loss
    batch = algo.collect()
    assert (batch.log_probs[:, [0, 3]] == 0).all() and (batch.log_probs[:, 1:3] != 0).all()
    stats = engine.fit()
    engine.close()
    assert trained and set(trained) <= {1, 2} and len(set(trained)) == 2
    assert torch.isfinite(torch.tensor(stats["loss/policy"]))


def test_eval_grid_and_exported_lora_load_in_stock_diffusers(tmp_path, sd3_pipeline):
    recipe = flow_recipe(tmp_path, sd3_pipeline, lora={"rank": 2, "alpha": 8.0}, clip_coef=10.0)
    recipe["optim"]["lr"] = 5e-2
    engine = Engine(load_recipe(recipe))
    engine.fit()
    engine.close()
    assert main(["eval", str(engine.run_dir), "--num-samples", "4"]) == 0
    result = json.loads((checkpoint.find_latest(engine.run_dir) / "eval.json").read_text())
    for key in ("eval/reward", "eval/base_reward", "eval/reward_ode", "eval/base_reward_ode"):
        assert key in result, key
    assert (checkpoint.find_latest(engine.run_dir) / "eval_base_vs_tuned.png").is_file()
    assert main(["export", str(engine.run_dir), str(tmp_path / "lora")]) == 0
    from diffusers import StableDiffusion3Pipeline

    stock = StableDiffusion3Pipeline.from_pretrained(str(sd3_pipeline), text_encoder_3=None, tokenizer_3=None)
    stock.load_lora_weights(str(tmp_path / "lora"))
    tuned = {n: p for n, p in engine.algo.denoiser.named_parameters() if "lora" in n}
    loaded = {n: p for n, p in stock.transformer.named_parameters() if "lora" in n}
    assert len(loaded) == len(tuned)
    for name, p in tuned.items():
        torch.testing.assert_close(loaded[name.replace(".default.", ".default_0.")], p.detach())


def test_flow_resume_after_sigkill_equals_uninterrupted(tmp_path, sd3_pipeline):
    from tests.crash import kill_resume_equals_uninterrupted

    iterations = 6

    def make(name):
        recipe = flow_recipe(tmp_path, sd3_pipeline, sde_window=[0, 3], timestep_fraction=0.67, advantage="group_norm")
        recipe["run"].update(name=name, iterations=iterations, save_every=1, keep_last=2)
        return recipe

    weights = kill_resume_equals_uninterrupted(tmp_path, make, iterations)
    assert any("lora" in k for k in weights) and all("lora" in k or "pos_embed" in k for k in weights)


@pytest.mark.parametrize(
    "flow,loop,message",
    [
        (True, {"eta": 1.0}, "loop.sampling.eta: not an option of StableDiffusion3Pipeline"),
        (False, {"sampler": "sde"}, "loop.sampling.sampler: not an option of StableDiffusionPipeline"),
        (False, {"sde_window": [0, 2]}, "loop.sampling.sde_window: not an option of StableDiffusionPipeline"),
        (True, {"noise_level": 0.0}, "loop.sampling.noise_level: must be > 0 (got 0.0)"),
        (True, {"sampler": "cps", "noise_level": 1.5}, "loop.sampling.noise_level: must be in (0, 1] for sampler"),
        (True, {"sde_window": [2, 9]}, "loop.sampling.sde_window: must be steps [start, end) with 0 <= start < end"),
        (True, {"sampler": "cps", "sde_window": [0, 4]}, "loop.sampling.sde_window: sampler cps cannot sample the"),
    ],
)
def test_bad_flow_options_are_one_line(tmp_path, sd3_pipeline, capsys, flow, loop, message):
    if flow:
        recipe = flow_recipe(tmp_path, sd3_pipeline, **loop)
    else:
        from tests.toy_pipelines import untrained_sd_pipeline as untrained_pipeline

        sd = tmp_path / "tiny-sd"
        untrained_pipeline(seed=0).save_pretrained(str(sd))
        recipe = loop_recipe(tmp_path, sd, **loop)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe error: " + message), err


@pytest.mark.parametrize(
    "case,message",
    [
        ("pos_embed", "loop.resolution: 72 px is a latent of 18 patches a side, above the transformer's position "),
        ("factor", "loop.resolution: 18 px is not a multiple of 4 (the VAE's factor 2 × patch size 2)"),
        ("memory", "loop.resolution: one sampling batch (1000000000 samples at 16 tokens) needs about "),
        ("missing", "loop.pipeline: no pipeline folder at "),
        ("not_a_pipeline", "loop.pipeline: "),
        ("prompts_not_utf8", "loop.prompts: "),
    ],
)
def test_edges_a_new_user_hits_are_one_line(tmp_path, sd3_pipeline, capsys, case, message):  # noqa: F811
    """Each a one-line recipe error, exit 2, before any weights load where the recipe and the model's
    config files show it (the memory estimate needs the loaded config, and refuses before sampling)."""
    recipe = flow_recipe(tmp_path, sd3_pipeline)
    if case == "pos_embed":
        recipe["loop"]["resolution"] = 72  # 36 latent pixels, 18 patches > pos_embed_max_size 16
    elif case == "factor":
        recipe["loop"]["resolution"] = 18
    elif case == "memory":
        recipe["loop"].update(sample_batch_size=10**9, guidance_scale=2.0)
    elif case == "missing":
        recipe["loop"]["pipeline"] = str(tmp_path / "models" / "sd3-typo")
        message += str(tmp_path / "models" / "sd3-typo")
    elif case == "not_a_pipeline":
        recipe["loop"]["pipeline"] = str(sd3_pipeline / "transformer")
        message += f"{sd3_pipeline / 'transformer'} is a folder but not a diffusers pipeline (no model_index.json)"
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_bytes("a red seven\n".encode("utf-16"))
        recipe["loop"]["prompts"] = str(prompts)
        message += f"{prompts} is not UTF-8 text"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe error: " + message), err
    assert not (tmp_path / "l").exists() or case == "memory"  # nothing made before the checks
