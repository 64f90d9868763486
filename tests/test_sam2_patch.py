"""patch_sam on SAM 2 image models (sam2's Hiera encoder and SAM 2 mask decoder), on the CPU reference path.

Models come from sam2's own build_sam2 and configs, random weights with sharpened attention
(tests/sam2_helpers.py), at 256 px. Dense must reproduce the unpatched model (fp32: layer and embedding
cosines >= 0.99999, the same masks); restore must be exact; a sparse encoder policy must change the
global blocks and nothing else.
"""

import copy
import pickle
import threading

import numpy as np
import pytest
import torch

from patch_helpers import pickled
from sam2_helpers import photo, small_sam2
from sam_sparse import Policy, patch_sam, unpatch_sam, verify_parity
from sam_sparse.families import layer_geometries
from sam_sparse.models import build_model
from sam_sparse.patches.sam2 import image_predictor
from sam_sparse.sam2_layers import MODEL_TYPES

HIERA_T_KINDS = ["encoder.window", "encoder.pooled", "encoder.window", "encoder.pooled", "encoder.window",
                 "encoder.global", "encoder.window", "encoder.global", "encoder.window", "encoder.global",
                 "encoder.pooled", "encoder.window"]


@pytest.fixture(scope="module")
def sam2_t():
    return small_sam2()


def _encoder(model, x):
    with torch.inference_mode():
        out = model.image_encoder(x)
    return [out["vision_features"], *out["backbone_fpn"]]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_every_attention_module_is_patched(sam2_t):
    handle = patch_sam(sam2_t, "dense")
    try:
        kinds = [r.kind for r in handle.report]
        assert kinds == HIERA_T_KINDS + ["decoder.self", "decoder.token_to_image", "decoder.image_to_token"] * 2 \
            + ["decoder.final_token_to_image"] + ["memory.self", "memory.cross"] * 4, kinds
        assert len(handle.report) == 27  # 12 Hiera blocks + 7 decoder attentions + 8 memory attentions
        assert not handle.notes
        grids = {r.name: r.grid for r in handle.report}
        assert grids["image_encoder.trunk.blocks.1.attn"] == "4x4 pooled -> 8x8"
        assert grids["image_encoder.trunk.blocks.5.attn"] == "16x16"  # a global block at 256 px
        assert grids["image_encoder.trunk.blocks.10.attn"] == "7x7 pooled -> 14x14"
    finally:
        handle.restore()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_table_describes_the_built_model(model_type):
    """sam2_layers' table (what policies see without a model) matches what the patcher finds in the model
    sam2 builds from its config: names, kinds, heads, grids, stages."""
    model = build_model(model_type)
    handle = patch_sam(model, "dense")
    try:
        found = [state.geometry for _, _, state in handle._entries]
    finally:
        handle.restore()
    table = layer_geometries(model_type)
    assert [g.name for g in found] == [g.name for g in table]
    for f, t in zip(found, table):
        if f.kind.startswith("encoder."):
            assert f == t, (f, t)
        else:
            assert (f.kind, f.num_heads, f.layer_index) == (t.kind, t.num_heads, t.layer_index)
    head_dims = {m.attn.dim_out // m.attn.num_heads for m in model.image_encoder.trunk.blocks}
    assert head_dims == {{"sam2.1_hiera_t": 96, "sam2.1_hiera_s": 96, "sam2.1_hiera_b+": 56,
                          "sam2.1_hiera_l": 72}[model_type]}


def test_dense_equals_unpatched_in_fp32(sam2_t):
    image = photo()
    report = verify_parity(sam2_t, "dense", [image], points=[[60, 90], [200, 40]], boxes=[[20, 30, 150, 160]])
    assert report.thresholds.name == "DENSE_FP32"
    assert report.passed, str(report)
    image_layers = [lp for lp in report.layers if not lp.kind.startswith("memory.")]
    assert len(image_layers) == 19 and all(lp.calls > 0 for lp in image_layers), str(report)
    assert [lp.calls for lp in report.layers[19:]] == [0] * 8  # the video memory attention: not run on images
    memory_rows = [line for line in str(report).splitlines() if "memory_attention." in line]
    assert len(memory_rows) == 8 and all("not run" in line and "1.000000" not in line for line in memory_rows)
    assert min(lp.cosine for lp in image_layers) >= 0.99999
    assert report.embedding_cosine[0] >= 0.99999
    assert [iou for _, iou in report.mask_iou] == [1.0, 1.0, 1.0]


def test_verify_parity_under_autocast_judges_half_precision(sam2_t):
    """SAM 2 runs half precision as float32 weights under autocast (its README): verify_parity then picks
    DENSE_HALF and says bfloat16 (autocast), and the dense patch passes it; a SAM2Base with bf16 weights, which
    SAM2ImagePredictor cannot run, is refused before any work, saying what to do."""
    image = photo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = verify_parity(sam2_t, "dense", [image], points=[[60, 90]])
    assert report.thresholds.name == "DENSE_HALF" and report.dtype == "bfloat16 (autocast)"
    assert report.passed, str(report)
    assert "bfloat16 (autocast), thresholds DENSE_HALF: PASS" in str(report)
    half = copy.deepcopy(sam2_t).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"bfloat16 weights; SAM 2's predictor needs float32 ones.*torch.autocast"):
        verify_parity(half, "dense", [image])


