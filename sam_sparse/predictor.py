"""SamPredictor.set_image with the resize on the model's device, and an encoder in another dtype; predict
without a device wait per prompt array and per result (DevicePredictor, predict_on_device).

segment-anything's set_image resizes the photo with PIL on the CPU (about 34 ms for a 1500 x 2250
photo, more than a patched bf16 encoder takes on an H200) and runs the encoder in the predictor's
dtype. set_image_on_device does the same steps on the GPU and lets the image encoder run in bf16 or
fp16 while the prompt encoder and mask decoder stay float32 (SAM's predictor needs them in float32):

    sam.image_encoder.to(torch.bfloat16)          # the rest of sam stays float32
    predictor = SamPredictor(sam)
    set_image_on_device(predictor, image)         # instead of predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=..., point_labels=...)

Its resize is torch's antialiased bilinear, not PIL's: docs/benchmarks.md gives the mask IoU between
the two on the sample photos (scripts/resize_parity.py).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .images import check_rgb_image


@torch.no_grad()
def set_image_on_device(predictor, image: np.ndarray, image_format: str = "RGB", encoder=None) -> None:
    """predictor.set_image(image), with the resize and normalization on the model's device.

    image: HxWx3 uint8, in image_format ("RGB" or "BGR"). The encoder runs in its own parameters'
    dtype; its features are handed to the predictor as float32. encoder: what runs the image encoder
    on the (1, 3, 1024, 1024) input (default model.image_encoder; DevicePredictor gives a graphed one).
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format={image_format!r}: expected 'RGB' or 'BGR'")
    check_rgb_image(image)
    model = predictor.model
    if image_format != model.image_format:
        image = image[..., ::-1]
    h, w = image.shape[:2]
    target = predictor.transform.get_preprocess_shape(h, w, predictor.transform.target_length)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(predictor.device, non_blocking=True)
    x = pixels.permute(2, 0, 1)[None].float()
    # Antialiased like PIL's resize; rounded to whole pixel values as SAM's uint8 path is.
    x = F.interpolate(x, size=target, mode="bilinear", antialias=True, align_corners=False).round_().clamp_(0, 255)
    predictor.reset_image()
    predictor.original_size = (h, w)
    predictor.input_size = tuple(x.shape[-2:])
    dtype = next(model.image_encoder.parameters()).dtype
    predictor.features = (encoder or model.image_encoder)(model.preprocess(x).to(dtype)).float()
    predictor.is_image_set = True


