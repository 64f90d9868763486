"""Calibrated policies: measure where each layer's attention goes on your images, keep what holds it.

    policy, report = calibrate(model, images, target_density=0.3)     # or min_mass=0.99
    policy.to_yaml()                                                   # an ordinary policy file
    print(report)                                                      # retained mass per layer / head

The model runs unpatched-equivalent (patched with a dense probe policy, which computes SAM's own
attention) on the calibration images; every chosen layer reports, per head, how much softmax
probability each (query block, key block) pair holds (kernels.block_attention_mass: no N x N tensor).
From those statistics, per layer and head:

- image layers (encoder.global, and encoder.window if asked): a set of block-grid offsets from the query
  block plus "sink" key blocks every query keeps (pattern relative_blocks), chosen greedily by
  probability mass per token pair until the layer reaches the target density or each head the target
  mass. Offsets move with the query, so the policy transfers to new images.
- decoder token-to-image layers: a radius around the call's prompts per head (pattern region_focused
  with no background), from the mass measured at each distance from the prompts.
- a head whose choice keeps nearly everything (DENSE_ABOVE) stays dense, and so does a layer whose heads
  all do; decoder.image_to_token has one key block and decoder.self one block: nothing to choose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__
from .geometry import LayerGeometry, MemoryLayout
from .kernels import block_attention_mass
from .masks import block_context, mask_density, pair_weights
from .patches import ParityReport, patch_sam, verify_parity
from .patches.video_parity import FRAME_SUFFIXES
from .policy import Policy
from .images import check_rgb_images
from .predictor import image_predictor, predict_points
from .sam2_layers import MEMORY_HEADS, MEMORY_PREFIX, memory_layer, nominal_memory
from .table import format_table

IMAGE_KINDS = ("encoder.global", "encoder.window")
PROMPT_KINDS = ("decoder.token_to_image", "decoder.final_token_to_image")
CALIBRATED_KINDS = IMAGE_KINDS + PROMPT_KINDS
DEFAULT_KINDS = ("encoder.global",) + PROMPT_KINDS
DENSE_ABOVE = 0.9  # a head that would keep more of its token pairs than this stays dense


@dataclass
class LayerStats:
    """What calibration measured on one layer, summed over calls (images, prompts, batch rows).

    mass: image layers: float64 (H, QB, KB) probability mass per block pair, in queries.
    bucket_mass: prompt layers: float64 (H, NB) mass on key blocks at prompt distance bucket b (0: the
        block overlaps or touches a prompt; b >= 1: gap in [b - 1, b) block extents).
    bucket_share: prompt layers: float64 (NB,) token share of the key side in each bucket, summed over calls.
    calls: batch rows seen.
    """

    layer: LayerGeometry
    mass: Optional[torch.Tensor] = None
    bucket_mass: Optional[torch.Tensor] = None
    bucket_share: Optional[torch.Tensor] = None
    calls: int = 0


@dataclass
class HeadChoice:
    """One head's calibrated pattern. offsets/sinks for image layers, radius for prompt layers; dense when
    nothing is dropped. retained: share of the measured probability mass the choice keeps; density:
    share of token pairs kept (prompt layers: averaged over the calibration calls)."""

    dense: bool
    retained: float
    density: float
    offsets: Tuple[Tuple[int, int], ...] = ()
    sinks: Tuple[int, ...] = ()
    radius: Optional[int] = None


@dataclass
class CalibrationReport:
    """Per layer and head: what was kept and what it holds. parity: verify_parity on held-out images."""

    target: str
    images: int
    layers: Dict[str, Tuple[str, List[HeadChoice]]] = field(default_factory=dict)
    parity: Optional[ParityReport] = None
    notes: List[str] = field(default_factory=list)

    def layer_density(self, name: str) -> float:
        return float(np.mean([c.density for c in self.layers[name][1]]))

    def layer_retained(self, name: str) -> float:
        return float(np.mean([c.retained for c in self.layers[name][1]]))

    def __str__(self) -> str:
        lines = [f"sam-sparse calibration: {self.target}, {self.images} calibration image(s)"]
        rows = []
        for name, (kind, heads) in self.layers.items():
            per_head = " ".join(f"{c.retained:.3f}" for c in heads)
            dense = sum(c.dense for c in heads)
            rows.append((name, kind, f"{self.layer_density(name):.3f}", f"{self.layer_retained(name):.4f}",
                         f"{min(c.retained for c in heads):.4f}", f"{dense}/{len(heads)}", per_head))
        lines.append(format_table(("layer", "kind", "density", "retained mass (mean)", "min head", "dense heads",
                                   "retained per head"), rows))
        lines += [f"note: {n}" for n in self.notes]
        if self.parity is not None:
            lines += ["", "held-out parity:", str(self.parity)]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------


def _bucket(gap: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Prompt-distance bucket of each gap (see LayerStats.bucket_mass); region_focused with integer radius
    r keeps buckets 0..r."""
    b = torch.where(gap == 0, 0.0, torch.floor(gap) + 1)
    return b.clamp(max=n_buckets - 1).nan_to_num(n_buckets - 1).long()


