"""Policies: built-ins, YAML round trip, rule resolution, caching, and the error corpus."""

import textwrap
from importlib import resources

import pytest
import torch
import yaml

import sam_sparse
from sam_sparse import Policy, PolicyError, list_policies, load_policy
from sam_sparse.geometry import LayerGeometry, Prompts
from sam_sparse.masks import mask_density
from sam_sparse.policy import PatternSpec, Rule
from sam_sparse.sam_layers import sam_layer_geometries

MODELS = ("vit_b", "vit_l", "vit_h")
BUILTINS = ("dense", "local2d-50", "local2d-30", "local2d-15", "hierarchical", "hybrid", "image_to_prompt", "region_focused", "random-0.5")

# token-level density of encoder.global layers (identical on vit_b / vit_l / vit_h: same 64x64 grid)
GLOBAL_DENSITY = {
    "dense": 1.0,
    "local2d-50": 0.5195,
    "local2d-30": 0.2930,
    "local2d-15": 0.1328,
    "hierarchical": 0.6230,
    "hybrid": 0.4111,
    "image_to_prompt": 0.4062,
    "region_focused": 0.2930,
    "random-0.5": 0.5,
}


def layers_of(policy, model="vit_b", kind=None):
    return [l for l in policy.geometries(model) if kind is None or l.kind == kind]


def write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


# --- built-ins --------------------------------------------------------------------------------------


def test_builtins_are_listed_and_exported():
    assert set(BUILTINS) <= set(list_policies())
    for name in ("load_policy", "Policy", "PolicyError", "list_policies"):
        assert name in sam_sparse.__all__ and hasattr(sam_sparse, name)
    assert issubclass(PolicyError, ValueError)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_by_name_and_round_trips(name):
    p = load_policy(name)
    assert p.name == name and p.description
    assert load_policy(name) is p  # one object per built-in: its mask cache is shared
    text = p.to_yaml()
    again = Policy.from_yaml(text)
    assert again == p and again.to_yaml() == text
    raw = yaml.safe_load((resources.files("sam_sparse") / "configs" / f"{name}.yaml").read_text())
    assert Policy.from_dict(raw) == p


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("model", MODELS)
def test_builtin_densities(name, model):
    p = load_policy(name)
    for layer in layers_of(p, model, "encoder.global"):
        assert mask_density(p.block_mask(layer), layer) == pytest.approx(GLOBAL_DENSITY[name], abs=1e-4)
    for layer in layers_of(p, model, "encoder.window") + layers_of(p, model, "decoder.self"):
        assert p.block_mask(layer) is None


def test_local2d_builtins_hit_their_targets():
    for name, target in (("local2d-50", 0.5), ("local2d-30", 0.3), ("local2d-15", 0.15)):
        assert abs(GLOBAL_DENSITY[name] - target) < 0.025


# --- the patcher's contract -------------------------------------------------------------------------


def test_block_mask_shape_dtype_device_and_none_for_dense():
    p = load_policy("local2d-30")
    g = layers_of(p, kind="encoder.global")[0]
    m = p.block_mask(g, device="cpu")
    assert m.dtype == torch.bool and m.shape == (1, 1, 32, 32) and m.device.type == "cpu" and m.is_contiguous()
    assert load_policy("dense").block_mask(g) is None


def test_masks_without_prompts_are_cached_per_layer_and_device():
    p = Policy.from_dict({"name": "c", "rules": [{"match": "*", "pattern": "random", "params": {"density": 0.3}}]})
    g = sam_layer_geometries("vit_b", 128)[2]
    first = p.block_mask(g)
    assert p.block_mask(g) is first
    assert p.block_mask(g, device=torch.device("cpu")) is first
    assert p.block_mask(sam_layer_geometries("vit_b", 128)[5]) is not first  # another layer
    assert Policy.from_dict(p.to_dict()).block_mask(g) is not first  # another policy object


