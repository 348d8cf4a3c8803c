"""Video rewards: an image reward on clips through a named reduction over frames, the one-line
errors of a reward that does not fit the model's media, the temporal-consistency reward and the
moving-digits reward on rendered clips."""

from __future__ import annotations

import pytest
import torch

from rlprox.errors import RewardError
from rlprox.rewards import build_reward, reward_media
from rlprox.zoo.data import _gray_digits, render_clips

torch.set_num_threads(1)


def clips(n: int = 3, frames: int = 5, size: int = 8) -> torch.Tensor:
    return torch.rand(n, frames, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("frames", ["mean", "min", "first", "last"])
def test_an_image_reward_scores_each_frame_and_reduces(frames):
    videos = clips()
    per_frame = videos.mean(dim=(2, 3, 4))  # brightness of each frame, (B, T)
    expected = {
        "mean": per_frame.mean(1),
        "min": per_frame.amin(1),
        "first": per_frame[:, 0],
        "last": per_frame[:, -1],
    }[frames]
    total, _ = build_reward({"name": "brightness", "frames": frames})(videos, ["a", "b", "c"], [{}, {}, {}])
    assert torch.allclose(total, expected)


def test_prompts_and_metadata_follow_each_frame():
    seen = {}

    def spy(images, prompts, metadata):
        seen.update(prompts=prompts, metadata=metadata)
        return images.mean(dim=(1, 2, 3))

    reward = build_reward({"name": "brightness", "frames": "mean"})
    reward.terms[0] = type(reward.terms[0])("spy", 1.0, spy, "image", "mean")
    reward(clips(2, 3), ["a", "b"], [{"i": 0}, {"i": 1}])
    assert seen["prompts"] == ["a"] * 3 + ["b"] * 3
    assert seen["metadata"] == [{"i": 0}] * 3 + [{"i": 1}] * 3


def test_media_mismatches_are_one_line():
    with pytest.raises(
        RewardError, match=r"^reward.frames: reward 'brightness' scores images and this model makes videos"
    ):
        build_reward("brightness")(clips(), ["a"] * 3, [{}] * 3)
    with pytest.raises(RewardError, match="scores videos .* and this model makes images"):
        build_reward("temporal_consistency")(torch.rand(2, 3, 8, 8), ["a"] * 2, [{}] * 2)
    with pytest.raises(RewardError, match="reduces a video's frames and this model makes images"):
        build_reward({"name": "brightness", "frames": "mean"})(torch.rand(2, 3, 8, 8), ["a"] * 2, [{}] * 2)
    with pytest.raises(ValueError, match="scores whole videos: frames reduces an image reward's frames"):
        build_reward({"name": "temporal_consistency", "frames": "mean"}, check_only=True)
    with pytest.raises(
        ValueError, match="frames must be one of mean, min, first, last .got 'maen'.*did you mean 'mean'"
    ):
        build_reward({"name": "brightness", "frames": "maen"}, check_only=True)
    assert (
        reward_media(build_reward),
        reward_media(__import__("rlprox.rewards.video").rewards.video.temporal_consistency),
    ) == (
        "image",
        "video",
    )


def test_the_reward_section_parses_frames(tmp_path):
    from rlprox.recipe import RecipeError, _coerce
    from rlprox.rewards import RewardSpec

    term = _coerce({"name": "brightness", "frames": "min"}, RewardSpec, "reward")
    assert term.frames == "min"
    with pytest.raises(RecipeError, match="reward.frames: must be one of mean, min, first, last"):
        _coerce({"name": "brightness", "frames": "median"}, RewardSpec, "reward")


def test_temporal_consistency_is_one_for_a_still_clip_and_lower_for_noise():
    still = clips(1, 1).expand(1, 4, 3, 8, 8)
    reward = build_reward("temporal_consistency")
    scores, _ = reward(torch.cat([still, clips(1, 4)]), ["a", "b"], [{}, {}])
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] < 0.5


@pytest.fixture(scope="module")
def micro_classifier(tmp_path_factory):
    from rlprox.zoo.build import build

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLPROX_CACHE", str(tmp_path_factory.mktemp("rlprox_cache")))
        yield build("digits-classifier", micro=True, classifier_steps=60, batch_size=32, progress=False)


def test_digits_video_alignment_scores_the_right_direction_higher(micro_classifier):
    gray, labels = _gray_digits()
    n = 8
    directions = torch.arange(n) % 4
    videos = render_clips(gray[:n], torch.arange(n) % 5, directions, torch.full((n,), 8))
    reward = build_reward({"name": "digits_video_alignment", "kwargs": {"classifier": str(micro_classifier)}})
    right = [{"digit": int(labels[i]), "colour": i % 5, "direction": int(directions[i])} for i in range(n)]
    wrong = [{**m, "direction": (m["direction"] + 1) % 4} for m in right]
    prompts = [""] * n
    right_scores, info = reward(videos, prompts, right)
    wrong_scores, _ = reward(videos, prompts, wrong)
    assert (right_scores > wrong_scores).all()
    assert info["direction_acc"] == 1.0 and info["motion"] == pytest.approx(1.0)
    assert ((right_scores >= 0) & (right_scores <= 1)).all()
    still = videos[:, :1].expand_as(videos)  # no motion: the motion term is 0
    still_scores, _ = reward(still, prompts, right)
    assert (still_scores <= 0.5).all()
    by_prompt, _ = reward(videos[:1], ["a red zero moving left"], [{}])
    assert torch.isfinite(by_prompt).all()