class _Recorder:
    """PatchHandle.observe callback: accumulates LayerStats for the layers of the chosen kinds."""

    def __init__(self, kinds: Sequence[str], block_size: int):
        self.kinds = set(kinds)
        self.block_size = block_size
        self.stats: Dict[str, LayerStats] = {}

    def __call__(self, layer: LayerGeometry, prompts, q, k, rel_h, rel_w, key_tile, softmax_scale) -> None:
        if layer.kind not in self.kinds:
            return
        if layer.kind in PROMPT_KINDS and (prompts is None or layer.k_grid is None):
            return  # no prompt or no image grid: no distance to measure
        mass = block_attention_mass(q, k, rel_h=rel_h, rel_w=rel_w, key_tile=key_tile, softmax_scale=softmax_scale,
                                    block_size=self.block_size).double()  # (B, H, QB, KB)
        st = self.stats.setdefault(layer.name, LayerStats(layer))
        st.calls += mass.shape[0]
        if layer.kind in IMAGE_KINDS:
            st.mass = mass.sum(0).cpu() + (st.mass if st.mass is not None else 0)
            return
        ctx = block_context(layer, prompts, q.device)
        n_buckets = layer.k_blocks + 1
        bucket = _bucket(ctx.prompt_gap(ctx.k), n_buckets)  # (B, KB)
        per_key = mass.sum(2)  # (B, H, KB): every query block (the few tokens) together
        bm = torch.zeros(per_key.shape[1], n_buckets, dtype=torch.float64, device=mass.device)
        bm.scatter_add_(1, bucket[:, None, :].expand_as(per_key).transpose(0, 1).reshape(per_key.shape[1], -1),
                        per_key.transpose(0, 1).reshape(per_key.shape[1], -1))
        share = pair_weights(layer).sum(0).to(mass.device)  # (KB,) token share of each key block
        bs = torch.zeros(n_buckets, dtype=torch.float64, device=mass.device)
        bs.scatter_add_(0, bucket.reshape(-1), share.expand_as(bucket).reshape(-1))
        st.bucket_mass = bm.cpu() + (st.bucket_mass if st.bucket_mass is not None else 0)
        st.bucket_share = bs.cpu() + (st.bucket_share if st.bucket_share is not None else 0)


