"""LOOP on a tiny random-weight WanPipeline (text to video: latents with a time axis, UMT5, the
flow-matching SDE / CPS policy): the adapter's ODE equals stock ``WanPipeline(...)``, LoRA-only
updates with a video reward, ratio 1 before the first update, the exported LoRA in stock
diffusers, exact resume after SIGKILL, and one-line errors for a bad frame count."""

import importlib.util
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rlprox.engine import Engine  # noqa: E402
from rlprox.models.pipelines import Sampling, adapter_for_class  # noqa: E402
from rlprox.models.pipelines.wan import WanAdapter, WanOptions  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402
from tests.test_loop_flow import (  # noqa: E402
    _lora_and_base,
    assert_first_minibatches_recompute_the_stored_log_probs,
    flow_recipe,
)

SIDE = 16  # pixels: 4×4 latents (the VAE's factor 4), 2×2 patches
FRAMES = 5  # 2 latent frames (temporal factor 4)
STEPS = 4  # flow_recipe's num_steps
LATENT = (4, 2, 4, 4)  # (C, F', H', W')
PROMPTS = ["a red seven moving left", "a blue two moving up"]


def tiny_wan_pipeline(seed: int = 0):
    """A real WanPipeline with random weights: digits-wan's components at their smallest (a 1-layer
    transformer of 2 heads × 12, a VAE of width 4 with 4 latent channels), latents_mean/std not 0/1."""
    from diffusers import WanPipeline

    from rlprox.zoo.wan import build_components

    parts = build_components(seed, z_dim=4, vae_dim=4, heads=2, head_dim=12, layers=1)
    parts["vae"].register_to_config(latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0])
    return WanPipeline(**parts)


@pytest.fixture(scope="module")
def wan_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny-wan"
    tiny_wan_pipeline().save_pretrained(str(path))
    return path


def wan_recipe(tmp_path, pipeline, **loop):
    recipe = flow_recipe(tmp_path, pipeline, resolution=SIDE, **loop)
    recipe["loop"]["sampling"]["frames"] = FRAMES
    recipe["loop"]["prompts"] = "digits-motion-train"
    recipe["reward"] = {"name": "brightness", "frames": "mean"}
    return recipe


