"""sam-sparse calibrate: a sparse policy measured on your images, with its quality on held-out ones; or, with
--frames, SAM 2's video memory attention measured on your clip."""

import os
from pathlib import Path

import click
from click.core import ParameterSource

from ..calibration import CALIBRATED_KINDS, DEFAULT_KINDS
from .common import checkpoint_option, device_option, guarded, load_model, model_type_option, resolve_device, say


def _unit_interval(ctx, param, value):
    if value is not None and not 0 < value <= 1:
        raise click.BadParameter(f"{value} is outside (0, 1]; expected a share greater than 0 and at most 1")
    return value


def image_list(specs, option: str, seen=None):
    """Paths and sample names from --images / --heldout values: a sample name (astronaut, coffee,
    chelsea, horse), an image file, a folder (recursively) or a .txt list of paths. ValueError for an
    image given twice, here or in `seen` ({image: the option that gave it}, updated)."""
    from ..amg import find_images
    from ..segment import SAMPLES

    seen = {} if seen is None else seen
    out = []
    for spec in specs:
        found = [spec] if spec in SAMPLES and not Path(spec).exists() else find_images(spec)
        for image in found:
            key = image if isinstance(image, str) else os.path.realpath(image)
            if key in seen:
                raise ValueError(f"{option} {spec}: image {image} is already given by {seen[key]}; give each image "
                                 "once (a held-out image must not be a calibration image)")
            seen[key] = f"{option} {spec}"
            out.append(image)
    return out


@click.command()
@checkpoint_option
@model_type_option
@click.option("--images", "images", multiple=True, metavar="DIR|FILE|NAME",
              help="Calibration images (repeatable): a folder (searched recursively), an image, a .txt list of "
                   "paths, or a sample name (astronaut, coffee, chelsea, horse).")
