"""recipes/loop/wan21-t2v.yaml against the real Wan 2.1 T2V 1.3B: its config files (tests/wan21_t2v_1_3b/,
no weights) validate the recipe's frames and size, and the transformer and VAE built from them on the
``meta`` device give the sizes the recipe and docs/flow-matching.md's memory note assume. No download."""

import shutil
import types
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from rlprox.errors import RecipeError  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "wan21_t2v_1_3b"
RECIPE = Path(ROOT) / "recipes/loop/wan21-t2v.yaml"


@pytest.fixture
def wan21_folder(tmp_path):
    """A pipeline folder holding only Wan 2.1 T2V 1.3B's config files."""
    folder = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    shutil.copytree(CONFIGS, folder, ignore=shutil.ignore_patterns("README.md"))
    return folder


def recipe_with(folder, **sampling) -> dict:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["loop"]["pipeline"] = str(folder)
    recipe["loop"]["prompts"] = str(Path(ROOT) / recipe["loop"]["prompts"])
    recipe["loop"]["sampling"].update(sampling)
    return recipe


def test_the_recipe_validates_against_the_real_config_files(wan21_folder):
    recipe = load_recipe(recipe_with(wan21_folder))
    assert recipe.setup.adapter.__name__ == "WanAdapter"
    assert (recipe.setup.options.frames, recipe.setup.options.height, recipe.setup.options.width) == (33, 240, 416)
    with pytest.raises(RecipeError, match=r"^recipe error: loop.sampling.frames: 32 frames: \(frames − 1\) must be"):
        load_recipe(recipe_with(wan21_folder, frames=32))
    with pytest.raises(RecipeError, match=r"^recipe error: loop.sampling.height: 248 px is not a multiple of 16"):
        load_recipe(recipe_with(wan21_folder, height=248))


def test_the_real_sizes_on_the_meta_device(wan21_folder):
    """1.3B transformer: 3,510 video tokens for 33 frames at 240x416, LoRA r32 on 240 attention projections;
    the VAE's real downsampling is 4 in time and 8 in space, as the adapter reads it; UniPC's σ grid."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    from rlprox.models.pipelines import Sampling
    from rlprox.models.pipelines.wan import WanAdapter

    with torch.device("meta"):
        transformer = WanTransformer3DModel.from_config(
            WanTransformer3DModel.load_config(wan21_folder / "transformer")
        )
        vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(wan21_folder / "vae"))
    params = sum(p.numel() for p in transformer.parameters())
    assert 1.3e9 < params < 1.5e9, params
    assert (vae.config.scale_factor_temporal, vae.config.scale_factor_spatial) == (4, 8)
    assert 2 ** sum(vae.config.temperal_downsample) == 4 and 2 ** (len(vae.config.dim_mult) - 1) == 8
    scheduler = UniPCMultistepScheduler.from_pretrained(wan21_folder / "scheduler")
    pipe = types.SimpleNamespace(transformer=transformer, vae=vae, scheduler=scheduler)
    recipe = load_recipe(recipe_with(wan21_folder))
    cfg = recipe.loop
    sampling = Sampling(cfg.num_steps, cfg.guidance_scale, cfg.resolution, cfg.max_sequence_length)
    adapter = WanAdapter(pipe, sampling, recipe.setup.options)
    assert adapter.latent_shape == (16, 9, 30, 52) and adapter._tokens() == 9 * 15 * 26
    assert (
        len(adapter.sigmas) == 21
        and float(adapter.sigmas[0]) == pytest.approx(1.0, abs=1e-5)
        and adapter.sigmas[-1] == 0
    )
    assert (adapter.sigmas[:-1] > adapter.sigmas[1:]).all()
    targets = [n for n, m in transformer.named_modules() if n.split(".", 2)[-1] in _lora_names()]
    assert len(targets) == 30 * 2 * 4  # blocks × (self-, cross-attention) × (q, k, v, out)
    lora = sum(
        cfg.lora.rank * (m.in_features + m.out_features) for n, m in transformer.named_modules() if n in targets
    )
    assert lora == 240 * 32 * (1536 + 1536)  # 23.6M trained parameters


def _lora_names() -> set[str]:
    from rlprox.models.pipelines.wan import WanAdapter

    return {f"{attn}.{target}" for attn in ("attn1", "attn2") for target in WanAdapter.lora_targets}
