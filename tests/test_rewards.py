"""Reward registry: lookup, plugins, option binding, errors, built-in rewards."""

from __future__ import annotations

import pytest
import torch

from rlprox.rewards import get_reward, list_rewards, register_reward

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def micro_classifier(tmp_path_factory):
    """A digits-classifier trained for 3 steps in a temporary cache (enough for shapes)."""
    from rlprox.zoo.build import build

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLPROX_CACHE", str(tmp_path_factory.mktemp("rlprox_cache")))
        yield build("digits-classifier", micro=True, classifier_steps=60, batch_size=32, progress=False)


def test_list_rewards_has_builtins_with_one_line_descriptions():
    rewards = list_rewards()
    assert {"brightness", "digits_alignment"} <= set(rewards)
    assert all(desc and "\n" not in desc for desc in rewards.values())


def test_unknown_reward_is_one_line_with_did_you_mean():
    with pytest.raises(ValueError) as err:
        get_reward("digit_alignment")
    message = str(err.value)
    assert "'digit_alignment'" in message and "did you mean 'digits_alignment'" in message
    assert "\n" not in message


def test_plugin_by_module_function_and_its_errors():
    fn = get_reward("rlprox.rewards:brightness")
    images = torch.full((2, 3, 4, 4), 0.25)
    assert torch.allclose(fn(images, ["", ""], [{}, {}]), torch.tensor([0.25, 0.25]))
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        get_reward("no_such_mod:fn")
    with pytest.raises(ValueError, match="has no attribute .nope."):
        get_reward("rlprox.rewards:nope")


def test_options_are_bound_and_checked():
    with pytest.raises(ValueError, match="unknown option .clasifier.*did you mean .classifier."):
        get_reward("digits_alignment", clasifier="x")
    with pytest.raises(ValueError, match="unknown option .scale."):
        get_reward("brightness", scale=2)


def test_register_reward_rejects_a_second_function_under_a_taken_name():
    @register_reward("test_constant_one")
    def constant_one(images, prompts, metadata):
        """Always 1."""
        return torch.ones(len(images))

    assert get_reward("test_constant_one") is constant_one
    assert list_rewards()["test_constant_one"] == "Always 1."
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_constant_one")(lambda images, prompts, metadata: images)


def test_digits_alignment_shapes_range_and_targets(micro_classifier):
    from rlprox.zoo.classifier import DigitsClassifier
    from rlprox.zoo.data import load_digits_world

    held = load_digits_world("heldout")
    images, prompts = held.images[:6], held.prompts[:6]
    reward_fn = get_reward("digits_alignment", classifier=str(micro_classifier))
    reward, stats = reward_fn(images, prompts, [{}] * 6)
    assert reward.shape == (6,) and ((0 <= reward) & (reward <= 1)).all()
    assert set(stats) == {"digit_acc", "colour_acc"}

    p_digit, p_colour = DigitsClassifier.from_pretrained(micro_classifier).predict_proba(images)
    expected = p_digit[torch.arange(6), held.digits[:6]] * p_colour[torch.arange(6), held.colours[:6]]
    torch.testing.assert_close(reward, expected)
    # metadata targets take precedence over the prompt text
    meta = [{"digit": int(d), "colour": int(c)} for d, c in zip(held.digits[:6], held.colours[:6])]
    torch.testing.assert_close(reward_fn(images, ["a red one"] * 6, meta)[0], expected)
    with pytest.raises(ValueError, match="one digit word"):
        reward_fn(images[:1], ["a picture"], [{}])


def test_jpeg_rewards_rank_flat_images_as_more_compressible():
    from rlprox.rewards import get_reward

    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32, generator=g)])
    comp = get_reward("jpeg_compressibility")(images, ["", ""], [{}, {}])
    incomp = get_reward("jpeg_incompressibility", quality=80)(images, ["", ""], [{}, {}])
    assert comp.shape == (2,) and comp[0] > comp[1] and incomp[1] > incomp[0] > 0


