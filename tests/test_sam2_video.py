"""patch_sam on SAM 2's video predictor: the memory attention through the kernel, and the batched propagation.

A SAM2VideoPredictor from sam2's own config (hiera_t, random weights, attention sharpened, the memory
attention's too: tests/sam2_helpers.py) at 128 px (8 x 8 memory grid) on five synthetic JPEG frames. Every
run is compared frame by frame with the same calls on the unpatched predictor (SAM 2's own per-object loop,
SDPA): masks identical, logits within float rounding, with the memory attention patched per object
(batch_objects=False) and batched (the default).
"""

import copy
import pickle

import pytest
import torch

from sam2_helpers import small_video_predictor, write_frames
from sam_sparse import patch_sam
from sam_sparse.geometry import MemoryLayout
from sam_sparse.patches import sam2_memory

LOGIT_ATOL = 1e-4  # fp32; SDPA vs the kernel's reference path, one object vs a batch: a few 1e-7 measured

# SAM 2's hole filling needs its CUDA extension; without it SAM 2 warns and skips it (both sides alike).
pytestmark = pytest.mark.filterwarnings("ignore:cannot import name ._C.:UserWarning")

# Scenarios: lists of steps. ("add", frame, obj_id, dict of add_new_points_or_box's prompt arguments),
# ("propagate", dict of propagate_in_video's arguments), ("remove", obj_id). Coordinates in the 120x90 video.
ONE = [("add", 0, 1, {"points": [[40, 45]], "labels": [1]}), ("propagate", {})]
THREE = [("add", 0, 1, {"points": [[40, 45]], "labels": [1]}),
         ("add", 0, 2, {"points": [[90, 20], [100, 30]], "labels": [1, 0]}),
         ("add", 0, 3, {"box": [10, 50, 70, 88]}),
         ("propagate", {}), ("propagate", {"start_frame_idx": 3, "reverse": True})]
# Object 3 joins on frame 2 after a first propagation: its memory (one prompted frame) is shorter than the
# others' from there on (varlen); then reverse from frame 2, then object 2 is removed and all propagate again.
# (Propagations start where every object has a pointer in its memory: in fp32 SAM 2 itself fails on a memory
# of frames alone, whose bfloat16 features reach the fp32 projections.)
LATER = [("add", 0, 1, {"points": [[40, 45]], "labels": [1]}),
         ("add", 0, 2, {"points": [[90, 20]], "labels": [1]}),
         ("propagate", {}),
         ("add", 2, 3, {"points": [[60, 70]], "labels": [1]}),
         ("propagate", {"start_frame_idx": 2}),
         ("propagate", {"start_frame_idx": 2, "reverse": True}),
         ("remove", 2),
         ("propagate", {"start_frame_idx": 2})]
SCENARIOS = {"one": ONE, "three": THREE, "later": LATER}


def run(predictor, frames, steps):
    """[(step, frame, object ids, mask logits (objects, 1, H, W))] of every frame the steps output."""
    out = []
    with torch.inference_mode():
        state = predictor.init_state(str(frames))
        for i, step in enumerate(steps):
            if step[0] == "add":
                _, frame, obj, prompt = step
                f, ids, logits = predictor.add_new_points_or_box(state, frame, obj, **prompt)
                out.append((i, f, tuple(ids), logits.clone()))
            elif step[0] == "remove":
                predictor.remove_object(state, step[1])
            else:
                for f, ids, logits in predictor.propagate_in_video(state, **step[1]):
                    out.append((i, f, tuple(ids), logits.clone()))
    return out


@pytest.fixture(scope="module")
def predictor():
    return small_video_predictor()


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return write_frames(tmp_path_factory.mktemp("video") / "frames")


@pytest.fixture(scope="module")
def reference(predictor, frames):
    """The unpatched predictor's outputs, per scenario (computed on first use)."""
    cache = {}

    def get(name):
        if name not in cache:
            assert not hasattr(predictor, "_sam_sparse_handle")
            cache[name] = run(predictor, frames, SCENARIOS[name])
        return cache[name]

    return get


