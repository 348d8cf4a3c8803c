"""The zoo's pipeline architectures with random weights, for tests: real diffusers
pipelines built in a second (the trained zoo models take minutes)."""


def untrained_sd_pipeline(seed: int = 0):
    """The digits-sd architecture, a ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline

    from rlprox.zoo.sd import build_components, build_tokenizer

    tokenizer = build_tokenizer()
    parts = build_components(tokenizer, seed=seed)
    pipe = StableDiffusionPipeline(
        tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def untrained_sd3_pipeline(seed: int = 0):
    """The digits-sd3 architecture, a ``StableDiffusion3Pipeline``."""
    from diffusers import StableDiffusion3Pipeline

    from rlprox.zoo.sd3 import build_components

    parts = build_components(seed)
    parts["vae"].register_to_config(shift_factor=0.0)  # a trained VAE gets its latents' mean
    pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
