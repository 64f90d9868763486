"""Run 129's probe (kept beside its outputs): hiera_b+ batch 8 compiled in a process of its own, per row dense, local2d-30, and local2d-30 with its layouts built eagerly and read under compile; per-call wall times, dynamo counters, a torch.profiler table."""
import json, os, sys, time, copy, gc
import torch, torch._dynamo.utils as du
from triton.testing import do_bench
from sam_sparse.models import build_model
from sam_sparse import patch_sam
OUT = os.environ.get("OUT", "/tmp")
name, B = sys.argv[1], int(sys.argv[2])
torch.backends.cuda.matmul.allow_tf32 = True
torch.manual_seed(0)
orig = build_model(name).image_encoder.eval()
x = torch.randn(B, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
def rec(row):
    print(json.dumps(row), flush=True)
    with open(f"{OUT}/probe.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
for impl in sys.argv[3].split(","):
    torch._dynamo.reset(); du.counters.clear(); gc.collect(); torch.cuda.empty_cache()
    m = copy.deepcopy(orig).to("cuda", torch.bfloat16)
    pol = impl.replace("-cached", "")
    if pol != "sa":
        patch_sam(m, pol)
    if impl.endswith("-cached"):
        from sam_sparse.patches import attention as A
        orig_el = A.LayerState.encoder_layout
        def cached(self, device):
            key = (device,)
            if key not in self.layouts:
                self.layouts[key] = A._layout(self.policy.block_mask(self.geometry, None, device), self.block_size)
            return self.layouts[key]
        A.LayerState.encoder_layout = cached
        with torch.inference_mode():
            m(x)  # fill the caches eagerly
    f = torch.compile(m)
    times = []
    with torch.inference_mode():
        for i in range(12):
            torch.cuda.synchronize(); t = time.time(); f(x); torch.cuda.synchronize(); times.append(round(time.time() - t, 4))
        ms = do_bench(lambda: f(x), warmup=10, rep=100, return_mode="median")
        rec(dict(impl=impl, B=B, ms=round(ms, 3), call_s=times, counters={k: dict(v) for k, v in du.counters.items() if v and k in ("frames", "stats", "graph_break", "recompiles")}))
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            for _ in range(5): f(x)
            torch.cuda.synchronize()
        tab = p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)
        with open(f"{OUT}/prof_{impl}.txt", "w") as fh: fh.write(tab)
    if impl.endswith("-cached"):
        A.LayerState.encoder_layout = orig_el
    m = f = None