def assert_same(out, ref, what):
    assert len(out) == len(ref) > 0, what
    for (i, f, ids, logits), (ri, rf, rids, rlogits) in zip(out, ref):
        where = f"{what}: step {i}, frame {f}"
        assert (i, f, ids) == (ri, rf, rids), where
        assert logits.shape == rlogits.shape, where
        assert torch.equal(logits > 0, rlogits > 0), f"{where}: masks differ"
        err = (logits - rlogits).abs().max().item()
        assert err <= LOGIT_ATOL, f"{where}: max logit error {err}"


def test_memory_attention_modules_are_patched(predictor):
    handle = patch_sam(predictor, "dense")
    try:
        assert len(handle.report) == 12 + 7 + 8
        memory = [r for r in handle.report if r.name.startswith("memory_attention")]
        assert [(r.name, r.kind) for r in memory] == [
            (f"memory_attention.layers.{i}.{a}", k) for i in range(4)
            for a, k in (("self_attn", "memory.self"), ("cross_attn_image", "memory.cross"))]
        assert {r.heads for r in memory} == {1} and not handle.notes
        assert memory[0].grid == "8x8" and memory[1].grid.startswith("8x8 -> 7 frames (1 cond) x 8x8 + 64 pointers")
        assert type(predictor).__name__ == "SparseSAM2VideoPredictor"
        assert type(predictor.memory_attention).__name__ == "SparseMemoryAttention"
        assert all(type(m).__name__ == "SparseRoPEAttention" for _, m in handle.modules()[-8:])
    finally:
        handle.restore()
    assert type(predictor).__name__ == "SAM2VideoPredictor"
    assert type(predictor.memory_attention).__name__ == "MemoryAttention"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("batch_objects", [False, True], ids=["per_object", "batched"])
def test_dense_propagation_equals_unpatched(predictor, frames, reference, scenario, batch_objects):
    ref = reference(scenario)
    handle = patch_sam(predictor, "dense", batch_objects=batch_objects)
    try:
        out = run(predictor, frames, SCENARIOS[scenario])
    finally:
        handle.restore()
    assert_same(out, ref, f"{scenario}, batch_objects={batch_objects}")


def test_batched_path_batches(predictor, frames, monkeypatch):
    """One memory attention and one mask decoder call per tracked frame, whatever the number of objects;
    memories of different lengths go through the kernel's varlen path, equal ones through the batched one."""
    calls = {"memory": 0, "decoder": 0, "varlen": 0, "batched_rows": []}
    varlen = sam2_memory.block_sparse_attn_varlen

    def count_varlen(*args, **kwargs):
        calls["varlen"] += 1
        return varlen(*args, **kwargs)

    monkeypatch.setattr(sam2_memory, "block_sparse_attn_varlen", count_varlen)
    handle = patch_sam(predictor, "dense")
    count_memory = lambda *a: calls.__setitem__("memory", calls["memory"] + 1)  # noqa: E731
    hooks = [predictor.memory_attention.register_forward_hook(count_memory),
             predictor.sam_mask_decoder.register_forward_hook(
                 lambda m, args, kwargs, out: calls["batched_rows"].append(kwargs["image_embeddings"].shape[0]),
                 with_kwargs=True)]
    try:
        with torch.inference_mode():
            state = predictor.init_state(str(frames))
            for obj, xy in ((1, [40, 45]), (2, [90, 20]), (3, [60, 70])):
                predictor.add_new_points_or_box(state, 0, obj, points=[xy], labels=[1])
            calls["batched_rows"].clear()
            n = sum(1 for _ in predictor.propagate_in_video(state))
            assert n == 5
            assert calls["memory"] == 4 and calls["batched_rows"] == [3] * 4  # frames 1-4; frame 0 was prompted
            assert calls["varlen"] == 0  # equal memories: one batched call
            predictor.add_new_points_or_box(state, 2, 4, points=[[20, 20]], labels=[1])
            calls.update(memory=0, batched_rows=[])
            list(predictor.propagate_in_video(state, start_frame_idx=2))
            assert calls["memory"] == 3 and calls["batched_rows"] == [3, 4, 4]  # frame 2: objects 1-3; 3, 4: all four
            assert calls["varlen"] == 2 * 4  # frames 3 and 4, four cross-attention layers each
    finally:
        for h in hooks:
            h.remove()
        handle.restore()