def grid_points(w: int, h: int, per_side: int) -> np.ndarray:
    """(per_side**2, 2) float32 pixel (x, y) points at the centres of a per_side x per_side partition of a
    w x h image, row by row."""
    c = (np.arange(per_side) + 0.5) / per_side
    xs, ys = np.meshgrid(c * w, c * h)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def measure(model, images: Sequence[np.ndarray], *, kinds: Sequence[str] = DEFAULT_KINDS, block_size: int = 128,
            token_order: str = "tiles", points_per_side: int = 4, prompts: Optional[Sequence[np.ndarray]] = None,
            progress: Optional[Callable[[int], None]] = None) -> Tuple[Dict[str, LayerStats], Policy, List[str]]:
    """Run `model` (a segment_anything Sam or a SAM 2 model) on `images` and return ({layer name: LayerStats},
    the probe policy whose block size and token order the statistics use, notes).

    Each image is embedded once (the family's predictor: set_image); prompt layers see one call per point
    prompt: `prompts[i]` (P, 2) pixel (x, y) points for image i, or a points_per_side grid.
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = sorted(set(kinds) - set(CALIBRATED_KINDS))
    if unknown:
        raise ValueError(f"layers: {', '.join(unknown)} cannot be calibrated; choose from {', '.join(CALIBRATED_KINDS)}")
    images = check_rgb_images(images)
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"prompts: {len(prompts)} point arrays for {len(images)} images; give one per image")
    if not isinstance(points_per_side, int) or isinstance(points_per_side, bool) or points_per_side < 1:
        raise ValueError(f"points_per_side={points_per_side!r}: expected an integer >= 1")
    if not (hasattr(model, "prompt_encoder") or hasattr(model, "sam_prompt_encoder")):
        raise TypeError(f"calibrate measures a whole model (a segment_anything Sam or a sam2 SAM2Base), got "
                        f"{type(model).__name__}")
    probe = Policy.from_dict({"name": "calibration-probe", "block_size": block_size, "token_order": token_order,
                              "rules": [{"match": "*", "pattern": "dense"}]})
    recorder = _Recorder(kinds, block_size)
    predictor = image_predictor(model)
    prior = getattr(model, "_sam_sparse_handle", None)
    if prior is not None:
        prior.restore()
    try:  # the model is left as found, whatever fails
        handle = patch_sam(model, probe)
        try:
            with handle.observe(recorder), torch.inference_mode():
                for i, image in enumerate(images):
                    predictor.set_image(image)
                    if any(k in PROMPT_KINDS for k in kinds):
                        pts = prompts[i] if prompts is not None else grid_points(image.shape[1], image.shape[0], points_per_side)
                        predict_points(predictor, pts)
                    if progress is not None:
                        progress(1)
        finally:
            handle.restore()
    finally:
        if prior is not None:
            prior.enable()
    notes = []
    missing = [k for k in kinds if not any(s.layer.kind == k for s in recorder.stats.values())]
    if missing:
        notes.append(f"this model has no {', '.join(missing)} layer that sam-sparse patches: left dense")
    return recorder.stats, probe, notes


# ---------------------------------------------------------------------------------------------------
# Measuring SAM 2's video memory attention
# ---------------------------------------------------------------------------------------------------



def video_frames(folder) -> List[str]:
    """The frame files of a frames folder as SAM 2's init_state reads them (JPEGs named by their frame
    index: 00000.jpg, ...), in frame order. ValueError saying what is wrong: not a folder, fewer than two
    frames (the memory is first read on frame 1), a JPEG whose name is not a frame index, a frame that is not an
    image (its header is read; SAM 2 decodes every frame later)."""
    import os

    from PIL import Image

    if not os.path.isdir(folder):
        raise ValueError(f"frames {folder}: not a folder; give a folder of JPEG frames named 00000.jpg, 00001.jpg, ... "
                         "(ffmpeg -i video.mp4 -q:v 2 -start_number 0 DIR/'%05d.jpg')")
    names = [n for n in os.listdir(folder) if os.path.splitext(n)[1] in FRAME_SUFFIXES]
    bad = [n for n in names if not os.path.splitext(n)[0].isdigit()]
    if bad:
        raise ValueError(f"frames {folder}: {bad[0]} is not named by its frame index; SAM 2 reads JPEGs named "
                         "00000.jpg, 00001.jpg, ...")
    if len(names) < 2:
        raise ValueError(f"frames {folder}: {len(names)} JPEG frame(s); memory attention needs at least 2 "
                         "(.jpg / .jpeg named by frame index)")
    names.sort(key=lambda n: int(os.path.splitext(n)[0]))
    paths = [os.path.join(folder, n) for n in names]
    for p in paths:
        try:
            Image.open(p).close()  # opening reads and checks the header
        except Exception as e:  # PIL raises several kinds for a file that is not an image
            raise ValueError(f"frames {folder}: frame {p} cannot be read as an image ({type(e).__name__}: "
                             f"{' '.join(str(e).split())}); SAM 2 reads every JPEG in the folder") from None
    return paths


def frame_prompt(frames: Sequence[str], point=None, box=None) -> tuple:
    """The prompt on frame 0 of a clip (frames: video_frames' paths), checked against that frame's size:
    ("point", (x, y)) | ("box", (x0, y0, x1, y1)) in its pixels; neither given: the frame's centre point.
    ValueError saying what is wrong: both given, frame 0 unreadable, a prompt outside the frame."""
    from PIL import Image

    if point is not None and box is not None:
        raise ValueError("give one prompt on frame 0: a point or a box, not both")
    try:
        with Image.open(frames[0]) as im:
            w, h = im.size
    except Exception as e:  # PIL raises several kinds for a file that is not an image
        raise ValueError(f"frame {frames[0]}: cannot be read as an image ({type(e).__name__}: {e})") from None
    if point is None and box is None:
        return ("point", (w / 2, h / 2))
    if point is not None:
        x, y = (float(v) for v in point)
        if not (0 <= x <= w and 0 <= y <= h):
            raise ValueError(f"point {x:g},{y:g} is outside frame 0 ({w}x{h} px: 0 <= X <= {w}, 0 <= Y <= {h})")
        return ("point", (x, y))
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box {x0:g},{y0:g},{x1:g},{y1:g}: expected X0<X1 and Y0<Y1")
    if not (0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h):
        raise ValueError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is outside frame 0 ({w}x{h} px)")
    return ("box", (x0, y0, x1, y1))


@dataclass
class MemoryStats:
    """Memory cross-attention mass of one layer for one memory shape, summed over calls (batch rows).

    name: the RoPEAttention module's qualified name (memory_attention.layers.{i}.cross_attn_image).
    index: the layer's index. frames: one bool per memory frame in key order (True: a conditioning
    frame). grid: (rows, cols) of the query frame and of every memory frame; keys are the frames' tokens
    in raster order, then pointer_tokens object-pointer tokens.
    mass: float64 (H, QB, KB) softmax probability mass per (query block, key block), in queries.
    """

    name: str
    index: int
    frames: Tuple[bool, ...]
    grid: Tuple[int, int]
    pointer_tokens: int
    mass: torch.Tensor
    calls: int = 0


def rope_qk(attn, q_in: torch.Tensor, k_in: torch.Tensor, num_k_exclude_rope: int = 0):
    """(q, k) of a sam2 RoPEAttention call as its forward computes them before attention: projected,
    split into heads, rotary encoding applied (keys past the last num_k_exclude_rope excluded), shaped
    (B, N, heads, head_dim) as the kernels take them. Inputs: the call's q (B, Nq, C) and k (B, Nk, kv_in_dim)."""
    from sam2.modeling.position_encoding import apply_rotary_enc

    heads = attn.num_heads
    q = attn.q_proj(q_in).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, Nq, D)
    k = attn.k_proj(k_in).unflatten(-1, (heads, -1)).transpose(1, 2)
    side = int(math.isqrt(q.shape[-2]))
    freqs = attn.freqs_cis.to(q.device)
    if freqs.shape[0] != q.shape[-2]:  # as RoPEAttention.forward: a grid other than its feat_sizes
        freqs = attn.compute_cis(end_x=side, end_y=side).to(q.device)
    n_rope = k.shape[-2] - num_k_exclude_rope
    q, k_rope = apply_rotary_enc(q, k[:, :, :n_rope], freqs_cis=freqs, repeat_freqs_k=attn.rope_k_repeat)
    k = torch.cat([k_rope, k[:, :, n_rope:]], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2)