def stock_pipeline(path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_ode(pipe, x_T: torch.Tensor, guidance: float, negative_prompt: str = ""):
    """WanPipeline's own sampling from x_T (B, C, F', H', W'): (final latents, videos (B, F, 3, H, W))."""
    final = {}

    def keep(pipe, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    videos = pipe(
        prompt=PROMPTS,
        negative_prompt=[negative_prompt] * len(PROMPTS),
        latents=x_T,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        height=SIDE,
        width=SIDE,
        num_frames=FRAMES,
        max_sequence_length=8,
        output_type="pt",
        callback_on_step_end=keep,
    ).frames
    return final["latents"], videos


def test_wan_ode_and_decode_equal_stock_wan_pipeline(wan_pipeline):
    """The σ's the pipeline sets, its Euler steps with classifier-free guidance and a negative prompt
    (our ODE, and our SDE at a tiny noise level) and its decoding to (B, F, 3, H, W), from the same x_T."""
    guidance = 3.0
    sampling = Sampling(STEPS, guidance, resolution=SIDE, max_sequence_length=8)
    options = WanOptions(noise_level=1e-6, sde_window=[0, STEPS], frames=FRAMES, negative_prompt="a digit")
    adapter = WanAdapter.load(wan_pipeline, sampling, options)
    assert adapter_for_class("WanPipeline") is WanAdapter and adapter.media == "video"
    assert adapter.latent_shape == LATENT and adapter.noise_shape() == (STEPS + 1, *LATENT)
    stock = stock_pipeline(wan_pipeline)
    x_T = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0))
    latents, videos = stock_ode(stock, x_T, guidance, negative_prompt="a digit")
    torch.testing.assert_close(adapter.sigmas, stock.scheduler.sigmas.float(), rtol=0, atol=0)
    model, cond = adapter.denoiser, adapter.encode(PROMPTS, "cpu")
    negative = adapter.negative(2, "cpu")
    noise = torch.cat([x_T[:, None], torch.randn(2, STEPS, *LATENT)], 1)
    ode = adapter.sample_with_noise(model, cond, negative, noise, deterministic=True)
    sde = adapter.sample_with_noise(model, cond, negative, noise, deterministic=False)
    torch.testing.assert_close(ode, latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(sde, latents, rtol=0, atol=1e-4)
    decoded = adapter.decode(latents)
    assert decoded.shape == (2, FRAMES, 3, SIDE, SIDE)
    torch.testing.assert_close(decoded, videos.float(), rtol=0, atol=1e-5)
    # the negative prompt reaches the guidance
    adapter._negative = None
    adapter.options.negative_prompt = ""
    assert (adapter.sample_with_noise(model, cond, adapter.negative(2, "cpu"), noise, True) - ode).abs().max() > 1e-4


def test_wan_lora_trains_with_a_video_reward_and_recomputes_the_stored_log_probs(tmp_path, wan_pipeline):
    recipe = wan_recipe(tmp_path, wan_pipeline, lora={"rank": 2, "alpha": 8.0})
    recipe["reward"] = [{"name": "temporal_consistency"}, {"name": "brightness", "frames": "min", "weight": 0.5}]
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    transformer = algo.denoiser
    lora, base = _lora_and_base(transformer)
    assert any("attn1.to_q.lora_A" in n for n in lora) and any("attn2.to_k.lora_A" in n for n in lora)
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
        assert batch.latents.shape == (4, STEPS + 1, *LATENT)
        assert_first_minibatches_recompute_the_stored_log_probs(algo, batch)
    stats = engine.fit()
    engine.close()
    for key in ("reward/mean", "policy/approx_kl", "loss/policy"):
        assert key in stats and torch.isfinite(torch.tensor(stats[key])), key
    assert any(not torch.equal(p, lora[n]) for n, p in transformer.named_parameters() if "lora" in n)
    assert all(torch.equal(p, base[n]) for n, p in transformer.named_parameters() if "lora" not in n)


@pytest.mark.parametrize("objective", ["ppo", "nft"])
def test_wan_kl_to_the_reference_ema_and_nft_run_with_gradient_checkpointing(tmp_path, wan_pipeline, objective):
    recipe = wan_recipe(
        tmp_path, wan_pipeline, objective=objective, ema_decay=0.9, gradient_checkpointing=True, advantage="group_norm"
    )
    recipe["regularizers"] = [{"type": "kl_ref", "lam": 0.5}]
    if objective == "nft":
        recipe["loop"]["guidance_scale"] = 1.0
    engine = Engine(load_recipe(recipe))
    stats = engine.fit()
    engine.close()
    for key in ("loss/policy", "penalty/0.kl_ref", "reward/mean"):
        assert key in stats and torch.isfinite(torch.tensor(stats[key])), key
    assert engine.algo.ema is not None and engine.algo.denoiser.is_gradient_checkpointing


def test_wan_exported_lora_loads_in_stock_wan_pipeline(tmp_path, wan_pipeline):
    from rlprox.cli import main

    recipe = wan_recipe(tmp_path, wan_pipeline, lora={"rank": 2, "alpha": 8.0}, clip_coef=10.0, guidance_scale=1.0)
    recipe["optim"]["lr"] = 5e-2
    recipe["run"]["iterations"] = 1
    engine = Engine(load_recipe(recipe))
    engine.fit()
    engine.close()
    assert main(["export", str(engine.run_dir), str(tmp_path / "lora")]) == 0
    stock = stock_pipeline(wan_pipeline)
    stock.load_lora_weights(str(tmp_path / "lora"))
    algo = engine.algo
    x_T = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))
    noise = x_T[:, None].expand(2, STEPS + 1, *LATENT)
    cond = algo.adapter.encode(PROMPTS, "cpu")
    with torch.no_grad():
        tuned = algo.adapter.sample_with_noise(algo.denoiser, cond, None, noise, deterministic=True)
        with algo._base_model() as base_model:
            base = algo.adapter.sample_with_noise(base_model, cond, None, noise, deterministic=True)
    latents, _ = stock_ode(stock, x_T, 1.0)
    assert (tuned - base).abs().max() > 1e-3  # the LoRA changed the samples
    torch.testing.assert_close(latents, tuned, rtol=0, atol=1e-5)