def test_restore_deepcopy_disabled_observe(predictor, frames, reference):
    before = {k: v.clone() for k, v in predictor.state_dict().items()}
    classes = {n: type(m) for n, m in predictor.named_modules()}
    with pytest.raises(TypeError, match="graph_encoder=1: expected True, False or None"):
        patch_sam(predictor, "dense", graph_encoder=1)
    with pytest.raises(TypeError, match="graph_heads='no': expected True, False or None"):
        patch_sam(predictor, "dense", graph_heads="no")
    handle = patch_sam(predictor, "dense", graph_encoder=False, graph_heads=False)
    try:
        twin = copy.deepcopy(predictor)
        assert twin._sam_sparse_handle is not handle and type(twin).__name__ == "SparseSAM2VideoPredictor"
        assert twin._sam_sparse_handle.memory is not handle.memory
        # the switches travel with a copy (the graphs do not: cuda_graphs' own tests, on the GPU)
        switches = lambda m: (m.batch_objects, m.graph_encoder, m.graph_heads)  # noqa: E731
        assert switches(twin._sam_sparse_handle.memory) == (True, False, False)
        assert switches(pickle.loads(pickle.dumps(handle.memory))) == (True, False, False)
        twin._sam_sparse_handle.restore()
        assert type(twin).__name__ == "SAM2VideoPredictor" and type(predictor).__name__ == "SparseSAM2VideoPredictor"
        with handle.disabled():
            assert {n: type(m) for n, m in predictor.named_modules()} == classes
        assert handle.active and type(predictor).__name__ == "SparseSAM2VideoPredictor"
        seen = []
        record = lambda layer, prompts, q, k, *rest: seen.append((layer.kind, layer.memory, q.shape, k.shape))  # noqa: E731
        with handle.observe(record):
            run(predictor, frames, ONE[:1] + [("propagate", {"max_frame_num_to_track": 2})])
        kinds = [s[0] for s in seen if s[0].startswith("memory.")]
        assert kinds == ["memory.self", "memory.cross"] * 4 * 2  # frames 1 and 2
        cross = [s for s in seen if s[0] == "memory.cross"]
        # frame 1: the prompted frame 0 and its pointer (4 tokens); frame 2: frames 0 (conditioning) and 1, 2 pointers
        assert cross[0][1] == MemoryLayout((True,), (8, 8), 4) and cross[0][3] == (1, 68, 1, 256)
        assert cross[-1][1] == MemoryLayout((True, False), (8, 8), 8) and cross[-1][3] == (1, 136, 1, 256)
    finally:
        handle.restore()
    assert {n: type(m) for n, m in predictor.named_modules()} == classes
    assert not any(hasattr(m, "_sam_sparse") for m in predictor.modules())
    assert not hasattr(predictor, "_sam_sparse_handle")
    for k, v in predictor.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert_same(run(predictor, frames, ONE), reference("one"), "restored")


def test_vos_optimized_dense_equals_unpatched(frames, reference):
    """SAM2VideoPredictorVOS compiles the memory attention, the mask decoder and the encoders with
    fullgraph=True: the patched attentions are traced into those graphs (built masks, RoPE, memory
    layouts: no value-dependent branch, no stores the trace cannot replay). Objects added on a later frame
    have memories of other shapes: the compiled memory attention runs once per shape group."""
    vos = small_video_predictor(vos_backend="aot_eager")
    handle = patch_sam(vos, "dense")
    try:
        assert len(handle.report) == 27 and type(vos).__name__ == "SparseSAM2VideoPredictorVOS"
        assert not sam2_memory.packable(vos.memory_attention)  # compiled forward: per-shape groups, no varlen
        assert_same(run(vos, frames, LATER), reference("later"), "vos_optimized, dense")
    finally:
        handle.restore()
    assert type(vos).__name__ == "SAM2VideoPredictorVOS"


# memory-local's pattern at a block size for the 8 x 8 memory grid of these tests: a block is 2 grid rows.
SMALL_MEMORY_LOCAL = {"name": "memory-local-8x8", "block_size": 16, "rules": [
    {"match": "memory.cross", "pattern": "memory_local", "params": {"radius": 1}},
    {"match": "*", "pattern": "dense"}]}


