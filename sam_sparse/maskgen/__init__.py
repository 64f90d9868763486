"""Automatic mask generation and mask decoding on the model's device, for SAM 1 (segment-anything, MobileSAM)
and SAM 2 (sam2) models alike: adapters.py (one family behind one interface), pipeline.py (the generator),
settings.py (the generators' parameters, the exact and fast modes), rle.py / transfer.py (run-length
encoding, one copy across the device boundary), prefetch.py (host work ahead on a thread), timing.py."""

from .adapters import Embedding, Sam2Adapter, SamAdapter, adapter_for, model_family
from .pipeline import OUTPUT_MODES, AutomaticMaskGenerator, Result, generate
from .rle import mask_to_rle, rle_to_mask
from .settings import EXACT, FAST, MODES, GeneratorSettings, Mode, resolve_mode, with_changes

__all__ = [
    "AutomaticMaskGenerator",
    "generate",
    "Result",
    "OUTPUT_MODES",
    "GeneratorSettings",
    "Mode",
    "EXACT",
    "FAST",
    "MODES",
    "resolve_mode",
    "with_changes",
    "Embedding",
    "SamAdapter",
    "Sam2Adapter",
    "adapter_for",
    "model_family",
    "mask_to_rle",
    "rle_to_mask",
]