class MemoryRecorder:
    """The memory cross-attention's block mass per call, summed per (layer, memory shape) into MemoryStats:
    attach(model) puts forward pre-hooks on a SAM 2 model's memory cross-attentions (RoPEAttention), which
    recompute the call's q and k (rope_qk) and hand them to add(). The memory's conditioning frames are
    taken to be its first `cond_frames` (SAM 2 puts prompted frames first; calibration prompts one)."""

    def __init__(self, block_size: int, cond_frames: int = 1):
        self.block_size, self.cond_frames = block_size, cond_frames
        self.stats: Dict[tuple, MemoryStats] = {}
        self.hooks = []

    def attach(self, model) -> "MemoryRecorder":
        for i, layer in enumerate(model.memory_attention.layers):
            name = f"memory_attention.layers.{i}.cross_attn_image"
            self.hooks.append(layer.cross_attn_image.register_forward_pre_hook(
                self._hook(name, i, layer.cross_attn_image), with_kwargs=True))
        return self

    def _hook(self, name, index, attn):
        def record(module, args, kwargs):
            # forward(q, k, v, num_k_exclude_rope=0); SAM 2's layers pass them by keyword
            given = dict(zip(("q", "k", "v", "num_k_exclude_rope"), args), **kwargs)
            q_in, k_in, pointers = given["q"], given["k"], int(given.get("num_k_exclude_rope", 0))
            q, k = rope_qk(attn, q_in, k_in, pointers)
            self.add(name, index, q, k, pointers)
        return record

    def add(self, name: str, index: int, q: torch.Tensor, k: torch.Tensor, pointers: int) -> None:
        """One call: q (B, Nq, H, D) on a square frame grid, k (B, frames * Nq + pointers, H, D)."""
        n = q.shape[1]
        side = int(math.isqrt(n))
        frames = (k.shape[1] - pointers) // n
        if side * side != n or frames * n + pointers != k.shape[1]:
            raise ValueError(f"{name}: {k.shape[1]} keys are not whole frames of {n} tokens plus {pointers} pointers")
        layout = tuple(f < self.cond_frames for f in range(frames))
        mass = block_attention_mass(q, k, block_size=self.block_size).double().sum(0).cpu()
        st = self.stats.get((name, layout, pointers))
        if st is None:
            st = self.stats[(name, layout, pointers)] = MemoryStats(name, index, layout, (side, side), pointers,
                                                                    torch.zeros_like(mass))
        st.mass += mass
        st.calls += q.shape[0]

    def remove(self):
        for h in self.hooks:
            h.remove()


def measure_memory(predictor, frames: str, *, prompt=None, block_size: int = 64, max_frames: Optional[int] = None,
                   progress: Optional[Callable[[int], None]] = None) -> List[MemoryStats]:
    """Run a SAM 2 video predictor over a frames folder and return the memory cross-attention's block mass
    per layer and memory shape (MemoryStats, every layer of every shape the clip reached).

    predictor: a sam2 SAM2VideoPredictor (unpatched: its own attention is what is measured).
    frames: a folder of JPEG frames (video_frames). prompt: on frame 0, ("point", (x, y)) or
    ("box", (x0, y0, x1, y1)) in the frames' pixels; default the centre point of frame 0.
    block_size: of the statistics (and of the policy written from them). max_frames: frames to propagate
    over (default all).
    """
    from PIL import Image

    if getattr(predictor, "_sam_sparse_handle", None) is not None:
        raise ValueError("calibrating memory attention needs the unpatched predictor (its own attention is what "
                         "is measured): restore its patch first (handle.restore() or sam_sparse.unpatch_sam)")
    paths = video_frames(frames)
    if prompt is None:
        with Image.open(paths[0]) as im:
            prompt = ("point", (im.width / 2, im.height / 2))
    kind, coords = prompt
    recorder = MemoryRecorder(block_size).attach(predictor)
    try:
        with torch.inference_mode():
            state = predictor.init_state(str(frames))
            if kind == "point":
                predictor.add_new_points_or_box(state, frame_idx=0, obj_id=0, points=np.array([coords], np.float32),
                                                labels=np.array([1], np.int32))
            else:
                predictor.add_new_points_or_box(state, frame_idx=0, obj_id=0, box=np.array(coords, np.float32))
            for _ in predictor.propagate_in_video(state, max_frame_num_to_track=max_frames):
                if progress is not None:
                    progress(1)
    finally:
        recorder.remove()
    return list(recorder.stats.values())


# The memory policy calibration writes: the real memory_local pattern (masks/memory.py, registered in
# policy/patterns.py) on memory.cross, one rule per group of layers with the same radii; every other layer
# (memory.self, the image encoder, the decoder) dense.
MEMORY_PATTERN = "memory_local"


def memory_policy(radii: Dict[int, Tuple[int, Optional[int]]], block_size: int, *, name: str = "calibrated-memory",
                  description: str = "") -> Policy:
    """The policy keeping, on memory cross-attention layer i, memory_local(radius, cond_radius) of
    radii[i] (grid tokens; cond_radius None: prompted frames whole); every other layer dense."""
    groups: Dict[Tuple[int, Optional[int]], List[int]] = {}
    for index, pair in sorted(radii.items()):
        groups.setdefault(tuple(pair), []).append(index)
    rules = [{"match": "memory.cross", "layers": layers, "pattern": MEMORY_PATTERN,
              "params": {"radius": r, "cond_radius": rc}} for (r, rc), layers in groups.items()]
    rules.append({"match": "*", "pattern": "dense"})
    return Policy.from_dict({"name": name, "description": description, "block_size": block_size,
                             "token_order": "raster", "rules": rules}, source=f"<calibrated {name}>")


