"""sam-sparse amg: automatic mask generation over an image, a folder or a list, on one device or many."""

import json
import os
import sys
import time
from pathlib import Path

import click

from ..amg import GeneratorSettings
from .common import (
    checkpoint_option,
    device_option,
    guarded,
    load_any_model,
    model_type_option,
    policy_help,
    resolve_device,
    say,
    sparse_checkpoint_option,
)

EXIT_SOME_FAILED = 3
DEFAULT_POLICY = "dense"
DEFAULT_MODE = "fast"  # keeps >= 99% of segment-anything's masks at IoU >= 0.9 (docs/benchmarks.md)
_DEFAULTS = GeneratorSettings()


def _setting(name, kind, help_text):
    return click.option(f"--{name.replace('_', '-')}", name, type=kind, default=getattr(_DEFAULTS, name),
                        show_default=True, help=help_text)


@click.command()
@click.argument("input", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="Folder for the outputs and manifest.json (created if missing).")
@checkpoint_option
@model_type_option
@sparse_checkpoint_option
@click.option("--policy", default=None, help=policy_help + f" Default: {DEFAULT_POLICY}, or the manifest's "
              "with --sparse-checkpoint.")
@click.option("--output-mode", type=click.Choice(["binary_mask", "coco_rle"]), default="binary_mask", show_default=True,
              help="binary_mask: a folder per image, one PNG per mask and metadata.csv; coco_rle: one JSON per "
                   "image with COCO RLE masks (segment-anything's scripts/amg.py layouts).")
@click.option("--overwrite", is_flag=True, help="Redo every image, complete outputs included.")
@click.option("--mode", type=click.Choice(["exact", "fast"]), default=DEFAULT_MODE, show_default=True,
              help="fast: large decoder batches and a low-res stability prefilter, its agreement with "
                   "segment-anything's generator measured (docs/benchmarks.md); exact: SamAutomaticMaskGenerator's "
                   "masks and records exactly.")
