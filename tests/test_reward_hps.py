"""The ``hpsv2`` reward: a tiny open_clip model saved as a local HPS-style checkpoint scores
exactly hpsv2's computation; missing or wrong files are one-line errors. The tests that
build a model skip when open_clip (the ``[hpsv2]`` extra) is not installed."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from rlprox.rewards import build_reward

torch.set_num_threads(1)

TINY = "rlprox-tiny-hps"  # an open_clip architecture registered by the fixture: 32×32 images, width 16


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """A random tiny open_clip CLIP saved as hpsv2 saves its checkpoints: {"state_dict": ...}."""
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("tiny_hps")
    config = {
        "embed_dim": 12,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY}.json")
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(TINY).state_dict()}, folder / "HPS_tiny.pt")
    return folder / "HPS_tiny.pt"


def error(**kwargs) -> str:
    with pytest.raises(ValueError) as err:
        build_reward({"name": "hpsv2", "kwargs": kwargs})
    assert "\n" not in str(err.value)
    return str(err.value)


def test_hpsv2_says_what_is_missing_in_one_line_before_importing_open_clip(tmp_path, monkeypatch):
    assert error() == "reward hpsv2: checkpoint_path must be a local HPS checkpoint file (got '')"
    assert error(checkpoint_path="/no/HPS_v2.1_compressed.pt").startswith(
        "reward hpsv2: checkpoint_path /no/HPS_v2.1_compressed.pt: no such file (download HPS_v2.1_compressed.pt"
    )
    assert error(checkpoint_path="/no/hps.pt", model="hf-hub:org/repo") == (
        "reward hpsv2: model must be an open_clip architecture name such as 'ViT-H-14' (got 'hf-hub:org/repo')"
    )
    assert build_reward({"name": "hpsv2", "kwargs": {"checkpoint_path": "/no/hps.pt"}}, check_only=True) is None
    (tmp_path / "hps.pt").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if the extra were not installed
    message = error(checkpoint_path=str(tmp_path / "hps.pt"))
    assert message.startswith("reward hpsv2: cannot import open_clip (") and message.endswith("'rlprox[hpsv2]'")


# hpsv2's ResizeMaxSize on (H, W) for a 32×32 model: resize to (h, w), then [left, top, right, bottom] black pixels
@pytest.mark.parametrize(
    "shape, resized, padding", [((20, 24), (27, 32), [0, 2, 0, 3]), ((48, 40), (32, 27), [2, 0, 3, 0])]
)
def test_hpsv2_equals_the_hand_computation(tiny_hps, shape, resized, padding):
    import open_clip
    import torchvision.transforms.functional as TF

    from rlprox.rewards import CLIP_MEAN, CLIP_STD
    from rlprox.rewards.hps import load_hps

    load_hps.cache_clear()
    reward = build_reward({"name": "hpsv2", "kwargs": {"checkpoint_path": str(tiny_hps), "model": TINY}})
    assert load_hps.cache_info().currsize == 1  # loaded at build, before any call
    images = torch.rand(3, 3, *shape, generator=torch.Generator().manual_seed(1))
    prompts = ["a red seven", "the digit one", "a blue two"]
    scores, _ = reward(images, prompts, [{}] * 3)

    # hpsv2's evaluation transform with torchvision, image by image: bicubic resize, zero padding, Normalize
    resize = lambda x: TF.resize(x, list(resized), TF.InterpolationMode.BICUBIC)  # antialiased (torchvision ≥ 0.17)
    pixels = torch.stack([TF.normalize(TF.pad(resize(x), padding, fill=0), CLIP_MEAN, CLIP_STD) for x in images])
    net = open_clip.create_model(TINY)
    net.load_state_dict(torch.load(tiny_hps)["state_dict"])
    with torch.no_grad():
        image_features = net.eval().encode_image(pixels)
        text_features = net.encode_text(open_clip.get_tokenizer(TINY)(prompts))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    expected = (image_features @ text_features.T).diagonal()  # no logit scale
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, expected)
    reward(images[:1], prompts[:1], [{}])
    assert load_hps.cache_info().misses == 1


def test_hpsv2_says_what_is_wrong_with_a_file_in_one_line(tiny_hps, tmp_path):
    assert error(checkpoint_path=str(tiny_hps), model="no-such-net") == (
        "reward hpsv2: model 'no-such-net' is not an open_clip architecture (see open_clip.list_models())"
    )
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert error(checkpoint_path=str(garbage), model=TINY).startswith(
        f"reward hpsv2: checkpoint_path {garbage}: cannot load it into {TINY} ("
    )
    state = torch.load(tiny_hps)["state_dict"]
    partial = tmp_path / "partial.pt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "visual.proj"}}, partial)
    message = error(checkpoint_path=str(partial), model=TINY)
    assert message.startswith(f"reward hpsv2: checkpoint_path {partial}: cannot load it into {TINY} (RuntimeError: ")
    assert "visual.proj" in message