@pytest.mark.parametrize("part", ["image_encoder", "image_encoder.trunk"])
def test_parity_of_the_image_encoder_alone(sam2_t, part):
    """verify_parity takes sam2's ImageEncoder or its Hiera trunk, as it takes SAM's ImageEncoderViT: embeddings
    (an image's FPN levels, or the trunk's stages) and layers; dense equals unpatched, and the model is left
    unpatched."""
    encoder = sam2_t.get_submodule(part)
    g = torch.Generator().manual_seed(3)
    size = sam2_t.image_size
    x = torch.randn(2, 3, size, size, generator=g)
    report = verify_parity(encoder, "dense", x)
    assert report.passed and report.thresholds.name == "DENSE_FP32", str(report)
    assert len(report.embedding_cosine) == 2 and min(report.embedding_cosine) >= 0.99999, str(report)
    assert len(report.layers) == 12 and all(lp.calls == 1 for lp in report.layers), str(report)
    assert getattr(encoder, "_sam_sparse_handle", None) is None and getattr(sam2_t, "_sam_sparse_handle", None) is None
    with pytest.raises(ValueError, match="compared on embeddings only"):
        verify_parity(encoder, "dense", x, points=[[10, 10]])
    with pytest.raises(ValueError, match=f"patched for SAM 2's 1024 px input.*got {size} px.*whole SAM2Base"):
        verify_parity(encoder, GLOBAL_ONLY, x)  # its masks would be built for 1024 px's grid, not this one
    dense_tiles = Policy.from_dict(dict(name="t", token_order="tiles", rules=[dict(match="*", pattern="dense")]))
    with pytest.raises(ValueError, match=f"patched for SAM 2's 1024 px input.*got {size} px"):
        verify_parity(encoder, dense_tiles, x)  # no mask, but the global blocks' token tiles are 1024 px's


GLOBAL_ONLY = Policy.from_dict(dict(name="g", rules=[dict(match="encoder.global", pattern="local2d", params=dict(radius=0))]))


def test_parity_of_a_sparse_image_encoder_alone():
    """An encoder patched alone gets the masks of SAM 2's 1024 px grid (it does not know its model's image size):
    a sparse global policy at 1024 px changes its embeddings, by more than DENSE's bar allows. The embedding cosine
    is over the FPN levels alone (the positional encodings, the same on both sides, would dilute it)."""
    encoder = small_sam2(image_size=1024, seed=5).image_encoder
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(4))
    report = verify_parity(encoder, GLOBAL_ONLY, x)
    assert report.thresholds.name == "SPARSE" and report.embedding_cosine[0] < 0.99999, str(report)
    changed = [lp.kind for lp in report.layers if lp.cosine < 0.99999]  # in the blocks' order
    assert changed and changed[0] == "encoder.global", str(report)  # what follows it sees other inputs
    assert getattr(encoder, "_sam_sparse_handle", None) is None
    with torch.no_grad():
        ref = torch.cat([t.flatten().double() for t in encoder(x)["backbone_fpn"]])
        handle = patch_sam(encoder, GLOBAL_ONLY)
        out = torch.cat([t.flatten().double() for t in encoder(x)["backbone_fpn"]])
        handle.restore()
    assert report.embedding_cosine[0] == pytest.approx(float(torch.nn.functional.cosine_similarity(out, ref, dim=0)),
                                                       abs=1e-6)


