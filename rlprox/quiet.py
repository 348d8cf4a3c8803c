"""Two library notices that every diffusion run printed and that ask nothing of the user,
dropped on the loggers that emit them (nothing else is filtered): transformers' image
processors falling back to PIL without torchvision (no pipeline here uses them), and
diffusers' notice on a dtype cast of a model with no modules to keep in float32 (the list
it prints is empty). Imported by the modules that load diffusers pipelines."""

from __future__ import annotations

import logging


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message contains ``fragment``."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(
    DropMessage("requires torchvision (not installed); falling back to")
)
logging.getLogger("diffusers.models.modeling_utils").addFilter(DropMessage("should be kept in float32: []."))
