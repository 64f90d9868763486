"""sam-sparse segment and sam-sparse demo: masks from a patched SAM, drawn over the image."""

from pathlib import Path

import click

from .common import (
    EncoderProgress,
    checkpoint_option,
    device_option,
    guarded,
    load_any_model,
    load_model,
    model_type_option,
    parity_passes,
    parse_prompts,
    policy_help,
    policy_input,
    resolve_device,
    say,
    sparse_checkpoint_option,
)

# No sparse policy passes the SPARSE quality bar on the built-in model (docs/quality.md: MobileSAM's
# encoder is not SAM's ViT, and region_focused, the only policy sparse on its decoder, fails it), and a
# sparse decoder is not faster than the dense one (docs/benchmarks.md): so the default is dense.
DEFAULT_POLICY = "dense"


@click.command()
@click.argument("image")
@click.option("--point", "points", multiple=True, metavar="X,Y",
              help="Foreground point in pixels (x right, y down); repeat for more points of the same object.")
@click.option("--neg-point", "background", multiple=True, metavar="X,Y",
              help="Background point in pixels: not part of the object (SAM's label 0); repeatable; goes with "
                   "--point or one --box.")
@click.option("--box", "boxes", multiple=True, metavar="X0,Y0,X1,Y1",
              help="Box around the object in pixels; repeat for several objects (one mask each).")
@click.option("--policy", default=None, help=policy_help + f" Default: {DEFAULT_POLICY}, "
              "or the manifest's with --sparse-checkpoint.")
@checkpoint_option
@model_type_option
@sparse_checkpoint_option
@click.option("--out", type=click.Path(path_type=Path), required=True, metavar="IMAGE",
              help="Where to write the image with the masks drawn over it (.png, or .jpg / .jpeg for JPEG).")
@click.option("--save-masks", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Also save the masks: .npy (K, H, W) bool, or .png (one mask: 0/255; several that do not "
                   "overlap: a label image, 0 none, k mask k).")
@click.option("--multimask", is_flag=True, help="SAM's three candidate masks for the prompt, best first.")
@device_option
@guarded
def segment(image, points, background, boxes, policy, checkpoint, model_type, sparse_checkpoint, out, save_masks,
            multimask, device):
    """Segment IMAGE with a patched SAM and write the mask overlay (PNG or JPEG, as --out's name says).

    IMAGE is an image file or a scikit-image sample name (astronaut, coffee, chelsea, horse). Points
    (--point) mark the object, background points (--neg-point) what is not it. Mask scores and areas
    are printed; without a prompt the image centre is used, and said so. Every output
    path and prompt is checked before the model loads; outputs are written whole or not at all.

    Examples:

    \b
      sam-sparse segment astronaut --point 250,120 --out astronaut.png
      sam-sparse segment astronaut --point 250,120 --neg-point 250,60 --out face_not_hair.png
      sam-sparse segment photo.jpg --box 40,30,400,380 --policy local2d-30 \\
          --checkpoint sam_vit_b_01ec64.pth --model-type vit_b --out photo_mask.png --save-masks masks.npy
    """
    from ..files import check_output, refuse_inputs
    from ..patches import patch_sam
    from ..policy import load_policy
    from ..segment import IMAGE_FORMATS, MASK_SUFFIXES, check_prompts, load_image, parse_numbers
    from ..segment import save_masks as write_masks
    from ..segment import save_overlay, segment_image

    device = resolve_device(device)
    check_output(out, "--out", tuple(IMAGE_FORMATS))
    inputs = [(f"IMAGE {image}", image if Path(image).exists() else None),
              (f"--checkpoint {checkpoint}", checkpoint), (f"--sparse-checkpoint {sparse_checkpoint}", sparse_checkpoint),
              policy_input(policy)]
    refuse_inputs(out, "--out", inputs)
    if save_masks is not None:
        check_output(save_masks, "--save-masks", MASK_SUFFIXES)
        refuse_inputs(save_masks, "--save-masks", inputs + [("--out", out)])
        if multimask and save_masks.suffix.lower() == ".png":
            raise ValueError(f"--save-masks {save_masks}: --multimask gives 3 nested candidate masks, which one label "
                             "PNG cannot hold; save them as .npy")
    pts, bxs = parse_prompts(points, boxes)
    neg = [parse_numbers(p, 2, "--neg-point") for p in background] or None
    picture = load_image(image)
    check_prompts(picture, pts, bxs, neg)  # before the model loads: a typo costs nothing
    if pts is None and bxs is None:
        h, w = picture.shape[:2]
        say(f"note: no --point or --box given: using the image centre, --point {w / 2:g},{h / 2:g}")
    chosen = load_policy(policy) if policy is not None else None
    model, _, manifest_policy = load_any_model(checkpoint, model_type, sparse_checkpoint, device)
    chosen = chosen or manifest_policy or load_policy(DEFAULT_POLICY)
    handle = patch_sam(model, chosen)
    say(f"Patched {len(handle.report)} attention modules with policy {chosen.name!r}.")
    for note in handle.notes:
        say(f"note: {note}")
    with EncoderProgress(model, total=1, desc="segment"):
        masks, scores = segment_image(model, picture, pts, bxs, multimask=multimask, background=neg)
    if save_masks is not None:
        write_masks(save_masks, masks)
    save_overlay(out, picture, masks, pts, bxs, background=neg)
    for i, (m, s) in enumerate(zip(masks, scores)):
        click.echo(f"mask {i}: score {s:.3f}, {int(m.sum())} pixels ({m.mean():.1%} of the image)")
    click.echo(f"wrote {out}" + (f" and {save_masks}" if save_masks is not None else ""))


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("sam-sparse-demo.png"), show_default=True,
              metavar="IMAGE", help="Where to write the overlay (.png, or .jpg / .jpeg for JPEG); by default in "
                                    "the current folder.")
