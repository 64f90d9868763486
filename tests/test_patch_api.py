"""patch_sam / unpatch_sam: what gets patched, what restore() undoes, errors, prompts capture (CPU, small models)."""

import copy
import warnings

import numpy as np
import pytest
import torch
from patch_helpers import make_image, small_encoder, small_policy, small_sam
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT, Sam
from segment_anything.modeling.image_encoder import Attention as EncoderAttention
from segment_anything.modeling.image_encoder import Block as EncoderBlock
from segment_anything.modeling.transformer import Attention as DecoderAttention

import sam_sparse.patches.attention as attention_mod
from sam_sparse import patch_sam, unpatch_sam
from sam_sparse.policy import PolicyError
from sam_sparse.patches import PolicyWarning, observing, patch_epoch
from sam_sparse.patches import PatchHandle, SparseDecoderAttention, SparseEncoderAttention, SparseWindowBlock
from sam_sparse.policy import Policy, load_policy


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _predict(sam, image, point=(100, 120), box=None):
    p = SamPredictor(sam)
    p.set_image(image)
    kw = dict(point_coords=np.array([point], dtype=np.float32), point_labels=np.array([1]))
    if box is not None:
        kw["box"] = np.array(box, dtype=np.float32)
    return p.predict(**kw, multimask_output=True, return_logits=True)


class SpyPolicy:
    """Wraps a Policy and records every block_mask call (layer name, prompts)."""

    def __init__(self, policy):
        self.inner = load_policy(policy)
        self.calls = []
        for attr in ("name", "description", "block_size", "token_order", "rules"):
            setattr(self, attr, getattr(self.inner, attr))

    def key_tile(self, layer):
        return self.inner.key_tile(layer)

    def needs_prompts(self, layer):
        return self.inner.needs_prompts(layer)

    def head_rules(self, layer):
        return self.inner.head_rules(layer)

    def matched_layers(self, layers):
        return self.inner.matched_layers(layers)

    def block_mask(self, layer, prompts=None, device=None):
        self.calls.append((layer.name, prompts))
        return self.inner.block_mask(layer, prompts, device)


def test_restore_is_exact_and_state_dict_unchanged():
    sam = small_sam()
    fresh = copy.deepcopy(sam)  # never patched
    image = make_image()
    keys = list(sam.state_dict().keys())
    ptrs = {k: v.data_ptr() for k, v in sam.state_dict().items()}
    modules = dict(sam.named_modules())
    hooks = _all_hooks(sam)

    handle = patch_sam(sam, "dense")
    assert isinstance(handle, PatchHandle)
    # Same parameter objects, same keys, same module tree: no wrapper, no copy.
    assert list(sam.state_dict().keys()) == keys
    assert {k: v.data_ptr() for k, v in sam.state_dict().items()} == ptrs
    assert dict(sam.named_modules()).keys() == modules.keys()
    assert all(modules[n] is m for n, m in sam.named_modules())
    assert sum(isinstance(m, SparseEncoderAttention) for m in sam.modules()) == 4
    assert sum(isinstance(m, SparseDecoderAttention) for m in sam.modules()) == 7
    patched_out = _predict(sam, image)

    handle.restore()
    assert all(type(m) in (EncoderAttention, DecoderAttention) for m in sam.modules()
               if isinstance(m, (EncoderAttention, DecoderAttention)))
    assert not any(hasattr(m, "_sam_sparse") for m in sam.modules())
    assert not hasattr(sam, "_sam_sparse_handle")
    assert _all_hooks(sam) == hooks
    assert list(sam.state_dict().keys()) == keys
    for k, v in fresh.state_dict().items():
        assert torch.equal(sam.state_dict()[k], v), k
    # Bit-identical to a model that was never patched; the patched run was close (dense policy).
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(sam.image_encoder(x), fresh.image_encoder(x))
    ref = _predict(fresh, image)
    for a, b in zip(_predict(sam, image), ref):
        assert np.array_equal(a, b)
    assert np.abs(patched_out[2] - ref[2]).max() < 1e-4
    handle.restore()  # idempotent


