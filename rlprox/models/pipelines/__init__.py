"""Model families as plug-ins: the adapter protocol (``base``), the flow-matching base
(``flow``) and one file per family (``sd``, ``sd3``, ``flux``, ``qwen_image``). An adapter registers itself
for the diffusers pipeline classes it serves; the built-in families are imported on first
lookup. See docs/algorithm-contract.md for a family of one's own."""

from rlprox.models.pipelines.base import (
    ADAPTERS,
    FORMER_SECTION_KEYS,
    Adapter,
    NoOptions,
    Sampling,
    adapter_for_class,
    adapter_from_spec,
    family_options,
    pipeline_class,
    register_adapter,
)

__all__ = [
    "ADAPTERS",
    "FORMER_SECTION_KEYS",
    "Adapter",
    "NoOptions",
    "Sampling",
    "adapter_for_class",
    "adapter_from_spec",
    "family_options",
    "pipeline_class",
    "register_adapter",
]