def test_prompt_masks_have_the_prompt_batch_and_are_not_cached():
    p = load_policy("region_focused")
    t2i = layers_of(p, kind="decoder.token_to_image")[0]
    assert p.needs_prompts(t2i) and not p.needs_prompts(layers_of(p, kind="encoder.global")[0])
    a = p.block_mask(t2i, Prompts(points=torch.tensor([[[10.5, 10.5]], [[50.5, 50.5]], [[50.5, 50.5]]])))
    assert a.shape == (3, 1, 1, 32)
    assert not torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])
    b = p.block_mask(t2i, Prompts(boxes=torch.tensor([[0.0, 0.0, 63.0, 63.0]])))
    assert b is None  # a box over the whole image keeps every key block
    assert p.block_mask(t2i) is None  # no prompts: dense fallback


def test_heads_fall_through_to_later_rules():
    p = Policy.from_dict({
        "name": "h",
        "rules": [
            {"match": "encoder.global", "heads": [0, 2], "pattern": "local2d", "params": {"radius": 0}},
            {"match": "encoder.global", "heads": [2, 3], "pattern": "sink"},
        ],
    })
    g = layers_of(p, kind="encoder.global")[0]
    assert p.head_rules(g) == (0, None, 0, 1) + (None,) * 8
    m = p.block_mask(g)
    eye = torch.eye(32, dtype=torch.bool)
    assert m.shape == (1, 12, 32, 32)
    assert torch.equal(m[0, 0], eye) and torch.equal(m[0, 2], eye)
    assert bool(m[0, 1].all()) and bool(m[0, 4:].all())  # no rule: dense
    assert torch.equal(m[0, 3], eye | (torch.arange(32) == 0))  # sink + the guaranteed diagonal


def test_heads_out_of_range_raise_when_applied():
    p = Policy.from_dict({"name": "h", "rules": [{"match": "encoder.global", "heads": [0, 15], "pattern": "dense"}]})
    vit_l = layers_of(p, "vit_l", "encoder.global")[0]
    assert p.block_mask(vit_l) is None  # 16 heads: fine
    g = layers_of(p, "vit_b", "encoder.global")[0]
    with pytest.raises(PolicyError, match=r"<dict>: rules\[0\]\.heads: rule 0 .*lists head 15, but layer image_encoder\.blocks\.2\.attn .*num_heads=12"):
        p.block_mask(g)


def test_layers_and_regex_select_single_modules():
    p = Policy.from_dict({
        "name": "sel",
        "rules": [
            {"match": "encoder.global", "layers": [1], "pattern": "local2d", "params": {"radius": 0}},
            {"match": r"re:blocks\.11\.attn$", "pattern": "local2d", "params": {"radius": 1}},
        ],
    })
    names = {l.name: p.block_mask(l) for l in layers_of(p)}
    assert names["image_encoder.blocks.2.attn"] is None
    assert int(names["image_encoder.blocks.5.attn"].sum()) == 32
    assert names["image_encoder.blocks.11.attn"] is not None and names["image_encoder.blocks.8.attn"] is None


def test_matched_layers_reports_rules_that_match_nothing():
    p = Policy.from_dict({"name": "m", "rules": [{"match": "re:blokcs", "pattern": "dense"}, {"match": "decoder.self", "pattern": "dense"}]})
    got = p.matched_layers(sam_layer_geometries("vit_b"))
    assert got[0] == [] and got[1] == ["mask_decoder.transformer.layers.0.self_attn", "mask_decoder.transformer.layers.1.self_attn"]


def test_key_tile():
    tiles, raster = load_policy("local2d-30"), load_policy("dense")
    layers = sam_layer_geometries("vit_h", 128)
    g, w, d = layers[7], layers[0], layers[-1]
    assert (tiles.key_tile(g), tiles.key_tile(w), tiles.key_tile(d)) == ((8, 16), None, None)
    assert raster.key_tile(g) is None
    odd = LayerGeometry("g", "encoder.global", 12, 63 * 63, 63 * 63, (63, 63), (63, 63))
    assert tiles.key_tile(odd) is None  # no 128-token tile divides a 63x63 grid: raster


