"""``sam-sparse policies``: list, show, render and check mask policies.

Thin commands over sam_sparse.policy and sam_sparse.masks. Every invalid policy ends the command with
exit status 2 and one line on stderr, ``error: <file>:<line>: <field>: <problem>``, no traceback.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import click
import torch

from ..geometry import LAYER_KINDS, LayerGeometry, Prompts
from ..masks import head_densities, mask_density
from ..policy import Policy, PolicyError, list_policies, load_policy, policy_text
from ..families import MODEL_TYPES
from ..sam2_layers import NOMINAL_COND_FRAMES, NOMINAL_MEMORY_FRAMES, NOMINAL_POINTER_TOKENS

MODELS = MODEL_TYPES  # every family's: SAM (vit_b, ..., mobile_sam) and SAM 2.1 (sam2.1_hiera_t, ...)

# Prompt-dependent policies (region_focused) are measured with one point at the centre of a 1024-px
# image: token (32, 32) of the 64x64 grid, in grid units as Prompts expects.
SAMPLE_PROMPTS = Prompts(points=torch.tensor([[[32.5, 32.5]]]))

_SHORT = {
    "encoder.global": "enc.global",
    "encoder.window": "enc.window",
    "encoder.pooled": "enc.pooled",
    "decoder.self": "dec.self",
    "decoder.token_to_image": "dec.tok2img",
    "decoder.image_to_token": "dec.img2tok",
    "decoder.final_token_to_image": "dec.final",
    "memory.self": "mem.self",
    "memory.cross": "mem.cross",
}

# SAM 2's memory cross-attention has no fixed shape: it is measured and drawn at the nominal memory.
MEMORY_NOTE = (f"memory.cross (SAM 2 video) is measured at a nominal memory: {NOMINAL_MEMORY_FRAMES} frames of the "
               f"64x64 grid, {NOMINAL_COND_FRAMES} of them conditioning (prompted), then {NOMINAL_POINTER_TOKENS} "
               "object-pointer tokens")


def _fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    click.get_current_context().exit(code)


def _load(name_or_path: str) -> Policy:
    try:
        return load_policy(name_or_path)
    except PolicyError as e:
        _fail(str(e))


def _layers(policy: Policy, model: str) -> List[Tuple[LayerGeometry, Optional[torch.Tensor], bool]]:
    """(layer, mask, measured with SAMPLE_PROMPTS) for every attention layer of the model."""
    out = []
    for layer in policy.geometries(model):
        prompted = policy.needs_prompts(layer)
        out.append((layer, policy.block_mask(layer, SAMPLE_PROMPTS if prompted else None), prompted))
    return out


def kind_densities(policy: Policy, model: str) -> Dict[str, Tuple[float, bool]]:
    """{layer kind: (mean token-level density over its layers and heads, prompt-dependent)}."""
    sums: Dict[str, List[float]] = {}
    prompted: Dict[str, bool] = {}
    for layer, mask, p in _layers(policy, model):
        sums.setdefault(layer.kind, []).append(mask_density(mask, layer))
        prompted[layer.kind] = prompted.get(layer.kind, False) or p
    return {k: (sum(v) / len(v), prompted[k]) for k, v in sums.items()}


def _head_groups(values: Sequence) -> List[Tuple[int, int]]:
    """Runs of equal consecutive values as (first, last) index pairs."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((start, i - 1))
            start = i
    return runs


def _heads(a: int, b: int) -> str:
    return f"head {a}" if a == b else f"heads {a}-{b}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def policies():
    """List, show, render and check mask policies.

    \b
    Example:
      sam-sparse policies list
      sam-sparse policies show local2d-30
      sam-sparse policies check my_policy.yaml
    """


@policies.command("list")
@click.option("--model", "models", type=click.Choice(MODELS), multiple=True,
              help="Model type(s) to give densities for (default: all). mobile_sam has decoder layers only.")