@click.option("--batch-images", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Images per image-encoder forward: the next N images are embedded together (their own "
                   "sizes, preprocessed as SamPredictor.set_image does), then each goes through the generator "
                   "with its embedding. Only without crop layers: with --crop-n-layers > 0 every crop needs "
                   "its own embedding, so images and crops are embedded one at a time and N has no effect. "
                   "Costs N images' encoder activation memory; up to N images are in flight.")
@_setting("points_per_side", click.IntRange(min=1), "Points sampled along one side of the image.")
@_setting("points_per_batch", click.IntRange(min=1), "Points run through the decoder at once.")
@_setting("pred_iou_thresh", click.FloatRange(0, 1), "Keep masks whose predicted IoU is at least this.")
@_setting("stability_score_thresh", click.FloatRange(0, 1), "Keep masks whose stability score is at least this.")
@_setting("stability_score_offset", float, "Logit offset for the stability score.")
@_setting("box_nms_thresh", click.FloatRange(0, 1), "Box IoU above which duplicate masks are suppressed.")
@_setting("crop_n_layers", click.IntRange(min=0), "Layers of image crops to run as well (0: the whole image only).")
@_setting("crop_nms_thresh", click.FloatRange(0, 1), "Box IoU for suppression between crops.")
@_setting("crop_overlap_ratio", click.FloatRange(0, 1), "Overlap of neighbouring crops, as a fraction of the crop.")
@_setting("crop_n_points_downscale_factor", click.IntRange(min=1), "Points per side divided by this in each crop layer.")
@_setting("min_mask_region_area", click.IntRange(min=0), "Remove holes and islands smaller than this (pixels).")
@device_option
@guarded
def amg(input, out, checkpoint, model_type, sparse_checkpoint, policy, output_mode, overwrite, mode, batch_images,
        device, **settings):
    """Generate every mask of each image in INPUT with SAM's automatic mask generator on a patched model.

    --mode fast (the default) keeps >= 99% of segment-anything's masks at IoU >= 0.9 on the sample photos
    (docs/benchmarks.md); --mode exact gives SamAutomaticMaskGenerator's masks and records exactly.

    INPUT is an image, a folder (searched recursively) or a .txt file listing image paths. Outputs follow
    segment-anything's scripts/amg.py (a folder of PNGs + metadata.csv, or a COCO-RLE JSON, per image),
    plus manifest.json. Each image's output appears only when complete: a rerun skips complete images
    and redoes the rest; --overwrite redoes all. An unreadable image is recorded as failed and the run
    goes on. Exit codes: 0 every image done, 2 bad arguments, 3 finished but some images failed.

    Several GPUs (one process each; each writes its own images, rank 0 the manifest):

    \b
      torchrun --nproc_per_node=4 -m sam_sparse amg photos/ --out masks/
    Several machines: the same command with torchrun's --nnodes, --node-rank and --rdzv-endpoint.

    Examples:

    \b
      sam-sparse amg photo.jpg --out masks/ --points-per-side 16
      sam-sparse amg photos/ --out masks/ --batch-images 4
      sam-sparse amg photos/ --out masks/ --mode exact
      sam-sparse amg photos/ --out masks/ --output-mode coco_rle \\
          --checkpoint sam_vit_b_01ec64.pth --model-type vit_b --policy local2d-30
    """
    import torch

    from .. import __version__
    from ..amg import find_images, generate_masks, image_pixels, output_names, shard, write_manifest
    from ..patches import patch_sam
    from ..policy import load_policy

    generator_settings = GeneratorSettings(**settings)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; expected a folder")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    paths = find_images(input)
    chosen = load_policy(policy) if policy is not None else None
    names = output_names(paths, input if input.is_dir() else None)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device)
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    out.mkdir(exist_ok=True)
    mine = shard(paths, [image_pixels(p) for p in paths], rank, world) if world > 1 else paths

    model, model_type_used, manifest_policy = load_any_model(checkpoint, model_type, sparse_checkpoint, device)
    chosen = chosen or manifest_policy or load_policy(DEFAULT_POLICY)
    patch_sam(model, chosen)
    if rank == 0:
        say(f"amg: {len(paths)} image(s), policy {chosen.name!r}, {output_mode}, mode {mode}, on {world} process(es)")
        if batch_images > 1 and generator_settings.crop_n_layers > 0:
            say(f"amg: --batch-images {batch_images} has no effect with --crop-n-layers "
                f"{generator_settings.crop_n_layers}: each crop is embedded on its own")

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(mine), desc=f"amg{f' rank {rank}' if world > 1 else ''}", unit="img", position=rank) as bar:
        masks_total = [0]

        def tick(n_masks):
            masks_total[0] += n_masks
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix_str(f"{bar.n / dt:.2f} img/s, {masks_total[0] / dt:.1f} masks/s")

        records = generate_masks(model, mine, out, generator_settings, output_mode=output_mode, names=names,
                                 overwrite=overwrite, progress=tick, batch_images=batch_images, mode=mode)
    run = dict(tool="sam-sparse amg", sam_sparse_version=__version__, model=model_type_used or "from manifest",
               policy=chosen.name, output_mode=output_mode, mode=mode, world_size=world, batch_images=batch_images,
               settings=settings, argv=sys.argv[1:], input=str(input))
    if world > 1:
        (out / f"manifest.rank{rank}.json").write_text(json.dumps(records))
        dist.barrier()
        if rank == 0:
            merged = []
            for r in range(world):
                part = out / f"manifest.rank{r}.json"
                merged += json.loads(part.read_text())
                part.unlink()
            write_manifest(out / "manifest.json", run, merged)
        dist.barrier()
        dist.destroy_process_group()
    else:
        write_manifest(out / "manifest.json", run, records)
    manifest = json.loads((out / "manifest.json").read_text())  # every rank: the merged run decides the exit code
    summary = manifest["summary"]
    if rank == 0:
        seconds = time.perf_counter() - t0
        click.echo(f"amg: {summary['done']} done, {summary['skipped']} skipped (complete from an earlier run), "
                   f"{summary['failed']} failed in {seconds:.1f} s; wrote {out / 'manifest.json'}")
        for r in manifest["images"]:
            if r["status"] == "failed":
                click.echo(f"failed: {r['image']}: {r['error']}", err=True)
    if summary["failed"]:
        sys.exit(EXIT_SOME_FAILED)
