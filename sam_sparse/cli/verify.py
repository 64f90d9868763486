"""sam-sparse verify: the model unpatched vs patched with a policy, as a parity table."""

import sys
from dataclasses import replace

import click

from .common import (
    EncoderProgress,
    checkpoint_option,
    device_option,
    guarded,
    load_any_model,
    model_type_option,
    parity_passes,
    parse_prompts,
    policy_help,
    resolve_device,
    say,
    sparse_checkpoint_option,
)

DEFAULT_IMAGES = ("astronaut", "coffee", "chelsea", "horse")


@click.command()
@checkpoint_option
@model_type_option
@sparse_checkpoint_option
@click.option("--policy", default=None, help=policy_help + " Default with --sparse-checkpoint: its manifest's.")
@click.option("--images", "images", multiple=True, metavar="PATH",
              help="Image file or scikit-image sample name; repeat for more "
                   f"(default: the photographs {', '.join(DEFAULT_IMAGES)}).")
@click.option("--points", "points", multiple=True, metavar="X,Y",
              help="A foreground point prompt in pixels, for every image; repeat for more.")
@click.option("--boxes", "boxes", multiple=True, metavar="X0,Y0,X1,Y1",
              help="A box prompt in pixels, for every image; repeat for more. No prompt: the image centre.")
@click.option("--multimask/--single-mask", default=True, show_default=True,
              help="Multimask: SAM's three candidate masks per prompt, compared on the one the unpatched model "
                   "scores best (the one a user would take); single-mask: SAM's single mask.")
@click.option("--thresholds", type=click.Choice(["auto", "dense", "sparse"]), default="auto", show_default=True,
              help="Threshold preset: auto = dense presets when every patched layer is dense, else sparse.")
@click.option("--min-mask-iou", type=float, default=None, help="Override the preset's minimum mask IoU.")
@click.option("--min-cosine", type=float, default=None,
              help="Override the preset's minimum cosine (layer outputs and image embeddings).")
@device_option
@guarded
def verify(checkpoint, model_type, sparse_checkpoint, policy, images, points, boxes, multimask, thresholds,
           min_mask_iou, min_cosine, device):
    """Run the model unpatched and patched with a policy and compare every layer, embedding and mask.

    Prints the parity table (sam_sparse.verify_parity). Exit code 0 when every number is within the
    thresholds, 1 when one is not or when no layer the policy makes sparse ran (SAM 2's memory attention
    runs in video only: sam_sparse.video_parity checks a memory policy), 2 for bad input.

    Examples:

    \b
      sam-sparse verify --policy dense
      sam-sparse verify --checkpoint sam_vit_b_01ec64.pth --model-type vit_b --policy local2d-30 \\
          --images photo.jpg --points 320,240 --boxes 100,80,400,360
      sam-sparse verify --sparse-checkpoint sam_vit_b_local2d-30.pt --min-mask-iou 0.9
    """
    from ..patches import verify_parity
    from ..policy import load_policy
    from ..segment import check_prompt_bounds, load_image

    # Every argument is checked before the model loads: a typo costs nothing.
    if policy is None and sparse_checkpoint is None:
        raise ValueError("--policy is required (a built-in name or a YAML file) unless --sparse-checkpoint is given")
    for flag, value in (("--min-mask-iou", min_mask_iou), ("--min-cosine", min_cosine)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{flag} {value}: expected a number from 0 to 1")
    device = resolve_device(device)
    policy = load_policy(policy) if policy is not None else None
    pts, bxs = parse_prompts(points, boxes)
    names = images or DEFAULT_IMAGES
    loaded = [load_image(name) for name in names]
    for image in loaded:
        check_prompt_bounds(image, pts, bxs)  # each point and each box is a prompt of its own
    model, _, manifest_policy = load_any_model(checkpoint, model_type, sparse_checkpoint, device)
    policy = policy or manifest_policy
    if policy is None:
        raise ValueError(f"--sparse-checkpoint {sparse_checkpoint}: its manifest names no policy; give --policy")

    preset = pick_thresholds(model, policy, thresholds, min_mask_iou, min_cosine)
    say(f"Comparing on {len(loaded)} image(s): {', '.join(map(str, names))}")
    with EncoderProgress(model, total=parity_passes(model) * len(loaded), desc="parity"):
        report = verify_parity(model, policy, loaded, points=pts, boxes=bxs, thresholds=preset,
                               multimask_output=multimask, image_names=[str(n) for n in names])
    click.echo(str(report))
    sys.exit(0 if report.passed else 1)


def pick_thresholds(model, policy, choice: str, min_mask_iou, min_cosine):
    """The ParityThresholds for --thresholds and the --min-* overrides; None lets verify_parity choose."""
    from ..patches import patch_sam, preset_for

    if choice == "auto" and min_mask_iou is None and min_cosine is None:
        return None
    handle = patch_sam(model, policy)
    handle.restore()
    preset = preset_for(handle, next(model.parameters()).dtype, choice)
    changes = {}
    if min_mask_iou is not None:
        changes["mask_iou"] = min_mask_iou
    if min_cosine is not None:
        changes.update(layer_cosine=min_cosine, embedding_cosine=min_cosine)
    return replace(preset, name=f"{preset.name}{' with overrides' if changes else ''}", **changes)
