"""Quality of mask policies on real MobileSAM weights, against the same model unpatched.

For every policy (built-in names or YAML files) and every photo:
  - the image encoder runs once (MobileSAM's TinyViT is never patched, so its embedding is the same
    for both sides) and the embedding is reused for every prompt and every policy;
  - prompts: an N x N grid of single foreground points at the centres of an N x N partition of the
    image, and one box per grid point: the bounding box of the unpatched model's single-mask output
    for that point (empty masks skipped, identical boxes kept once), i.e. boxes around real objects;
  - SAM's decoder always computes its four masks (0 = the single-mask output, 1-3 = the multimask
    outputs; multimask_output only selects), so one decoder pass per side gives both modes;
  - measured: IoU of each binarized output mask at the photo's size against the unpatched model's
    mask of the same index, |IoU prediction patched - unpatched|, and the block density of each
    layer kind (the handle's report; for prompt-dependent layers, the mean of each call's block mask
    per prompt, recorded from the policy's block_mask).
Then `sam-sparse verify`'s default check (verify_parity, default prompt and thresholds) on each of
the CLI's sample photos, single-mask and multimask.

Policies under which every patched layer of this model is dense (on MobileSAM: every policy whose
rules only touch the image encoder) patch the same model, so they are measured once, as a group.

    python scripts/quality.py                                # every built-in, every photo, 4x4 grid
    python scripts/quality.py --policies region_focused my_policy.yaml --grid 3 --out q.md --json q.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from sam_sparse.calibration import grid_points  # the point grid calibration uses, so prompts match

# scikit-image photographs that load offline (skimage 0.26), colour or greyscale (converted to RGB).
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "retina", "rocket", "text")
# Left out: cat (the same photo as chelsea); horse, binary_blobs (binary); checkerboard, colorwheel, logo,
# shepp_logan_phantom (synthetic); page (a scanned document); lfw_subset, microaneurysms (tiny crops);
# brain, cells3d, eagle, kidney, lily, skin, ... (need a download, or 3-D / multichannel).
BAR_MEDIAN, BAR_P5 = 0.95, 0.85  # the proposed quality bar (issue 13)
MODES = {"single": slice(0, 1), "multi": slice(1, None)}  # which of the decoder's 4 masks each mode returns


# ---- metrics (pure functions; tests/test_quality_script.py) ----

def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def mask_box(mask: np.ndarray):
    """(x0, y0, x1, y1) pixel box around a boolean (H, W) mask (x1, y1 exclusive), or None if empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def summarize(ious, errs) -> dict:
    """Median, 5th percentile (linear interpolation) and worst IoU; median and max IoU-prediction error."""
    ious, errs = np.asarray(ious, dtype=np.float64), np.asarray(errs, dtype=np.float64)
    if ious.size == 0:
        return {"masks": 0}
    return {"masks": int(ious.size), "median_iou": float(np.median(ious)), "p5_iou": float(np.percentile(ious, 5)),
            "worst_iou": float(ious.min()), "median_iou_pred_err": float(np.median(errs)),
            "max_iou_pred_err": float(errs.max())}


def meets_bar(s: dict) -> bool:
    return s.get("masks", 0) > 0 and s["median_iou"] >= BAR_MEDIAN and s["p5_iou"] >= BAR_P5


# ---- model side ----

def load_photo(spec: str) -> np.ndarray:
    """HxWx3 uint8 RGB: a file, one of the CLI's samples (load_image), or a skimage.data photo name."""
    from skimage import data

    from sam_sparse.segment import SAMPLES, load_image

    if spec in SAMPLES or Path(spec).exists():
        return load_image(spec)
    if spec == "motorcycle":
        img = data.stereo_motorcycle()[0]  # the left view of the stereo pair
    elif spec in PHOTOS or hasattr(data, spec):
        img = getattr(data, spec)()
    else:
        raise SystemExit(f"error: image {spec!r}: not a file or a scikit-image photo")
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


class RecordingPolicy:
    """A Policy that records, for every prompt-dependent block mask it builds, each prompt's density
    by layer kind. Everything else is the wrapped policy's."""

    def __init__(self, policy):
        self._policy = policy
        self.densities = defaultdict(list)

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def block_mask(self, layer, prompts=None, device=None):
        mask = self._policy.block_mask(layer, prompts, device)
        if prompts is not None and prompts.batch and self._policy.needs_prompts(layer):
            per_prompt = torch.ones(1) if mask is None else mask.flatten(1).float().mean(1)
            self.densities[layer.kind] += per_prompt.expand(prompts.batch).tolist()
        return mask