def list_cmd(models):
    """Built-in policies with their token-level density per layer kind on each model type.

    Density is the fraction of (query token, key token) pairs attended, per layer kind (`sam-sparse
    bench` reports one number per policy instead: the mean over all patched encoder layers, window
    layers included). Values marked * depend on the prompts: they are measured with one point at the
    image centre. "-": the model has no such layer to patch (MobileSAM's TinyViT encoder is not SAM's
    ViT).

    \b
    Example:
      sam-sparse policies list
      sam-sparse policies list --model mobile_sam
      sam-sparse policies list --model sam2.1_hiera_t --model sam2.1_hiera_l
    """
    header = "  model           " + "".join(f"{_SHORT[k]:>13}" for k in LAYER_KINDS)
    any_prompted = False
    for name in list_policies():
        policy = _load(name)
        click.echo(f"{name}")
        for line in textwrap.wrap(policy.description, 96):
            click.echo(f"  {line}")
        click.echo(header)
        for model in models or MODELS:
            dens = kind_densities(policy, model)
            cells = []
            for k in LAYER_KINDS:
                if k not in dens:
                    cells.append(f"{'-':>12} ")
                    continue
                d, p = dens[k]
                any_prompted |= p
                cells.append(f"{d:>12.3f}{'*' if p else ' '}")
            click.echo(f"  {model:<16}" + "".join(cells))
        click.echo("")
    click.echo("density: share of (query token, key token) pairs attended, per layer kind (mean over its layers "
               "and heads); `sam-sparse bench` reports the mean over all patched encoder layers instead")
    if any_prompted:
        click.echo("* depends on the prompts; measured with one point at the image centre")
    if any(m.startswith("sam2") for m in models or MODELS):
        click.echo(MEMORY_NOTE)


@policies.command("show")
@click.argument("policy")
@click.option("--model", type=click.Choice(MODELS), default="vit_b", show_default=True, help="Model type for the densities (SAM or SAM 2.1).")
def show_cmd(policy: str, model: str):
    """Print a policy's YAML and the density of every layer and head of a model.

    POLICY is a built-in name (see `sam-sparse policies list`) or a path to a YAML file.

    \b
    Example:
      sam-sparse policies show local2d-30 --model vit_h
      sam-sparse policies show ./my_policy.yaml
    """
    p = _load(policy)
    click.echo(policy_text(policy).rstrip())
    click.echo("")
    click.echo(f"# token-level density per layer and head, {model} (1.000 = dense)")
    if model == "mobile_sam":
        click.echo("# mobile_sam: its TinyViT image encoder is not SAM's ViT and is never patched; decoder layers only")
    try:
        layers = _layers(p, model)
    except PolicyError as e:
        _fail(str(e))
    width = max(len(layer.name) for layer, _, _ in layers) + 2
    if any(layer.kind == "memory.cross" for layer, _, _ in layers):
        click.echo(f"# {MEMORY_NOTE}")
    for layer, mask, prompted in layers:
        per_head = [round(d, 3) for d in head_densities(mask, layer)]
        runs = _head_groups(per_head)
        if len(runs) == 1:
            text = f"{per_head[0]:.3f} (all {layer.num_heads} heads)"
        else:
            text = ", ".join(f"{_heads(a, b)} {per_head[a]:.3f}" for a, b in runs)
        mark = "  * with one point at the centre" if prompted else ""
        kind = layer.kind + (f" (stage {layer.stage})" if layer.stage is not None else "")
        click.echo(f"{layer.name:<{width}}{kind:<40}{text}{mark}")


def _panels(p: Policy, model: str):
    """(title, 2-D bool mask (QB, KB)) per group of identical heads of each distinct layer: layers of one kind
    and stage (SAM 2's windows differ per stage) whose masks are the same share a panel; where a kind and stage
    has layers that differ (a rule on some blocks only), each variant gets its own, titled with its blocks."""
    groups = {}  # (kind, stage, mask shape, each head's mask) -> [layers], heads, prompted
    for layer, mask, prompted in _layers(p, model):
        full = torch.ones(1, 1, layer.q_blocks, layer.k_blocks, dtype=torch.bool) if mask is None else mask.cpu()
        heads = [full[0, h if full.shape[1] > 1 else 0] for h in range(layer.num_heads)]
        key = (layer.kind, layer.stage, tuple(full.shape[-2:]), tuple(tuple(m.flatten().tolist()) for m in heads))
        groups.setdefault(key, ([], heads, prompted))[0].append(layer)
    order = {kind: i for i, kind in enumerate(LAYER_KINDS)}
    keys = sorted(groups, key=lambda k: (order[k[0]], k[1] or 0, _block_number(groups[k][0][0].name)))
    variants = Counter(k[:2] for k in keys)  # (kind, stage) -> how many distinct masks its layers have
    for key in keys:
        layers, heads, prompted = groups[key]
        kind, stage = key[0], key[1]
        title = kind + (f" (stage {stage})" if stage is not None else "")
        if variants[key[:2]] > 1:
            title += " " + _blocks(layers)
        for a, b in _head_groups(list(key[3])):
            dens = mask_density(heads[a][None, None], layers[0])
            note = " (1 point)" if prompted else ""
            yield f"{title}\n{_heads(a, b)}: density {dens:.3f}{note}", heads[a]