def test_checkpoint_loads_into_patched_and_unpatched():
    a, b = small_sam(seed=0), small_sam(seed=1)
    handle = patch_sam(a, "dense")
    b.load_state_dict(a.state_dict(), strict=True)  # patched -> unpatched
    a.load_state_dict(small_sam(seed=2).state_dict(), strict=True)  # unpatched -> patched
    handle.restore()
    assert set(a.state_dict()) == set(b.state_dict())


def test_every_attention_goes_through_the_kernel(monkeypatch):
    """vit_b's layout (12 blocks, global 2/5/8/11, 12 heads, window 14) at 256 px and a quarter of its
    width (head dim 16) for speed: 12 encoder + 7 decoder calls."""
    calls = []
    real, real_window = attention_mod.block_sparse_attn, attention_mod.window_attn

    def spy(q, k, v, block_mask=None, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), kw.get("rel_h") is not None))
        return real(q, k, v, block_mask, **kw)

    def spy_window(q, k, v, window_size, block_mask=None, **kw):
        calls.append((tuple(q.shape), tuple(window_size), kw.get("rel_h") is not None))
        return real_window(q, k, v, window_size, block_mask, **kw)

    monkeypatch.setattr(attention_mod, "block_sparse_attn", spy)
    monkeypatch.setattr(attention_mod, "window_attn", spy_window)
    sam = small_sam(embed_dim=192, depth=12, num_heads=12, window_size=14, global_attn_indexes=(2, 5, 8, 11))
    handle = patch_sam(sam, "dense")
    assert len(handle.report) == 19
    _predict(sam, make_image())
    enc, dec = calls[:12], calls[12:]
    assert len(enc) == 12 and len(dec) == 7
    for i, (qs, ks, rel) in enumerate(enc):
        if i in (2, 5, 8, 11):
            assert qs == (1, 256, 12, 16)  # the whole 16x16 grid
        else:
            assert qs == (1, 16, 16, 12, 16) and ks == (14, 14)  # the whole grid, read window by window
        assert rel  # rel-pos goes to the kernel, never as a bias
    head_dims = [qs[-1] for qs, _, _ in dec]
    assert head_dims == [32, 16, 16, 32, 16, 16, 16]  # self-attn 256/8; cross attn downsample 2: 128/8
    assert dec[1][1][1] == 256 and dec[2][0][1] == 256  # token->image keys / image->token queries: 16x16
    handle.restore()
    calls.clear()
    _predict(sam, make_image())
    assert not calls


def test_patch_twice_and_unpatch_errors():
    sam = small_sam()
    handle = patch_sam(sam, "dense")
    with pytest.raises(RuntimeError, match="already patched"):
        patch_sam(sam, "dense")
    with pytest.raises(RuntimeError, match="already patched"):
        patch_sam(sam.image_encoder, "dense")
    with pytest.raises(RuntimeError, match="larger model"):
        unpatch_sam(sam.image_encoder)
    unpatch_sam(sam)
    assert not handle.active
    handle2 = patch_sam(sam, "dense")  # patchable again after restore
    handle2.restore()
    alone = patch_sam(sam.image_encoder, "dense")  # the encoder on its own: the Sam holds no handle
    with pytest.raises(RuntimeError, match=r"image_encoder was patched on its own.*unpatch_sam\(model.image_encoder\)"):
        unpatch_sam(sam)
    assert alone.active
    unpatch_sam(sam.image_encoder)
    assert not alone.active


@pytest.mark.parametrize("option,match", [
    (dict(batch_objects=True), r"batch_objects=True: for a SAM2VideoPredictor's propagate_in_video; a Sam has no video"),
    (dict(graph_encoder=False), r"graph_encoder=False: for a SAM 2 model with sam2's ImageEncoder .*, not for a Sam"),
    (dict(batch_objects=False, graph_encoder=True), r"batch_objects=False: .* a Sam has no video")], ids=str)
def test_video_options_refused_on_an_image_model(option, match):
    """batch_objects / graph_encoder only mean something to SAM 2 models (graph_encoder to its image models too):
    given for a Sam they were ignored; now a ValueError naming them, before anything is patched."""
    sam = small_sam()
    with pytest.raises(ValueError, match=match):
        patch_sam(sam, "dense", **option)
    assert not any(hasattr(m, "_sam_sparse") for m in sam.modules())
    patch_sam(sam, "dense", batch_objects=None, graph_encoder=None).restore()  # the defaults, spelled out


