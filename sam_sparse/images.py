"""What the user's images must be before any work starts: HxWx3 uint8 RGB arrays (what set_image takes)."""

from __future__ import annotations

from typing import List

import numpy as np


def check_rgb_image(image, what: str = "image") -> np.ndarray:
    """`image` if it is an HxWx3 uint8 array of at least one pixel, else ValueError saying what it is."""
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
            and image.shape[0] > 0 and image.shape[1] > 0):
        got = f"shape {tuple(image.shape)}, dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{what}: {got}; expected an HxWx3 uint8 RGB array")
    return image


def check_rgb_images(images, what: str = "images") -> List[np.ndarray]:
    """`images` as a list of HxWx3 uint8 arrays, or ValueError naming the first that is not: found before any
    image is embedded."""
    return [check_rgb_image(im, f"{what}[{i}]") for i, im in enumerate(images)]