def test_memory_local_builtin_density_and_checks():
    from sam_sparse import Policy, load_policy
    from sam_sparse.masks import mask_density
    from sam_sparse.policy import PolicyError

    policy = load_policy("memory-local")
    layers = policy.geometries("sam2.1_hiera_t")
    cross = [g for g in layers if g.kind == "memory.cross"]
    assert len(cross) == 4 and cross[0].memory == MemoryLayout((True,) + (False,) * 6, (64, 64), 64)
    assert cross[0].seqlen_k == 7 * 4096 + 64
    assert 0.2 < mask_density(policy.block_mask(cross[0]), cross[0]) < 0.3  # 0.273
    assert all(policy.block_mask(g) is None for g in layers if g.kind != "memory.cross")
    mask = policy.block_mask(cross[0])[0, 0]
    assert mask[:, :32].all() and mask[:, -1].all()  # the conditioning frame and the pointer tokens, whole
    band = mask[10, 32:64].nonzero().flatten().tolist()  # query rows 20-21 in the first tracked frame
    assert band == [8, 9, 10, 11, 12]  # key rows 16-25: within 4 rows
    with pytest.raises(PolicyError, match=r"rules\[0\]\.pattern: .*needs a memory.cross layer.*matches memory.self"):
        Policy.from_dict({"name": "x", "rules": [{"match": "memory.self", "pattern": "memory_local"}]})
    with pytest.raises(PolicyError, match=r"rules\[0\]\.params\.radius: .*in grid tokens"):
        Policy.from_dict({"name": "x", "rules": [{"match": "memory.cross", "pattern": "memory_local",
                                                   "params": {"radius": -1}}]})


@pytest.mark.parametrize("batch_objects", [False, True], ids=["per_object", "batched"])
def test_memory_local_runs_and_changes_the_logits(predictor, frames, reference, batch_objects):
    """A sparse memory policy: the memory.cross calls see each memory's conditioning frames (recorded from
    SAM 2's own memory building per object, or given by the batched path), the masks drop key blocks, the
    logits move; batched and per-object give the same numbers (per-object masks, varlen included)."""
    from sam_sparse import Policy

    handle = patch_sam(predictor, Policy.from_dict(SMALL_MEMORY_LOCAL), batch_objects=batch_objects)
    seen = []
    try:
        assert [r.pattern for r in handle.report if r.kind == "memory.cross"] == ["memory_local"] * 4
        assert all(r.density < 1 for r in handle.report if r.kind == "memory.cross")
        with handle.observe(lambda layer, *rest: seen.append(layer)):
            out = run(predictor, frames, LATER)
    finally:
        handle.restore()
    cross = [g for g in seen if g.kind == "memory.cross"]
    assert {g.kind for g in seen if g.kind.startswith("memory.")} == {"memory.self", "memory.cross"}
    assert all(g.memory.frames[0] and not any(g.memory.frames[g.memory.cond_frames:]) for g in cross)
    assert max(len(g.memory.frames) for g in cross) == 4 and {g.memory.cond_frames for g in cross} == {1}
    ref = reference("later")
    errs = [(o[3] - r[3]).abs().max().item() for o, r in zip(out, ref)]
    assert max(errs) > 1e-2, f"memory-local changed nothing: {errs}"
    test_memory_local_runs_and_changes_the_logits.outputs[batch_objects] = out
    if len(test_memory_local_runs_and_changes_the_logits.outputs) == 2:
        per_object = test_memory_local_runs_and_changes_the_logits.outputs[False]
        assert_same(out, per_object, "memory-local, batched vs per-object")


test_memory_local_runs_and_changes_the_logits.outputs = {}


def test_vos_optimized_refuses_a_sparse_memory_policy():
    """A sparse memory.cross mask depends on each memory's frames and pointers: under the VOS predictor's
    fullgraph compile that is a compile per memory composition, past dynamo's limit. patch_sam says so up
    front and patches nothing; a policy sparse elsewhere but dense on memory.cross is accepted."""
    from sam_sparse import Policy

    vos = small_video_predictor(vos_backend="eager")
    classes = {n: type(m) for n, m in vos.named_modules()}
    with pytest.raises(ValueError, match=r"sparsifies the memory cross-attention .*vos_optimized=False"):
        patch_sam(vos, Policy.from_dict(SMALL_MEMORY_LOCAL))
    assert {n: type(m) for n, m in vos.named_modules()} == classes
    handle = patch_sam(vos, Policy.from_dict({"name": "self-only", "block_size": 16, "rules": [
        {"match": "memory.self", "pattern": "local2d", "params": {"radius": 1}}, {"match": "*", "pattern": "dense"}]}))
    handle.restore()


