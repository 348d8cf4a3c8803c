"""The example model family of docs/algorithm-contract.md: SD-1.5 with only the last denoising
steps trained, an option of its own, used through `loop.adapter: "module:Class"`."""

from dataclasses import dataclass

from rlprox.errors import RecipeError
from rlprox.models.pipelines.sd import StableDiffusionAdapter


@dataclass
class LateStepsOptions:
    eta: float = 1.0  # DDIM η
    trained_fraction: float = 0.5  # the last fraction of the denoising steps is trained


class LateStepsSD(StableDiffusionAdapter):
    """SD-1.5 with only the last denoising steps trained."""

    Options = LateStepsOptions

    @classmethod
    def check_options(cls, sampling, options, key):
        super().check_options(sampling, options, key)
        if not 0 < options.trained_fraction <= 1:
            raise RecipeError(f"{key}.trained_fraction", f"must be in (0, 1] (got {options.trained_fraction})")

    def __init__(self, pipe, sampling, options):
        super().__init__(pipe, sampling, options)
        keep = max(1, round(sampling.num_steps * options.trained_fraction))
        self.trained_steps = self.trained_steps[-keep:]