def memory_mask(policy: Policy, index: int, memory: MemoryLayout) -> torch.Tensor:
    """bool (QB, KB): the block mask `policy` gives memory cross-attention layer `index` (one head, as in
    SAM 2) for a call whose keys are `memory` (all True where the policy keeps the layer dense): the
    mask the patched model computes with."""
    layer = memory_layer(f"{MEMORY_PREFIX}.{index}.cross_attn_image", "memory.cross", MEMORY_HEADS, index,
                         memory.grid, policy.block_size, memory)
    mask = policy.block_mask(layer, None, "cpu")
    return torch.ones(layer.q_blocks, layer.k_blocks, dtype=torch.bool) if mask is None else mask[0, 0]


def memory_kept(stats: Sequence[MemoryStats], policy: Policy) -> float:
    """Share of the measured mass (every call of `stats` together, heads averaged) the policy's block masks
    keep. The statistics' block size must be the policy's."""
    kept = total = 0.0
    for st in stats:
        keep = memory_mask(policy, st.index, MemoryLayout(st.frames, st.grid, st.pointer_tokens))
        if keep.shape != st.mass.shape[1:]:
            raise ValueError(f"{st.name}: statistics of {tuple(st.mass.shape[1:])} blocks, policy mask "
                             f"{tuple(keep.shape)}: measure with the policy's block size ({policy.block_size})")
        kept += float((st.mass * keep.to(torch.float64)).sum())
        total += float(st.mass.sum())
    return kept / total if total > 0 else 1.0


def memory_density(policy: Policy, index: int, memory: MemoryLayout) -> float:
    """Share of (query token, key token) pairs the policy keeps on layer `index` for the keys `memory`."""
    layer = memory_layer("", "memory.cross", MEMORY_HEADS, index, memory.grid, policy.block_size, memory)
    return mask_density(memory_mask(policy, index, memory)[None, None], layer)


@dataclass
class MemoryChoice:
    """One memory layer's calibrated radii (grid tokens; cond_radius None: conditioning frames dense), the
    share of its measured mass they keep, and their density (share of token pairs) on the nominal memory."""

    radius: int
    cond_radius: Optional[int]
    retained: float
    density: float


def choose_memory_radius(stats: Sequence[MemoryStats], nominal: MemoryLayout, block_size: int, *,
                         min_mass: Optional[float] = None, target_density: Optional[float] = None) -> MemoryChoice:
    """The memory_local radii of one layer (its statistics, every call of every memory shape), measured
    with the real pattern's block masks (memory_policy, memory_mask): with min_mass, the pair (radius,
    cond_radius) of least density on the `nominal` memory (e.g. sam2_layers.nominal_memory(grid): 7
    frames, 1 prompted, 64 pointer tokens) that keeps min_mass of the measured mass; with target_density,
    the pair that keeps the most mass at nominal density <= target_density (radius 0 with conditioning
    frames at radius 0 when none is that sparse). Radii run to the grid's longer side less one, where the
    pattern holds the whole frame (cond_radius None)."""
    _check_targets(target_density, min_mass)
    stats = list(stats)
    index = stats[0].index
    if any(st.index != index for st in stats):
        raise ValueError("choose_memory_radius: statistics of one layer at a time")
    top = max(max(st.grid) for st in stats) - 1  # the largest token gap on the grid: radius top keeps every token
    memo = {}

    def measured(r, rc):  # (kept mass, nominal density) of the pair, each built once
        if (r, rc) not in memo:
            policy = memory_policy({index: (r, rc)}, block_size)
            memo[r, rc] = (memory_kept(stats, policy), memory_density(policy, index, nominal))
        return memo[r, rc]

    # Kept mass and density both grow with either radius, so as cond_radius grows the radius that a mass
    # target needs, or a density target allows, can only shrink: one sweep down over radius in all.
    best, r = None, top
    for rc in list(range(top)) + [None]:
        if min_mass is not None:
            if measured(r, rc)[0] < min_mass - 1e-12:
                continue  # not even the whole tracked frames are enough with this little of the prompted ones
            while r > 0 and measured(r - 1, rc)[0] >= min_mass - 1e-12:
                r -= 1
            if best is None or measured(r, rc)[1] < best.density - 1e-12:
                best = MemoryChoice(r, rc, *measured(r, rc))
        else:
            while r > 0 and measured(r, rc)[1] > target_density + 1e-9:
                r -= 1
            kept, d = measured(r, rc)
            if d <= target_density + 1e-9 and (best is None or kept > best.retained + 1e-12):
                best = MemoryChoice(r, rc, kept, d)
    if best is None:
        best = MemoryChoice(0, 0, *measured(0, 0))
    return best