@click.option("--policy", default=DEFAULT_POLICY, show_default=True, help=policy_help)
@checkpoint_option
@model_type_option
@device_option
@guarded
def demo(out, policy, checkpoint, model_type, device):
    """The quick start: segment a photo with the built-in MobileSAM, patched, and check parity.

    Fetches MobileSAM (38 MB, once), segments scikit-image's astronaut photo from one point with the
    model patched (by default with the dense policy: no sparse policy passes the quality bar on
    MobileSAM, see the README), prints the parity table (unpatched vs patched) and writes the overlay
    PNG. About a minute on a laptop CPU. With --checkpoint (and --model-type), the same with your SAM or
    SAM 2.1 weights.

    Examples:

    \b
      sam-sparse demo
      sam-sparse demo --policy region_focused --out demo_sparse.png
      sam-sparse demo --checkpoint sam2.1_hiera_base_plus.pt --model-type sam2.1_hiera_b+
    """
    from ..files import check_output, refuse_inputs
    from ..policy import load_policy
    from ..segment import IMAGE_FORMATS

    device = resolve_device(device)
    check_output(out, "--out", tuple(IMAGE_FORMATS))
    refuse_inputs(out, "--out", [(f"--checkpoint {checkpoint}", checkpoint), policy_input(policy)])
    chosen = load_policy(policy)
    model, model_type = load_model(checkpoint, model_type, device)
    _demo(out, chosen, model, model_type)


def _demo(out: Path, chosen, model, model_type: str) -> None:
    from ..patches import patch_sam, verify_parity
    from ..segment import load_image, save_overlay, segment_image

    image, point = load_image("astronaut"), (250.0, 120.0)  # Eileen Collins' face
    say(f"Parity: {model_type} unpatched vs patched with {chosen.name!r}, astronaut photo, one point ...")
    with EncoderProgress(model, total=parity_passes(model), desc="parity"):
        report = verify_parity(model, chosen, [image], points=[point], multimask_output=False,
                               image_names=["astronaut"])
    click.echo(str(report))

    handle = patch_sam(model, chosen)
    with EncoderProgress(model, total=1, desc="segment"):
        masks, scores = segment_image(model, image, points=[point])
    handle.restore()
    save_overlay(out, image, masks, points=[point])
    click.echo(f"\nastronaut, point {point[0]:g},{point[1]:g}: mask score {scores[0]:.3f}, "
               f"{masks[0].mean():.1%} of the image")
    click.echo(f"wrote {out}")
