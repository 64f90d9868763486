"""What the amg test files share."""

import numpy as np


def stub_generate(self, image, embedding=None, prepared=None):
    """AutomaticMaskGenerator.generate without the model: two masks from the image's brightness, in the generator's
    record format for its output mode. For tests of where outputs go and which images run, not of the
    masks (tests/test_amg.py checks those against segment-anything's generator)."""
    import torch
    from segment_anything.utils.amg import coco_encode_rle, mask_to_rle_pytorch

    h, w = image.shape[:2]
    bright = image.mean(-1) > image.mean()
    records = []
    for m in (bright, ~bright):
        ys, xs = np.nonzero(m)
        bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)), int(np.ptp(ys))] if len(xs) else [0, 0, 0, 0]
        seg = m if self.output_mode == "binary_mask" else coco_encode_rle(mask_to_rle_pytorch(torch.from_numpy(m)[None])[0])
        records.append(dict(segmentation=seg, area=int(m.sum()), bbox=bbox, predicted_iou=0.9,
                            point_coords=[[w / 2, h / 2]], stability_score=0.95, crop_box=[0, 0, w, h]))
    return records