@torch.no_grad()
def decode(model, predictor, points=None, boxes=None):
    """Low-res logits (B, 4, 256, 256) and IoU predictions (B, 4) for B single-point or box prompts,
    from the predictor's current image embedding (all four decoder outputs)."""
    if points is not None:
        coords = torch.as_tensor(predictor.transform.apply_coords(points, predictor.original_size))[:, None, :]
        pts, bxs = (coords, torch.ones(coords.shape[:2], dtype=torch.int)), None
    else:
        pts, bxs = None, torch.as_tensor(predictor.transform.apply_boxes(boxes, predictor.original_size))
    # The prompt encoder's call is what a patched model reads the prompts from (a forward pre-hook).
    sparse, dense = model.prompt_encoder(points=pts, boxes=bxs, masks=None)
    return model.mask_decoder.predict_masks(image_embeddings=predictor.features,
                                            image_pe=model.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)


@torch.no_grad()
def binarize(model, predictor, logits: torch.Tensor) -> np.ndarray:
    """(4, 256, 256) low-res logits of one prompt -> (4, H, W) bool masks at the photo's size."""
    up = model.postprocess_masks(logits[None], predictor.input_size, predictor.original_size)[0]
    return (up > model.mask_threshold).numpy()


def patch_key(handle) -> str:
    """Policies whose every patched layer is dense run the same model: one key for all of them."""
    if all(r.pattern == "dense" for r in handle.report):
        return f"all-dense/{handle.policy.block_size}"
    return f"policy:{id(handle.policy)}"


def layer_densities(report, recorded) -> dict:
    """Layer kind -> density text: the report's (mean over layers), or the per-call densities recorded."""
    out = {}
    for kind in dict.fromkeys(r.kind for r in report):
        rows = [r for r in report if r.kind == kind]
        if all(r.density is not None for r in rows):
            out[kind] = {"density": float(np.mean([r.density for r in rows])), "per_prompt": False}
        elif recorded.get(kind):
            d = np.asarray(recorded[kind])
            out[kind] = {"density": float(d.mean()), "min": float(d.min()), "max": float(d.max()),
                         "per_prompt": True}
        else:
            out[kind] = {"density": None, "per_prompt": True}
    return out


# ---- run ----