def _block_number(name: str) -> int:
    """The block (or decoder layer) index in a module name such as image_encoder.trunk.blocks.4.attn; -1 if none."""
    m = re.search(r"\.(?:blocks|layers)\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _blocks(layers) -> str:
    """'blocks 4, 8' for the encoder blocks (decoder layers) named by layers."""
    numbers = [_block_number(layer.name) for layer in layers]
    if min(numbers) < 0:
        return ", ".join(layer.name for layer in layers)
    noun = "block" if ".blocks." in layers[0].name else "layer"
    return f"{noun}{'s' if len(numbers) > 1 else ''} " + ", ".join(map(str, numbers))


@policies.command("render")
@click.argument("policy")
@click.option("--model", type=click.Choice(MODELS), default="vit_b", show_default=True, help="Model type (SAM or SAM 2.1).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG file to write.")
def render_cmd(policy: str, model: str, out: str):
    """Draw the block masks of a policy as a PNG: one panel per layer kind and group of heads (per stage of
    SAM 2's encoder, and per group of blocks where a rule makes a kind's blocks differ); the panels are listed.

    Rows are query blocks, columns key blocks; dark = attend. Prompt-dependent layers are drawn for
    one point at the image centre.

    \b
    Example:
      sam-sparse policies render local2d-30 --model vit_b --out masks.png
      sam-sparse policies render local2d-30 --model sam2.1_hiera_b+ --out masks_sam2.png
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, MaxNLocator

    from ..files import atomic_path, check_output, refuse_inputs

    try:
        check_output(out, "--out", (".png",))
        refuse_inputs(out, "--out", [(f"the policy file {policy}", policy if Path(policy).is_file() else None)])
    except ValueError as e:
        _fail(str(e))
    p = _load(policy)
    try:
        panels = list(_panels(p, model))
    except PolicyError as e:
        _fail(str(e))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(3.4 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    for i, (title, m) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(m.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("key block", fontsize=7)
        ax.set_ylabel("query block", fontsize=7)
        ax.tick_params(labelsize=6)
        for axis, n in ((ax.yaxis, m.shape[0]), (ax.xaxis, m.shape[1])):
            axis.set_major_locator(FixedLocator([0]) if n == 1 else MaxNLocator(integer=True))
    title = f"{p.name} on {model} (block {p.block_size}, {p.token_order} order)"
    if any(t.startswith("memory.cross") for t, _ in panels):
        title += f"\nmemory.cross: {NOMINAL_MEMORY_FRAMES} memory frames ({NOMINAL_COND_FRAMES} conditioning) + " \
                 f"{NOMINAL_POINTER_TOKENS} pointer tokens (nominal)"
    fig.suptitle(title, fontsize=10)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    except OSError as e:  # disk full, permissions: the environment (exit 1), not the input
        _fail(f"cannot write {out}: {e}", code=1)
    click.echo(f"wrote {out} ({len(panels)} panels)")
    for t, _ in panels:
        click.echo("  " + t.replace("\n", ": "))
    if any(t.startswith("memory.cross") for t, _ in panels):
        click.echo(MEMORY_NOTE)


@policies.command("check")
@click.argument("path")
@click.option(
    "--model",
    "models",
    type=click.Choice(MODELS),
    multiple=True,
    help="Model type(s) the policy must build masks for (repeatable); default: every model type of every family.",
)
def check_cmd(path: str, models: Tuple[str, ...]):
    """Validate a policy file: exit 0 if it is valid and builds a mask for every layer of the models,
    else exit 2 with a one-line error naming the file, line and field.

    \b
    Example:
      sam-sparse policies check my_policy.yaml
      sam-sparse policies check my_policy.yaml --model vit_h
    """
    p = _load(path)
    models = models or MODELS
    for model in models:
        try:
            layers = p.geometries(model)
            for layer in layers:
                p.block_mask(layer, SAMPLE_PROMPTS if p.needs_prompts(layer) else None)
        except PolicyError as e:
            _fail(f"{e} (model {model})")
        for i in p.unmatched_rules(layers):
            click.echo(f"warning: {p.rules[i].describe(i)} matches no layer of {model}", err=True)
    click.echo(f"ok: {path}: policy {p.name!r}, {len(p.rules)} rules, builds on {', '.join(models)}")