def test_unpatch_sam_is_idempotent_as_restore():
    """Issue 25, item 9: unpatch_sam on a restored model raised, while handle.restore() (which it equals)
    is a no-op there."""
    sam = small_sam()
    originals = {n: type(m) for n, m in sam.named_modules()}
    handle = patch_sam(sam, "dense")
    handle.restore()
    handle.restore()
    unpatch_sam(sam)  # restored already: nothing to do
    unpatch_sam(small_sam())  # never patched: nothing to do either
    assert {n: type(m) for n, m in sam.named_modules()} == originals and not hasattr(sam, "_sam_sparse_handle")
    patch_sam(sam, "dense")
    unpatch_sam(sam)
    unpatch_sam(sam)
    assert {n: type(m) for n, m in sam.named_modules()} == originals
    with pytest.raises(TypeError, match="torch.nn.Module"):
        unpatch_sam("vit_b")


def test_unsupported_model_type():
    with pytest.raises(TypeError, match="Sam.*ImageEncoderViT.*MaskDecoder.*TwoWayTransformer"):
        patch_sam(torch.nn.Linear(4, 4), "dense")
    with pytest.raises(TypeError, match="supports"):
        patch_sam("vit_b", "dense")


class TinyEncoder(torch.nn.Module):
    """Stands in for MobileSAM's TinyViT: any non-ViT image encoder."""

    img_size = 256

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 256, 16, 16)

    def forward(self, x):
        return self.conv(x)


def test_sam_with_other_encoder_patches_decoder_only():
    sam = small_sam()
    sam.image_encoder = TinyEncoder()
    handle = patch_sam(sam, "dense")
    assert [r.kind.split(".")[0] for r in handle.report] == ["decoder"] * 7
    assert any("TinyEncoder" in n and "only the mask decoder" in n for n in handle.notes)
    assert "only the mask decoder" in str(handle)
    masks, scores, logits = _predict(sam, make_image())
    handle.restore()
    ref = _predict(sam, make_image())
    assert np.abs(logits - ref[2]).max() < 1e-4


@pytest.mark.parametrize("part,count,first", [
    ("image_encoder", 4, "blocks.0.attn"),
    ("mask_decoder", 7, "transformer.layers.0.self_attn"),
    ("mask_decoder.transformer", 7, "layers.0.self_attn"),
])
def test_bare_parts(part, count, first):
    sam = small_sam()
    module = sam.get_submodule(part)
    policy = SpyPolicy("dense")
    handle = patch_sam(module, policy)
    assert len(handle.report) == count and handle.report[0].name == first
    # The policy sees canonical names, whichever part was patched.
    assert policy.calls[0][0] == f"{part}.{first}"
    # The bare part still runs through the patched path inside the whole model.
    out = _predict(sam, make_image())
    handle.restore()
    ref = _predict(sam, make_image())
    assert np.abs(out[2] - ref[2]).max() < 1e-4


def test_filter_fn_selects_modules():
    sam = small_sam()
    seen = []

    def only_global(name, module):
        seen.append(name)
        return isinstance(module, EncoderAttention) and name in ("image_encoder.blocks.1.attn", "image_encoder.blocks.3.attn")

    handle = patch_sam(sam, "dense", filter_fn=only_global)
    assert [r.name for r in handle.report] == ["image_encoder.blocks.1.attn", "image_encoder.blocks.3.attn"]
    assert len(seen) == 11
    assert type(sam.image_encoder.blocks[0].attn) is EncoderAttention
    assert type(sam.image_encoder.blocks[1].attn) is SparseEncoderAttention
    assert type(sam.mask_decoder.transformer.layers[0].self_attn) is DecoderAttention
    handle.restore()


