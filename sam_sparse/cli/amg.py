"""sam-sparse amg: automatic mask generation over an image, a folder or a list, on one device or many."""

import dataclasses
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import click

from .. import amg as job
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
# fast is the default where it keeps >= 99% of segment-anything's masks at IoU >= 0.9 (issue 24's rule): on
# the H200 it kept 99.54% of the 20 sample photos' 1509, median best IoU 1.0 (docs/benchmarks.md, run 48;
# tests/gpu/test_gpu_maskgen.py checks the rule on every GPU run).
DEFAULT_MODE = "fast"
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
              help="fast: up to 1024 points per decoder call, the decoder taken apart into fused kernels (other "
                   "float rounding), its agreement with "
                   "segment-anything's generator measured (docs/benchmarks.md); exact: SamAutomaticMaskGenerator's "
                   "masks and records exactly, with its decoder batches.")
@click.option("--batch-images", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Images per image-encoder forward: the next N images are embedded together (their own "
                   "sizes, preprocessed as SamPredictor.set_image does), then each goes through the generator "
                   "with its embedding. Only without crop layers: with --crop-n-layers > 0 every crop needs "
                   "its own embedding, so images and crops are embedded one at a time and N has no effect. "
                   "Costs N images' encoder activation memory; up to N images are in flight.")
@_setting("points_per_side", click.IntRange(min=1), "Points sampled along one side of the image.")
@_setting("points_per_batch", click.IntRange(min=1), "Points run through the decoder at once.")
@click.option("--pred-iou-thresh", "pred_iou_thresh", type=click.FloatRange(0, 1), default=None,
              help="Keep masks whose predicted IoU is at least this. Default: the model family's generator's, "
                   f"{_DEFAULTS.pred_iou_thresh} (SamAutomaticMaskGenerator) or "
                   f"{GeneratorSettings.for_sam2().pred_iou_thresh} (SAM2AutomaticMaskGenerator).")
@_setting("stability_score_thresh", click.FloatRange(0, 1), "Keep masks whose stability score is at least this.")
@_setting("stability_score_offset", float, "Logit offset for the stability score.")
@_setting("box_nms_thresh", click.FloatRange(0, 1), "Box IoU above which duplicate masks are suppressed.")
@_setting("crop_n_layers", click.IntRange(min=0), "Layers of image crops to run as well (0: the whole image only).")
@_setting("crop_nms_thresh", click.FloatRange(0, 1), "Box IoU for suppression between crops.")
@_setting("crop_overlap_ratio", click.FloatRange(0, 1), "Overlap of neighbouring crops, as a fraction of the crop.")
@_setting("crop_n_points_downscale_factor", click.IntRange(min=1), "Points per side divided by this in each crop layer.")
@_setting("min_mask_region_area", click.IntRange(min=0), "Remove holes and islands smaller than this (pixels).")
@click.option("--overlay", is_flag=True,
              help="Also draw each image's masks over it: NAME.overlay.png beside its output.")
@device_option
@guarded
def amg(input, out, checkpoint, model_type, sparse_checkpoint, policy, output_mode, overwrite, mode, batch_images,
        overlay, device, **settings):
    """Generate every mask of each image in INPUT with SAM's automatic mask generator on a patched model.

    --mode fast (the default) runs the decoder on up to 1024 points per call, taken apart into fused
    kernels, and upsamples in one more: on an H200 it found 99.54% of segment-anything's masks on the 20
    sample photos at IoU >= 0.9 at 8x its speed (docs/benchmarks.md, run 48); --mode exact gives
    SamAutomaticMaskGenerator's (SAM2AutomaticMaskGenerator's) masks and records exactly (2.6x).

    INPUT is an image, a folder (searched recursively) or a .txt file listing image paths. Outputs follow
    segment-anything's scripts/amg.py (a folder of PNGs + metadata.csv, or a COCO-RLE JSON, per image),
    plus manifest.json, rewritten as the run goes ("finished": false until it ends; images not yet done
    are "pending"). An image's output name is its path under INPUT without suffix, folders joined by
    "__", with anything but letters, digits and _-+=,@() and spaces replaced by "_"; a name so changed,
    equal to another up to case, or reserved (manifest, con, ...) gets "~" and a hash of the image's path.
    Each image's output appears only when complete: a rerun skips complete images and redoes the rest;
    --overwrite redoes all. A rerun whose masks would come otherwise (another model, weights file, policy,
    mode or generator setting than manifest.json records) is refused without --overwrite. amg never
    replaces or deletes a file it did not write. An image that cannot be read (missing, a broken link,
    corrupt, too large) or whose masks fail (out of memory, say) is recorded as failed and the run goes on. Images stream: the next ones are read and resized on a worker
    thread while the device works on this one (--batch-images N: N per encoder forward instead).
    --out inside a folder INPUT is not searched for images (said on stderr); --out equal to INPUT, or
    holding input images itself, is refused. Exit codes: 0 every image done, 2 bad arguments, 3
    finished but some images failed, 130 interrupted (manifest.json says what was done).

    Several GPUs (one process each; each writes its own images and manifest.rank<R>.json, rank 0 the
    merged manifest.json):

    \b
      torchrun --nproc_per_node=4 -m sam_sparse amg photos/ --out masks/
    Several machines: the same command with torchrun's --nnodes, --node-rank and --rdzv-endpoint.

    Examples:

    \b
      sam-sparse amg photo.jpg --out masks/ --points-per-side 16 --overlay
      sam-sparse amg photos/ --out masks/ --batch-images 4
      sam-sparse amg photos/ --out masks/ --mode exact
      sam-sparse amg photos/ --out masks/ --output-mode coco_rle \\
          --checkpoint sam_vit_b_01ec64.pth --model-type vit_b --policy local2d-30
    """
    import torch

    from .. import __version__
    from ..models import fetch_mobile_sam
    from ..patches import model_family, patch_sam
    from ..policy import load_policy

    given = {k: v for k, v in settings.items() if v is not None}
    generator_settings = GeneratorSettings(**given)  # checked here, before any model loads
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    paths = _check_input_and_out(input, out, quiet=rank > 0)
    chosen = load_policy(policy) if policy is not None else None
    names = job.output_names(paths, input if input.is_dir() else None)
    missing = [p for p in paths if not p.exists()]
    if missing and rank == 0:
        say(f"amg: {len(missing)} image(s) not found, to be recorded as failed: "
            f"{', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}")

    device = resolve_device(device)
    run_id = uuid.uuid4().hex
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        shared = [run_id]
        dist.broadcast_object_list(shared, src=0)  # one id per run: parts of an earlier run are not merged
        run_id = shared[0]
    model, model_type_used, manifest_policy = load_any_model(checkpoint, model_type, sparse_checkpoint, device)
    chosen = chosen or manifest_policy or load_policy(DEFAULT_POLICY)
    patch_sam(model, chosen)
    if model_family(model) == "sam2":  # SAM2AutomaticMaskGenerator's defaults where nothing was given
        generator_settings = GeneratorSettings.for_sam2(**given)
    settings = dataclasses.asdict(generator_settings)
    weights = checkpoint or sparse_checkpoint or fetch_mobile_sam(quiet=True)  # the built-in: the file it loaded
    makes = dict(model=model_type_used, weights=_file_identity(weights), policy=chosen.name,
                 policy_sha256=_sha256(chosen.to_yaml()), mode=mode, settings=settings)  # what the masks depend on
    made = _sha256(json.dumps(makes, sort_keys=True))  # each record's "made": which run's masks its output holds
    earlier = _earlier_manifest(out)
    if not overwrite:
        _refuse_another_runs_outputs(out, makes, made, earlier)
    out.mkdir(exist_ok=True)  # only now: bad input leaves no folder behind
    if world == 1:
        _remove_stale_parts(out)
    mine = job.shard(paths, [job.image_pixels(p) for p in paths], rank, world) if world > 1 else paths
    if rank == 0:
        say(f"amg: {len(paths)} image(s), policy {chosen.name!r}, {output_mode}, mode {mode}, on {world} process(es)")
        if batch_images > 1 and generator_settings.crop_n_layers > 0:
            say(f"amg: --batch-images {batch_images} has no effect with --crop-n-layers "
                f"{generator_settings.crop_n_layers}: each crop is embedded on its own")

    run = dict(tool="sam-sparse amg", sam_sparse_version=__version__, **makes, output_mode=output_mode,
               world_size=world, batch_images=batch_images, overlay=overlay, argv=sys.argv[1:], input=str(input))
    manifest = _LiveManifest(out, run, run_id, rank, world,
                             {p: job.output_path(out, names[p], output_mode) for p in paths}, mine, made,
                             {r["image"]: r.get("made") for r in earlier.get("images", ()) if "image" in r})

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(mine), desc=f"amg{f' rank {rank}' if world > 1 else ''}", unit="img", position=rank) as bar:
        masks_total = [0]

        def tick(n_masks):
            masks_total[0] += n_masks
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix_str(f"{bar.n / dt:.2f} img/s, {masks_total[0] / dt:.1f} masks/s")

        try:
            job.generate_masks(model, mine, out, generator_settings, output_mode=output_mode, names=names,
                               overwrite=overwrite, progress=tick, batch_images=batch_images, overlay=overlay,
                               on_record=manifest.update, mode=mode)
        except KeyboardInterrupt:
            manifest.write(finished=False)  # what was done, for the user and for a rerun
            raise
    manifest.write(finished=True)
    if world > 1:
        if rank == 0:
            manifest.wait_for_ranks()
        dist.barrier()
        if rank == 0:
            _remove_stale_parts(out)  # this run's, and any an earlier, larger job left
        dist.barrier()
        dist.destroy_process_group()
    merged = json.loads((out / job.MANIFEST).read_text())  # every rank: the merged run decides the exit code
    counts = merged["summary"]
    if rank == 0:
        seconds = time.perf_counter() - t0
        click.echo(f"amg: {counts['done']} done, {counts['skipped']} skipped (complete from an earlier run), "
                   f"{counts['failed']} failed in {seconds:.1f} s; wrote {out / job.MANIFEST}")
        for r in merged["images"]:
            if r["status"] == "failed":
                click.echo(f"failed: {r['image']}: {r['error']}", err=True)
    if counts["failed"]:
        sys.exit(EXIT_SOME_FAILED)