def test_image_predictor_masks_identical(sam2_t):
    image = photo(200, 150, seed=1)
    pts, labels = np.array([[40, 60], [100, 150]]), np.array([1, 0])
    predictor = image_predictor(sam2_t)

    def run():
        with torch.inference_mode():
            predictor.set_image(image)
            return predictor.predict(point_coords=pts, point_labels=labels, multimask_output=True)

    ref_masks, ref_iou, ref_lr = run()
    handle = patch_sam(predictor, "dense")  # through the predictor: its model is patched
    assert handle.model is sam2_t
    try:
        masks, iou, lr = run()
    finally:
        unpatch_sam(predictor)
    assert masks.shape == ref_masks.shape and masks.any()
    assert np.array_equal(masks, ref_masks)
    np.testing.assert_allclose(iou, ref_iou, atol=1e-5)
    np.testing.assert_allclose(lr, ref_lr, atol=1e-3)


def test_automatic_mask_generator_records_identical(sam2_t):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    image = photo(160, 200, seed=2)
    gen = SAM2AutomaticMaskGenerator(sam2_t, points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0,
                                     stability_score_thresh=0.0)
    gen.predictor._bb_feat_sizes = image_predictor(sam2_t)._bb_feat_sizes  # 256-px model (sam2_helpers)
    with torch.inference_mode():
        ref = gen.generate(image)
        handle = patch_sam(gen, "dense")
        try:
            out = gen.generate(image)
        finally:
            handle.restore()
    assert len(ref) > 0, "the test must compare some masks"
    assert len(out) == len(ref)
    for r, o in zip(ref, out):
        assert np.array_equal(r["segmentation"], o["segmentation"])
        assert r["bbox"] == o["bbox"] and r["area"] == o["area"] and r["point_coords"] == o["point_coords"]
        assert abs(r["predicted_iou"] - o["predicted_iou"]) < 1e-4
        assert abs(r["stability_score"] - o["stability_score"]) < 1e-4


def test_restore_is_exact(sam2_t):
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in sam2_t.state_dict().items()}
    classes = {n: type(m) for n, m in sam2_t.named_modules()}
    ref = _encoder(sam2_t, x)
    handle = patch_sam(sam2_t, "dense")
    assert set(sam2_t.state_dict()) == set(before)
    assert any(type(m) is not classes[n] for n, m in sam2_t.named_modules())
    handle.restore()
    handle.restore()  # idempotent
    assert {n: type(m) for n, m in sam2_t.named_modules()} == classes
    assert not any(hasattr(m, "_sam_sparse") for m in sam2_t.modules()) and not hasattr(sam2_t, "_sam_sparse_handle")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in sam2_t.modules())
    for k, v in sam2_t.state_dict().items():
        assert torch.equal(v, before[k]), k
    for a, b in zip(_encoder(sam2_t, x), ref):
        assert torch.equal(a, b)


def test_sparse_encoder_policy_changes_the_global_blocks_and_nothing_else(sam2_t):
    """Each patched module is re-run, patched dense, on the input it saw patched with a sparse encoder
    policy: only the global blocks differ; every other layer (windowed, pooled, decoder) is the dense
    patch's, which test_dense_equals_unpatched_in_fp32 shows to be SAM 2's own."""
    policy = Policy.from_dict({"name": "global-local", "block_size": 16, "token_order": "tiles", "rules": [
        {"match": "encoder.global", "pattern": "local2d", "params": {"radius": 1}},
        {"match": "*", "pattern": "dense"}]})
    image = photo(seed=4)
    handle = patch_sam(sam2_t, policy)
    assert [r.pattern for r in handle.report if r.kind == "encoder.global"] == ["local2d"] * 3
    assert all(r.pattern == "dense" for r in handle.report if r.kind != "encoder.global")
    seen = {}

    def record(name):
        def hook(mod, args, kwargs, out):  # returns None: a forward hook's result would replace the output
            seen.setdefault(name, (args, kwargs, out))
        return hook

    hooks = [m.register_forward_hook(record(rep.name), with_kwargs=True) for rep, m in handle.modules()]
    predictor = image_predictor(sam2_t)
    try:
        with torch.inference_mode():
            predictor.set_image(image)
            predictor.predict(point_coords=np.array([[50, 50]]), point_labels=np.array([1]))
    finally:
        for h in hooks:
            h.remove()
        handle.restore()
    assert len(seen) == 19
    dense = patch_sam(sam2_t, "dense")
    modules = {rep.name: m for rep, m in dense.modules()}
    try:
        with torch.inference_mode():
            for name, (args, kwargs, out) in seen.items():
                err = (out - modules[name](*args, **kwargs)).abs().max().item()
                if name.endswith(("blocks.5.attn", "blocks.7.attn", "blocks.9.attn")):
                    assert err > 1e-3, f"{name}: the sparse mask changed nothing ({err})"
                else:
                    assert err == 0, f"{name}: changed by a policy that is dense there ({err})"
    finally:
        dense.restore()


