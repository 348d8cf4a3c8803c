"""digits-wan: a micro build in a temporary cache loads with a plain ``WanPipeline.from_pretrained`` and
generates 9-frame clips; its VAE's scale factors are its real downsampling; the tokenizer reads every
motion prompt; the rendered clips and the motion prompt sets hold what they say."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("diffusers")

from rlprox.zoo import build as zoo_build  # noqa: E402
from rlprox.zoo.data import (  # noqa: E402
    CLIP_FRAMES,
    CLIP_SIZE,
    DIRECTIONS,
    HELD_OUT_MOTIONS,
    PROMPT_SETS,
    _gray_digits,
    parse_motion_prompt,
    render_clips,
)

torch.set_num_threads(1)

MICRO = dict(wan_vae_steps=40, wan_steps=40, batch_size=32, progress=False)  # micro: 2 steps each


@pytest.fixture(scope="module")
def micro_wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlprox_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLPROX_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield zoo_build.build("digits-wan", micro=True, **MICRO)


def test_plain_from_pretrained_loads_and_generates_clips_offline(micro_wan):
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
        pipe = WanPipeline.from_pretrained({str(micro_wan)!r})
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler, type(pipe.scheduler)
        assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel"
        out = pipe(["a red seven moving left", "a blue two moving up"], num_frames={CLIP_FRAMES},
                   height={CLIP_SIZE}, width={CLIP_SIZE}, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="pt").frames
        assert out.shape == (2, {CLIP_FRAMES}, 3, {CLIP_SIZE}, {CLIP_SIZE}), out.shape
        assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
        print("OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OK" in res.stdout


def test_vae_scale_factors_are_its_real_downsampling(micro_wan):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(micro_wan, subfolder="vae")
    c = vae.config
    assert c.scale_factor_spatial == 2 ** (len(c.dim_mult) - 1) == 4
    assert c.scale_factor_temporal == 2 ** sum(c.temperal_downsample) == 4
    clip = torch.zeros(1, 3, CLIP_FRAMES, CLIP_SIZE, CLIP_SIZE)
    with torch.no_grad():
        latent = vae.encode(clip).latent_dist.mean
    assert latent.shape[2:] == ((CLIP_FRAMES - 1) // 4 + 1, CLIP_SIZE // 4, CLIP_SIZE // 4)
    assert len(c.latents_mean) == len(c.latents_std) == c.z_dim and min(c.latents_std) > 0


def test_build_info_grid_and_tokenizer(micro_wan):
    from transformers import AutoTokenizer

    info = zoo_build.build_info(micro_wan)
    assert info["name"] == "digits-wan" and info["options"]["micro"] is True and info["build_seconds"] > 0
    for key in ("vae_heldout_mse", "flow_loss_train_last"):
        assert math.isfinite(info[key]) and info[key] > 0, key
    assert (micro_wan / "samples.png").stat().st_size > 0 and (micro_wan / "samples.gif").stat().st_size > 0
    tokenizer = AutoTokenizer.from_pretrained(micro_wan, subfolder="tokenizer")
    prompts, _ = PROMPT_SETS["digits-motion"]()
    ids = tokenizer(prompts).input_ids
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}
    assert len({tuple(row) for row in ids}) == len(prompts) == 200


def test_motion_prompt_sets_hold_out_digit_direction_pairs():
    train, train_meta = PROMPT_SETS["digits-motion-train"]()
    test, test_meta = PROMPT_SETS["digits-motion-test"]()
    assert (len(train), len(test)) == (150, 50) and not set(train) & set(test)
    assert all((m["digit"], m["direction"]) in HELD_OUT_MOTIONS for m in test_meta)
    assert not any((m["digit"], m["direction"]) in HELD_OUT_MOTIONS for m in train_meta)
    for prompt, meta in zip(test, test_meta):
        assert parse_motion_prompt(prompt) == (meta["digit"], meta["colour"], meta["direction"])
    with pytest.raises(ValueError, match="must name one direction"):
        parse_motion_prompt("a red seven")


def test_rendered_clips_move_the_digit_as_named():
    from rlprox.rewards.video import digit_track

    gray, _ = _gray_digits()
    directions = torch.arange(4)
    clips = render_clips(gray[:4], torch.zeros(4, dtype=torch.long), directions, torch.full((4,), 8))
    assert clips.shape == (4, CLIP_FRAMES, 3, CLIP_SIZE, CLIP_SIZE)
    track = digit_track(clips)  # (4, T, 2)
    moved = track[:, -1] - track[:, 0]
    for i, unit in enumerate(DIRECTIONS.values()):
        along = float(moved[i] @ torch.tensor(unit, dtype=torch.float32))
        assert along == pytest.approx(CLIP_SIZE - 16, abs=1.0), (i, moved[i])