def test_empty_rows_guard():
    sink_only = {"name": "s", "rules": [{"match": "encoder.global", "pattern": "sink", "params": {"blocks": 1}}]}
    g = layers_of(Policy.from_dict(sink_only), kind="encoder.global")[0]
    guarded = Policy.from_dict(sink_only).block_mask(g)
    assert guarded[0, 0].diagonal().all()
    exact = Policy.from_dict({**sink_only, "allow_empty_rows": True}).block_mask(g)
    assert torch.equal(exact[0, 0], (torch.arange(32) == 0).expand(32, 32))
    # a cross-attention row with no key block keeps all of them, unless allowed
    region = {"name": "r", "rules": [{"match": "decoder.token_to_image", "pattern": "region_focused", "params": {"background_stride": 0}}]}
    t2i = layers_of(Policy.from_dict(region), kind="decoder.token_to_image")[0]
    nowhere = Prompts(points=torch.full((1, 1, 2), float("nan")))
    assert Policy.from_dict(region).block_mask(t2i, nowhere) is None
    assert not Policy.from_dict({**region, "allow_empty_rows": True}).block_mask(t2i, nowhere).any()


def test_load_policy_accepts_a_policy_and_a_path(tmp_path):
    p = load_policy("hybrid")
    assert load_policy(p) is p
    path = write(tmp_path, p.to_yaml(), "mine.yaml")
    assert load_policy(path) == p and load_policy(str(path)) == p
    assert load_policy(path).source == str(path)


def test_policy_is_a_validated_frozen_dataclass():
    rule = Rule("encoder.global", PatternSpec("local2d", {"radius": 1}))
    p = Policy("x", (rule,), token_order="tiles")
    with pytest.raises(Exception):
        p.name = "y"
    with pytest.raises(PolicyError, match=r"^block_size: got int 100; expected a power of two from 16 to 65536"):
        Policy("x", (rule,), block_size=100)
    with pytest.raises(PolicyError, match=r"^params\.radius: -1 is negative"):
        PatternSpec("local2d", {"radius": -1})


# --- the error corpus: each bad file, its one-line message with file, line and field ------------------