class DevicePredictor:
    """predictor.predict(...) (a SamPredictor or a SAM2ImagePredictor, image already set) with one copy to
    the device and one back per call, and no other wait for the device; with cuda_graph=True, the prompt
    encoder, mask decoder and mask upsampling are captured as one CUDA graph per prompt signature (which
    arrays are given, their shapes, the flags, the image's size) and replayed.

        fast = DevicePredictor(predictor, cuda_graph=True)
        set_image_on_device(predictor, image)       # or predictor.set_image(image)
        masks, scores, low_res = fast.predict(point_coords=..., point_labels=...)

    The results are predict's: the same arrays (dtype, shape, values), computed by the steps of the
    predictor's predict_torch (SAM 1) / _predict (SAM 2) on the same inputs (maskgen's adapters; their
    prompt encoding gives segment-anything's bits without its boolean-mask indexing, which waits for the
    device and cannot be captured). segment-anything's predict uploads each prompt array on its own and
    copies its three results back one by one, each copy waiting for the device. A graph replays the
    captured kernels; its first call per signature runs the steps three
    times and captures (a capture that fails falls back to the eager path for that signature;
    `graph_errors` says why). One DevicePredictor per thread.

    set_image(image) is set_image_on_device for a SamPredictor and SAM2ImagePredictor.set_image's steps
    for SAM 2; with cuda_graph=True the image encoder (at batch 1 its kernel launches take the host
    longer than the GPU takes to run them) replays a CUDA graph too (cuda_graphs.GraphedFunction).
    The features are the encoder's, bit for bit.
    """

    def __init__(self, predictor, cuda_graph: bool = False):
        from .maskgen import Sam2Adapter, SamAdapter, model_family

        self.predictor = predictor
        self.family = model_family(predictor)
        self.adapter = (SamAdapter(predictor.model) if self.family == "sam" else
                        Sam2Adapter(predictor.model, transforms=predictor._transforms))
        self.device = torch.device(predictor.device)
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.graph_errors = {}
        self._graphs = {}
        self._staging = None
        self._encoder = None
        if self.cuda_graph:
            from .cuda_graphs import GraphedFunction

            model = predictor.model
            if self.family == "sam":
                self._encoder = GraphedFunction(model.image_encoder, state=functools.partial(
                    _graph_state, model.image_encoder))
            else:  # forward_image: the image encoder, then the decoder's high-resolution convolutions
                self._encoder = GraphedFunction(model.forward_image, state=functools.partial(
                    _graph_state, model.image_encoder, model.sam_mask_decoder))

    @property
    def encoder_graph(self):
        """The image encoder's cuda_graphs.GraphedFunction (its `errors`, `graphs`), or None without graphs."""
        return self._encoder

    @torch.inference_mode()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """The predictor's set_image(image) (image: HxWx3 uint8; image_format: SAM 1 only), its encoder
        graphed with cuda_graph=True. SAM 1: set_image_on_device's resize on the device; SAM 2:
        SAM2ImagePredictor.set_image's own transforms."""
        from .maskgen.adapters import sam2_features
        from .patches import observing

        # an observed patched model runs eagerly: its observers are Python, which a replay skips
        encoder = None if observing(self.predictor.model) else self._encoder
        if self.family == "sam":
            set_image_on_device(self.predictor, image, image_format, encoder=encoder)
            return
        if image_format != "RGB":
            raise ValueError(f"image_format={image_format!r}: SAM2ImagePredictor takes RGB images")
        p, model = self.predictor, self.predictor.model
        p.reset_predictor()
        p._orig_hw = [image.shape[:2]]
        x = p._transforms(image)[None, ...].to(p.device)
        feats = sam2_features(model, (encoder or model.forward_image)(x), p._bb_feat_sizes)
        p._features = {"image_embed": feats[-1], "high_res_feats": feats[:-1]}
        p._is_image_set = True

    @torch.inference_mode()
    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output: bool = True,
                return_logits: bool = False, normalize_coords: bool = True):
        """The predictor's predict(...) arguments and results (normalize_coords: SAM 2 only)."""
        from .maskgen.transfer import pack, to_device

        if self.family == "sam" and not normalize_coords:  # SamPredictor.predict has no such argument
            raise ValueError("normalize_coords=False: SAM 2's predictor only; a segment-anything SamPredictor takes "
                             "pixel coordinates of the original image")
        arrays = self._prompts(point_coords, point_labels, box, mask_input)
        flags = (bool(multimask_output), bool(return_logits), bool(normalize_coords))
        if self.cuda_graph:
            out = self._replay(arrays, flags)
        else:
            out = self._fetch(*pack(self._run(to_device(arrays, self.device), flags)))
        return out["masks"], out["iou"], out["low_res"]

    # --- the family's predict, split at the device boundary ------------------------------------------

    def _prompts(self, point_coords, point_labels, box, mask_input) -> dict:
        """predict's host-side conversions: numpy arrays of the dtypes its tensors get."""
        p = self.predictor
        if not (p.is_image_set if self.family == "sam" else p._is_image_set):
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if point_coords is not None and point_labels is None:
            raise ValueError("point_labels must be supplied if point_coords is supplied.")
        arrays = {}
        if self.family == "sam":  # SamPredictor.predict: ResizeLongestSide on the host, in float64
            if point_coords is not None:
                arrays["coords"] = p.transform.apply_coords(point_coords, p.original_size)
            if box is not None:
                arrays["box"] = p.transform.apply_boxes(box, p.original_size)
        else:  # SAM2ImagePredictor._prep_prompts normalizes on the device, from float32
            if point_coords is not None:
                arrays["coords"] = point_coords
            if box is not None:
                arrays["box"] = box
        if point_coords is not None:
            arrays["labels"] = point_labels
        if mask_input is not None:
            arrays["mask"] = mask_input
        dtypes = dict(coords=torch.float, box=torch.float, labels=torch.int, mask=torch.float)
        return {k: torch.as_tensor(v, dtype=dtypes[k]).numpy() for k, v in arrays.items()}

    def _run(self, dev: dict, flags) -> dict:
        """predict's device-side steps on the uploaded prompts (predict_torch / _predict, through the
        adapter, whose prompt encoding never waits for the device): masks, IoU scores, low-res logits."""
        from .maskgen import Embedding

        multimask_output, return_logits, normalize_coords = flags
        p = self.predictor
        coords, labels, box, mask = (dev.get(k) for k in ("coords", "labels", "box", "mask"))
        if self.family == "sam":
            masks, iou, low_res = self.adapter.predict(
                Embedding(p.features, tuple(p.input_size), tuple(p.original_size)),
                coords[None, :, :] if coords is not None else None, labels[None, :] if labels is not None else None,
                box[None, :] if box is not None else None, mask[None, :, :, :] if mask is not None else None,
                multimask_output, return_logits)
            return {"masks": masks[0], "iou": iou[0], "low_res": low_res[0]}
        orig_hw = p._orig_hw[-1]
        if coords is not None:
            coords = p._transforms.transform_coords(coords, normalize=normalize_coords, orig_hw=orig_hw)
            if coords.dim() == 2:
                coords, labels = coords[None, ...], labels[None, ...]
        if box is not None:
            box = p._transforms.transform_boxes(box, normalize=normalize_coords, orig_hw=orig_hw)
        if mask is not None and mask.dim() == 3:
            mask = mask[None, :, :, :]
        size = self.adapter.model.image_size
        masks, iou, low_res = self.adapter.predict(Embedding(p._features, (size, size), tuple(orig_hw)), coords, labels,
                                                   box, mask, multimask_output, return_logits, p.mask_threshold)
        return {"masks": masks.squeeze(0).float(), "iou": iou.squeeze(0).float(), "low_res": low_res.squeeze(0).float()}

    def _fetch(self, packed: torch.Tensor, layout) -> dict:
        """The packed results as fresh numpy arrays: one copy into a reused pinned buffer, then out of it."""
        from .maskgen.transfer import unpack

        if self.device.type != "cuda":
            return {k: v.copy() for k, v in unpack(packed.numpy(), layout).items()}
        if self._staging is None or self._staging.numel() < packed.numel():
            self._staging = torch.empty(packed.numel(), dtype=torch.uint8, pin_memory=True)
        staging = self._staging[:packed.numel()]
        staging.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return {k: v.copy() for k, v in unpack(staging.numpy(), layout).items()}

    # --- CUDA graphs ----------------------------------------------------------------------------------

    def _features(self):
        """The predictor's image features (a tensor, or SAM 2's dict of them)."""
        return self.predictor.features if self.family == "sam" else self.predictor._features

    def _set_features(self, features) -> None:
        if self.family == "sam":
            self.predictor.features = features
        else:
            self.predictor._features = features

    def _signature(self, arrays: dict, flags) -> tuple:
        p = self.predictor
        size = (tuple(p.input_size), tuple(p.original_size)) if self.family == "sam" else tuple(p._orig_hw[-1])
        feats = [t for t in _tensors(self._features())]
        return (tuple((k, a.dtype.str, a.shape) for k, a in arrays.items()), flags, size,
                tuple((tuple(t.shape), t.stride(), t.dtype) for t in feats))

    def _replay(self, arrays: dict, flags) -> dict:
        from .maskgen.transfer import pack, stage, to_device

        key = self._signature(arrays, flags)
        if key not in self._graphs:
            self._graphs[key] = self._capture(arrays, flags, key)
        entry = self._graphs[key]
        if entry is None:  # capture failed for this signature: eager
            return self._fetch(*pack(self._run(to_device(arrays, self.device), flags)))
        host, _ = stage(arrays, pin=True)
        entry["inputs"].copy_(host, non_blocking=True)
        current = self._features()
        if entry["source"] is not current:  # a new image: its features into the graph's own copies
            for dst, src in zip(_tensors(entry["features"]), _tensors(current)):
                dst.copy_(src)
            entry["source"] = current
        entry["graph"].replay()
        return self._fetch(entry["outputs"], entry["layout"])

    def _capture(self, arrays: dict, flags, key):
        from .cuda_graphs import capture
        from .maskgen.transfer import pack, stage, views

        host, layout = stage(arrays, pin=True)
        inputs = host.to(self.device)
        dev = views(inputs, layout)
        current = self._features()
        features = _map_tensors(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                                .copy_(t), current)
        self._set_features(features)
        try:
            with torch.cuda.device(self.device):
                graph, (outputs, out_layout) = capture(lambda: pack(self._run(dev, flags)), warmup=3)
        except Exception as e:  # noqa: BLE001  e.g. a host-to-device copy inside the step; this signature runs eagerly
            self.graph_errors[key] = f"{type(e).__name__}: {e}"
            return None
        finally:
            self._set_features(current)
        return dict(graph=graph, inputs=inputs, outputs=outputs, layout=out_layout, features=features, source=current)