def run(args) -> dict:
    from segment_anything import SamPredictor

    import sam_sparse
    from sam_sparse import build_sam, fetch_mobile_sam, list_policies, load_policy, patch_sam, verify_parity
    from sam_sparse.segment import SAMPLES, load_image

    torch.manual_seed(0)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    specs = args.policies or list_policies()
    policies = {spec: load_policy(spec) for spec in specs}
    images = args.images or list(PHOTOS)
    model = build_sam("mobile_sam", fetch_mobile_sam(), device="cpu").eval()
    predictor = SamPredictor(model)
    say(f"MobileSAM on CPU ({torch.get_num_threads()} thread(s)); {len(policies)} policies, {len(images)} photos, "
        f"{args.grid}x{args.grid} grid; sam_sparse from {Path(sam_sparse.__file__).parent}")

    # Patch each policy once to read its report and warnings; group the ones that patch the same model.
    recorders, reports, warned, groups = {}, {}, {}, defaultdict(list)
    for spec, policy in policies.items():
        recorders[spec] = RecordingPolicy(policy)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = patch_sam(model, recorders[spec])
        handle.restore()
        reports[spec], warned[spec] = handle.report, [str(w.message) for w in caught]
        groups[patch_key(handle)].append(spec)
    warnings.simplefilter("ignore", category=sam_sparse.PolicyWarning)  # said once above, not per call

    samples = {g[0]: defaultdict(list) for g in groups.values()}  # -> "points/single": [(iou, err, label, photo)]
    prompt_counts = {}
    t0 = time.time()
    for i, name in enumerate(images):
        image = load_photo(name)
        h, w = image.shape[:2]
        with torch.no_grad():
            predictor.set_image(image)
        points = grid_points(w, h, args.grid)
        ref = {"points": decode(model, predictor, points=points)}
        ref_masks = {"points": [binarize(model, predictor, lr) for lr in ref["points"][0]]}
        boxes = list(dict.fromkeys(b for b in (mask_box(m[0]) for m in ref_masks["points"]) if b is not None))
        boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        prompts = {"points": dict(points=points), "boxes": dict(boxes=boxes)}
        labels = {"points": [f"{name}, point {x:.0f},{y:.0f}" for x, y in points],
                  "boxes": [f"{name}, box {','.join(f'{v:.0f}' for v in b)}" for b in boxes]}
        if len(boxes):
            ref["boxes"] = decode(model, predictor, boxes=boxes)
            ref_masks["boxes"] = [binarize(model, predictor, lr) for lr in ref["boxes"][0]]
        prompt_counts[name] = {"size": f"{w}x{h}", "points": len(points), "boxes": len(boxes)}
        say(f"[{i + 1}/{len(images)}] {name} {w}x{h}: {len(points)} points, {len(boxes)} boxes ({time.time() - t0:.0f} s)")
        for first in samples:
            handle = patch_sam(model, recorders[first])
            try:
                for kind in ref:
                    lr, iou = decode(model, predictor, **prompts[kind])
                    for p, label in enumerate(labels[kind]):
                        got = binarize(model, predictor, lr[p])
                        for mode, sl in MODES.items():
                            samples[first][f"{kind}/{mode}"] += [
                                (mask_iou(ref_masks[kind][p][j], got[j]),
                                 abs(float(iou[p, j] - ref[kind][1][p, j])), f"{label}, mask {j}", name)
                                for j in range(4)[sl]]
            finally:
                handle.restore()
        predictor.reset_image()
    measure_s = time.time() - t0

    verify = defaultdict(dict)  # first spec of a group -> "photo/mode" -> numbers
    if not args.no_verify:
        for first in samples:
            for name in SAMPLES:
                for multimask in (False, True):
                    rep = verify_parity(model, policies[first], [load_image(name)], multimask_output=multimask,
                                        image_names=[name])
                    verify[first][f"{name}/{'multi' if multimask else 'single'}"] = {
                        "passed": rep.passed, "thresholds": rep.thresholds.name,
                        "mask_iou": min(v for _, v in rep.mask_iou), "iou_pred_err": rep.iou_pred_err}
            say(f"verify {first}: {sum(v['passed'] for v in verify[first].values())}/{2 * len(SAMPLES)} pass "
                f"({time.time() - t0:.0f} s)")

    results = []
    for group in groups.values():
        rows, checks = samples[group[0]], verify.get(group[0], {})
        by_part = {k: summarize([r[0] for r in v], [r[1] for r in v]) for k, v in sorted(rows.items())}
        every = [r for v in rows.values() for r in v]
        overall = summarize([r[0] for r in every], [r[1] for r in every])
        worst = min(every, key=lambda r: r[0]) if every else None
        by_photo = {name: summarize([r[0] for r in every if r[3] == name], [r[1] for r in every if r[3] == name])
                    for name in prompt_counts}
        for spec in group:
            results.append({
                "policy": policies[spec].name, "spec": spec, "measured_as": group[0], "warnings": warned[spec],
                "overall": overall, "by_prompt": by_part, "by_photo": by_photo, "worst_at": worst[2] if worst else None,
                "meets_bar": meets_bar(overall),
                "patched_layers_sparse": sum(r.pattern != "dense" for r in reports[spec]),
                "patched_layers": len(reports[spec]),
                "density": layer_densities(reports[spec], recorders[group[0]].densities),
                "verify": checks, "verify_passed": sum(v["passed"] for v in checks.values()),
                "ious": [round(r[0], 6) for r in every],
            })
    order = {spec: i for i, spec in enumerate(specs)}
    results.sort(key=lambda r: order[r["spec"]])
    return {
        "commit": git_commit(), "date": datetime.date.today().isoformat(),
        "command": "python scripts/quality.py " + " ".join(args.argv), "images": prompt_counts,
        "grid": args.grid, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "shared_measurement": [g for g in groups.values() if len(g) > 1], "results": results,
        "seconds": {"prompts": round(measure_s), "total": round(time.time() - t0)},
        "bar": {"median_iou": BAR_MEDIAN, "p5_iou": BAR_P5},
    }


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- markdown ----