def test_windowed_blocks_swap_with_their_attention():
    """A windowed block reads its windows in place exactly while its attention is patched: swapped by
    patch_sam, put back by restore() / disabled(), left alone when filter_fn skips its attention, and
    carried by a deep copy (which unpatch_sam then restores on its own)."""
    sam = small_sam()
    blocks = sam.image_encoder.blocks
    windowed = [i for i, b in enumerate(blocks) if b.window_size > 0]
    assert windowed and len(windowed) < len(blocks)
    handle = patch_sam(sam, "dense")
    assert all(type(b) is (SparseWindowBlock if i in windowed else EncoderBlock) for i, b in enumerate(blocks))
    with handle.disabled():
        assert all(type(b) is EncoderBlock for b in blocks)
    assert all(type(blocks[i]) is SparseWindowBlock for i in windowed)
    twin = copy.deepcopy(sam)
    assert all(type(twin.image_encoder.blocks[i]) is SparseWindowBlock for i in windowed)
    unpatch_sam(twin)
    assert all(type(b) is EncoderBlock for b in twin.image_encoder.blocks)
    assert all(type(blocks[i]) is SparseWindowBlock for i in windowed)  # the original is still patched
    handle.restore()
    assert all(type(b) is EncoderBlock for b in blocks)
    skip = f"image_encoder.blocks.{windowed[0]}.attn"
    handle = patch_sam(sam, "dense", filter_fn=lambda name, m: name != skip)
    assert type(blocks[windowed[0]]) is EncoderBlock and type(blocks[windowed[0]].attn) is EncoderAttention
    assert all(type(blocks[i]) is SparseWindowBlock for i in windowed[1:])
    handle.restore()


def test_image_encoder_swaps_and_compiles_ahead_once_per_signature(monkeypatch):
    """SAM's image encoder becomes SparseImageEncoderViT while any of its attention is patched (restore() and
    disabled() put ImageEncoderViT back; a decoder-only filter leaves it; a deep copy and a pickle carry it with
    the switch). Its first call of an input signature runs ImageEncoderViT.forward once inside
    kernels.compile_ahead (here a block that is on, the CUDA check opened on the CPU), then for real, with the
    unpatched values; a repeat makes no pass, nor does handle.memory.compile_ahead = False."""
    import contextlib
    import pickle

    from sam_sparse.patches import first_call
    from sam_sparse.patches.attention import SparseImageEncoderViT

    sam = small_sam()
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = sam.image_encoder(x)
    state, runs = {"inside": False}, []

    @contextlib.contextmanager
    def block(device):
        state["inside"] = True
        try:
            yield True
        finally:
            state["inside"] = False

    real = ImageEncoderViT.forward
    monkeypatch.setattr(first_call, "_on_device", lambda sample: True)
    monkeypatch.setattr(first_call, "compile_ahead", block)
    monkeypatch.setattr(ImageEncoderViT, "forward", lambda self, t: runs.append(state["inside"]) or real(self, t))
    handle = patch_sam(sam, "dense")
    enc = sam.image_encoder
    try:
        assert type(enc) is SparseImageEncoderViT and enc._sam_sparse_memory is handle.memory
        with torch.inference_mode():
            out = enc(x)
            assert runs == [True, False] and torch.allclose(out, ref, atol=1e-5)
            enc(x)
            assert runs == [True, False, False], "a repeat makes no pass"
            handle.memory.compile_ahead = False
            enc(torch.randn(2, 3, 256, 256))
            assert runs[3:] == [False], "switched off"
        twin = copy.deepcopy(sam)
        assert type(twin.image_encoder) is SparseImageEncoderViT and not twin.image_encoder._sam_sparse_memory.compile_ahead
        assert type(pickle.loads(pickle.dumps(sam)).image_encoder) is SparseImageEncoderViT
        with handle.disabled():
            assert type(enc) is ImageEncoderViT and "_sam_sparse_memory" not in vars(enc)
        assert type(enc) is SparseImageEncoderViT
    finally:
        handle.restore()
    assert type(enc) is ImageEncoderViT and "_sam_sparse_memory" not in vars(enc)
    handle = patch_sam(sam, "dense", filter_fn=lambda name, m: not name.startswith("image_encoder"))
    assert type(enc) is ImageEncoderViT, "no patched attention inside: the encoder stays as it is"
    handle.restore()


