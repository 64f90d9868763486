"""How far set_image_on_device's torch resize moves SAM's masks from SamPredictor.set_image's PIL resize.

MobileSAM's real weights (its decoder is SAM's own), scikit-image's sample photos, a 3 x 3 grid of
single-point prompts per photo, multimask output: for each prompt and each of the 3 masks, the IoU
between the masks predicted after PIL's resize and after set_image_on_device's. Runs on the CPU.

    python scripts/resize_parity.py [--device cpu]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from segment_anything import SamPredictor

from sam_sparse import build_sam, fetch_mobile_sam
from sam_sparse.predictor import set_image_on_device
from sam_sparse.segment import SAMPLES, load_image


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).sum(axis=(-1, -2))
    union = (a | b).sum(axis=(-1, -2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sam = build_sam("mobile_sam", fetch_mobile_sam(), device=args.device)
    pil, dev = SamPredictor(sam), SamPredictor(sam)
    all_ious = []
    for name in SAMPLES:
        image = load_image(name)
        h, w = image.shape[:2]
        with torch.inference_mode():
            pil.set_image(image)
            set_image_on_device(dev, image)
            ious = []
            for fy in (0.25, 0.5, 0.75):
                for fx in (0.25, 0.5, 0.75):
                    pt, lab = np.array([[fx * w, fy * h]]), np.array([1])
                    a = pil.predict(point_coords=pt, point_labels=lab)[0]
                    b = dev.predict(point_coords=pt, point_labels=lab)[0]
                    ious.extend(mask_ious(a, b).tolist())
        ious = np.array(ious)
        all_ious.append(ious)
        print(f"{name:10s} {h}x{w}: mask IoU PIL vs torch resize: median {np.median(ious):.4f}, "
              f"min {ious.min():.4f} over {ious.size} masks")
    ious = np.concatenate(all_ious)
    print(f"all photos: median {np.median(ious):.4f}, 5th percentile {np.percentile(ious, 5):.4f}, "
          f"min {ious.min():.4f} over {ious.size} masks")


if __name__ == "__main__":
    main()