def _graph_state(*modules) -> tuple:
    """What a graph of these modules reads besides its inputs: their parameters' storage, and the patch
    epoch (a patch, restore or re-patch changes the attention the graph would replay)."""
    from .cuda_graphs import module_storage
    from .patches import patch_epoch

    return module_storage(*modules), patch_epoch()


def predict_on_device(predictor, point_coords=None, point_labels=None, box=None, mask_input=None,
                      multimask_output: bool = True, return_logits: bool = False, normalize_coords: bool = True):
    """predictor.predict(...) with one copy each way and no other wait for the device (DevicePredictor,
    without CUDA graphs)."""
    return DevicePredictor(predictor).predict(point_coords, point_labels, box, mask_input, multimask_output,
                                              return_logits, normalize_coords)


def _tensors(features):
    """The tensors of a predictor's features, in a fixed order (SAM 2: image_embed, then high_res_feats)."""
    if isinstance(features, torch.Tensor):
        return [features]
    return [features["image_embed"], *features["high_res_feats"]]


def _map_tensors(fn, features):
    if isinstance(features, torch.Tensor):
        return fn(features)
    return {"image_embed": fn(features["image_embed"]), "high_res_feats": [fn(t) for t in features["high_res_feats"]]}


def image_predictor(model):
    """The image predictor of the model's family, ready for set_image(image) / predict(point_coords,
    point_labels, box, multimask_output=...): segment-anything's SamPredictor for a Sam, sam2's
    SAM2ImagePredictor for a SAM 2 model (told the feature sizes of the model's image size)."""
    from .patches import model_family

    if model_family(model) == "sam2":
        from .patches.sam2 import image_predictor as sam2_image_predictor

        return sam2_image_predictor(model)
    from segment_anything import SamPredictor

    return SamPredictor(model)


def predict_points(predictor, points: np.ndarray, multimask_output: bool = True):
    """Each pixel point (x, y) of `points` (P, 2) as its own one-point foreground prompt, all in one decoder
    batch, on the image set last (SamPredictor.predict_torch, or SAM2ImagePredictor's batched path).
    Returns (masks (P, C, H, W) bool, scores (P, C)) on the predictor's device."""
    from segment_anything import SamPredictor

    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if isinstance(predictor, SamPredictor):
        coords = predictor.transform.apply_coords(pts, predictor.original_size)
        coords = torch.as_tensor(coords, dtype=torch.float, device=predictor.device)[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=predictor.device)
        masks, scores, _ = predictor.predict_torch(coords, labels, multimask_output=multimask_output)
        return masks, scores
    _, coords, labels, _ = predictor._prep_prompts(pts[:, None, :], np.ones((len(pts), 1), np.int64), None, None, True)
    masks, scores, _ = predictor._predict(coords, labels, multimask_output=multimask_output)
    return masks, scores