def _check_input_and_out(input: Path, out: Path, quiet: bool = False):
    """The images of INPUT, after the checks on --out that need no model: a folder (or a new one in an
    existing folder), not INPUT itself, holding no input image and no manifest.json but amg's. --out
    inside a folder INPUT is left out of the search, and said so."""

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; expected a folder")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    where = os.path.realpath(out)
    exclude = None
    if input.is_dir():
        inside = os.path.realpath(input)
        if where == inside:
            raise ValueError(f"--out {out}: is the input folder itself; give another folder for the outputs")
        if where.startswith(inside.rstrip(os.sep) + os.sep):
            if not quiet:
                say(f"amg: --out {out} is inside {input}: it is not searched for images")
            exclude = out
    paths = job.find_images(input, exclude=exclude)
    for p in paths:
        if os.path.realpath(p.parent) == where:
            raise ValueError(f"input image {p}: lies in --out {out} itself, where amg writes; move it or give "
                             "another --out")
    if (out / job.MANIFEST).exists() and not job.is_manifest(out / job.MANIFEST):
        raise ValueError(f"--out {out}: holds a {job.MANIFEST} that sam-sparse amg did not write; give another --out")
    return paths


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _file_identity(path) -> str:
    """A weights file as the manifest records it: its name and size (the same on every machine of a torchrun job,
    wherever the file is mounted; hashing a 2.5 GB checkpoint would cost seconds)."""
    path = Path(path)
    return f"{path.name} ({path.stat().st_size} bytes)"