@dataclass
class MemoryCalibrationReport:
    """What memory calibration measured and chose. clip: the frames folder; frames: frames propagated
    over; prompt: ("point", (x, y)) | ("box", (x0, y0, x1, y1)) on frame 0; target: the target as text;
    weights: where the model's weights came from (a checkpoint path, or "random"); nominal: the memory the
    densities are given at; layers: {layer name: MemoryChoice}."""

    clip: str
    frames: int
    prompt: tuple
    target: str
    weights: str
    nominal: MemoryLayout
    block_size: int
    layers: Dict[str, MemoryChoice] = field(default_factory=dict)

    def prompt_text(self) -> str:
        kind, coords = self.prompt
        return f"{kind} ({', '.join(f'{c:g}' for c in coords)}) on frame 0"

    def nominal_text(self) -> str:
        m = self.nominal
        return (f"{len(m.frames)} memory frames ({m.cond_frames} prompted) of {m.grid[0]}x{m.grid[1]} tokens "
                f"+ {m.pointer_tokens} pointer tokens")

    def header(self) -> str:
        """YAML comment lines (each '# ...') saying what was measured, for the top of the policy file."""
        lines = [f"Calibrated by sam-sparse {__version__}: SAM 2 memory cross-attention measured on {self.clip} "
                 f"({self.frames} frames), prompt: {self.prompt_text()}, weights: {self.weights}.",
                 f"Target: {self.target}; block size {self.block_size}; density = share of token pairs kept at the "
                 f"nominal memory: {self.nominal_text()}."]
        for name, c in self.layers.items():
            cond = "whole frame" if c.cond_radius is None else c.cond_radius
            lines.append(f"{name}: radius {c.radius}, cond_radius {cond}: kept mass {c.retained:.4f}, "
                         f"density {c.density:.3f}")
        lines.append("memory.self, the image encoder and the mask decoder: dense. Verify on your clip before use "
                     "(README: SAM 2 video).")
        if self.weights == "random":
            lines.append("WEIGHTS WERE RANDOM: this file shows where random attention goes, not where SAM 2's does.")
        return "".join(f"# {line}\n" for line in lines)

    def __str__(self) -> str:
        rows = [(name, c.radius, "whole frame" if c.cond_radius is None else c.cond_radius, f"{c.retained:.4f}",
                 f"{c.density:.3f}") for name, c in self.layers.items()]
        return "\n".join([
            f"sam-sparse memory calibration: {self.target}, {self.clip} ({self.frames} frames), "
            f"prompt {self.prompt_text()}, weights {self.weights}",
            format_table(("layer", "radius", "cond_radius", "kept mass", "density (nominal memory)"), rows),
            f"nominal memory: {self.nominal_text()}",
        ])


def calibrate_memory(predictor, frames: str, *, target_density: Optional[float] = None,
                     min_mass: Optional[float] = None, prompt=None, block_size: int = 128,
                     max_frames: Optional[int] = None, name: str = "calibrated-memory", weights: str = "given",
                     progress: Optional[Callable[[int], None]] = None) -> Tuple[Policy, MemoryCalibrationReport]:
    """A memory_local policy calibrated on a clip for a SAM 2 video predictor, and a report of what it keeps.

    predictor: an unpatched sam2 SAM2VideoPredictor. frames: a folder of JPEG frames (video_frames).
    target_density: share of token pairs each memory cross-attention layer keeps at the nominal memory
    (nominal_memory on the clip's grid), in (0, 1]; or min_mass: share of the measured attention
    probability each layer keeps, in (0, 1]. prompt: as measure_memory's (default: the centre point of
    frame 0). block_size: of the statistics and of the policy. weights: for the report ("random", a path).
    The policy's YAML with report.header() on top is what `sam-sparse calibrate --frames` writes.
    """
    _check_targets(target_density, min_mass)
    paths = video_frames(frames)
    if prompt is None:
        prompt = frame_prompt(paths)
    else:
        kind, coords = prompt
        if kind not in ("point", "box"):
            raise ValueError(f"prompt kind {kind!r}: expected 'point' or 'box'")
        prompt = frame_prompt(paths, **{kind: coords})
    seen = []

    def count(n):
        seen.append(n)
        if progress is not None:
            progress(n)

    stats = measure_memory(predictor, frames, prompt=prompt, block_size=block_size, max_frames=max_frames,
                           progress=count)
    if not stats:
        raise ValueError(f"frames {frames}: no memory cross-attention call was recorded (is it a SAM 2 video "
                         "predictor, and were frames propagated?)")
    grid = stats[0].grid
    nominal = nominal_memory(grid)
    target = f"target density {target_density}" if target_density is not None else f"min mass {min_mass}"
    report = MemoryCalibrationReport(str(frames), sum(seen), prompt, target, weights, nominal, block_size)
    by_layer: Dict[int, List[MemoryStats]] = {}
    for st in stats:
        by_layer.setdefault(st.index, []).append(st)
    radii = {}
    for index, layer_stats in sorted(by_layer.items()):
        choice = choose_memory_radius(layer_stats, nominal, block_size, min_mass=min_mass,
                                      target_density=target_density)
        report.layers[layer_stats[0].name] = choice
        radii[index] = (choice.radius, choice.cond_radius)
    description = (f"SAM 2 memory cross-attention calibrated by sam-sparse {__version__} on {frames} "
                   f"({report.frames} frames, {report.prompt_text()}, weights {weights}), {target}")
    return memory_policy(radii, block_size, name=name, description=description), report


# ---------------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------------