def test_deepcopy_pickle_threads_disabled_observe(sam2_t):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    ref = _encoder(sam2_t, x)
    handle = patch_sam(sam2_t, "dense")
    try:
        twin = copy.deepcopy(sam2_t)
        loaded = pickled(sam2_t)
        for m in (twin, loaded):
            assert m._sam_sparse_handle is not handle and m._sam_sparse_handle.active
            for a, b in zip(_encoder(m, x), ref):
                assert _cos(a, b) > 0.99999
        twin._sam_sparse_handle.restore()
        assert handle.active and hasattr(sam2_t.image_encoder.trunk.blocks[0].attn, "_sam_sparse")

        results = [None, None]

        def work(i):
            results[i] = _encoder(sam2_t, x[i:i + 1])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(2):
            for a, b in zip(results[i], ref):
                assert _cos(a, b[i:i + 1]) > 0.99999

        with handle.disabled():
            assert not hasattr(sam2_t.image_encoder.trunk.blocks[0].attn, "_sam_sparse")
            for a, b in zip(_encoder(sam2_t, x), ref):
                assert torch.equal(a, b)
        assert handle.active

        calls = []
        with handle.observe(lambda layer, prompts, q, k, *rest: calls.append((layer.kind, q.shape, k.shape))):
            _encoder(sam2_t, x[:1])
        kinds = [c[0] for c in calls]
        assert kinds == HIERA_T_KINDS  # observed windowed layers run Hiera's partitioned path
        pooled = calls[1]
        assert pooled[1][1] * 4 == pooled[2][1], pooled  # 16 pooled queries per 64 keys of an 8x8 window
    finally:
        handle.restore()


def test_image_encoder_graph_wiring(sam2_t):
    """An image model's ImageEncoder becomes a GraphedImageEncoder that reads its handle's MemoryContext
    (sam2_encoder.py): on by default, switched by graph_encoder or handle.memory.graph_encoder, gone with
    restore() (class and attribute), carried to a deep copy's and a pickle's own handle; the encoder copied or
    saved alone carries the switches, not the model. On the CPU it runs ImageEncoder.forward, the same values,
    and makes no graph. A video predictor keeps its ImageEncoder (its frames have a graph of their own)."""
    import io

    from sam2.build_sam import build_sam2_video_predictor
    from sam2.modeling.backbones.image_encoder import ImageEncoder

    from sam_sparse.patches.sam2_encoder import GraphedImageEncoder

    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(7))
    ref = _encoder(sam2_t, x)
    size = lambda obj: len(pickle.dumps(obj))  # noqa: E731
    alone_size = size(sam2_t.image_encoder)
    handle = patch_sam(sam2_t, "dense")
    try:
        enc = sam2_t.image_encoder
        assert type(enc) is GraphedImageEncoder and enc._sam_sparse_memory is handle.memory
        assert handle.memory.graph_encoder
        for a, b in zip(_encoder(sam2_t, x), ref):
            assert _cos(a, b) > 0.99999
        assert handle.memory.encoder_graph is None, "no graph on the CPU"
        for m in (copy.deepcopy(sam2_t), pickled(sam2_t)):
            assert m.image_encoder._sam_sparse_memory is m._sam_sparse_handle.memory is not handle.memory
        # the encoder alone: its own switches, not the whole model (the handle holds the model)
        assert size(enc) < 1.05 * alone_size, (size(enc), alone_size)
        buf = io.BytesIO()
        torch.save(enc, buf)
        twin = copy.deepcopy(enc)
        assert twin._sam_sparse_memory is not handle.memory and twin._sam_sparse_memory.graph_encoder
        with torch.inference_mode():
            out = twin(x)
        for a, b in zip([out["vision_features"], *out["backbone_fpn"]], ref):
            assert _cos(a, b) > 0.99999
    finally:
        handle.restore()
    assert type(sam2_t.image_encoder) is ImageEncoder and "_sam_sparse_memory" not in vars(sam2_t.image_encoder)
    from sam_sparse.cuda_graphs import module_storage
    from sam_sparse.patches.sam2_encoder import _graph_state

    state = _graph_state(sam2_t.image_encoder)  # the graph's key: parameter storage and scalp
    assert state[-1] == sam2_t.image_encoder.scalp and state[:-1] == module_storage(sam2_t.image_encoder)
    handle = patch_sam(image_predictor(sam2_t), "dense", graph_encoder=False)
    assert not handle.memory.graph_encoder and type(sam2_t.image_encoder) is GraphedImageEncoder
    handle.restore()
    alone = patch_sam(sam2_t.image_encoder, "dense", graph_encoder=True)  # the encoder patched on its own
    assert type(sam2_t.image_encoder) is GraphedImageEncoder and sam2_t.image_encoder._sam_sparse_memory is alone.memory
    alone.restore()
    with pytest.raises(ValueError, match="graph_encoder=True: for a SAM 2 model with sam2's ImageEncoder .* not for a Hiera"):
        patch_sam(sam2_t.image_encoder.trunk, "dense", graph_encoder=True)
    assert not hasattr(sam2_t.image_encoder.trunk.blocks[0].attn, "_sam_sparse")
    video = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")
    handle = patch_sam(video, "dense")
    assert type(video.image_encoder) is ImageEncoder
    handle.restore()


