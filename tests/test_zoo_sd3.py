"""digits-sd3: a micro build in a temporary cache loads with a plain
``StableDiffusion3Pipeline.from_pretrained`` and generates; the training-time shortcut for the
pipeline's zero T5 tokens matches the stock pipeline; the full build's quality is the ``slow`` test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlprox.zoo import build as zoo_build
from rlprox.zoo.data import COLOUR_NAMES, DIGIT_WORDS, load_digits_world, prompt_for

torch.set_num_threads(1)

MICRO = dict(vae_steps=40, sd3_steps=40, batch_size=32, progress=False)  # micro: 2 steps each
ALL_PROMPTS = [prompt_for(d, c) for d in range(len(DIGIT_WORDS)) for c in range(len(COLOUR_NAMES))]


@pytest.fixture(scope="module")
def micro_sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlprox_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLPROX_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield zoo_build.build("digits-sd3", micro=True, **MICRO)


def test_plain_from_pretrained_loads_and_generates_offline(micro_sd3):
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
        pipe = StableDiffusion3Pipeline.from_pretrained({str(micro_sd3)!r})
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler, type(pipe.scheduler)
        assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
        out = pipe(["a red seven", "a blue two"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
        assert out.shape == (2, 3, 16, 16), out.shape
        assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
        print("OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OK" in res.stdout


def test_tokenizers_encode_the_digits_prompts(micro_sd3):
    from rlprox.zoo.sd3 import load_sd3_pipeline

    pipe = load_sd3_pipeline(micro_sd3)
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        ids = tok(ALL_PROMPTS).input_ids
        assert all(len(row) == 5 for row in ids)  # <sot> a colour digit <eot>: one token per word
    t5 = pipe.tokenizer_3
    ids = t5(ALL_PROMPTS, padding="max_length", max_length=8, truncation=True).input_ids
    assert t5.unk_token_id not in {i for row in ids for i in row}
    assert ids[0] == [*t5.convert_tokens_to_ids(["a", "red", "zero"]), t5.eos_token_id] + [t5.pad_token_id] * 4
    assert t5("A RED Zero").input_ids == t5("a red zero").input_ids
    assert len({tuple(row) for row in ids}) == len(ALL_PROMPTS)


def test_build_info_and_grid_written(micro_sd3):
    info = zoo_build.build_info(micro_sd3)
    assert info["name"] == "digits-sd3" and info["options"]["micro"] is True
    assert info["options"]["sd3_steps"] == 40 and info["build_seconds"] > 0
    for key in ("vae_heldout_mse", "flow_loss_train_last", "flow_loss_heldout"):
        assert math.isfinite(info[key]) and info[key] > 0, key
    assert (micro_sd3 / "samples.png").stat().st_size > 0
    assert micro_sd3.name == "digits-sd3-seed0-micro"


@pytest.mark.parametrize("t5_tokens", [256, 8])
def test_one_biased_null_token_equals_the_pipelines_zero_t5_tokens(t5_tokens):
    """Training folds the pipeline's n all-zero T5 tokens into one with log n on its logit: exact."""
    from rlprox.zoo.sd3 import _clip_ids, clip_conditioning, velocity
    from tests.toy_pipelines import untrained_sd3_pipeline as untrained_pipeline

    pipe = untrained_pipeline(seed=1)
    prompts = ["a red seven", "a Blue two", ""]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=t5_tokens
    )
    assert embeds.shape == (3, 8 + t5_tokens, 128) and torch.all(embeds[:, 8:] == 0)  # T5 as if dropped
    context, pool = clip_conditioning([pipe.text_encoder, pipe.text_encoder_2], _clip_ids(pipe.tokenizer, prompts))
    torch.testing.assert_close(context, embeds[:, :8])
    torch.testing.assert_close(pool, pooled)
    z, sigma = torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        stock = pipe.transformer(z, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=1000 * sigma)
        folded = velocity(pipe.transformer, z, sigma, context, pool, math.log(t5_tokens))
    torch.testing.assert_close(folded, stock.sample, atol=1e-5, rtol=1e-4)
    assert type(next(iter(pipe.transformer.attn_processors.values()))).__name__ == "JointAttnProcessor2_0"


def test_rectified_flow_pair_by_hand():
    from rlprox.zoo.sd3 import rectified_flow_loss, rectified_flow_pair

    z0, noise = torch.full((2, 1, 1, 1), 1.0), torch.full((2, 1, 1, 1), 3.0)
    z_sigma, v = rectified_flow_pair(z0, noise, torch.tensor([0.25, 1.0]))
    assert z_sigma.flatten().tolist() == [1.5, 3.0]  # 0.75·1 + 0.25·3; σ = 1 is pure noise
    assert v.flatten().tolist() == [2.0, 2.0]  # ε − z₀
    assert (z_sigma[1] - 1.0 * v[1]).item() == 1.0  # one Euler step σ 1 -> 0 with the true v lands on z₀
    loss, stats = rectified_flow_loss(torch.zeros(2, 1, 1, 1), v)
    assert loss.item() == 4.0 and stats == {"loss/flow": 4.0}


def test_two_training_steps_move_the_weights():
    from rlprox.zoo.sd3 import build_components, train_transformer

    parts = build_components(seed=0)
    before = parts["transformer"].proj_out.weight.clone()
    latents = torch.randn(16, 4, 8, 8)
    transformer, encoders, loss = train_transformer(
        parts["transformer"],
        [parts["text_encoder"], parts["text_encoder_2"]],
        parts["tokenizer"],
        latents,
        ALL_PROMPTS[:16],
        steps=2,
        batch_size=8,
        gen=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert math.isfinite(loss) and len(encoders) == 2
    assert not torch.equal(transformer.proj_out.weight, before)


# ----------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_full_build_quality(tmp_path, monkeypatch):
    """The full build (≈5 CPU-min; + the classifier's 35 s) through the pipeline's own call (20 Euler steps,
    256 zero T5 tokens) at the recommended guidance. Seed 0 measured alignment 0.97, digit accuracy 0.98,
    colour accuracy 1.0 at N = 500; the bars leave a margin, and a transformer that ignores the prompt
    (alignment ≈ 0.02) or a broken VAE cannot pass them."""
    from rlprox.zoo.classifier import DigitsClassifier
    from rlprox.zoo.metrics import conditional_accuracy
    from rlprox.zoo.sd import sample_sd
    from rlprox.zoo.sd3 import RECOMMENDED_GUIDANCE, load_sd3_pipeline

    monkeypatch.setenv("RLPROX_CACHE", os.environ.get("RLPROX_TEST_CACHE", str(tmp_path)))
    path = zoo_build.resolve("digits-sd3", progress=False)
    info = zoo_build.build_info(path)
    assert info["vae_heldout_mse"] < 0.003 and info["flow_loss_heldout"] < 0.25
    clf = DigitsClassifier.from_pretrained(zoo_build.resolve("digits-classifier", progress=False))
    held = load_digits_world("heldout")
    pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[:200]
    images = sample_sd(load_sd3_pipeline(path), [held.prompts[i] for i in pick], guidance_scale=RECOMMENDED_GUIDANCE)
    acc = conditional_accuracy(images, held.digits[pick], held.colours[pick], clf)
    assert acc["alignment"] >= 0.85 and acc["digit_acc"] >= 0.85 and acc["colour_acc"] >= 0.95, acc