def tiny_clip_config(tokenizer=None):
    """A CLIP of width 16 (one layer per tower, 32×32 images, 12-d projection); with ``tokenizer``,
    its text tower takes that tokenizer's ids."""
    from transformers import CLIPConfig

    layer = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = dict(layer)
    if tokenizer is not None:
        text.update(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return CLIPConfig(text_config=text, vision_config={**layer, "image_size": 32, "patch_size": 8}, projection_dim=12)


def test_aesthetic_loads_local_weights_only_and_says_what_is_missing(tmp_path):
    from transformers import CLIPModel

    from rlprox.rewards import AestheticMLP, build_reward

    with pytest.raises(ValueError, match="reward 'aesthetic': clip_path '/no/clip' is not a local CLIP model folder"):
        build_reward({"name": "aesthetic", "kwargs": {"clip_path": "/no/clip", "mlp_path": "/no/mlp.pth"}})
    CLIPModel(tiny_clip_config()).save_pretrained(tmp_path / "clip")
    torch.save(AestheticMLP(12).state_dict(), tmp_path / "mlp.pth")
    reward = build_reward(
        {"name": "aesthetic", "kwargs": {"clip_path": str(tmp_path / "clip"), "mlp_path": str(tmp_path / "mlp.pth")}}
    )
    scores, _ = reward(torch.rand(3, 3, 16, 16), ["a", "b", "c"], [{}] * 3)
    assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_weighted_multi_reward_sums_terms_and_checks_each():
    from rlprox.errors import RewardError
    from rlprox.rewards import build_reward

    images = torch.full((2, 3, 8, 8), 0.25)
    reward = build_reward([{"name": "brightness", "weight": 2.0}, {"name": "jpeg_compressibility", "weight": 0.0}])
    total, _ = reward(images, ["", ""], [{}, {}])
    assert torch.allclose(total, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="unknown reward 'brightnes'"):
        build_reward([{"name": "brightnes"}])
    bad = build_reward("tests.reward_plugins:wrong_shape")
    with pytest.raises(RewardError, match=r"returned shape \(2, 3\) for 2 images"):
        bad(images, ["", ""], [{}, {}])
    on_meta = build_reward("tests.reward_plugins:on_meta")
    with pytest.raises(RewardError, match="returned a tensor on device meta; expected cpu"):
        on_meta(images, ["", ""], [{}, {}])


# ----------------------------------------------------------------------------- CLIP rewards
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A saved random CLIPModel + CLIPProcessor (digits-sd's offline tokenizer, 32×32 crops)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    from rlprox.zoo.sd import build_tokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(tokenizer)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["clip_score", "pickscore"])
def test_clip_rewards_equal_the_direct_computation(tiny_clip, name):
    from transformers import CLIPModel, CLIPProcessor

    from rlprox.rewards import build_reward

    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    prompts = ["a red seven", "the digit one", "a blue two"]
    scores, _ = build_reward({"name": name, "kwargs": {"model_path": str(tiny_clip)}})(images, prompts, [{}] * 3)

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    inputs = processor(text=prompts, images=list(images), do_rescale=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.diagonal()  # exp(τ)·cos(image_i, prompt_i)
    expected = logits if name == "pickscore" else (100 * logits / model.logit_scale.exp()).clamp(min=0)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, expected.detach())


def test_clip_rewards_load_once_when_built(tiny_clip, monkeypatch):
    from rlprox.rewards import build_reward
    from rlprox.rewards.clip import load_clip

    load_clip.cache_clear()
    reward = build_reward({"name": "pickscore", "kwargs": {"model_path": str(tiny_clip)}})
    assert load_clip.cache_info().currsize == 1  # loaded at build, before any call
    reward(torch.rand(2, 3, 32, 32), ["a red one", "a two"], [{}, {}])
    reward(torch.rand(2, 3, 32, 32), ["a red one", "a two"], [{}, {}])
    assert load_clip.cache_info().misses == 1


def test_clip_rewards_say_what_is_missing_in_one_line(tiny_clip, tmp_path):
    import shutil

    from rlprox.rewards import build_reward

    def error(**kwargs) -> str:
        with pytest.raises(ValueError) as err:
            build_reward({"name": "pickscore", "kwargs": kwargs})
        assert "\n" not in str(err.value)
        return str(err.value)

    assert error(model_path="") == "reward pickscore: model_path must be a local CLIP folder (got '')"
    assert error(model_path="/no/x") == "reward pickscore: model_path /no/x: no CLIP model there (not a folder)"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        error(model_path=str(empty))
        == f"reward pickscore: model_path {empty}: no CLIP model there (config.json missing)"
    )
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(tiny_clip / "config.json", weightless)
    assert "no CLIP model there (no model.safetensors or pytorch_model.bin)" in error(model_path=str(weightless))
    assert error(model_path=str(tiny_clip), processor_path=str(empty)) == (
        f"reward pickscore: processor_path {empty}: no CLIP processor there (tokenizer.json or vocab.json missing)"
    )
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    assert error(model_path=str(broken)).startswith(
        f"reward pickscore: model_path {broken}: cannot load a CLIPModel ("
    )


def test_pixel_reconstruction_shuffle_seed_hands_out_the_same_scores_without_their_images():
    from rlprox.rewards import pixel_reconstruction

    g = torch.Generator().manual_seed(0)
    reference = torch.rand(16, 3, 8, 8, generator=g)
    noise = torch.linspace(0.0, 0.5, 16).view(16, 1, 1, 1)  # image i is i-th worst: distinct MSEs
    images = (reference + noise * torch.randn(16, 3, 8, 8, generator=g)).clamp(0, 1)
    metadata = [{"reference": r} for r in reference]
    true, info = pixel_reconstruction(images, [""] * 16, metadata)
    shuffled, shuffled_info = pixel_reconstruction(images, [""] * 16, metadata, shuffle_seed=3)
    assert torch.equal(shuffled.sort().values, true.sort().values) and not torch.equal(shuffled, true)
    assert shuffled_info == info  # the true MSE is still logged
    again, _ = pixel_reconstruction(images, [""] * 16, metadata, shuffle_seed=3)
    other, _ = pixel_reconstruction(images, [""] * 16, metadata, shuffle_seed=4)
    assert torch.equal(again, shuffled) and not torch.equal(other, shuffled)
    # over many batches the shuffled score says nothing about the image: no rank correlation with the true one
    correlations = []
    for k in range(200):
        imgs = (reference + noise * torch.randn(16, 3, 8, 8, generator=g)).clamp(0, 1)
        t, _ = pixel_reconstruction(imgs, [""] * 16, metadata)
        s, _ = pixel_reconstruction(imgs, [""] * 16, metadata, shuffle_seed=k)
        correlations.append(torch.corrcoef(torch.stack([t.argsort().argsort(), s.argsort().argsort()]).float())[0, 1])
    assert abs(float(torch.stack(correlations).mean())) < 0.05


@pytest.fixture(scope="module")
def tiny_vq_folder(tmp_path_factory):
    from rlprox.models import llamagen

    torch.manual_seed(0)
    vq_kwargs = llamagen.vq_config(
        "VQ-16", 16, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4, codebook_size=16
    )
    folder = tmp_path_factory.mktemp("vq")
    llamagen.VQModel(**vq_kwargs).save_pretrained(folder)
    return str(folder)


def test_perceptual_term_is_an_encoder_feature_distance(tiny_vq_folder):
    from rlprox.rewards import pixel_reconstruction
    from rlprox.rewards.perceptual import encoder_feature_distance

    g = torch.Generator().manual_seed(0)
    reference = torch.rand(8, 3, 16, 16, generator=g)
    near = (reference + 0.05 * torch.randn(8, 3, 16, 16, generator=g)).clamp(0, 1)
    far = (reference + 0.4 * torch.randn(8, 3, 16, 16, generator=g)).clamp(0, 1)
    d_self = encoder_feature_distance(tiny_vq_folder, reference, reference)
    d_near = encoder_feature_distance(tiny_vq_folder, near, reference)
    d_far = encoder_feature_distance(tiny_vq_folder, far, reference)
    assert torch.allclose(d_self, torch.zeros(8), atol=1e-6) and (d_near < d_far).all()
    torch.testing.assert_close(encoder_feature_distance(tiny_vq_folder, reference, near), d_near)
    # 32 x 32 images are compared at the VQ's 16 x 16
    big = torch.nn.functional.interpolate(far, size=(32, 32), mode="nearest")
    assert encoder_feature_distance(tiny_vq_folder, big, big).abs().max() < 1e-6
    metadata = [{"reference": r} for r in reference]
    plain, _ = pixel_reconstruction(far, [""] * 8, metadata)
    reward, info = pixel_reconstruction(far, [""] * 8, metadata, perceptual_weight=0.5, perceptual=tiny_vq_folder)
    torch.testing.assert_close(reward, plain - 0.5 * d_far)
    assert info["perceptual"] == pytest.approx(float(d_far.mean()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"perceptual_weight": -1.0}, "perceptual_weight must be >= 0 (got -1.0)"),
        ({"perceptual_weight": 1.0, "perceptual": "lpips"}, "perceptual 'lpips' is not a VQ folder"),
        (
            {"perceptual_weight": 1.0, "perceptual": "zoo:digits-classifier"},
            "perceptual: zoo:digits-classifier is not",
        ),
    ],
)
def test_perceptual_options_are_checked_in_one_line(kwargs, message):
    from rlprox.rewards import build_reward

    with pytest.raises(ValueError) as err:
        build_reward({"name": "pixel_reconstruction", "kwargs": kwargs}, check_only=True)
    assert message in str(err.value) and "\n" not in str(err.value)
