"""sam-sparse bench: image-encoder time, original vs patched, per policy."""

from pathlib import Path

import click

from ..bench import COMPILE_MODES
from ..models import DTYPES, MODEL_TYPES
from .common import device_option, guarded, policy_help, policy_input, resolve_device, say


@click.command()
@click.option("--model-type", type=click.Choice(MODEL_TYPES), default="vit_b", show_default=True,
              help="Architecture to time (random weights: timing does not depend on their values).")
@click.option("--policy", "policies", multiple=True, help=policy_help + " Repeat for several (default: dense).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Images per forward.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the image encoder.")
@click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default=None,
              help="torch.compile mode (implies --compile); reduce-overhead replays CUDA graphs, the fast "
                   "choice at batch 1.")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              help="Untimed rounds, each running every configuration once (default: 5 CUDA, 1 CPU).")
@click.option("--iters", type=click.IntRange(min=1), default=None,
              help="Timed rounds, each running every configuration once (default: 20 CUDA, 3 CPU).")
@click.option("--plot", type=click.Path(path_type=Path), default=None, metavar="PNG",
              help="Write a plot of encoder time vs policy density.")
@device_option
@guarded
def bench(model_type, policies, batch, dtype, use_compile, compile_mode, warmup, iters, plot, device):
    """Time SAM's image encoder, original vs patched with each policy.

    The original and one patched copy per policy run in interleaved rounds (A B A B ...), so drift hits
    all alike; each row prints min / median / max ms and each speedup the median of the per-round ratios
    with their range. A policy that patches no encoder layer (e.g. any policy on MobileSAM, whose TinyViT
    encoder is not SAM's ViT) is not timed, and the table says so. CUDA runs are timed with CUDA events,
    CPU runs with perf_counter. CPU numbers time the PyTorch reference path, not the Triton kernel; they
    are printed as CPU numbers. What will run (models, rounds) is printed on stderr before any timing.
    density: the share of (query block, key block) pairs computed, averaged over every patched layer of
    the image encoder, its window layers included (`policies list` gives token-pair density per layer
    kind: local2d-30 keeps 0.293 of the global layers' pairs, 0.764 of all encoder layers' on vit_b).

    Examples:

    \b
      sam-sparse bench --model-type vit_h --policy dense --policy local2d-30 --policy local2d-15 \\
          --batch 4 --dtype bf16 --plot bench.png
      sam-sparse bench --model-type vit_b --batch 1 --dtype bf16 --compile-mode reduce-overhead
      sam-sparse bench --device cpu --policy local2d-30 --warmup 0 --iters 1   # about a minute on a CPU
    """
    from ..bench import bench_encoder
    from ..files import check_output, refuse_inputs

    if plot is not None:
        check_output(plot, "--plot", (".png",))
        refuse_inputs(plot, "--plot", [policy_input(p) for p in policies])
    result = bench_encoder(model_type, policies or ("dense",), batch=batch, dtype=dtype,
                           compile=use_compile or compile_mode is not None, compile_mode=compile_mode or "default",
                           device=resolve_device(device), warmup=warmup, iters=iters, announce=say)
    click.echo(result.table())
    if plot is not None:
        result.plot(plot)
        click.echo(f"wrote {plot}")