def test_image_encoder_op_for_compiled_callers(sam2_t):
    """sam2_encoder's op, what a compiled caller records for a patched encoder at batch 1 on CUDA: patch_sam,
    deepcopy and unpickling enroll the encoder by id (restore leaves nothing on it); the op runs the encoder
    (on the CPU without a graph: the eager forward, the same values, a fresh list of contiguous tensors) and its
    fake implementation gives the outputs' shapes from one eager run per input shape, with no fake tensor
    left in sam2's position-encoding cache; an unknown id is a clear error. On the CPU a compiled patched
    encoder is traced as before (fullgraph), with the eager values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sam_sparse.patches import sam2_encoder

    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(11))
    ref = _encoder(sam2_t, x)
    handle = patch_sam(sam2_t, "dense")
    try:
        enc = sam2_t.image_encoder
        assert sam2_encoder._ENCODERS.get(id(enc)) is enc
        for m in (copy.deepcopy(sam2_t), pickled(sam2_t)):
            assert sam2_encoder._ENCODERS.get(id(m.image_encoder)) is m.image_encoder
        op = torch.ops.sam_sparse.sam2_image_encoder
        with torch.inference_mode():
            flat = op(x, id(enc), None)
            pos = enc(x)["vision_pos_enc"]
        assert len(flat) == 2 * len(ref[1:]) and all(t.is_contiguous() for t in flat)
        for a, b in zip(flat, [*pos, *ref[1:]]):
            assert a.shape == b.shape and _cos(a, b) > 0.99999
        pe = enc.neck.position_encoding
        with FakeTensorMode() as mode:
            fake = op(mode.from_tensor(torch.empty(1, 3, 192, 192)), id(enc), None)
        assert [tuple(t.shape) for t in fake] == [(1, 256, 48, 48), (1, 256, 24, 24), (1, 256, 12, 12)] * 2
        assert all(type(t) is torch.Tensor for t in pe.cache.values()), "a fake tensor cached"
        with pytest.raises(RuntimeError, match="no patched image encoder has id"):
            op(x, 12345, None)
        with torch.inference_mode():
            compiled = torch.compile(enc, backend="eager", fullgraph=True)(x)
        for a, b in zip([compiled["vision_features"], *compiled["backbone_fpn"]], ref):
            assert _cos(a, b) > 0.99999
    finally:
        handle.restore()
        torch._dynamo.reset()
    assert not [k for k in vars(sam2_t.image_encoder) if "sam_sparse" in k]


def test_image_encoder_op_traced(sam2_t, monkeypatch):
    """What torch.compile records for a patched encoder (sam2_encoder.py; the CUDA check opened on the CPU, where
    the op then runs the eager forward): at batch 1 with grad off one op node (fullgraph), the eager values, the
    position encodings included; traced as before (no op) with graph_encoder off (a recompile), at batch 2 and
    under torch.export; a hook added after compiling fires (the op runs the encoder eagerly); a symbolic size
    (dynamic=True) and a second size compile; a deep copy gets its own op."""
    from sam_sparse.patches import sam2_encoder

    monkeypatch.setattr(sam2_encoder, "_on_device", lambda sample: True)
    op = torch.ops.sam_sparse.sam2_image_encoder.default
    graphs = []

    def backend(gm, inputs):
        graphs.append(sum(n.target is op for n in gm.graph.nodes))
        return gm.forward

    flat = lambda out: [out["vision_features"], *out["vision_pos_enc"], *out["backbone_fpn"]]  # noqa: E731
    g = torch.Generator().manual_seed(12)
    x, x2 = torch.randn(1, 3, 256, 256, generator=g), torch.randn(2, 3, 256, 256, generator=g)
    handle = patch_sam(sam2_t, "dense")
    enc, ctx = sam2_t.image_encoder, handle.memory
    try:
        with torch.inference_mode():
            ref, ref2 = flat(enc(x)), flat(enc(x2))

            def check(out, want, what):
                assert len(out) == len(want), what
                for i, (a, b) in enumerate(zip(out, want)):
                    assert a.shape == b.shape and _cos(a, b) > 0.99999, (what, i)

            torch._dynamo.reset()
            fired = []
            hook = enc.trunk.blocks[1].register_forward_hook(lambda *a: fired.append(1))
            hook.remove()  # a hook that was there and is gone: the op path
            compiled = torch.compile(enc, backend=backend, fullgraph=True)
            out = flat(compiled(x))
            assert graphs == [1] and fired == []
            check(out, ref, "the op")
            assert out[0] is out[-1], "vision_features is the last level"
            ctx.graph_encoder = False
            check(flat(compiled(x)), ref, "graph_encoder off")
            assert graphs == [1, 0]
            ctx.graph_encoder = True
            check(flat(compiled(x)), ref, "graph_encoder on again")
            assert graphs == [1, 0], "the first trace serves again"
            hook = enc.trunk.blocks[1].register_forward_hook(lambda *a: fired.append(1))
            check(flat(compiled(x)), ref, "a hook")
            assert graphs == [1, 0] and fired == [1], "a hook: the op runs the encoder eagerly"
            hook.remove()
            check(flat(compiled(x2)), ref2, "batch 2")
            assert graphs[2:] == [0], graphs
            twin = copy.deepcopy(enc)
            check(flat(torch.compile(twin, backend=backend, fullgraph=True)(x)), ref, "a deep copy")
            assert graphs[-1] == 1
            torch._dynamo.reset()
            graphs.clear()
            dyn = torch.compile(enc, backend=backend, fullgraph=True, dynamic=True)
            check(flat(dyn(x)), ref, "dynamic=True")
            small = torch.randn(1, 3, 192, 192, generator=g)
            assert [t.shape[-1] for t in flat(dyn(small))] == [12, 48, 24, 12, 48, 24, 12]
            assert graphs and all(n == 1 for n in graphs), graphs
        with torch.no_grad():
            exported = torch.export.export(enc, (x,))
        assert not any(n.target is op for n in exported.graph.nodes), "export records the encoder, not the op"
    finally:
        handle.restore()
        torch._dynamo.reset()


def test_image_encoder_compiles_ahead_once_per_signature(sam2_t, monkeypatch):
    """first_call.compile_ahead_once from GraphedImageEncoder (sam2_encoder.py), with the CUDA check opened on the
    CPU and kernels.compile_ahead replaced by a block that is on: the first call of an input signature runs the forward
    once inside the block, then once for real, with the eager values; a repeat runs none; a new size one again.
    Grad on, handle.memory.compile_ahead off, or a forward hook (which would see the pass) run none, and a hook
    leaves the signature to the next call. A pass that raises is dropped and the call goes on. A block that
    declines (no async compiles) is recorded as such. A copy carries the switch, not the signatures."""
    import contextlib

    from sam2.modeling.backbones.image_encoder import ImageEncoder

    from sam_sparse.patches import first_call

    monkeypatch.setattr(first_call, "_on_device", lambda sample: True)
    state, runs = {"inside": False, "on": True, "raise": False}, []

    @contextlib.contextmanager
    def block(device):
        state["inside"] = state["on"]
        try:
            yield state["on"]
        finally:
            state["inside"] = False

    real = ImageEncoder.forward

    def forward(self, sample):
        runs.append(state["inside"])
        if state["inside"] and state["raise"]:
            raise RuntimeError("a failing pass")
        return real(self, sample)

    monkeypatch.setattr(first_call, "compile_ahead", block)
    monkeypatch.setattr(ImageEncoder, "forward", forward)
    g = torch.Generator().manual_seed(5)
    x, small = torch.randn(1, 3, 256, 256, generator=g), torch.randn(1, 3, 192, 192, generator=g)
    batch = lambda n: torch.randn(n, 3, 256, 256, generator=g)  # noqa: E731
    ref = _encoder(sam2_t, x)
    runs.clear()
    handle = patch_sam(sam2_t, "dense")
    try:
        enc, ctx = sam2_t.image_encoder, handle.memory
        out = _encoder(sam2_t, x)
        assert runs == [True, False], runs
        for a, b in zip(out, ref):
            assert _cos(a, b) > 0.99999
        _encoder(sam2_t, x)
        assert runs == [True, False, False], "a repeat makes no pass"
        _encoder(sam2_t, small)
        assert runs[3:] == [True, False], "a new size makes one"
        assert list(ctx.compiled_ahead.values()) == [True, True]
        runs.clear()
        with torch.no_grad():
            enc(batch(2))
        with torch.enable_grad(), pytest.raises(RuntimeError, match="inference-only"):
            enc(batch(3))  # the real call says why; no pass before it
        assert runs == [True, False, False], "grad on: no pass"
        runs.clear()
        twin = copy.deepcopy(enc)
        assert twin._sam_sparse_memory.compile_ahead and not twin._sam_sparse_memory.compiled_ahead
        ctx.compile_ahead = False
        assert not copy.deepcopy(enc)._sam_sparse_memory.compile_ahead, "the switch is carried"
        _encoder(sam2_t, batch(4))
        assert runs == [False], "switched off"
        ctx.compile_ahead = True
        runs.clear()
        hook = enc.neck.register_forward_hook(lambda *a: None)
        _encoder(sam2_t, batch(5))
        hook.remove()
        _encoder(sam2_t, batch(5))
        assert runs == [False, True, False], "a hook would see the pass: the next call makes it"
        runs.clear()
        state["raise"] = True
        got = _encoder(sam2_t, x[:, :, :224, :224].contiguous())
        assert runs == [True, False] and got[0].shape[-1] == 14, "a failing pass is dropped"
        state["raise"], state["on"] = False, False
        runs.clear()
        _encoder(sam2_t, batch(6))
        _encoder(sam2_t, batch(6))
        assert runs == [False, False] and list(ctx.compiled_ahead.values())[-1] is False, "declined once, recorded"
    finally:
        handle.restore()


def test_image_encoder_graph_yields_to_python(sam2_t):
    """first_call.must_run_eagerly: a forward hook or pre-hook on any module of the encoder or a global one,
    an observed patched attention, a module in training mode, or a forward replaced on an instance makes the call
    run as Python (a replay would skip it, or replay eval mode)."""
    from sam_sparse.patches.first_call import must_run_eagerly as _must_run_eagerly

    enc = sam2_t.image_encoder
    assert not _must_run_eagerly(enc)
    for register in (enc.trunk.blocks[3].mlp.register_forward_hook, enc.neck.register_forward_pre_hook,
                     torch.nn.modules.module.register_module_forward_hook):
        h = register(lambda *a: None)
        try:
            assert _must_run_eagerly(enc)
        finally:
            h.remove()
    assert not _must_run_eagerly(enc)
    enc.trunk.blocks[2].train()
    assert _must_run_eagerly(enc)
    enc.eval()
    enc.neck.forward = enc.neck.forward  # an instance attribute, as offloading wrappers set
    assert _must_run_eagerly(enc)
    del enc.neck.forward
    handle = patch_sam(sam2_t, "dense")
    try:
        assert not _must_run_eagerly(sam2_t.image_encoder)
        with handle.observe(lambda *a: None):
            assert _must_run_eagerly(sam2_t.image_encoder)
        assert not _must_run_eagerly(sam2_t.image_encoder)
    finally:
        handle.restore()


def test_patch_through_predictors_and_video_predictor():
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2_video_predictor
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = small_sam2(image_size=256)
    for obj in (SAM2ImagePredictor(model), SAM2AutomaticMaskGenerator(model)):
        handle = patch_sam(obj, "dense")
        assert handle.model is model
        with pytest.raises(RuntimeError, match="already patched"):
            patch_sam(model, "dense")
        unpatch_sam(obj)
        assert not hasattr(model, "_sam_sparse_handle")
        with pytest.raises(ValueError, match="batch_objects=True: for a SAM2VideoPredictor's propagate_in_video"):
            patch_sam(obj, "dense", batch_objects=True)  # an image predictor has no video to batch
    video = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")
    patch_sam(video, "dense", batch_objects=False, graph_encoder=False).restore()
    handle = patch_sam(video, "dense")
    assert len(handle.report) == 27 and handle.model is video
    handle.restore()
    with pytest.raises(TypeError, match="sam2's SAM2Base"):
        patch_sam(model.memory_attention, "dense")


def test_stage_rules_select_hiera_stages():
    p = Policy.from_dict({"name": "stage3", "block_size": 64, "rules": [
        {"match": "encoder.window", "stages": [3], "pattern": "local2d", "params": {"radius": 0}},
        {"match": "*", "pattern": "dense"}]})
    layers = p.geometries("sam2.1_hiera_t")
    sparse = {g.name for g in layers if p.block_mask(g) is not None}
    assert sparse == {f"image_encoder.trunk.blocks.{i}.attn" for i in (4, 6, 8)}  # the 14x14 windows of stage 3
    assert [g.stage for g in layers[:12]] == [1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4, 4]
    assert p.unmatched_rules(p.geometries("vit_b")) == []  # expected to match nothing on SAM's ViT
    with pytest.raises(ValueError, match=r"rules\[0\]\.stages.*stages count from 1"):
        Policy.from_dict({"name": "bad", "rules": [{"match": "*", "stages": [0], "pattern": "dense"}]})


def test_pooled_queries_are_placed_on_the_key_grid():
    """encoder.pooled: a query block of an 8x8 pooled grid covers key-grid rows twice its own; a 2-D
    pattern must measure it there. 16-token blocks: query block i = pooled rows 2i, 2i+1 = key rows
    4i..4i+3; key block r = key row r. local2d radius 2 around the query block's centre keeps rows 4i..4i+3."""
    from sam_sparse.geometry import LayerGeometry
    from sam_sparse.masks import block_context, evaluate, local2d

    layer = LayerGeometry("pooled", "encoder.pooled", 1, 64, 256, (8, 8), (16, 16), 16)
    mask = evaluate(local2d(radius=2), block_context(layer))[0, 0]
    for i in range(4):
        assert mask[i].nonzero().flatten().tolist() == [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3], mask[i]


