"""LOOP on a tiny random-weight FluxPipeline (packed latents, guidance embedding, flow-matching
SDE / CPS policy): LoRA-only updates, ratio 1 before the first update, the schedule, velocity,
steps and decoding of stock diffusers, the exported LoRA in stock diffusers, one-line option errors."""

import json

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rlprox import checkpoint  # noqa: E402
from rlprox.cli import main  # noqa: E402
from rlprox.engine import Engine  # noqa: E402
from rlprox.models import flow_match  # noqa: E402
from rlprox.models.pipelines import FluxAdapter, Sampling, adapter_for_class  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402
from tests.test_loop_flow import (  # noqa: E402
    _lora_and_base,
    assert_first_minibatches_recompute_the_stored_log_probs,
    flow_recipe,
)

IMAGE = 16  # pixels: 8×8×4 latents, 4×4 = 16 packed tokens of 16 channels
STEPS = 4  # flow_recipe's num_steps
PROMPTS = ["a red seven", "a blue two"]


def tiny_flux_pipeline(seed: int = 0):
    """A real FluxPipeline with random weights: a 2-layer CLIP text encoder (pooled, width 16)
    over the digits vocabulary, a 1-layer T5 (width 32), a FLUX transformer with one double and
    one single block and a guidance embedding, a 16×16 AutoencoderKL with a shift factor, and
    FLUX.1's dynamically shifted scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from rlprox.zoo.sd import build_tokenizer, clip_text_config
    from rlprox.zoo.sd3 import build_t5_tokenizer, t5_text_config

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × a 2×2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width
        pooled_projection_dim=16,  # CLIP's width
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),  # sums to the head dim
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=IMAGE,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        scaling_factor=1.5,
        shift_factor=0.1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=CLIPTextModel(clip_text_config(tokenizer, 16)),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5_text_config(tokenizer_2, 32)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


@pytest.fixture(scope="module")
def flux_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny-flux"
    tiny_flux_pipeline().save_pretrained(str(path))
    return path


def flux_recipe(tmp_path, pipeline, **loop):
    return flow_recipe(tmp_path, pipeline, guidance_scale=1.0, **loop)


def stock_pipeline(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_ode(pipe, x_T: torch.Tensor, guidance: float):
    """FluxPipeline's own sampling from packed x_T (B, N, 16): (final latents, images (B, 3, H, W))."""
    final = {}

    def keep(pipe, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    images = pipe(
        prompt=PROMPTS,
        latents=x_T,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        height=IMAGE,
        width=IMAGE,
        max_sequence_length=8,
        output_type="pt",
        callback_on_step_end=keep,
    ).images
    return final["latents"], images


def test_flux_lora_runs_and_only_lora_moves(tmp_path, flux_pipeline):
    engine = Engine(load_recipe(flux_recipe(tmp_path, flux_pipeline)))
    assert isinstance(engine.algo.pipeline, FluxAdapter) and engine.algo.pipeline.negative(2, "cpu") is None
    transformer = engine.algo.denoiser
    lora, base = _lora_and_base(transformer)
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj"):
        assert f"{name}.lora_A.default.weight" in lora, name
    assert "single_transformer_blocks.0.attn.to_v.lora_A.default.weight" in lora
    stats = engine.fit()
    engine.close()
    for key in ("reward/mean", "policy/approx_kl", "policy/ratio_max", "loss/policy"):
        assert key in stats and torch.isfinite(torch.tensor(stats[key])), key
    assert stats["progress/images"] == 2 * 4
    assert any(not torch.equal(p, lora[n]) for n, p in transformer.named_parameters() if "lora" in n)
    assert all(torch.equal(p, base[n]) for n, p in transformer.named_parameters() if "lora" not in n)
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint.find_latest(engine.run_dir) / "model.safetensors"))
    assert any("lora" in k for k in saved) and all("lora" in k for k in saved)


@pytest.mark.parametrize("sampler", ["sde", "cps"])
def test_flux_ratio_is_one_and_the_stored_log_prob_is_recomputed(tmp_path, flux_pipeline, sampler):
    """fp32: the loss re-evaluates each stored step's log-prob exactly as sampled."""
    recipe = flux_recipe(tmp_path, flux_pipeline, sampler=sampler, noise_level=0.5 if sampler == "cps" else 0.7)
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
        assert batch["latents"].shape == (4, STEPS + 1, 16, 16)  # (B, T+1, N tokens, 4·C)
        assert batch["cond"]["embeds"].shape == (4, 8, 32) and batch["cond"]["pooled"].shape == (4, 16)
        assert_first_minibatches_recompute_the_stored_log_probs(algo, batch)
    engine.close()


