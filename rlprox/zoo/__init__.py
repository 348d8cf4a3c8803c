"""The offline digits world: tiny base models trained from scikit-learn's digits.

- ``digits-classifier``: reward model (``digits_alignment``) and FID-proxy features
- ``digits-sd``: a stock diffusers ``StableDiffusionPipeline``
- ``digits-sd3``: a stock diffusers ``StableDiffusion3Pipeline`` (rectified flow, MM-DiT)
- ``digits-qwen``: a stock diffusers ``QwenImagePipeline`` (rectified flow, Qwen2.5-VL text encoder)
- ``digits-wan``: a stock diffusers ``WanPipeline``: 9-frame clips of a digit moving as prompted
- ``digits-vq`` / ``digits-gpt``: LlamaGen-style VQ tokenizer and class-conditional GPT

``resolve("zoo:digits-sd")`` returns a local model directory, building and caching it on
first use; ``rlprox.zoo.build.build(name, seed=..., micro=..., force=...)`` (re)builds
explicitly. Heavy imports (diffusers) stay inside the submodules.
"""

from rlprox.zoo.build import MODELS, BuildOptions, cache_root, model_dir, resolve

__all__ = ["MODELS", "BuildOptions", "cache_root", "model_dir", "resolve"]
