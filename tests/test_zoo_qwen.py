"""digits-qwen: a micro build in a temporary cache loads with a plain ``QwenImagePipeline.from_pretrained``
and generates offline; its tokenizer keeps every prompt word after the pipeline's template prefix; the
full build's quality is the zoo table's."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlprox.zoo import build as zoo_build

torch.set_num_threads(1)

MICRO = dict(vae_steps=40, qwen_steps=40, batch_size=32, progress=False)  # micro: 2 steps each


@pytest.fixture(scope="module")
def micro_qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlprox_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLPROX_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield zoo_build.build("digits-qwen", micro=True, **MICRO)


def test_plain_from_pretrained_loads_and_generates_offline(micro_qwen):
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
        pipe = QwenImagePipeline.from_pretrained({str(micro_qwen)!r})
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler, type(pipe.scheduler)
        assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
        assert type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
        gen = torch.Generator().manual_seed(0)
        out = pipe(["a red seven", "the blue digit two"], negative_prompt=" ", true_cfg_scale=1.5, height=16,
                   width=16, num_inference_steps=2, generator=gen, output_type="pt").images
        assert out.shape == (2, 3, 16, 16), out.shape
        assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
        template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
        assert len(pipe.tokenizer(template.split("{{}}")[0]).input_ids) == drop
        print("OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OK" in res.stdout


def test_build_info_and_grid_written(micro_qwen):
    info = zoo_build.build_info(micro_qwen)
    assert info["name"] == "digits-qwen" and info["options"]["micro"] is True
    assert info["options"]["qwen_steps"] == 40 and info["build_seconds"] > 0
    for key in ("vae_heldout_mse", "flow_loss_train_last", "flow_loss_heldout"):
        assert math.isfinite(info[key]) and info[key] > 0, key
    assert (micro_qwen / "samples.png").stat().st_size > 0
    assert micro_qwen.name == "digits-qwen-seed0-micro"
    assert zoo_build.PIPELINE_CLASSES["digits-qwen"] == "QwenImagePipeline"


def test_the_vae_normalisation_gives_unit_scale_latents(micro_qwen):
    """latents_mean / latents_std are the training latents' moments: normalised latents have mean 0, std 1."""
    from rlprox.zoo.data import load_digits_world
    from rlprox.zoo.qwen import load_qwen_pipeline, normalized_latents

    pipe = load_qwen_pipeline(micro_qwen)
    latents = normalized_latents(pipe.vae, load_digits_world("train").images[:2000])
    assert latents.shape == (2000, 16, 16)  # 4×4 tokens of a 2×2 patch × 4 channels
    per_channel = latents.view(2000, 16, 4, 4).transpose(2, 3).reshape(-1, 4)  # each token: (channel, 2×2 position)
    assert per_channel.mean(0).abs().max() < 0.15 and (per_channel.std(0) - 1).abs().max() < 0.15


def test_two_training_steps_move_the_transformer_only():
    from rlprox.zoo.data import load_digits_world
    from rlprox.zoo.qwen import build_components, build_pipeline, normalized_latents, train_transformer

    parts = build_components(seed=0, num_layers=1)
    pipe = build_pipeline(parts)
    text = {n: p.clone() for n, p in pipe.text_encoder.named_parameters()}
    before = pipe.transformer.proj_out.weight.clone()
    train = load_digits_world("train")
    latents = normalized_latents(pipe.vae, train.images[:64])
    ema, loss = train_transformer(pipe, latents, train.prompts[:64], 2, 8, torch.Generator().manual_seed(0), False)
    assert math.isfinite(loss) and not torch.equal(pipe.transformer.proj_out.weight, before)
    assert all(torch.equal(p, text[n]) for n, p in pipe.text_encoder.named_parameters())
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