def test_video_parity_dense_error_does_not_grow(predictor, frames):
    from sam_sparse import video_parity

    prompts = [{"frame": 0, "obj_id": 1, "points": [[40, 45]], "labels": [1]},
               {"frame": 0, "obj_id": 2, "box": [10, 50, 70, 88]}]
    report = video_parity(predictor, frames, prompts, "dense")
    assert report.passed, str(report)
    assert [f.frame for f in report.frames] == [0, 1, 2, 3, 4] and report.objects == 2
    assert max(f.max_logit_err for f in report.frames) <= 1e-4  # bounded on every frame: nothing accumulates
    assert all(f.iou == 1.0 and f.object_iou == 1.0 for f in report.frames)
    assert "IoU vs SAM 2" in str(report) and not hasattr(predictor, "_sam_sparse_handle")
    with pytest.raises(ValueError, match=r"prompts\[0\]: give points with labels, or a box"):
        video_parity(predictor, frames, [{"frame": 0, "obj_id": 1, "points": [[1, 1]]}])


def test_video_parity_judges_a_sparse_policy_by_the_thresholds_given(predictor, frames):
    """A sparse memory policy: without thresholds only the batching is judged (and the report says the masks
    against SAM 2 are not); with min_iou / max_logit_err the masks against SAM 2 are judged too, so a policy that
    moves the logits fails. error_growth leaves out the frames whose memory holds no tracked frame (frames 0-1:
    their error is ~0 and made a flat error look like a growth of 1e4)."""
    from sam_sparse import Policy, video_parity

    prompts = [{"frame": 0, "obj_id": 1, "points": [[40, 45]], "labels": [1]},
               {"frame": 0, "obj_id": 2, "box": [10, 50, 70, 88]}]
    policy = Policy.from_dict(SMALL_MEMORY_LOCAL)
    report = video_parity(predictor, frames, prompts, policy)
    assert report.passed and not report.gated, str(report)
    assert "the masks against SAM 2 are not judged" in str(report)
    errs = [f.max_logit_err for f in report.frames]
    assert max(errs[:2]) < 1e-4 and min(errs[2:]) > 1e-3, errs  # frames 0-1 read the prompted frame only: kept
    assert report.error_growth == pytest.approx(errs[4] / errs[2])  # frames 2-4 (thirds of one frame)
    judged = video_parity(predictor, frames, prompts, policy, min_iou=0.5, max_logit_err=1e-3)
    assert not judged.passed and judged.gated
    assert any("(forward): patched vs SAM 2" in f for f in judged.failures()), judged.failures()
    assert not any("batched vs per-object" in f for f in judged.failures())
    iou_only = video_parity(predictor, frames, prompts, policy, min_iou=0.5)  # the logit error not checked
    assert iou_only.passed and iou_only.gated and iou_only.max_logit_err == float("inf"), str(iou_only)
    assert (iou_only.batch_min_iou, iou_only.batch_max_logit_err) == (1.0, 1e-3)  # batching: the same masks always


def test_video_parity_in_reverse_needs_autocast_and_says_each_frames_direction(predictor, frames):
    """SAM 2 itself fails in float32 propagating in reverse from the last frame: refused before any run, saying
    to use autocast; under bf16 autocast the dense patch passes DENSE_HALF's bar both ways, each frame's
    direction in the report."""
    from sam_sparse import video_parity

    prompts = [{"frame": 0, "obj_id": 1, "points": [[40, 45]], "labels": [1]}]
    with pytest.raises(ValueError, match=r"reverse=True in float32 from frame 4, .*no prompt is on: SAM 2 itself "
                                         r"fails there.*torch.autocast"):
        video_parity(predictor, frames, prompts, "dense", reverse=True)
    with pytest.raises(ValueError, match=r"from frame 2, the last forward frame"):
        video_parity(predictor, frames, prompts, "dense", reverse=True, max_frames=2)
    last = prompts + [{"frame": 4, "obj_id": 1, "points": [[40, 45]], "labels": [1]}]  # SAM 2 runs this in fp32
    both_ways = video_parity(predictor, frames, last, "dense", reverse=True)
    assert both_ways.passed and [f.direction for f in both_ways.frames].count("reverse") == 5, str(both_ways)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = video_parity(predictor, frames, prompts, "dense", reverse=True)
    assert report.passed and (report.min_iou, report.max_logit_err) == (0.9, 2.0), str(report)
    assert [(f.direction, f.frame) for f in report.frames] == (
        [("forward", i) for i in range(5)] + [("reverse", i) for i in (4, 3, 2, 1, 0)])
    assert "reverse" in str(report)