def _offset_ids(layer: LayerGeometry) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """(ids (QB, KB) int64, offsets): each block pair's block-grid offset (query minus key), numbered;
    offset (0, 0), the own block, is number 0."""
    ctx = block_context(layer, None, "cpu")
    dr = ctx.q.lattice[:, None, 0] - ctx.k.lattice[None, :, 0]
    dc = ctx.q.lattice[:, None, 1] - ctx.k.lattice[None, :, 1]
    pairs = torch.stack([dr, dc], -1).reshape(-1, 2)
    offsets, ids = torch.unique(pairs, dim=0, return_inverse=True)
    offsets = [tuple(o) for o in offsets.tolist()]
    own = offsets.index((0, 0))
    ids = torch.where(ids == own, 0, ids + (ids < own).long())  # own first, the rest in order after it
    offsets = [(0, 0)] + [o for o in offsets if o != (0, 0)]
    return ids.reshape(dr.shape), offsets


def _choose_image_layer(st: LayerStats, target_density: Optional[float], min_mass: Optional[float]) -> List[HeadChoice]:
    """Greedy by mass per token pair over (head, item), an item being an offset (every pair at that offset)
    or a sink (every pair with that key block): with a density target the layer stops when its mean
    density reaches it; with a mass target each head stops when it keeps min_mass."""
    layer = st.layer
    ids, offsets = _offset_ids(layer)
    n_off, KB = len(offsets), layer.k_blocks
    w = pair_weights(layer)  # (QB, KB), sums to 1
    m = st.mass / st.mass.sum(dim=(1, 2), keepdim=True).clamp(min=1e-30)  # each head's mass sums to 1
    H = m.shape[0]
    flat_ids = ids.reshape(-1)
    keep = (ids == 0).expand(H, -1, -1).clone()  # offset (0, 0): the own block, always kept
    chosen: List[set] = [{("offset", 0)} for _ in range(H)]

    def per_item(x):  # (..., QB, KB) -> (..., offsets + sinks): x summed over each item's pairs
        lead = x.shape[:-2]
        flat = x.reshape(-1, ids.numel())
        by_offset = torch.zeros(flat.shape[0], n_off, dtype=torch.float64).index_add_(1, flat_ids, flat)
        return torch.cat([by_offset, x.sum(-2).reshape(-1, KB)], dim=1).reshape(*lead, -1)

    # Mass and token share each item would still add, per head; updated as pairs get kept.
    gain, cost = per_item(m * ~keep), per_item(w * ~keep)
    retained, density = (m * keep).sum(dim=(1, 2)), (w * keep).sum(dim=(1, 2))
    while True:
        if target_density is not None:
            if float(density.mean()) >= target_density - 1e-9:
                break
            active = torch.ones(H, dtype=torch.bool)
        else:
            active = retained < min_mass - 1e-12
            if not bool(active.any()):
                break
        # Ties (no mass measured there): the cheapest item first.
        ratio = torch.where(cost > 1e-15, gain / cost.clamp(min=1e-30) - 1e-9 * cost, -math.inf)
        ratio[~active] = -math.inf
        h, n = divmod(int(torch.argmax(ratio)), ratio.shape[1])
        if ratio[h, n] == -math.inf:
            break  # nothing left to add
        item = (ids == n) if n < n_off else (torch.arange(KB) == n - n_off).expand_as(ids)
        new = item & ~keep[h]
        gain[h] -= per_item(m[h] * new)
        cost[h] -= per_item(w * new)
        retained[h] += (m[h] * new).sum()
        density[h] += (w * new).sum()
        keep[h] |= item
        chosen[h].add(("offset", n) if n < n_off else ("sink", n - n_off))
    out = []
    for h in range(H):
        d, r = float((w * keep[h]).sum()), float((m[h] * keep[h]).sum())
        if d > DENSE_ABOVE:
            out.append(HeadChoice(dense=True, retained=1.0, density=1.0))
            continue
        offs = tuple(sorted(offsets[i] for kind, i in chosen[h] if kind == "offset"))
        sinks = tuple(sorted(i for kind, i in chosen[h] if kind == "sink"))
        out.append(HeadChoice(dense=False, retained=r, density=d, offsets=offs, sinks=sinks))
    return out


def _choose_prompt_layer(st: LayerStats, target_density: Optional[float], min_mass: Optional[float]) -> List[HeadChoice]:
    """Per head, the radius (in buckets) around the prompts: the smallest that keeps min_mass, or, with a
    density target, radii raised one step at a time where mass per kept token share is highest."""
    bm = st.bucket_mass / st.bucket_mass.sum(dim=1, keepdim=True).clamp(min=1e-30)  # (H, NB)
    share = st.bucket_share / st.bucket_share.sum().clamp(min=1e-30)  # (NB,)
    H, NB = bm.shape
    last = int(torch.nonzero(share > 0).max()) if bool((share > 0).any()) else 0
    cum_m, cum_s = bm.cumsum(1), share.cumsum(0)
    radius = [0] * H
    if min_mass is not None:
        for h in range(H):
            ok = torch.nonzero(cum_m[h] >= min_mass - 1e-12)
            radius[h] = int(ok.min()) if len(ok) else last
    else:
        while float(np.mean([cum_s[r] for r in radius])) < target_density - 1e-9:
            gains = [(bm[h, radius[h] + 1] / share[radius[h] + 1].clamp(min=1e-30), h) if radius[h] < last else (-1, h)
                     for h in range(H)]
            g, h = max(gains, key=lambda x: float(x[0]))
            if g < 0:
                break
            radius[h] += 1
    out = []
    for h, r in enumerate(radius):
        d = float(cum_s[r])
        if r >= last or d > DENSE_ABOVE:
            out.append(HeadChoice(dense=True, retained=1.0, density=1.0))
        else:
            out.append(HeadChoice(dense=False, retained=float(cum_m[h, r]), density=d, radius=r))
    return out