def test_random_checkpoint_in_sam2_format_loads(tmp_path):
    """The loading path SAM 2 users take: a checkpoint in SAM 2's released layout ({"model": state dict}),
    loaded by sam2's build_sam2 and by sam_sparse.build_sam, both then patched."""
    from sam2.build_sam import build_sam2

    from sam_sparse import build_sam
    from sam_sparse.models import CheckpointError

    src = small_sam2(image_size=1024, seed=7)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": src.state_dict()}, path)
    theirs = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(path), device="cpu")
    ours = build_sam(None, path)
    for model in (theirs, ours):
        assert type(model).__name__ == "SAM2Base"
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        patch_sam(model, "dense").restore()
    with pytest.raises(CheckpointError, match=r"is for sam2.1_hiera_t .*not sam2.1_hiera_l; pass --model-type sam2.1_hiera_t"):
        build_sam("sam2.1_hiera_l", path)


def test_sam2_box_prompts_reach_prompt_policies_as_boxes():
    """SAM 2's predictor passes a box as two points labelled 2 and 3: region_focused must see a box (its
    corners in token units), the other points as points, padding (-1) as nothing."""
    from sam_sparse.patches.attention import prompts_from_call

    class PromptEncoder:  # SAM 2's at 1024 px: 64 x 64 tokens
        image_embedding_size, input_image_size = (64, 64), (1024, 1024)

    coords = torch.tensor([[[16.0, 32.0], [160.0, 320.0], [500.0, 600.0]], [[0.0, 0.0], [64.0, 64.0], [0.0, 0.0]]])
    labels = torch.tensor([[2, 3, 1], [1, 0, -1]])
    p = prompts_from_call(PromptEncoder(), ((coords, labels), None, None), {})
    assert torch.equal(p.boxes[0], torch.tensor([1.0, 2.0, 10.0, 20.0]))
    assert p.boxes[1].isnan().all()
    assert p.points[0, :2].isnan().all() and torch.equal(p.points[0, 2], torch.tensor([31.25, 37.5]))
    assert torch.equal(p.points[1, :2], torch.tensor([[0.0, 0.0], [4.0, 4.0]])) and p.points[1, 2].isnan().all()


def test_segment_image_on_sam2(sam2_t):
    """sam_sparse.segment_image through SAM2ImagePredictor: a point with a background point, and two boxes."""
    from sam_sparse.segment import segment_image

    image = photo(seed=6)
    masks, scores = segment_image(sam2_t, image, points=[(60, 90)], background=[(200, 40)])
    assert masks.shape == (1, 180, 240) and masks.dtype == bool and scores.shape == (1,)
    masks, scores = segment_image(sam2_t, image, boxes=[(10, 10, 100, 100), (120, 60, 230, 170)], multimask=True)
    assert masks.shape == (6, 180, 240) and (np.diff(scores) <= 0).all()