def _earlier_manifest(out: Path) -> dict:
    """The manifest.json an earlier run left in --out ({} when none; _check_input_and_out has checked that one
    there is amg's)."""
    try:
        earlier = json.loads((out / job.MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return earlier if isinstance(earlier, dict) else {}


def _refuse_another_runs_outputs(out: Path, makes: dict, made: str, earlier: dict) -> None:
    """ValueError when --out holds an output that masks made otherwise put there (another model, weights file,
    policy, mode or generator setting): a rerun skips complete outputs, so they would stand beside this run's as if
    they were its own. Each record says which run's masks its output holds ("made", kept by a run that did not
    redo it, an interrupted --overwrite included); a manifest of an older sam-sparse, without it, is judged by its
    run's fields (a field it lacks is not compared). --overwrite redoes them all."""
    records = [r for r in earlier.get("images", ()) if isinstance(r, dict)]
    says_made = any("made" in r for r in records)  # False: a manifest of an older sam-sparse
    if says_made:
        stale = [r for r in records if r.get("made") not in (None, made) and (out / Path(r.get("output", "")).name).exists()]
    else:
        stale = [r for r in records if r.get("status") in ("done", "skipped")]
    if not stale:
        return
    changes = []
    for key, now in makes.items():
        was = earlier.get(key)
        if was is None or was == now or (key == "model" and was == "from manifest"):  # older runs wrote that
            continue
        if key == "settings":
            changes += [f"{k} {was.get(k)!r} -> {v!r}" for k, v in now.items() if was.get(k) != v]
        elif key == "policy_sha256":
            if earlier.get("policy") == makes["policy"]:
                changes.append(f"policy {makes['policy']!r}: its rules changed")
        else:
            changes.append(f"{key} {was!r} -> {now!r}")
    if not changes and not says_made:
        return  # an older manifest, and nothing it records differs
    why = "; ".join(changes) or "by a run before an --overwrite that did not finish"
    raise ValueError(f"--out {out}: holds the masks of {len(stale)} image(s) made otherwise ({why}); a rerun would "
                     "keep them as its own: pass --overwrite to redo every image, or give another --out")


def _remove_stale_parts(out: Path) -> None:
    """Every manifest.rank<R>.json in `out` that amg wrote (a run's part: run_id and rank), merged or stale;
    a file of that name that amg did not write is left as it is (never read as a part: its run_id differs)."""
    for entry in os.scandir(out):
        if re.fullmatch(r"manifest\.rank[0-9]+\.json", entry.name) and entry.is_file(follow_symlinks=False):
            try:
                part = json.loads(Path(entry.path).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(part, dict) and {"run_id", "rank"} <= part.keys():
                os.unlink(entry.path)


class _LiveManifest:
    """manifest.json while the run goes: every image's record (pending until its turn), written atomically
    at most every job.MANIFEST_SECONDS and when asked. In a torchrun job each rank writes its records to
    manifest.rank<R>.json, and rank 0 merges the parts of this run into manifest.json."""

    def __init__(self, out: Path, run: dict, run_id: str, rank: int, world: int, outputs: dict, mine, made: str,
                 earlier_made: dict):
        self.out, self.run, self.run_id, self.rank, self.world = out, run, run_id, rank, world
        self.made, self.earlier_made = made, earlier_made  # this run's, and each image's output's before it
        self.records = {str(p): dict(job.pending_record(p, o), made=earlier_made.get(str(p))) for p, o in outputs.items()}
        self.mine = [str(p) for p in mine]
        self.last = 0.0

    def update(self, record: dict) -> None:
        earlier = self.earlier_made.get(record["image"])
        # done: this run's masks; skipped: the earlier run's (this one's where an older manifest did not say);
        # failed: whatever was there before is still there
        made = {"done": self.made, "skipped": earlier or self.made}.get(record["status"], earlier)
        self.records[record["image"]] = dict(record, made=made)
        if time.monotonic() - self.last >= job.MANIFEST_SECONDS:
            self.write(finished=False)

    def write(self, finished: bool) -> None:
        """This rank's part (torchrun), and on rank 0 the merged manifest.json; finished: nothing pending."""
        from ..files import atomic_path

        self.last = time.monotonic()
        if self.rank > 0:
            part = dict(run_id=self.run_id, rank=self.rank, finished=finished,
                        images=[self.records[p] for p in self.mine])
            with atomic_path(self.out / job.manifest_part(self.rank)) as tmp:
                tmp.write_text(json.dumps(part))
        if self.rank == 0:
            job.write_manifest(self.out / job.MANIFEST, self.run, list(self._merged().values()),
                                    finished=finished and self._all_finished())

    def _parts(self):
        for r in range(1, self.world):
            try:
                part = json.loads((self.out / job.manifest_part(r)).read_text())
            except (OSError, ValueError):  # not written yet
                continue
            if part.get("run_id") == self.run_id:
                yield part

    def _merged(self) -> dict:
        merged = dict(self.records)
        for part in self._parts():
            merged.update((r["image"], r) for r in part["images"])
        return merged

    def _all_finished(self) -> bool:
        return self.world == 1 or sum(1 for part in self._parts() if part["finished"]) == self.world - 1

    def wait_for_ranks(self) -> None:
        """Rank 0, its own images done: merge the other ranks' parts as they come, until all are finished."""
        while not self._all_finished():
            time.sleep(job.MANIFEST_SECONDS)
            self.write(finished=True)
        self.write(finished=True)