def test_unmatched_rule_warns_and_bad_head_raises():
    sam = small_sam()
    typo = Policy.from_dict({"name": "typo", "rules": [
        {"match": r"re:blocks\.99\.attn", "pattern": "local2d", "params": {"radius": 1}},
        {"match": "*", "pattern": "dense"}]})
    with pytest.warns(PolicyWarning, match=r"rule 0 .*matches no attention module"):
        handle = patch_sam(sam, typo)
    handle.restore()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_sam(sam, "dense").restore()  # the catch-all rule matches: no warning

    bad = Policy.from_dict({"name": "bad-head", "block_size": 16, "rules": [
        {"match": "encoder.global", "heads": [7], "pattern": "local2d", "params": {"radius": 1}},
        {"match": "*", "pattern": "dense"}]})
    with pytest.raises(PolicyError, match="head 7"):
        patch_sam(sam, bad)
    assert not any(isinstance(m, (SparseEncoderAttention, SparseDecoderAttention)) for m in sam.modules())
    assert not hasattr(sam, "_sam_sparse_handle")


def test_report_and_table():
    sam = small_sam()
    handle = patch_sam(sam, small_policy(params={"radius": 1}))
    rows = {r.name: r for r in handle.report}
    g = rows["image_encoder.blocks.1.attn"]
    assert g.kind == "encoder.global" and g.pattern == "local2d" and g.heads == 4 and g.grid == "16x16"
    assert g.key_tile == (4, 4) and 0 < g.density < 1
    w = rows["image_encoder.blocks.0.attn"]
    assert w.kind == "encoder.window" and w.pattern == "dense" and w.density == 1.0 and w.grid == "7x7 window"
    d = rows["mask_decoder.transformer.layers.0.cross_attn_token_to_image"]
    assert d.kind == "decoder.token_to_image" and d.heads == 8 and d.grid == "7 tokens -> 16x16"
    text = str(handle)
    assert "small-sparse" in text and "local2d tiles 4x4" in text and f"{g.density:.3f}" in text
    assert len(text.splitlines()) == 1 + 2 + 11
    handle.restore()
    assert "(restored)" in str(handle)


def test_masks_built_once_per_layer_and_device():
    sam = small_sam()
    policy = SpyPolicy(small_policy(params={"radius": 1}))
    handle = patch_sam(sam, policy)
    built = len(policy.calls)
    assert built == 11  # one per layer, at patch time
    image = make_image()
    _predict(sam, image)
    _predict(sam, image, point=(50, 60))
    assert len(policy.calls) == built  # reused: no block_mask call in forward
    st = sam.image_encoder.blocks[1].attn._sam_sparse
    layout = st.encoder_layout(torch.device("cpu"))
    assert layout is st.encoder_layout(torch.device("cpu"))  # built once, kept on the layer
    assert torch.equal(layout.to_mask(), policy.inner.block_mask(st.geometry, None, "cpu").expand(layout.shape))
    assert list(sam.state_dict()) == list(small_sam().state_dict())  # nothing registered
    handle.restore()


def test_prompts_reach_region_focused_layers():
    sam = small_sam()
    policy = SpyPolicy(small_policy(
        "region_focused", {"radius": 1, "background_stride": 4}, token_order="raster",
        match=["decoder.token_to_image", "decoder.final_token_to_image"]))
    handle = patch_sam(sam, policy)
    assert [r.pattern.endswith("(per prompt)") for r in handle.report].count(True) == 3
    policy.calls.clear()
    image = make_image()  # 256 x 192 (H x W): SamPredictor resizes the long side to 256, a scale of 1
    p = SamPredictor(sam)
    p.set_image(image)
    p.predict(point_coords=np.array([[96.0, 160.0]]), point_labels=np.array([1]), box=np.array([16, 32, 80, 96.0]))
    got = [pr for name, pr in policy.calls if "token_to_image" in name]
    assert len(got) == 3 and all(pr is not None for pr in got)
    pr = got[0]
    # 256-px input frame -> 16x16 token grid: divide by 16 (x, y order kept)
    assert torch.allclose(pr.points, torch.tensor([[[6.0, 10.0]]]))
    assert torch.allclose(pr.boxes, torch.tensor([[1.0, 2.0, 5.0, 6.0]]))
    assert handle.context.prompts is None  # forgotten after the decoder call
    # A point alone gets SAM's padding point (label -1), which the policy must ignore: NaN.
    policy.calls.clear()
    p.predict_torch(torch.tensor([[[96.0, 160.0]]]), torch.tensor([[-1]]), multimask_output=False)
    pr = [pr for name, pr in policy.calls if "token_to_image" in name][0]
    assert torch.isnan(pr.points).all()
    handle.restore()


