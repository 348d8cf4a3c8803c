"""The DDIM policy: our step equals diffusers' DDIMScheduler.step with the same noise,
at every timestep, for ε- and v-prediction; log-probs are the averaged Gaussian density."""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from rlprox.models.diffusion import ddim_step_with_logprob  # noqa: E402


def scheduler(prediction_type, **kw):
    s = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        **kw,
    )
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_step_equals_diffusers_at_every_timestep(prediction_type, eta):
    s = scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    for t in s.timesteps:
        x = torch.randn(3, 4, 8, 8, generator=g)
        eps = torch.randn(3, 4, 8, 8, generator=g)
        z = torch.randn(3, 4, 8, 8, generator=g)
        ref = s.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        # our sampler with the same z: feed the sample back as prev_sample is what the
        # update does; sampling draws z from a generator in the same shape and order
        ours, logp = ddim_step_with_logprob(s, eps, t, x, eta, generator=torch.Generator().manual_seed(1))
        gz = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        ref_same_noise = s.step(eps, t, x, eta=eta, variance_noise=gz).prev_sample
        torch.testing.assert_close(ours, ref_same_noise, rtol=1e-5, atol=1e-5)
        _, logp_ref = ddim_step_with_logprob(s, eps, t, x, eta, prev_sample=ref)
        assert logp_ref.shape == (3,) and torch.isfinite(logp_ref).all()


def test_log_prob_is_the_averaged_gaussian_density_and_batch_t_matches_scalar():
    s = scheduler("epsilon")
    g = torch.Generator().manual_seed(2)
    t = s.timesteps[4]
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    prev, logp = ddim_step_with_logprob(s, eps, t, x, eta=1.0, generator=g)
    a_t = float(s.alphas_cumprod[t])
    a_prev = float(s.alphas_cumprod[t - 100])
    sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    expected = (-((prev - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)).mean(
        dim=(1, 2, 3)
    )
    torch.testing.assert_close(logp, expected, rtol=1e-4, atol=1e-4)
    # a (B,) timestep gives the per-sample result
    _, logp_b = ddim_step_with_logprob(s, eps, torch.tensor([t, t]), x, 1.0, prev_sample=prev)
    torch.testing.assert_close(logp_b, logp, rtol=1e-5, atol=1e-5)
    # the last step (prev_t < 0) uses the final alpha
    _, last = ddim_step_with_logprob(s, eps, s.timesteps[-1], x, 1.0, generator=g)
    assert torch.isfinite(last).all()