def test_wan_eval_writes_an_animated_grid_and_a_still_strip_and_tensorboard_gets_them(tmp_path, wan_pipeline):
    import json

    from PIL import Image

    from rlprox import checkpoint
    from rlprox.cli import main

    recipe = wan_recipe(tmp_path, wan_pipeline)
    recipe["run"].update(iterations=1, eval_size=2, log_with=["tensorboard"])
    engine = Engine(load_recipe(recipe))
    engine.fit()
    engine.close()
    samples = sorted(p.name for p in (engine.run_dir / "samples").iterdir())
    assert any(n.endswith(".gif") for n in samples) and any(n.endswith(".png") for n in samples), samples
    assert list(engine.run_dir.rglob("events.out.tfevents.*"))
    assert main(["eval", str(engine.run_dir), "--num-samples", "2"]) == 0
    out = checkpoint.find_latest(engine.run_dir)
    result = json.loads((out / "eval.json").read_text())
    png = Path(result["images"][0])
    gif = png.with_suffix(".gif")
    assert "eval/reward_ode" in result and png.is_file() and gif.is_file()
    with Image.open(gif) as animation:
        assert animation.n_frames == FRAMES
        frame_size = animation.size
    with Image.open(png) as still:  # five frames side by side in each cell
        assert still.size[0] > 4 * frame_size[0] and still.size[1] == frame_size[1]
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        assert png.with_suffix(".mp4").is_file()


@pytest.mark.slow  # ~30-50 s on 2 cores: .ci/run runs it after make test
def test_wan_resume_after_sigkill_equals_uninterrupted(tmp_path, wan_pipeline):
    from tests.crash import kill_resume_equals_uninterrupted

    iterations = 5

    def make(name):
        recipe = wan_recipe(tmp_path, wan_pipeline, sde_window=[0, 2], advantage="group_norm")
        recipe["run"].update(name=name, iterations=iterations, save_every=1, keep_last=2)
        return recipe

    weights = kill_resume_equals_uninterrupted(tmp_path, make, iterations)
    assert any("lora" in k for k in weights)


@pytest.mark.parametrize(
    "sampling,message",
    [
        (
            {"frames": 6},
            "loop.sampling.frames: 6 frames: (frames − 1) must be divisible by the VAE's temporal factor 4",
        ),
        ({"frames": 0}, "loop.sampling.frames: must be >= 1 (got 0)"),
        ({"height": 24}, "loop.sampling.height: sets the clip's size and loop.resolution 16 does too"),
        ({"eta": 1.0}, "loop.sampling.eta: not an option of WanPipeline"),
    ],
)
def test_wan_bad_options_are_one_line(tmp_path, wan_pipeline, capsys, sampling, message):
    import yaml

    from rlprox.cli import main

    recipe = wan_recipe(tmp_path, wan_pipeline)
    recipe["loop"]["sampling"].update(sampling)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_an_image_reward_without_frames_on_wan_is_one_line(tmp_path, wan_pipeline, capsys):
    import yaml

    from rlprox.cli import main

    recipe = wan_recipe(tmp_path, wan_pipeline)
    recipe["reward"] = "brightness"
    recipe["run"]["iterations"] = 1
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2  # a recipe error: found before the pipeline is loaded or sampled
    err = capsys.readouterr().err.strip()
    assert "reward.frames: reward 'brightness' scores images and this model makes videos" in err, err
    assert "\n" not in err and not (tmp_path / "l").exists(), err  # no run folder: nothing sampled
