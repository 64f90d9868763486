"""Whole SAM image encoder, side by side in ONE process on one GPU: segment-anything (original),
segment-anything-fast (pytorch-labs fork, flash_4), and sam-sparse patch_sam with given policies.
Same random weights (rel-pos randomized), bf16, 1024 px. Eager, torch.compile, compile+cudagraphs.
SAM 2.1 model types (sam2.1_hiera_t / s / b+ / l) time sam2's image encoder (Hiera trunk + FPN neck) the
same way: "sa" is then sam2's own (SDPA), built by sam2's build_sam2 with random weights; safast does
not apply to them.

  python side_by_side.py --shapes vit_b:1,vit_b:8 --modes eager,compile --impls sa,safast,dense,local2d-30
  python side_by_side.py --shapes sam2.1_hiera_b+:1,sam2.1_hiera_b+:8 --impls sa,dense,local2d-30
Needs: segment_anything importable; tools/peer/samfast on the path for safast; sam_sparse importable.
Writes $OUT/side.jsonl (one JSON object per measurement; compiled rows also count dynamo's frame compiles and
graph breaks over the row: a row with more compiles than its twins (the same shape, another impl) recompiled
because guards failed, and after dynamo's recompile limit a frame runs eagerly).

The team's comparison script (../shared/bench/side_by_side.py, which made ../shared/anchors.md), kept
here so that the figures in docs/benchmarks.md come from a script in the repository. One impl added:
"dense-partitioned" is patch_sam(m, "dense") with the windowed blocks put back to SAM's own
Block.forward (pad + window_partition copies), to measure what window_attn's in-place windows give;
and gc.collect() before each row, so that a row's peak memory does not hold the previous model."""
import argparse, copy, functools, gc, json, os, sys, time, traceback
import torch
from torch._dynamo.utils import counters
from triton.testing import do_bench

here = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser()
ap.add_argument("--samfast", default=os.path.join(here, "..", ".whl", "samfast"),
                help="folder that holds the segment_anything_fast package (default: .whl/samfast, git-ignored)")
ap.add_argument("--shapes", default="vit_b:1,vit_b:8,vit_h:8")
ap.add_argument("--modes", default="eager,compile")
ap.add_argument("--impls", default="sa,safast,dense,local2d-30")
ap.add_argument("--rep", type=int, default=200)
ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "side.jsonl"))
a = ap.parse_args()
sys.path.insert(0, a.samfast)

from segment_anything.modeling.image_encoder import ImageEncoderViT as OrigEnc
torch.backends.cuda.matmul.allow_tf32 = True
CFG = {"vit_b": (768, 12, 12, [2, 5, 8, 11]), "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
       "vit_h": (1280, 32, 16, [7, 15, 23, 31])}
MODES = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead"}


def build(cls, name):
    E, depth, heads, g = CFG[name]
    torch.manual_seed(0)
    m = cls(depth=depth, embed_dim=E, img_size=1024, mlp_ratio=4, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=heads, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=g, window_size=14, out_chans=256)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "rel_pos" in n: p.normal_(0, 0.02)
    return m.eval()


def build_sam2_encoder(name):
    from sam_sparse.models import build_model

    torch.manual_seed(0)
    return build_model(name).image_encoder.eval()


def make(impl, name, orig_cpu):
    if impl == "sa":
        return copy.deepcopy(orig_cpu).to("cuda", torch.bfloat16)
    if name.startswith("sam2"):
        from sam_sparse import patch_sam

        m = copy.deepcopy(orig_cpu).to("cuda", torch.bfloat16)
        patch_sam(m, "dense" if impl == "dense-partitioned" else impl)
        if impl == "dense-partitioned":  # Hiera's own MultiScaleBlock.forward: pad + window_partition copies
            from sam2.modeling.backbones.hieradet import MultiScaleBlock

            from sam_sparse.patches.sam2_attention import SparseMultiScaleBlock
            for b in m.modules():
                if type(b) is SparseMultiScaleBlock:
                    b.__class__ = MultiScaleBlock
        return m
    if impl == "safast":
        import segment_anything_fast.flash_4 as f4
        f4._load_best_configs = lambda: None       # tune on this card, not the shipped A100 pickle
        f4._save_best_configs = lambda c: None
        from segment_anything_fast.modeling.image_encoder import ImageEncoderViT as FastEnc
        m = build(FastEnc, name); m.load_state_dict(orig_cpu.state_dict())
        return m.to("cuda", torch.bfloat16)
    from sam_sparse import patch_sam
    from sam_sparse.patches import SparseWindowBlock
    m = copy.deepcopy(orig_cpu).to("cuda", torch.bfloat16)
    patch_sam(m, "dense" if impl == "dense-partitioned" else impl)
    if impl == "dense-partitioned":
        from segment_anything.modeling.image_encoder import Block
        for b in m.modules():
            if type(b) is SparseWindowBlock:
                b.__class__ = Block
    return m


def rec(row):
    print(json.dumps(row), flush=True)
    with open(a.out, "a") as f: f.write(json.dumps(row) + "\n")


print(torch.cuda.get_device_name(), torch.__version__, flush=True)
for shape in a.shapes.split(","):
    name, B = shape.split(":"); B = int(B)
    orig_cpu = build_sam2_encoder(name) if name.startswith("sam2") else build(OrigEnc, name)
    out = (lambda y: y["vision_features"]) if name.startswith("sam2") else (lambda y: y)  # noqa: E731
    x = torch.randn(B, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = out(copy.deepcopy(orig_cpu).to("cuda", torch.bfloat16)(x)).float()
    for impl in a.impls.split(","):
        for mode in a.modes.split(","):
            try:
                torch._dynamo.reset(); gc.collect(); torch.cuda.empty_cache()  # the last row's model is gone
                counters.clear()
                m = make(impl, name, orig_cpu)
                f = m if MODES[mode] is None else torch.compile(m, mode=MODES[mode])
                if mode == "cudagraphs":  # each call a new step: the last call's graph outputs may be overwritten
                    f = (lambda g: lambda x: (torch.compiler.cudagraph_mark_step_begin(), g(x))[1])(f)
                with torch.inference_mode():
                    t0 = time.time(); y = out(f(x)).float(); f(x); torch.cuda.synchronize(); tc = time.time() - t0
                    torch.cuda.reset_peak_memory_stats()
                    t = do_bench(lambda: f(x), warmup=25, rep=a.rep, return_mode="median")
                    peak = torch.cuda.max_memory_allocated() / 2**30
                cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()
                row = dict(model=name, B=B, impl=impl, mode=mode, ms=round(t, 3), img_s=round(B / t * 1e3, 1),
                           first_calls_s=round(tc, 1), peak_gb=round(peak, 2), cos=round(cos, 6))
                if MODES[mode] is not None:  # a row that recompiled or broke its graph is not the compiled model's time
                    row.update(compiles=counters["frames"]["total"], graph_breaks=sum(counters["graph_break"].values()))
                rec(row)
                m = f = None  # the model goes before the next row is built
            except Exception as e:
                traceback.print_exc()
                rec(dict(model=name, B=B, impl=impl, mode=mode, error=f"{type(e).__name__}: {str(e)[:200]}"))
    x = ref = None  # the batch goes before the next shape is built