def test_memory_cross_attention_module_rotary_cases(predictor, monkeypatch):
    """One patched memory cross-attention called directly, against RoPEAttention.forward on the same module
    (fp32, CPU): keys of two frames plus pointer tokens, pointer tokens only (SAM 2 rotates no key), and a
    key count that is no multiple of the frame (SAM 2 fails on it; the patch says what was wrong). The kernel
    reads the values before v_proj (64 columns, not 256): v_proj runs after the attention, with its bias."""
    from sam2.modeling.sam.transformer import RoPEAttention

    from sam_sparse.patches import sam2_memory

    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    v_dims = []
    kernel = sam2_memory.block_sparse_attn
    monkeypatch.setattr(sam2_memory, "block_sparse_attn", lambda q, k, v, *a, **kw: v_dims.append(v.shape[-1]) or
                        kernel(q, k, v, *a, **kw))
    handle = patch_sam(predictor, "dense", batch_objects=False)
    try:
        module = predictor.memory_attention.layers[0].cross_attn_image
        n, kv_dim = 64, module.kv_in_dim  # an 8 x 8 frame
        assert module.v_proj.bias.abs().min() > 0, "the test needs v_proj's bias"
        q = torch.randn(2, n, module.embedding_dim, generator=g)
        for keys, pointers in ((2 * n + 4, 4), (4, 4)):
            k, v = (torch.randn(2, keys, kv_dim, generator=g) for _ in range(2))
            with torch.inference_mode():
                got = module(q, k, v, num_k_exclude_rope=pointers)
                want = RoPEAttention.forward(module, q, k, v, num_k_exclude_rope=pointers)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{keys} keys: {m} (seed {seed})")
        assert v_dims == [kv_dim, kv_dim] and kv_dim < module.embedding_dim
        k = torch.randn(2, n + 5, kv_dim, generator=g)
        with pytest.raises(ValueError, match="rotary-encoded keys"), torch.inference_mode():
            module(q, k, k, num_k_exclude_rope=0)
    finally:
        handle.restore()


def test_heads_graph_state_follows_weights_and_dropped_caches(predictor):
    """What a graph of a frame's heads reads besides its arguments (sam2_video.heads_storage): it changes when
    a head's weights move, a memory attention lets a cached layout or RoPE table go (a new grid) or a model
    setting changes, and not with the image encoder's weights, which that graph does not read."""
    from sam_sparse.patches.sam2_video import heads_storage

    handle = patch_sam(predictor, "dense")
    try:
        before = heads_storage(predictor)
        with torch.no_grad():
            predictor.image_encoder.neck.convs[0].conv.weight.mul_(1)  # in place, and not the heads': same
        assert heads_storage(predictor) == before
        cross = predictor.memory_attention.layers[0].cross_attn_image
        table = cross.compute_cis(end_x=4, end_y=4)
        sam2_memory.rope_table(cross._sam_sparse, table)
        sam2_memory.rope_table(cross._sam_sparse, cross.compute_cis(end_x=2, end_y=2))  # a new grid: the old table goes
        assert cross._sam_sparse.dropped == 1 and heads_storage(predictor) != before
        before = heads_storage(predictor)
        predictor.obj_ptr_proj.double()
        assert heads_storage(predictor) != before
        predictor.obj_ptr_proj.float()
        before = heads_storage(predictor)
        predictor.multimask_output_for_tracking = not predictor.multimask_output_for_tracking  # a setting
        assert heads_storage(predictor) != before
        predictor.multimask_output_for_tracking = not predictor.multimask_output_for_tracking
        assert heads_storage(predictor) == before
    finally:
        handle.restore()
    assert handle.memory.heads_graph is None
