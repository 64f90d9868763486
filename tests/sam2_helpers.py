"""Small random SAM 2 models for the tests: sam2's own build_sam2 and configs, on random weights.

No SAM 2 checkpoint can be downloaded here, so every SAM 2 test runs on sam2's random initialization with
the attention sharpened (sharpen_attention_): at init, q.k is small and every softmax is close to
uniform, which would let a wrong key order or mask pass unnoticed. The tests run at a reduced image size
(256 px: Hiera grids 64 / 32 / 16 / 8, stage 3's 14 x 14 windows overhanging its 16 x 16 grid, global
blocks of 256 tokens) to keep the CPU reference path quick; SAM2ImagePredictor then needs the model's
feature sizes, which sam_sparse.patches.sam2.image_predictor gives it.
"""

import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("sam2", reason="SAM 2 tests need the sam2 extra (README: install)")

from sam2.build_sam import build_sam2  # noqa: E402

from sam_sparse.sam2_layers import SAM2_CONFIGS  # noqa: E402


def sharpen_attention_(model, gain=3.0, seed=0):
    """Scale every query and key projection by `gain` (logits by gain**2) and give the position embeddings
    random values, so attention is far from uniform: Hiera's qkv (its q and k thirds) and the mask
    decoder's q_proj / k_proj."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
                p[: 2 * p.shape[0] // 3] *= gain
            elif name.endswith(("q_proj.weight", "k_proj.weight")) and "memory_attention" not in name:
                p *= gain
            elif name.endswith(("pos_embed", "pos_embed_window")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def small_sam2(model_type="sam2.1_hiera_t", image_size=256, seed=0, gain=3.0, **overrides):
    """sam2's build_sam2 for `model_type` (its released config, post-processing on, as users get it) at
    `image_size`, random weights (seeded) with sharpened attention, eval mode, on the CPU."""
    torch.manual_seed(seed)
    extra = [f"++model.image_size={image_size}"] + [f"++model.{k}={v}" for k, v in overrides.items()]
    model = build_sam2(SAM2_CONFIGS[model_type], None, device="cpu", hydra_overrides_extra=extra)
    return sharpen_attention_(model.eval(), gain, seed)


def photo(h=180, w=240, seed=0):
    """An HxWx3 uint8 image with structure (discs on a gradient) and noise."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), np.zeros_like(xx)], -1).astype(np.float32)
    for cy, cx, r in ((h // 2, w // 3, h // 5), (h // 3, 3 * w // 4, h // 7)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (220, 40, 90)
    return np.clip(img + g.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


@contextlib.contextmanager
def compile_backend(backend=None):
    """Inside, torch.compile(fn, mode=..., ...) calls (sam2's SAM2VideoPredictorVOS makes them at build time)
    go to `backend` without their mode: "eager" (dynamo alone: a graph break or value-dependent branch
    fails), "aot_eager" (also fake tensors and functionalization), "inductor" (code generation, no GEMM
    search). None: as they are."""
    if backend is None:
        yield
        return
    compile_ = torch.compile
    torch.compile = lambda fn=None, mode=None, **kwargs: compile_(fn, **kwargs, backend=backend)
    try:
        yield
    finally:
        torch.compile = compile_


def small_video_predictor(image_size=128, seed=0, gain=3.0, vos_optimized=False, vos_backend=None):
    """sam2's build_sam2_video_predictor for sam2.1_hiera_t (post-processing on, as users get it) at
    `image_size` (the memory grid is image_size / 16 a side), random weights (seeded), eval mode, CPU, with
    the attention sharpened as small_sam2's and the memory attention's q / k projections scaled by `gain` too:
    at init its softmax is near uniform, and a wrong key order or mask would pass unnoticed.

    vos_backend: build SAM2VideoPredictorVOS with SAM 2's torch.compile calls (max-autotune, fullgraph) sent
    to this backend without the mode (compile_backend)."""
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(seed)
    if vos_backend is not None:
        vos_optimized = True
        torch._dynamo.reset()
    with compile_backend(vos_backend):
        model = build_sam2_video_predictor(SAM2_CONFIGS["sam2.1_hiera_t"], None, device="cpu",
                                           hydra_overrides_extra=[f"++model.image_size={image_size}"],
                                           vos_optimized=vos_optimized)
    sharpen_attention_(model.eval(), gain, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("memory_attention") and name.endswith(("q_proj.weight", "k_proj.weight")):
                p *= gain
    return model


def fit_rope_tables_(model):
    """Give every memory RoPEAttention the rotary table of the model's memory grid (image_size / backbone
    stride a side), on the model's device. SAM 2 makes them for its 1024 px grid (64 x 64) at build time and
    remakes them inside forward when the grid differs: traced by torch.compile, that remake
    (compute_axial_cis: arange, outer, polar on the CPU) becomes CPU code in the CUDA graph, and inductor's
    C++ code generation stalled the GPU test for minutes. At 1024 px, as users run the VOS predictor, the
    table is never remade."""
    from sam2.modeling.sam.transformer import RoPEAttention

    side = model.image_size // model.backbone_stride
    device = next(model.parameters()).device
    for m in model.modules():
        if isinstance(m, RoPEAttention):
            m.freqs_cis = m.compute_cis(end_x=side, end_y=side).to(device)
    return model


def write_frames(folder, count=5, h=90, w=120, seed=0):
    """`count` JPEG frames 00000.jpg, ... in `folder` (what SAM 2's init_state reads): the discs of photo()
    drifting right by 4 px a frame, fresh noise each frame. Returns the folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    base = photo(h, w, seed)
    for i in range(count):
        frame = np.roll(base, 4 * i, axis=1)
        noise = np.random.default_rng(seed + i).normal(0, 6, frame.shape)
        Image.fromarray(np.clip(frame + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg")
    return folder
