"""Which model family an object belongs to, and that family's patch module (sam1.py, sam2.py).

The sam2 package is optional: its family module is imported only for objects that come from it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

_MODULES = {"sam": "sam1", "sam2": "sam2"}  # family name -> module of this package


def family(name: str) -> ModuleType:
    """The patch module of a family by name ("sam", "sam2")."""
    return importlib.import_module(f"{__package__}.{_MODULES[name]}")


def _from_package(obj, package: str) -> bool:
    return any(cls.__module__.split(".")[0] == package for cls in type(obj).__mro__)


def family_for(obj) -> ModuleType:
    """The patch module of obj's family; TypeError naming what each family accepts otherwise."""
    if _from_package(obj, "sam2"):
        fam = family("sam2")
        if fam.owns(obj):
            return fam
    fam = family("sam")
    if fam.owns(obj):
        return fam
    accepted = "; ".join(family(n).SUPPORTED if n == "sam" else _sam2_supported() for n in _MODULES)
    raise TypeError(f"patch_sam supports {accepted}; got {type(obj).__module__}.{type(obj).__name__}")


def _sam2_supported() -> str:
    try:
        return family("sam2").SUPPORTED
    except ImportError:  # sam2 not installed: say what it would take
        return "sam2's SAM2Base, SAM2ImagePredictor or SAM2AutomaticMaskGenerator (pip install 'sam-sparse[sam2]')"


def unwrap(obj) -> nn.Module:
    """The module that patch_sam(obj) patches (a predictor's model, ...); obj itself for other objects."""
    if _from_package(obj, "sam2"):
        fam = family("sam2")
        if fam.owns(obj):
            return fam.unwrap(obj)[0]
    return obj


def model_family(obj) -> str:
    """The family name of what patch_sam accepts: "sam" (segment-anything) or "sam2"; TypeError otherwise."""
    return family_for(obj).NAME