def _rules(stats: Dict[str, LayerStats], choices: Dict[str, List[HeadChoice]]) -> List[dict]:
    """Policy rules: per layer, one rule per group of heads with the same choice; every other head and
    layer dense (the last rule)."""
    rules = []
    for name, heads in choices.items():
        layer = stats[name].layer
        groups: Dict[tuple, List[int]] = {}
        for h, c in enumerate(heads):
            if not c.dense:
                groups.setdefault((c.offsets, c.sinks, c.radius), []).append(h)
        for (offsets, sinks, radius), hs in groups.items():
            rule = {"match": layer.kind, "layers": [layer.layer_index], "heads": hs}
            if layer.kind in IMAGE_KINDS:
                params = {"offsets": [list(o) for o in offsets]}
                if sinks:
                    params["sinks"] = list(sinks)
                rule.update(pattern="relative_blocks", params=params)
            else:
                rule.update(pattern="region_focused", params={"radius": radius, "background_stride": 0})
            rules.append(rule)
    rules.append({"match": "*", "pattern": "dense"})
    return rules


def choose(stats: Dict[str, LayerStats], probe: Policy, *, target_density: Optional[float] = None,
           min_mass: Optional[float] = None, name: str = "calibrated", description: str = "") -> Tuple[Policy, Dict[str, List[HeadChoice]]]:
    """The policy for measured statistics (see the module docstring); exactly one target."""
    _check_targets(target_density, min_mass)
    choices = {}
    for layer_name, st in stats.items():
        pick = _choose_image_layer if st.layer.kind in IMAGE_KINDS else _choose_prompt_layer
        choices[layer_name] = pick(st, target_density, min_mass)
    policy = Policy.from_dict({"name": name, "description": description, "block_size": probe.block_size,
                               "token_order": probe.token_order, "rules": _rules(stats, choices)},
                              source=f"<calibrated {name}>")
    return policy, choices


def _check_targets(target_density, min_mass) -> None:
    if (target_density is None) == (min_mass is None):
        raise ValueError("give exactly one of target_density (share of token pairs to keep) or min_mass "
                         "(share of attention probability to keep)")
    for what, v in (("target_density", target_density), ("min_mass", min_mass)):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"{what}={v!r}: expected a number greater than 0 and at most 1")


def calibrate(model, images, *, target_density: Optional[float] = None, min_mass: Optional[float] = None,
              prompts: Optional[Sequence[np.ndarray]] = None, layers: Sequence[str] = DEFAULT_KINDS,
              block_size: int = 128, token_order: str = "tiles", points_per_side: int = 4,
              heldout=None, heldout_names: Optional[Sequence[str]] = None, name: str = "calibrated",
              progress: Optional[Callable[[int], None]] = None) -> Tuple[Policy, CalibrationReport]:
    """A policy calibrated on `images` for `model`, and a report of what it keeps.

    model: a segment_anything Sam (any model type; MobileSAM's TinyViT encoder is not patched, so only
        its decoder is calibrated) or a SAM 2 model (SAM2Base: Hiera's global and windowed blocks, its
        decoder). It is left as found (patched or not).
    images: HxWx3 uint8 RGB arrays. target_density: share of token pairs each calibrated layer keeps,
        in (0, 1]; or min_mass: share of attention probability each head keeps, in (0, 1].
    prompts: per image, (P, 2) pixel (x, y) point prompts for the decoder's statistics; default a
        points_per_side grid. layers: layer kinds to calibrate (CALIBRATED_KINDS); others stay dense.
    block_size, token_order: of the policy written (tiles: compact image blocks, best for offsets).
    heldout: images NOT used for calibration; the report's parity is verify_parity on them (at their
        centres and the same point grid), against the unpatched model.
    """
    _check_targets(target_density, min_mass)
    images = check_rgb_images(images)
    if not images:
        raise ValueError("calibrate needs at least one image")
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    stats, probe, notes = measure(model, images, kinds=layers, block_size=block_size, token_order=token_order,
                                  points_per_side=points_per_side, prompts=prompts, progress=progress)
    target = f"target density {target_density}" if target_density is not None else f"min mass {min_mass}"
    description = (f"calibrated by sam-sparse {__version__} on {len(images)} image(s), {target}, "
                   f"layers {', '.join(layers)}")
    policy, choices = choose(stats, probe, target_density=target_density, min_mass=min_mass, name=name,
                             description=description)
    report = CalibrationReport(target=target, images=len(images), notes=notes)
    for layer_name, heads in choices.items():
        report.layers[layer_name] = (stats[layer_name].layer.kind, heads)
    if heldout is not None and len(heldout):
        pts = [grid_points(im.shape[1], im.shape[0], points_per_side) for im in heldout]
        report.parity = verify_parity(model, policy, list(heldout), points=pts, image_names=heldout_names)
    return policy, report