def test_flux_schedule_velocity_steps_and_decode_match_stock_diffusers(flux_pipeline):
    """The σ's FluxPipeline sets, its Euler steps on packed latents (our SDE at a tiny noise level
    and our ODE), its guidance embedding and its decoding, all from the same x_T."""
    guidance = 2.5
    sampling = Sampling(STEPS, 1.0, noise_level=1e-6, sde_window=(0, STEPS), max_sequence_length=8)
    sampling.guidance_embedding = guidance
    adapter = FluxAdapter.load(flux_pipeline, sampling)
    assert adapter_for_class("FluxPipeline") is FluxAdapter
    stock = stock_pipeline(flux_pipeline)
    x_T = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    latents, images = stock_ode(stock, x_T, guidance)
    torch.testing.assert_close(adapter.sigmas, stock.scheduler.sigmas.float(), rtol=0, atol=0)
    model, cond = adapter.denoiser, adapter.encode(PROMPTS, "cpu")
    noise = torch.cat([x_T[:, None], torch.randn(2, STEPS, 16, 16)], 1)  # (B, T+1, N, 4·C)
    assert adapter.noise_shape() == noise.shape[1:]
    sde = adapter.sample_with_noise(model, cond, None, noise, deterministic=False)
    ode = adapter.sample_with_noise(model, cond, None, noise, deterministic=True)
    torch.testing.assert_close(ode, latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(sde, latents, rtol=0, atol=1e-4)
    # one step: the SDE's mean at a tiny noise level is the scheduler's Euler step
    # (a fresh copy of the FLUX scheduler set to the pipeline's σ's: unshifted, as they are shifted already)
    scheduler = type(stock.scheduler).from_config(stock.scheduler.config, use_dynamic_shifting=False, shift=1.0)
    scheduler.set_timesteps(sigmas=stock.scheduler.sigmas[:-1].numpy())
    torch.testing.assert_close(scheduler.sigmas, stock.scheduler.sigmas, rtol=0, atol=0)
    sigma = adapter.sigmas[:1].expand(2)
    v = adapter._velocity(model, cond, None)(x_T, sigma)
    euler = scheduler.step(v, scheduler.timesteps[0], x_T, return_dict=False)[0]
    x_1, _ = flow_match.sde_step_with_logprob(v, x_T, sigma, adapter.sigmas[1], 1e-6)
    torch.testing.assert_close(x_1, euler, rtol=0, atol=1e-5)
    # the guidance value reaches the transformer
    adapter.sampling.guidance_embedding = 3.5
    v_other = adapter._velocity(model, cond, None)(x_T, sigma)
    assert (v_other - v).abs().max() > 1e-3
    # decoding: unpacked, unscaled and shifted as the pipeline does
    torch.testing.assert_close(adapter.decode(latents), images.float(), rtol=0, atol=1e-5)


def test_flux_eval_and_exported_lora_reproduce_the_tuned_samples_in_stock_diffusers(tmp_path, flux_pipeline):
    recipe = flux_recipe(tmp_path, flux_pipeline, lora={"rank": 2, "alpha": 8.0}, clip_coef=10.0)
    recipe["optim"]["lr"] = 5e-2
    engine = Engine(load_recipe(recipe))
    engine.fit()
    engine.close()
    assert main(["eval", str(engine.run_dir), "--num-samples", "2"]) == 0
    result = json.loads((checkpoint.find_latest(engine.run_dir) / "eval.json").read_text())
    for key in ("eval/reward", "eval/base_reward", "eval/reward_ode", "eval/base_reward_ode"):
        assert key in result, key
    assert main(["export", str(engine.run_dir), str(tmp_path / "lora")]) == 0
    stock = stock_pipeline(flux_pipeline)
    stock.load_lora_weights(str(tmp_path / "lora"))
    algo = engine.algo
    x_T = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = x_T[:, None].expand(2, STEPS + 1, 16, 16)
    cond = algo.pipeline.encode(PROMPTS, "cpu")
    with torch.no_grad():
        tuned = algo.pipeline.sample_with_noise(algo.denoiser, cond, None, noise, deterministic=True)
        with algo._base_model() as base_model:
            base = algo.pipeline.sample_with_noise(base_model, cond, None, noise, deterministic=True)
    latents, _ = stock_ode(stock, x_T, 3.5)
    assert (tuned - base).abs().max() > 1e-2  # the LoRA changed the samples
    torch.testing.assert_close(latents, tuned, rtol=0, atol=1e-5)


def test_flux_full_fine_tuning_evaluates_the_base_and_exports_a_stock_pipeline(tmp_path, flux_pipeline):
    recipe = flux_recipe(tmp_path, flux_pipeline, finetune="full")
    recipe["run"]["iterations"] = 1
    engine = Engine(load_recipe(recipe))
    engine.fit()
    engine.close()
    assert main(["eval", str(engine.run_dir), "--num-samples", "2"]) == 0  # the base transformer from the folder
    result = json.loads((checkpoint.find_latest(engine.run_dir) / "eval.json").read_text())
    assert "eval/base_reward_ode" in result
    assert main(["export", str(engine.run_dir), str(tmp_path / "full")]) == 0
    exported = stock_pipeline(tmp_path / "full").transformer.state_dict()
    tuned = engine.algo.denoiser.state_dict()
    assert exported.keys() == tuned.keys() and all(torch.equal(exported[k], tuned[k]) for k in tuned)
    base = stock_pipeline(flux_pipeline).transformer.state_dict()
    assert any(not torch.equal(base[k], tuned[k]) for k in tuned)


@pytest.mark.parametrize(
    "family,loop,message",
    [
        ("FluxPipeline", {"guidance_scale": 2.0}, "loop.guidance_scale: FLUX uses a guidance embedding"),
        ("StableDiffusion3Pipeline", {"guidance_embedding": 3.5}, "loop.guidance_embedding: a FLUX option, but"),
        ("StableDiffusionPipeline", {"guidance_embedding": 3.5}, "loop.guidance_embedding: a FLUX option, but"),
    ],
)
def test_flux_guidance_options_are_one_line(tmp_path, capsys, family, loop, message):
    """Refused at validation, from the folder's model_index.json alone (before anything loads)."""
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": family}))
    recipe = flow_recipe(tmp_path, folder, **{"guidance_scale": 1.0, **loop})
    if family == "StableDiffusionPipeline":
        recipe["loop"].pop("noise_level")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe error: " + message), err


def test_flux_folder_missing_a_component_is_one_line(tmp_path, flux_pipeline, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(flux_pipeline, broken)
    shutil.rmtree(broken / "transformer")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(flux_recipe(tmp_path, broken)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe error: loop.pipeline: cannot load a diffusers pipeline"), err


def test_flux_resolution_and_a_bf16_lora_base(tmp_path, flux_pipeline):
    """loop.resolution sets the packed token count; under run.frozen_dtype bfloat16 the base is bf16,
    the adapters fp32, and only they move."""
    recipe = flux_recipe(tmp_path, flux_pipeline, resolution=8)
    recipe["run"].update(frozen_dtype="bfloat16", mixed_precision="bf16")
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    scale = algo.pipeline.pipe.vae_scale_factor
    assert algo.pipeline.image_size == 8 and algo.pipeline.latent_shape[0] == (8 // scale // 2) ** 2
    assert all((p.dtype == torch.float32) == ("lora_" in n) for n, p in algo.denoiser.named_parameters())
    before = {n: p.detach().clone() for n, p in algo.denoiser.named_parameters()}
    engine.fit()
    engine.close()
    moved = {n for n, p in algo.denoiser.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert algo.pipeline.decode(torch.zeros(1, *algo.pipeline.latent_shape)).shape[-2:] == (8, 8)


def test_a_guidance_value_for_a_transformer_without_the_embedding_is_one_line(tmp_path, flux_pipeline, capsys):
    """FLUX.1-schnell style: guidance_embeds false; a recipe that sets loop.guidance_embedding is refused."""
    import shutil

    schnell = tmp_path / "schnell"
    shutil.copytree(flux_pipeline, schnell)
    config = schnell / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": False}))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(flux_recipe(tmp_path, schnell, guidance_embedding=3.5)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"recipe error: loop.guidance_embedding: the transformer of {str(schnell)!r} has no guidance embedding "
        "(FLUX.1-schnell): leave it unset"
    ], err