BAD = [
    ("syntax", "name: x\nrules: [\n  - match: *\n", r"bad\.yaml:3: YAML syntax error"),
    ("empty", "", r"bad\.yaml:1: the file is empty; expected a mapping"),
    ("comments only", "# nothing\n", r"bad\.yaml:1: the file is empty"),
    ("top-level list", "- name: x\n", r"bad\.yaml:1: the top level is a list; expected a mapping with keys name, "),
    ("unknown key", "name: x\nblocksize: 64\nrules: [{match: '*', pattern: dense}]\n",
     r"bad\.yaml:2: blocksize: unknown key 'blocksize' \(did you mean 'block_size'\?\); accepted keys: name, "),
    ("unknown rule key", "name: x\nrules:\n  - match: '*'\n    pattern: dense\n    head: [0]\n",
     r"bad\.yaml:5: rules\[0\]\.head: unknown key 'head' \(did you mean 'heads'\?\)"),
    ("duplicate key", "name: x\nrules: [{match: '*', pattern: dense}]\nname: y\n",
     r"bad\.yaml:3: duplicate key 'name' \(first given on line 1\)"),
    ("duplicate key in rule", "name: x\nrules:\n  - match: '*'\n    pattern: dense\n    pattern: local2d\n",
     r"bad\.yaml:5: duplicate key 'pattern' \(first given on line 4\)"),
    ("unknown pattern", "name: x\nrules:\n  - match: encoder.global\n    pattern: local3d\n",
     r"bad\.yaml:4: rules\[0\]\.pattern: unknown pattern 'local3d' \(did you mean 'local2d'\?\); known patterns: dense, local2d, axial"),
    ("pattern not a string", "name: x\nrules:\n  - match: '*'\n    pattern: [dense]\n",
     r"bad\.yaml:4: rules\[0\]\.pattern: expected a pattern name, got a list; known patterns: "),
    ("missing pattern", "name: x\nrules:\n  - match: '*'\n",
     r"bad\.yaml:3: rules\[0\]: missing key 'pattern'; known patterns: dense, local2d, "),
    ("wrong type", "name: x\nblock_size: big\nrules: [{match: '*', pattern: dense}]\n",
     r"bad\.yaml:2: block_size: got the string 'big'; expected a power of two from 16"),
    ("bool is not a number", "name: x\nrules:\n  - match: encoder.global\n    pattern: local2d\n    params: {radius: true}\n",
     r"bad\.yaml:5: rules\[0\]\.params\.radius: expected a number >= 0, got the boolean True"),
    ("unknown param", "name: x\nrules:\n  - match: encoder.global\n    pattern: local2d\n    params:\n      radious: 2\n",
     r"bad\.yaml:6: rules\[0\]\.params\.radious: unknown parameter 'radious' \(did you mean 'radius'\?\); pattern local2d takes: radius \(number >= 0, in blocks, default 1\)"),
    ("params on dense", "name: x\nrules:\n  - match: '*'\n    pattern: dense\n    params: {radius: 1}\n",
     r"bad\.yaml:5: rules\[0\]\.params\.radius: unknown parameter 'radius'; pattern dense takes no parameters"),
    ("radius < 0", "name: x\nrules:\n  - match: encoder.global\n    pattern: local2d\n    params: {radius: -1}\n",
     r"bad\.yaml:5: rules\[0\]\.params\.radius: -1 is negative; expected a number >= 0"),
    ("density > 1", "name: x\nrules:\n  - match: '*'\n    pattern: random\n    params: {density: 1.5}\n",
     r"bad\.yaml:5: rules\[0\]\.params\.density: 1\.5 is outside \(0, 1\]"),
    ("density 0", "name: x\nrules:\n  - match: '*'\n    pattern: random\n    params: {density: 0}\n",
     r"rules\[0\]\.params\.density: 0 is outside \(0, 1\]"),
    ("sparsity 0", "name: x\nrules:\n  - match: '*'\n    pattern: image_to_prompt\n    params: {image_sparsity: 0}\n",
     r"bad\.yaml:5: rules\[0\]\.params\.image_sparsity: 0 is outside \(0, 1\]"),
    ("bad radii entry", "name: x\nrules:\n  - match: encoder.global\n    pattern: hierarchical\n    params:\n      radii: [1, most]\n",
     r"bad\.yaml:6: rules\[0\]\.params\.radii\[1\]: expected a number >= 0 or \"all\", got the string 'most'"),
    ("bad metric", "name: x\nrules:\n  - match: encoder.global\n    pattern: local2d\n    params: {metric: cosine}\n",
     r"rules\[0\]\.params\.metric: got the string 'cosine'; expected one of chebyshev, manhattan, euclidean"),
    ("nested bad param", "name: x\nrules:\n  - match: encoder.global\n    pattern: hybrid\n    params:\n      sparse:\n        pattern: local2d\n        params: {radius: -2}\n",
     r"bad\.yaml:8: rules\[0\]\.params\.sparse\.params\.radius: -2 is negative"),
    ("block_size", "name: x\nblock_size: 100\nrules: [{match: '*', pattern: dense}]\n",
     r"bad\.yaml:2: block_size: got int 100; expected a power of two from 16 to 65536"),
    ("token_order", "name: x\ntoken_order: hilbert\nrules: [{match: '*', pattern: dense}]\n",
     r"bad\.yaml:2: token_order: got the string 'hilbert'; expected one of raster, tiles"),
    ("empty rules", "name: x\nrules: []\n", r"bad\.yaml:2: rules: the rule list is empty"),
    ("rules not a list", "name: x\nrules: {match: '*'}\n", r"bad\.yaml:2: rules: expected a list of rules, got a mapping"),
    ("missing rules", "name: x\n", r"bad\.yaml:1: missing required key 'rules'"),
    ("bad match", "name: x\nrules:\n  - match: encoder.globl\n    pattern: dense\n",
     r"bad\.yaml:3: rules\[0\]\.match: 'encoder\.globl' is not a layer selector; expected a layer kind \(encoder\.global, "),
    ("bad regex", "name: x\nrules:\n  - match: 're:blocks.(2'\n    pattern: dense\n",
     r"bad\.yaml:3: rules\[0\]\.match: bad regular expression 'blocks\.\(2'"),
    ("grid pattern on decoder", "name: x\nrules:\n  - match: decoder.token_to_image\n    pattern: local2d\n",
     r"bad\.yaml:4: rules\[0\]\.pattern: pattern local2d measures 2-D distances .* use it on encoder\.global or encoder\.window"),
    ("heads wrong type", "name: x\nrules:\n  - match: '*'\n    heads: some\n    pattern: dense\n",
     r"bad\.yaml:4: rules\[0\]\.heads: expected \"all\" or a list of head indices, got the string 'some'"),
    ("negative head", "name: x\nrules:\n  - match: '*'\n    heads: [0, -1]\n    pattern: dense\n",
     r"bad\.yaml:4: rules\[0\]\.heads\[1\]: -1 is negative; expected an integer >= 0"),
    ("pattern and any_of", "name: x\nrules:\n  - match: '*'\n    pattern: dense\n    any_of: [{pattern: sink}]\n",
     r"bad\.yaml:5: rules\[0\]\.any_of: give one of pattern, any_of, all_of, not pattern and any_of"),
    ("bad any_of item", "name: x\nrules:\n  - match: encoder.global\n    any_of:\n      - {pattern: sink}\n      - {pattern: local2d, params: {radius: x}}\n",
     r"bad\.yaml:6: rules\[0\]\.any_of\[1\]\.params\.radius: expected a number >= 0, got the string 'x'"),
    ("second rule", "name: x\nrules:\n  - match: '*'\n    pattern: dense\n  - match: '*'\n    pattern: sink\n    params: {blocks: 1.5}\n",
     r"bad\.yaml:7: rules\[1\]\.params\.blocks: expected an integer >= 0, got float 1\.5"),
]