def table(header, rows) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def fmt(v, digits=4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def density_text(d: dict) -> str:
    if d["density"] is None:
        return "per prompt (not measured)"
    if d["per_prompt"]:
        return f"{d['density']:.3f} per prompt (mean; {d['min']:.3f}-{d['max']:.3f})"
    return f"{d['density']:.3f}"


def markdown(res: dict) -> str:
    imgs = res["images"]
    n_pts = sum(v["points"] for v in imgs.values())
    n_box = sum(v["boxes"] for v in imgs.values())
    lines = [f"Commit `{res['commit']}`, {res['date']}; MobileSAM (real weights), CPU, float32, "
             f"{res['threads']} thread(s), torch {res['torch']}; {res['seconds']['total']} s in all.", "",
             f"Command: `{res['command']}`", "",
             f"Photos ({len(imgs)}): " + ", ".join(f"{k} ({v['size']})" for k, v in imgs.items()) + ".", "",
             f"Prompts: {n_pts} points ({res['grid']}x{res['grid']} per photo) and {n_box} boxes "
             f"(around the unpatched single-mask output of each point, duplicates dropped); each prompt gives "
             "1 single-mask and 3 multimask outputs.", ""]
    for specs in res["shared_measurement"]:
        lines += [f"Under {', '.join(specs)} every patched layer of this model is dense: the same patched model, "
                  f"so its prompt metrics and verify runs were measured once, under {specs[0]}, and are shown "
                  "for each.", ""]
    bar = f"median IoU >= {res['bar']['median_iou']}, 5th pct >= {res['bar']['p5_iou']}"
    lines += ["### Summary", ""]
    rows = []
    for r in res["results"]:
        o = r["overall"]
        n_verify = len(r["verify"])
        rows.append((r["policy"], f"{r['patched_layers_sparse']}/{r['patched_layers']}", o.get("masks", 0),
                     fmt(o.get("median_iou")), fmt(o.get("p5_iou")), fmt(o.get("worst_iou")),
                     fmt(o.get("median_iou_pred_err")), fmt(o.get("max_iou_pred_err")),
                     "yes" if r["meets_bar"] else "no",
                     f"{r['verify_passed']}/{n_verify}" if n_verify else "not run"))
    lines += table(("policy", "sparse layers", "masks", "median IoU", "p5 IoU", "worst IoU", "median IoU-pred err",
                    "max IoU-pred err", f"bar ({bar})", "verify passes"), rows)
    shown = set()
    for r in res["results"]:
        if r["measured_as"] in shown:
            continue
        shown.add(r["measured_as"])
        group = [g["policy"] for g in res["results"] if g["measured_as"] == r["measured_as"]]
        lines += ["", f"### {', '.join(group)}", ""]
        if r["spec"] != r["policy"]:
            lines += [f"From `{r['spec']}`.", ""]
        for g in res["results"]:
            if g["measured_as"] == r["measured_as"]:
                lines += [f"patch_sam warned: {w}" + "  " for w in g["warnings"]]
        lines += [""] if lines[-1] else []
        lines += table(("layer kind", "block density"), [(k, density_text(d)) for k, d in r["density"].items()])
        lines += [""]
        stats = lambda s: (s.get("masks", 0), fmt(s.get("median_iou")), fmt(s.get("p5_iou")),  # noqa: E731
                           fmt(s.get("worst_iou")), fmt(s.get("median_iou_pred_err")), fmt(s.get("max_iou_pred_err")))
        columns = ("masks", "median IoU", "p5 IoU", "worst IoU", "median IoU-pred err", "max IoU-pred err")
        parts = list(r["by_prompt"].items()) + [("all", r["overall"])]
        lines += table(("prompts/output",) + columns, [(k,) + stats(s) for k, s in parts])
        lines += [""]
        lines += table(("photo",) + columns, [(k,) + stats(s) for k, s in r["by_photo"].items()])
        if r["worst_at"] and r["overall"]["worst_iou"] < 1:
            lines += ["", f"Worst mask: {r['worst_at']} (IoU {r['overall']['worst_iou']:.4f})."]
        if r["verify"]:
            lines += [""]
            lines += table(("verify (CLI defaults)", "thresholds", "result", "mask IoU", "IoU-pred err"),
                           [(k, v["thresholds"], "PASS" if v["passed"] else "FAIL", fmt(v["mask_iou"]),
                             fmt(v["iou_pred_err"])) for k, v in r["verify"].items()])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", nargs="+", metavar="NAME|YAML", help="default: every built-in policy")
    ap.add_argument("--images", nargs="+", metavar="NAME|PATH", help=f"default: {', '.join(PHOTOS)}")
    ap.add_argument("--grid", type=int, default=4, help="N: an N x N grid of point prompts per photo (default 4)")
    ap.add_argument("--no-verify", action="store_true", help="skip the verify runs on the CLI's sample photos")
    ap.add_argument("--out", type=Path, metavar="FILE.md", help="write the markdown tables here")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every number (and each mask IoU) here")
    args = ap.parse_args(argv)
    if args.grid < 1:
        ap.error("--grid must be >= 1")
    args.argv = argv
    res = run(args)
    text = markdown(res)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.exit(main())
