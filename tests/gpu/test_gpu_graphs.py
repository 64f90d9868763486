"""CUDA graphs (sam_sparse.cuda_graphs): the same bits as the eager call, a new graph
where one would read stale memory, and the places that use them (DevicePredictor.set_image, a patched
SAM 2 video predictor's frames).

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu/test_gpu_graphs.py
"""

import copy
import functools

import numpy as np
import pytest
import torch
from gpu_helpers import GPU_MARKS

from sam_sparse.cuda_graphs import GraphedFunction, module_storage

pytestmark = GPU_MARKS


class Block(torch.nn.Module):
    """A small encoder-like function with a dict-of-lists output, as SAM 2's forward_image returns."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):
        y = self.norm(torch.nn.functional.gelu(self.proj(x)))
        return {"fpn": [y, y.sum(-1)], "pos": (x * 2,)}


def poison_(outputs):
    for t in (*outputs["fpn"], *outputs["pos"]):
        t.fill_(float("nan"))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "autocast_bf16"])
def test_replay_gives_the_eager_bits_for_new_inputs(autocast):
    seed = torch.seed() % 2**31
    g = torch.Generator(device="cuda").manual_seed(seed)
    block = Block().cuda()
    graphed = GraphedFunction(block, state=functools.partial(module_storage, block))
    ctx = torch.autocast("cuda", dtype=autocast) if autocast else torch.autocast("cuda", enabled=False)
    with torch.inference_mode():
        for i in range(4):  # capture on the first call, replays after; each with fresh inputs
            x = torch.randn(3, 7, 32, device="cuda", generator=g)
            with ctx:
                ref, out = block(x), graphed(x)
            for a, b in zip((*ref["fpn"], *ref["pos"]), (*out["fpn"], *out["pos"])):
                assert a.dtype == b.dtype and torch.equal(a, b), f"call {i}, seed {seed}"
            poison_(out)  # outputs are the caller's: the next replay must not depend on them
        assert graphed.graphs == 1 and not graphed.errors


def test_a_new_signature_or_recast_weights_get_their_own_graph():
    block = Block().cuda()
    graphed = GraphedFunction(block, state=functools.partial(module_storage, block))
    with torch.inference_mode():
        x = torch.randn(2, 5, 32, device="cuda")
        graphed(x)
        graphed(torch.randn(2, 6, 32, device="cuda"))  # another shape
        assert graphed.graphs == 2
        with torch.no_grad():
            block.proj.weight.mul_(2)  # in place: the graph reads the new values
        assert torch.equal(graphed(x)["fpn"][0], block(x)["fpn"][0])
        block.half()  # new tensors: a graph of the old ones would read freed memory; all old graphs go
        xh = x.half()
        assert torch.equal(graphed(xh)["fpn"][0], block(xh)["fpn"][0])
        assert graphed.graphs == 1


def test_a_function_that_waits_for_the_device_runs_eagerly_and_says_why():
    def syncs(x):
        return x * float(x.sum())  # .item(): not capturable

    graphed = GraphedFunction(syncs)
    x = torch.randn(4, device="cuda")
    with torch.inference_mode():
        assert torch.equal(graphed(x), syncs(x)) and torch.equal(graphed(x), syncs(x))
    assert graphed.graphs == 0 and len(graphed.errors) == 1, graphed.errors


def test_capture_after_static_arguments_and_max_graphs():
    """A signature runs eagerly until it has come capture_after + 1 calls in a row, then is captured (never
    while signatures alternate); static arguments are part of it; past max_graphs the least recently used
    graph goes, and its signature is captured again when it comes back. Every call gives the eager bits,
    into outputs the caller may poison."""
    seed = torch.seed() % 2**31
    g = torch.Generator(device="cuda").manual_seed(seed)
    calls = []

    def fn(x, *, times):
        calls.append(times)
        return {"y": [torch.nn.functional.gelu(x) * times]}

    graphed = GraphedFunction(fn, capture_after=1, max_graphs=2)
    with torch.inference_mode():
        def check(times, graphs):
            x = torch.randn(5, 32, device="cuda", generator=g)
            out = graphed(x, times=times)
            assert torch.equal(out["y"][0], torch.nn.functional.gelu(x) * times), f"times {times}, seed {seed}"
            out["y"][0].fill_(float("nan"))
            assert graphed.graphs == graphs, f"times {times}: {graphed.graphs} graphs, expected {graphs}"

        check(2, 0)  # first sight: eager
        assert calls == [2]
        check(2, 1)  # second: 2 warm-up calls, then the capture (fn runs once more inside it)
        assert calls == [2] * 4
        check(2, 1)  # replay: fn's Python does not run
        assert calls == [2] * 4
        for times in (7, 8, 7, 8):  # alternating: each call's signature differs from the last one's
            check(times, 1)
        check(3, 1)
        check(3, 2)
        check(5, 2)  # eager (first sight of times=5)
        check(5, 2)  # captured; the graph of times=2, the least recently used, went
        n = len(calls)
        check(3, 2)
        assert len(calls) == n  # times=3: a replay
        check(2, 2)
        assert len(calls) == n + 1  # times=2: eager again (its first sight since its graph went)
        check(2, 2)
        assert len(calls) == n + 4 and not graphed.errors  # and captured again: two warm-ups and the capture


def test_autograd_and_cpu_calls_bypass_the_graph():
    block = Block().cuda()
    graphed = GraphedFunction(block)
    x = torch.randn(2, 3, 32, device="cuda", requires_grad=True)
    graphed(x)["fpn"][0].sum().backward()
    assert x.grad is not None and graphed.graphs == 0
    copy.deepcopy(graphed)  # a copy starts without graphs


def test_device_predictor_set_image_graphs_the_encoder_bit_for_bit():
    from segment_anything import SamPredictor, sam_model_registry

    from sam_sparse import patch_sam, set_image_on_device, unpatch_sam
    from sam_sparse.predictor import DevicePredictor

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"](checkpoint=None).cuda().eval()
    with torch.no_grad():
        for n, p in sam.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.02)
    sam.image_encoder.to(torch.bfloat16)
    patch_sam(sam, "dense")
    predictor = SamPredictor(sam)
    fast = DevicePredictor(predictor, cuda_graph=True)
    rng = np.random.default_rng(0)
    for i in range(3):  # capture, replay, replay on another photo size
        image = rng.integers(0, 255, (600 + 100 * (i == 2), 800, 3), dtype=np.uint8)
        fast.set_image(image)
        graphed = predictor.features.clone()
        set_image_on_device(predictor, image)
        assert torch.equal(graphed, predictor.features), f"image {i}"
        assert predictor.original_size == image.shape[:2]
    assert fast.encoder_graph.graphs == 1 and not fast.encoder_graph.errors
    # another patch: the graph of the old attention must not replay (patch_epoch is in its state)
    unpatch_sam(sam)
    patch_sam(sam, "local2d-30")
    fast.set_image(image)
    graphed = predictor.features.clone()
    set_image_on_device(predictor, image)
    assert torch.equal(graphed, predictor.features), "after re-patching"


def test_patched_video_predictor_frames_replay_the_encoder_with_the_same_masks(tmp_path):
    pytest.importorskip("sam2", reason="sam2 is an optional dependency")
    from sam2_helpers import small_video_predictor, write_frames

    from sam_sparse import patch_sam

    predictor = small_video_predictor(image_size=256).cuda()
    frames = write_frames(tmp_path / "frames", count=5)
    outs = {}
    for graph in (False, True):
        handle = patch_sam(predictor, "dense", graph_encoder=graph)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            state = predictor.init_state(str(frames))
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=np.array([[40.0, 45.0]], np.float32),
                                            labels=np.array([1], np.int32))
            outs[graph] = [m.float().cpu() for _, _, m in predictor.propagate_in_video(state)]
        graphs = handle.memory.encoder_graph
        if graph:
            assert graphs is not None and graphs.graphs == 1 and not graphs.errors
            seen = []  # observed, every frame's encoder runs its Python: 12 Hiera blocks x 5 frames
            with handle.observe(lambda layer, *rest: seen.append(layer.kind)), torch.inference_mode(), \
                    torch.autocast("cuda", dtype=torch.bfloat16):
                state = predictor.init_state(str(frames))
                predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1,
                                                points=np.array([[40.0, 45.0]], np.float32), labels=np.array([1], np.int32))
                list(predictor.propagate_in_video(state))
            assert sum(k.startswith("encoder.") for k in seen) == 12 * 5, sorted(set(seen))
        handle.restore()
        assert handle.memory.encoder_graph is None
    for i, (a, b) in enumerate(zip(outs[False], outs[True])):
        assert torch.equal(a, b), f"frame {i}"


def test_patched_video_predictor_heads_replay_with_the_same_masks(tmp_path):
    """Once the memory stops growing, each frame's memory attention, mask decoder and memory encoder replay
    from one graph (graph_heads): the same masks and stored memories as running them eagerly, bit for bit;
    with a second object added on a later frame (memories of two lengths: eager, packed) and once both
    memories are full (one stacked shape: captured again for two objects). Propagating again captures
    nothing new."""
    pytest.importorskip("sam2", reason="sam2 is an optional dependency")
    from sam2_helpers import small_video_predictor, write_frames

    from sam_sparse import patch_sam

    predictor = small_video_predictor(image_size=256).cuda()
    predictor.max_obj_ptrs_in_encoder = 4  # the memory stops growing at frame 7 of 14 (7 frames, 4 pointers)
    frames = write_frames(tmp_path / "frames", count=14)
    point = dict(points=np.array([[40.0, 45.0]], np.float32), labels=np.array([1], np.int32))

    def run(handle):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            state = predictor.init_state(str(frames))
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, **point)
            masks = [m.float().cpu() for _, _, m in predictor.propagate_in_video(state)]
            predictor.add_new_points_or_box(state, frame_idx=3, obj_id=2, points=np.array([[80.0, 30.0]], np.float32),
                                            labels=np.array([1], np.int32))
            masks += [m.float().cpu() for _, _, m in predictor.propagate_in_video(state, start_frame_idx=3)]
            memory = [out["maskmem_features"].float().cpu() for obj in state["output_dict_per_obj"].values()
                      for _, out in sorted(obj["non_cond_frame_outputs"].items())]
        return masks, memory

    outs, signatures = {}, []
    for graph in (False, True):
        handle = patch_sam(predictor, "dense", graph_heads=graph)
        outs[graph] = run(handle)
        graphs = handle.memory.heads_graph
        if graph:
            assert graphs is not None and not graphs.errors, graphs.errors
            signatures = [dict(s[1]) for s in graphs.signatures]
            # propagated anew: the filling memory's shapes come again, one frame each: no new capture
            again = run(handle)
            assert [dict(s[1]) for s in graphs.signatures] == signatures
            assert all(torch.equal(a, b) for a, b in zip(again[0] + again[1], outs[True][0] + outs[True][1]))
            seen = []  # observed, every frame's heads run their Python
            with handle.observe(lambda layer, *rest: seen.append(layer.kind)):
                run(handle)
            assert sum(k == "memory.cross" for k in seen) >= 4 * 13, sorted(set(seen))
        else:
            assert graphs is None
        handle.restore()
        assert handle.memory.heads_graph is None
    for i, (a, b) in enumerate(zip(outs[False][0], outs[True][0])):
        assert torch.equal(a, b), f"mask of propagated frame {i}"
    for i, (a, b) in enumerate(zip(outs[False][1], outs[True][1])):
        assert torch.equal(a, b), f"stored memory {i}"
    # one object, then two, each once its memory is full (7 frames, 4 pointers of 4 tokens)
    assert {(s["conds"], s["pointer_tokens"]) for s in signatures} >= {((1,), 16), ((1, 1), 16)}, signatures
    assert len(signatures) <= 4, signatures


def test_patched_sam2_image_encoder_replays_at_batch_one():
    """A patched SAM 2 image model's encoder at batch 1 (sam2_encoder.GraphedImageEncoder): eager on a size's
    first call, captured on its second, replayed after, bit for bit the eager forward's (graph_encoder off),
    as fresh tensors; eager where a replay would be wrong or is not wanted (a forward hook, batch 2, grad on,
    observe()); inside DevicePredictor's own graph of forward_image, its kernels are recorded there (no graph
    in a graph), with the same features; restore() lets the graph go."""
    from sam2_helpers import photo, small_sam2

    from sam_sparse import patch_sam
    from sam_sparse.patches.sam2 import image_predictor
    from sam_sparse.patches.sam2_encoder import GraphedImageEncoder
    from sam_sparse.predictor import DevicePredictor

    model = small_sam2("sam2.1_hiera_t", image_size=1024).cuda()
    handle = patch_sam(model, "dense")
    enc, ctx = model.image_encoder, handle.memory
    assert type(enc) is GraphedImageEncoder
    flat = lambda out: [out["vision_features"], *out["vision_pos_enc"], *out["backbone_fpn"]]  # noqa: E731
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(1, 3, 1024, 1024, device="cuda", generator=g) for _ in range(3)]
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        ctx.graph_encoder = False
        eager = [flat(enc(x)) for x in xs]
        assert ctx.encoder_graph is None
        ctx.graph_encoder = True
        outs = [flat(enc(x)) for x in xs]  # eager, capture, replay
        assert ctx.encoder_graph.graphs == 1 and not ctx.encoder_graph.errors, ctx.encoder_graph.errors
        for t in outs[2]:
            t.fill_(float("nan"))  # fresh tensors: the next replay must not care
        outs.append(flat(enc(xs[0])))
        for i, (a, b) in enumerate(zip(outs, eager + eager[:1])):
            assert all(torch.equal(p, r) for p, r in zip(a, b)) or i == 2, f"call {i}: not the eager bits"
        fired = []
        hook = enc.trunk.blocks[0].register_forward_hook(lambda *a: fired.append(1))
        assert all(torch.equal(p, r) for p, r in zip(flat(enc(xs[1])), eager[1])) and fired == [1]
        hook.remove()
        # a capture of the caller's own: the encoder runs eagerly inside it (no replay, no nested capture)
        user = torch.cuda.CUDAGraph()
        static_x = xs[1].clone()
        with torch.cuda.graph(user):
            static_out = flat(enc(static_x))
        user.replay()
        assert all(torch.equal(p, r) for p, r in zip(static_out, eager[1])), "inside the caller's own graph"
        enc(torch.cat(xs[:2]))  # batch 2: eager, no new graph
        calls = []
        with handle.observe(lambda *a: calls.append(1)):
            enc(xs[0])
        assert calls and ctx.encoder_graph.graphs == 1
    with pytest.raises(RuntimeError, match="inference-only"):  # grad on: the eager forward, whose kernel refuses
        enc(xs[0])
    assert ctx.encoder_graph.graphs == 1
    # DevicePredictor graphs forward_image itself: the encoder inside runs eagerly there, recorded in that graph.
    predictor = image_predictor(model)
    fast = DevicePredictor(predictor, cuda_graph=True)
    image = photo(600, 800, seed=1)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            fast.set_image(image)
            feats = [predictor._features["image_embed"].clone(), *[f.clone() for f in predictor._features["high_res_feats"]]]
            predictor.set_image(image)  # sam2's own set_image: the encoder's graph at batch 1
            ref = [predictor._features["image_embed"], *predictor._features["high_res_feats"]]
            assert all(torch.equal(a, b) for a, b in zip(feats, ref))
    assert fast.encoder_graph.graphs == 1 and not fast.encoder_graph.errors, fast.encoder_graph.errors
    handle.restore()
    assert ctx.encoder_graph is None and type(model.image_encoder) is not GraphedImageEncoder


def test_patched_sam2_image_encoder_compiled_replays_at_batch_one(monkeypatch):
    """Under torch.compile (fullgraph) a patched SAM 2 image encoder at batch 1 is one op whose implementation
    compiles ImageEncoder.forward and replays it from a CUDA graph (sam2_encoder.py): captured on the second
    call, replayed after with no recompile of the caller, as fresh tensors, with the shapes, dtypes and values
    of the plain compiled encoder (graph_encoder off) and of the eager one, under bf16 autocast and in fp32
    without it; a forward hook added after the capture fires (the op runs the encoder eagerly); batch 2 is
    traced, not the op; restore() lets the graph go."""
    from sam2_helpers import small_sam2

    from sam_sparse import patch_sam
    from sam_sparse.patches.sam2_encoder import GraphedImageEncoder

    runs = []
    run = GraphedImageEncoder.compiled_forward
    monkeypatch.setattr(GraphedImageEncoder, "compiled_forward", lambda self, x: runs.append(x.shape[0]) or run(self, x))
    torch._dynamo.reset()
    model = small_sam2("sam2.1_hiera_t", image_size=1024).cuda()
    handle = patch_sam(model, "dense")
    enc, ctx = model.image_encoder, handle.memory
    flat = lambda out: [out["vision_features"], *out["vision_pos_enc"], *out["backbone_fpn"]]  # noqa: E731
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(1, 3, 1024, 1024, device="cuda", generator=g) for _ in range(3)]

    def close(a, b, what):
        assert len(a) == len(b), (what, len(a), len(b))
        for i, (p, r) in enumerate(zip(a, b)):
            assert p.shape == r.shape and p.dtype == r.dtype, (what, i, p.shape, r.shape, p.dtype, r.dtype)
            err = (p.float() - r.float()).abs().max().item()
            assert err <= 0.03 * r.float().abs().max().item() + 1e-3, f"{what}, output {i}: max error {err}"

    compiled = torch.compile(enc, fullgraph=True)
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            ctx.graph_encoder = False
            eager = [flat(enc(x)) for x in xs]
            plain = [flat(compiled(x)) for x in xs]  # traced into the caller's graph, no graph of ours
            assert ctx.compiled_encoder_graph is None and not runs
            ctx.graph_encoder = True
            outs = [flat(compiled(xs[0]))]  # compile inside the op
            with torch.compiler.set_stance("fail_on_recompile"):
                outs += [flat(compiled(x)) for x in xs[1:]]  # capture, replay
                graphs = ctx.compiled_encoder_graph
                assert graphs is not None and graphs.graphs == 1 and not graphs.errors, graphs and graphs.errors
                for t in outs[2]:
                    t.fill_(float("nan"))  # fresh tensors: the next replay must not care
                outs[2] = flat(compiled(xs[2]))
            assert runs == [1] * 4
            for i in range(3):
                close(outs[i], plain[i], f"call {i} against the plain compiled encoder")
                close(outs[i], eager[i], f"call {i} against the eager encoder")
                assert outs[i][0] is outs[i][-1], "vision_features is the last level, as in sam2"
            fired = []
            hook = enc.trunk.blocks[0].register_forward_hook(lambda *a: fired.append(1))
            close(flat(compiled(xs[1])), eager[1], "with a hook")
            assert fired == [1] and runs == [1] * 5  # the op, which ran the encoder eagerly
            hook.remove()
            two = flat(compiled(torch.cat(xs[:2])))  # batch 2: traced, not the op
            close([t[1:] for t in two], eager[1], "batch 2")
            assert runs == [1] * 5 and graphs.graphs == 1
        with torch.inference_mode():  # fp32, no autocast: a trace and a graph of its own
            want = flat(enc(xs[0]))
            for _ in range(3):
                close(flat(compiled(xs[0])), want, "fp32")
            assert graphs.graphs == 2 and not graphs.errors and runs == [1] * 8
    finally:
        handle.restore()
        torch._dynamo.reset()
    assert ctx.compiled_encoder_graph is None
