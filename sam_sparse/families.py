"""Model families and their model types: which table describes a model type's attention layers.

    family_of("vit_b")            # "sam": segment-anything (SAM v1), table sam_layers.py
    family_of("sam2.1_hiera_t")   # "sam2": SAM 2 (the sam2 package), table sam2_layers.py
    layer_geometries("sam2.1_hiera_l", 128)

A family is one table module (names and shapes, no model code) plus, in the layers above, its patch
module (patches/sam1.py, patches/sam2.py) and its builders (models/build.py). A third family goes in
the same three places and one line here (docs/architecture.md).
"""

from __future__ import annotations

from typing import List

from . import sam2_layers, sam_layers
from .geometry import LayerGeometry

FAMILIES = {"sam": sam_layers.MODEL_TYPES, "sam2": sam2_layers.MODEL_TYPES}
MODEL_TYPES = tuple(t for types in FAMILIES.values() for t in types)
_GEOMETRIES = {"sam": sam_layers.sam_layer_geometries, "sam2": sam2_layers.sam2_layer_geometries}


def family_of(model_type: str) -> str:
    """The family of a model type: "sam" or "sam2"; ValueError naming the accepted types otherwise."""
    for family, types in FAMILIES.items():
        if model_type in types:
            return family
    raise ValueError(f"model_type={model_type!r}: expected one of {', '.join(MODEL_TYPES)}")


def layer_geometries(model_type: str, block_size: int = 128, key_tile_fn=None, **kwargs) -> List[LayerGeometry]:
    """Every attention layer sam-sparse patches in an unpatched model of `model_type`, in forward order
    (the family's table: sam_layer_geometries or sam2_layer_geometries, same arguments)."""
    return _GEOMETRIES[family_of(model_type)](model_type, block_size, key_tile_fn, **kwargs)