@pytest.mark.parametrize("text, pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_policy_files(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError, match=pattern) as info:
        load_policy(path)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(str(path))


def test_unknown_builtin_and_missing_path():
    with pytest.raises(PolicyError, match=r"unknown policy 'local2d-99'; built-in policies: dense, .*local2d-30"):
        load_policy("local2d-99")
    with pytest.raises(PolicyError, match=r"no such file: nowhere/policy\.yaml"):
        load_policy("nowhere/policy.yaml")
    with pytest.raises(PolicyError, match=r"expected a built-in policy name, a path"):
        load_policy(3)


def test_apply_time_error_names_the_file_and_rule_line(tmp_path):
    path = write(tmp_path, """
        name: x
        rules:
          - match: "*"
            heads: all
            pattern: dense
          - match: "re:cross_attn"
            pattern: local2d
    """)
    p = load_policy(path)  # valid: a regex can't be checked until layers are known
    t2i = layers_of(p, kind="decoder.token_to_image")[0]
    t2i_shadowed = p.block_mask(t2i)  # rule 0 takes every head first
    assert t2i_shadowed is None
    p2 = load_policy(write(tmp_path, "name: y\nrules:\n  - match: 're:cross_attn'\n    pattern: local2d\n", "y.yaml"))
    with pytest.raises(PolicyError, match=r"y\.yaml:3: rules\[0\]: rule 0 \(match re:cross_attn, pattern local2d\) on layer mask_decoder\.transformer\.layers\.0\.cross_attn_token_to_image: needs image tokens on both sides"):
        p2.block_mask(t2i)


def test_heads_error_from_a_file_points_at_the_heads_line(tmp_path):
    p = load_policy(write(tmp_path, "name: b\nrules:\n  - match: encoder.global\n    heads: [12]\n    pattern: dense\n"))
    with pytest.raises(PolicyError, match=r"bad\.yaml:4: rules\[0\]\.heads: rule 0 \(match encoder\.global, pattern dense\) lists head 12"):
        p.block_mask(layers_of(p, "vit_b", "encoder.global")[0])
    assert p.block_mask(layers_of(p, "vit_h", "encoder.global")[0]) is None


def test_keeps_all_is_known_from_the_rules():
    """Policy.keeps_all: dense by rule without building a mask (what a torch.compile'd forward needs)."""
    from sam_sparse.policy import Policy

    layers = {g.kind: g for g in load_policy("memory-local").geometries("sam2.1_hiera_t")}
    assert not load_policy("memory-local").keeps_all(layers["memory.cross"])
    assert load_policy("memory-local").keeps_all(layers["memory.self"])
    assert all(load_policy("dense").keeps_all(g) for g in layers.values())
    either = Policy.from_dict({"name": "x", "rules": [{"match": "memory.cross", "any_of": [
        {"pattern": "memory_local"}, {"pattern": "dense"}]}]})
    both = Policy.from_dict({"name": "y", "rules": [{"match": "memory.cross", "all_of": [
        {"pattern": "memory_local"}, {"pattern": "dense"}]}]})
    assert either.keeps_all(layers["memory.cross"]) and not both.keeps_all(layers["memory.cross"])
    assert either.block_mask(layers["memory.cross"]) is None
