"""Time SAM's image encoder, original vs patched with each policy: what `sam-sparse bench` runs.

    result = bench_encoder("vit_b", ["dense", "NAME"], batch=1)
    print(result.table()); result.plot("bench.png")

The original and each patched model (a copy per policy) run in interleaved rounds (A B C A B C ...):
`warmup` untimed rounds, then `iters` timed ones, so that drift in clocks or load hits every variant
alike. Each row reports min / median / max, and each speedup the median of the per-round ratios with
their range. A policy that patches no image-encoder layer is not timed: its encoder is the original's.
On CUDA, runs are timed with CUDA events; on CPU with time.perf_counter. CPU numbers time the PyTorch
reference path, not the Triton kernel: they say nothing about GPU speed. Weights are random (timing
does not depend on their values), so no checkpoint is needed.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .devices import default_device
from .files import atomic_path
from .models import DTYPES, build_model
from .table import format_table


@dataclass
class BenchRow:
    """One configuration. density: mean block density of the patched encoder layers (1.0: original).
    times_ms: one per timed round, in round order (empty when the policy patches no encoder layer)."""

    policy: str
    density: float
    times_ms: List[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms)


@dataclass
class BenchResult:
    model_type: str
    device: str
    dtype: str
    batch: int
    compiled: bool
    compile_mode: str = "default"
    rows: List[BenchRow] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def on_cpu(self) -> bool:
        return not self.device.startswith("cuda")

    def header(self) -> str:
        head = (f"sam-sparse bench: {self.model_type} image encoder (random weights), batch {self.batch}, "
                f"{self.dtype}, {self.device}{f', torch.compile (mode {self.compile_mode})' if self.compiled else ''}")
        if self.on_cpu:
            head += ("\nThese are CPU numbers: they time the PyTorch reference path, not the Triton kernel, "
                     "and say nothing about GPU speed.")
        return head

    def speedup(self, row: BenchRow) -> Optional[tuple]:
        """(median, min, max) of original / row over the timed rounds (paired: the same round), or None."""
        base = self.rows[0].times_ms if self.rows else []
        if row is self.rows[0] or not row.times_ms or len(base) != len(row.times_ms):
            return None
        ratios = [b / t for b, t in zip(base, row.times_ms)]
        return statistics.median(ratios), min(ratios), max(ratios)

    def table(self) -> str:
        rows = [("policy", "density (all encoder layers)", "ms min / median / max", "speedup (range)")]
        for r in self.rows:
            if not r.times_ms:
                rows.append((r.policy, "-", "not timed", "patches no encoder layer: same code as the original"))
                continue
            sp = self.speedup(r)
            rows.append((r.policy, f"{r.density:.3f}", f"{r.min_ms:.1f} / {r.median_ms:.1f} / {r.max_ms:.1f}",
                         "-" if sp is None else f"{sp[0]:.2f}x ({sp[1]:.2f}-{sp[2]:.2f})"))
        lines = [self.header(), format_table(rows[0], rows[1:])] + [f"note: {n}" for n in self.notes]
        lines.append("density: share of (query block, key block) pairs computed, mean over every patched image-encoder "
                     "layer, window layers included (`sam-sparse policies list` gives it per layer kind)")
        return "\n".join(lines)

    def plot(self, path) -> None:
        """PNG: median encoder time vs mean block density, one point per policy, the original as a line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        original, patched = self.rows[0], [r for r in self.rows[1:] if r.times_ms]
        ax.axhline(original.median_ms, color="gray", linestyle="--", label="original (unpatched)")
        ax.scatter([r.density for r in patched], [r.median_ms for r in patched], color="tab:blue", zorder=3)
        for r in patched:
            ax.annotate(r.policy, (r.density, r.median_ms), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("mean block density of patched encoder layers")
        ax.set_ylabel("image encoder time, median (ms)")
        title = f"{self.model_type}, batch {self.batch}, {self.dtype}, {self.device}"
        ax.set_title(title + (" (CPU reference path)" if self.on_cpu else ""), fontsize=10)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def time_once(fn: Callable[[], object], cuda: bool) -> float:
    """Milliseconds of one run of fn: CUDA events on CUDA, perf_counter on CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_runs(fns: Sequence[Callable[[], object]], device: str, warmup: int, iters: int,
                     tick: Callable[[], None]) -> List[List[float]]:
    """Per fn, the milliseconds of `iters` timed rounds after `warmup` untimed ones; each round runs every
    fn once, in order (A B C A B C ...)."""
    cuda = device.startswith("cuda")
    times: List[List[float]] = [[] for _ in fns]
    for r in range(warmup + iters):
        for i, fn in enumerate(fns):
            t = time_once(fn, cuda)
            if r >= warmup:
                times[i].append(t)
            tick()
    return times


def _encoder_density(report) -> Optional[float]:
    dens = [r.density for r in report if r.kind.startswith("encoder.")]
    if not dens:
        return None
    return sum(1.0 if d is None else d for d in dens) / len(dens)


def bench_encoder(
    model_type: str = "vit_b",
    policies: Sequence = ("dense",),
    *,
    batch: int = 1,
    dtype: str = "fp32",
    compile: bool = False,
    compile_mode: str = "default",
    device: Optional[str] = None,
    warmup: Optional[int] = None,
    iters: Optional[int] = None,
    progress: bool = True,
    announce: Optional[Callable[[str], None]] = None,
) -> BenchResult:
    """Median image-encoder time of the original model and of the model patched with each policy.

    warmup / iters: untimed and timed rounds, each running every configuration once (default 5 / 20 on
    CUDA, 1 / 3 on CPU). progress: a tqdm bar on stderr. announce(text): told what will run, once the
    policies are read and again once the models are built, before any timing.
    compile_mode: torch.compile's mode when compile is set; "reduce-overhead" replays CUDA graphs, which
    removes the host launch cost that bounds batch-1 eager runs.
    """
    from tqdm.auto import tqdm

    from .patches import patch_sam
    from .policy import load_policy

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={compile_mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if batch < 1:
        raise ValueError(f"batch={batch}: expected at least 1")
    device = device or default_device()
    cuda = str(device).startswith("cuda")
    warmup = (5 if cuda else 1) if warmup is None else warmup
    iters = (20 if cuda else 3) if iters is None else iters
    loaded = [p if hasattr(p, "block_mask") else load_policy(p) for p in policies]  # fail fast on a bad name
    result = BenchResult(model_type, str(device), dtype, batch, compile, compile_mode)
    if announce is not None:
        announce(f"{result.header()}\nplan: the original and {len(loaded)} patched model(s) "
                 f"({', '.join(p.name for p in loaded)}), {warmup} untimed + {iters} timed round(s), each running "
                 f"every model once")
        if not cuda:
            announce(f"warning: on a CPU one image encoder run takes from seconds (mobile_sam, sam2.1_hiera_t) to "
                     f"minutes (vit_h, sam2.1_hiera_l); {model_type}: up to {(len(loaded) + 1) * (warmup + iters)} "
                     "runs follow (--warmup 0 --iters 1 for a quick look)")

    model = build_model(model_type).to(device=device, dtype=DTYPES[dtype]).eval()
    size = getattr(model.image_encoder, "img_size", 1024)
    x = torch.randn(batch, 3, size, size, device=device, dtype=DTYPES[dtype])

    # One model per configuration, so that the rounds can interleave them; None: not timed.
    configs = [("original", 1.0, model)]
    for policy in loaded:
        patched = copy.deepcopy(model)
        handle = patch_sam(patched, policy)
        density = _encoder_density(handle.report)
        if density is None:
            why = "; ".join(handle.notes) or "the policy leaves them dense"
            result.notes.append(f"{policy.name}: no image-encoder layer was patched ({why}), so it was not timed")
            configs.append((policy.name, 1.0, None))
        else:
            configs.append((policy.name, density, patched))

    def runner(m):
        encoder = m.image_encoder
        fn = torch.compile(encoder, mode=None if compile_mode == "default" else compile_mode) if compile else encoder
        return lambda: fn(x)

    timed = [c for c in configs if c[2] is not None]
    if announce is not None:
        announce(f"timing {len(timed)} model(s): {len(timed) * (warmup + iters)} encoder runs"
                 + "".join(f"\nnote: {n}" for n in result.notes))
    with tqdm(total=len(timed) * (warmup + iters), desc="bench", unit="run", disable=not progress) as bar, \
            torch.inference_mode():
        times = iter(interleaved_runs([runner(m) for _, _, m in timed], str(device), warmup, iters, bar.update))
    result.rows = [BenchRow(label, density, next(times) if m is not None else []) for label, density, m in configs]
    if compile:
        reset_dynamo()
    return result


def reset_dynamo() -> None:
    """torch._dynamo.reset(), robust to torch 2.14's walk over its cached backends, which a backend's own
    reset can grow ("dictionary changed size during iteration", seen in CI): the entry it adds is already
    there the second time, so one retry completes the reset."""
    try:
        torch._dynamo.reset()
    except RuntimeError as e:
        if "changed size during iteration" not in str(e):
            raise
        torch._dynamo.reset()
