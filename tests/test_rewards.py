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
        yield build("digits-classifier", micro=True, classifier_steps=60, batch_size=32,
                    progress=False)


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