def test_bare_encoder_any_policy_type():
    enc = small_encoder(depth=2, global_attn_indexes=(1,))
    assert isinstance(enc, ImageEncoderViT) and not isinstance(enc, Sam)
    for policy in ("dense", load_policy("dense"), small_policy()):
        handle = patch_sam(enc, policy)
        assert len(handle.report) == 2
        handle.restore()
    with pytest.raises(PolicyError, match="unknown policy"):
        patch_sam(enc, "no-such-policy")
    assert not hasattr(enc, "_sam_sparse_handle")


def test_disabled_runs_unpatched_and_enable_restores_the_patch():
    """handle.disabled(): the original classes (and outputs) inside the block, the patch back after it;
    enable() after restore() patches again; a second handle cannot enable over an active one."""
    torch.manual_seed(0)
    enc = small_encoder()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref = enc(x)
        handle = patch_sam(enc, small_policy())
        sparse = enc(x)
        with handle.disabled():
            assert not handle.active and type(enc.blocks[1].attn) is EncoderAttention
            assert torch.equal(enc(x), ref)
        assert handle.active and type(enc.blocks[1].attn) is SparseEncoderAttention
        assert torch.equal(enc(x), sparse)
        handle.restore()
        with handle.disabled():  # not active: stays unpatched after the block
            pass
        assert not handle.active and type(enc.blocks[1].attn) is EncoderAttention
        handle.enable()
        assert torch.equal(enc(x), sparse)
        with handle.disabled():  # a restore() inside the block is for good
            handle.restore()
        assert not handle.active and type(enc.blocks[1].attn) is EncoderAttention
        assert not hasattr(enc, "_sam_sparse_handle")
        handle.enable()
        with handle.disabled():
            handle.enable()  # enabled inside: active after the block, as before it
        assert handle.active
        handle.restore()
        other = patch_sam(enc, "dense")
        with pytest.raises(RuntimeError, match="another handle"):
            handle.enable()
        other.restore()


def test_every_patch_and_restore_changes_the_patch_epoch():
    """A CUDA graph of a model's forward keys on patch_epoch(): patching, restoring, disabling and
    re-patching must each change it, or a graph of the old attention would replay."""
    enc = small_encoder()
    seen = [patch_epoch()]
    handle = patch_sam(enc, "dense")
    seen.append(patch_epoch())
    with handle.disabled():
        seen.append(patch_epoch())
    seen.append(patch_epoch())
    handle.restore()
    seen.append(patch_epoch())
    patch_sam(enc, small_policy()).restore()
    seen.append(patch_epoch())
    assert len(set(seen)) == len(seen), seen


def test_observe_sees_the_kernel_inputs_of_every_patched_module():
    torch.manual_seed(0)
    sam = small_sam()
    handle = patch_sam(sam, "dense")
    seen = []
    assert not observing(sam)
    with handle.observe(lambda layer, prompts, q, k, rel_h, rel_w, tile, scale: seen.append(
            (layer.kind, prompts is not None, tuple(q.shape), rel_h is not None))):
        SamPredictor(sam).set_image(make_image())
        assert all(m._sam_sparse.observer is not None for _, m in handle.modules())
        assert observing(sam)  # graphs of the model run eagerly now (cuda_graphs)
    assert all(m._sam_sparse.observer is None for _, m in handle.modules())  # removed after the block
    assert not observing(sam)
    kinds = [s[0] for s in seen]
    assert kinds.count("encoder.global") == 2 and kinds.count("encoder.window") == 2
    assert all(has_rel for kind, _, _, has_rel in seen if kind.startswith("encoder."))
    handle.restore()


def test_a_per_prompt_policy_on_a_bare_decoder_warns_that_it_runs_dense():
    """A MaskDecoder patched alone has no prompt encoder to hear the prompts from: say so."""
    focused = Policy.from_dict({"name": "rf", "block_size": 16, "rules": [
        {"match": "decoder.token_to_image", "pattern": "region_focused", "params": {"radius": 1}},
        {"match": "*", "pattern": "dense"}]})
    sam = small_sam()
    with pytest.warns(PolicyWarning, match=r"depend on the prompts .*no prompts reach them, so they run dense"):
        handle = patch_sam(sam.mask_decoder, focused)
    handle.restore()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_sam(sam, focused).restore()  # the whole Sam: its prompt encoder's hook records the prompts