@click.option("--frames", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Instead of --images: a clip, as a folder of JPEG frames named by index (00000.jpg, ...; SAM 2 "
                   "reads them so). Calibrates SAM 2's video memory cross-attention (needs a SAM 2.1 model: a sam2.1_* "
                   "--model-type, or --checkpoint with SAM 2.1 weights).")
@click.option("--point", default=None, metavar="X,Y",
              help="With --frames: the object's point on frame 0, in its pixels (default: the frame's centre).")
@click.option("--box", default=None, metavar="X0,Y0,X1,Y1", help="With --frames: the object's box on frame 0.")
@click.option("--heldout", multiple=True, metavar="DIR|FILE|NAME",
              help="Images to check the policy on (repeatable, as --images). Default: every fourth calibration "
                   "image is held out instead (with one image, none: no held-out check).")
@click.option("--target-density", "--density", "target_density", type=float, default=None, callback=_unit_interval,
              help="Share of token pairs each calibrated layer keeps, in (0, 1] (with --frames: at a full memory "
                   "of 7 frames).")
@click.option("--min-mass", "--mass", "min_mass", type=float, default=None, callback=_unit_interval,
              help="Share of attention probability each head (with --frames: each memory layer) keeps, in (0, 1] "
                   "(e.g. 0.99).")
@click.option("--out", type=click.Path(path_type=Path), required=True, metavar="FILE.yaml",
              help="Where to write the policy (written whole or not at all; an existing file only with --force).")
@click.option("--layers", multiple=True, type=click.Choice(CALIBRATED_KINDS), default=DEFAULT_KINDS, show_default=True,
              help="Layer kinds to calibrate (repeatable); the others stay dense.")
@click.option("--block-size", type=int, default=128, show_default=True, help="Mask block size of the policy.")
@click.option("--token-order", type=click.Choice(["tiles", "raster"]), default="tiles", show_default=True,
              help="Token order of the encoder's global layers (tiles: compact blocks).")
@click.option("--points-per-side", type=click.IntRange(min=1, max=32), default=4, show_default=True,
              help="Point prompts per image side for the decoder's statistics and the held-out check.")
@click.option("--name", default=None, help="Policy name (default: the output file's stem).")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@device_option
@guarded
def calibrate(checkpoint, model_type, images, frames, point, box, heldout, target_density, min_mass, out, layers,
              block_size, token_order, points_per_side, name, force, device):
    """Measure where attention goes on your images and write a sparse policy that keeps it.

    Runs the model on the calibration images, measures per layer and head the attention probability of
    every (query block, key block), keeps the blocks that hold the most of it (position-relative sets
    in the encoder, a radius around the prompts in the decoder) until --target-density or --min-mass
    is met, writes the policy YAML, and prints the retained mass per layer and head and the parity of
    the policy on held-out images against the unpatched model.

    With --frames (SAM 2.1 model types): runs SAM 2's video predictor over the clip from a prompt on frame
    0 (--point or --box; default the frame's centre), measures per memory layer where its cross-attention
    to the memory goes, and writes a memory_local policy (the radius kept around the same place in each
    tracked memory frame, and in the prompted frames; every other layer dense) that keeps --min-mass of
    it, or the most at --target-density on a full memory. Without --checkpoint the weights are random
    (sam-sparse cannot download SAM 2 checkpoints), and the command says so. Verify the policy on your
    clip before using it (README: SAM 2 video).

    Exit codes: 0 written (read the held-out check before using it), 2 bad arguments (an image given twice,
    an existing --out without --force, a frames folder SAM 2 cannot read, ...).

    \b
    Examples:
      sam-sparse calibrate --images photos/ --target-density 0.3 --out my_policy.yaml
      sam-sparse calibrate --checkpoint sam_vit_b_01ec64.pth --images train/ --heldout val/ \\
          --min-mass 0.99 --out vit_b_calibrated.yaml
      sam-sparse calibrate --model-type sam2.1_hiera_l --checkpoint sam2.1_hiera_large.pt --frames clip/ \\
          --point 640,360 --mass 0.99 --out memory_policy.yaml
    """
    from tqdm.auto import tqdm

    from ..calibration import calibrate as run_calibration
    from ..files import atomic_path, check_output
    from ..kernels import check_block_size
    from ..segment import load_image

    if bool(images) == (frames is not None):
        raise ValueError("give --images (calibrate the image model on photos) or --frames (calibrate SAM 2's "
                         "video memory attention on a clip), not " + ("both" if images else "neither"))
    if (target_density is None) == (min_mass is None):
        raise ValueError("give exactly one of --target-density (--density: share of token pairs kept) or "
                         "--min-mass (--mass: share of attention probability kept)")
    if frames is not None:
        return calibrate_clip(checkpoint, model_type, frames, point, box, heldout, target_density, min_mass, out,
                              block_size, name, force, device)
    if point is not None or box is not None:
        raise ValueError("--point / --box give the prompt on frame 0 of a clip: use them with --frames")
    check_output(out, "--out", (".yaml", ".yml"))
    if out.exists() and not force:
        raise ValueError(f"--out {out}: already exists; pass --force to replace it")
    check_block_size(block_size)
    device = resolve_device(device)
    given = {}
    calib = image_list(images, "--images", given)
    held = image_list(heldout, "--heldout", given)
    if not held and len(calib) > 1:
        held = calib[3::4] or calib[-1:]
        calib = [p for p in calib if p not in held]
    loaded = [load_image(p) for p in calib]  # every image read before the model loads: a bad one fails fast
    loaded_held = [load_image(p) for p in held]
    model, _ = load_model(checkpoint, model_type, device)
    say(f"Calibrating on {len(calib)} image(s); held out: {len(held) or 'none'}")
    with tqdm(total=len(loaded), desc="calibrate", unit="image") as bar:
        policy, report = run_calibration(
            model, loaded, target_density=target_density, min_mass=min_mass, layers=tuple(layers),
            block_size=block_size, token_order=token_order, points_per_side=points_per_side,
            heldout=loaded_held or None, heldout_names=[str(p) for p in held], name=name or out.stem,
            progress=bar.update,
        )
    with atomic_path(out) as tmp:
        tmp.write_text(policy.to_yaml())
    click.echo(str(report))
    say(f"Wrote {out} (check it with `sam-sparse policies check {out}`; verify it with "
        f"`sam-sparse verify --policy {out}`)")


IMAGE_ONLY = ("layers", "token_order", "points_per_side")  # options of the image calibration alone


def calibrate_clip(checkpoint, model_type, frames, point, box, heldout, target_density, min_mass, out, block_size,
                   name, force, device):
    """calibrate --frames: every argument checked (frames folder, prompt inside frame 0, output) before the
    video predictor is built."""
    from tqdm.auto import tqdm

    from ..calibration import calibrate_memory, frame_prompt, video_frames
    from ..families import MODEL_TYPES, family_of
    from ..files import atomic_path, check_output
    from ..kernels import check_block_size
    from ..segment import parse_numbers

    sam2_types = [t for t in MODEL_TYPES if family_of(t) == "sam2"]
    if (model_type is None and checkpoint is None) or (model_type is not None and family_of(model_type) != "sam2"):
        given = "no --model-type or --checkpoint" if model_type is None else f"--model-type {model_type}"
        raise ValueError(f"--frames calibrates SAM 2's video memory attention and needs a SAM 2.1 model; got "
                         f"{given}; use --model-type {' | '.join(sam2_types)} (or --checkpoint with SAM 2.1 weights)")
    ctx = click.get_current_context()
    given = [f"--{o.replace('_', '-')}" for o in IMAGE_ONLY
             if ctx.get_parameter_source(o) not in (ParameterSource.DEFAULT, None)] + (["--heldout"] if heldout else [])
    if given:
        raise ValueError(f"{', '.join(given)}: image calibration options; with --frames use --point / --box, "
                         "--target-density / --min-mass, --block-size, --name")
    check_output(out, "--out", (".yaml", ".yml"))
    if out.exists() and not force:
        raise ValueError(f"--out {out}: already exists; pass --force to replace it")
    check_block_size(block_size)
    paths = video_frames(str(frames))
    prompt = frame_prompt(paths, point=None if point is None else parse_numbers(point, 2, "--point"),
                          box=None if box is None else parse_numbers(box, 4, "--box"))
    device = resolve_device(device)
    if checkpoint is None:
        say(f"note: no --checkpoint: {model_type} with RANDOM weights (sam2's initialization; sam-sparse cannot "
            "download SAM 2 checkpoints). The policy will show where random attention goes, not where SAM 2's "
            "does; pass --checkpoint with SAM 2's released file for a policy you can use.")
    from ..models import build_video_predictor, infer_model_type

    predictor = build_video_predictor(model_type, checkpoint, device=device)  # model_type None: the checkpoint's
    model_type = model_type or infer_model_type(predictor.state_dict())[0]
    say(f"Calibrating {model_type}'s memory attention on {frames} ({len(paths)} frames), "
        f"{prompt[0]} prompt on frame 0")
    with tqdm(total=len(paths), desc="calibrate", unit="frame") as bar:
        policy, report = calibrate_memory(
            predictor, str(frames), target_density=target_density, min_mass=min_mass, prompt=prompt,
            block_size=block_size, name=name or out.stem, weights="random" if checkpoint is None else str(checkpoint),
            progress=bar.update)
    with atomic_path(out) as tmp:
        tmp.write_text(report.header() + policy.to_yaml())
    click.echo(str(report))
    say(f"Wrote {out} (check it with `sam-sparse policies check {out}`; verify it on your clip before use: "
        "README, SAM 2 video)")
