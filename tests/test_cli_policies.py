"""`sam-sparse policies` through click's CliRunner."""

import pytest
from click.testing import CliRunner
from PIL import Image

from sam_sparse.cli import main
from sam_sparse.policy import list_policies


def invoke(*args):
    return CliRunner().invoke(main, ["policies", *args])


def test_list_shows_every_builtin_with_densities_for_three_models():
    r = invoke("list")
    assert r.exit_code == 0, r.output
    for name in list_policies():
        assert f"\n{name}\n" in f"\n{r.stdout}"
    assert r.stdout.count("vit_b") == len(list_policies()) and "vit_h" in r.stdout
    assert "enc.global" in r.stdout and "dec.tok2img" in r.stdout
    lines = [l for l in r.stdout.splitlines() if l.strip().startswith("vit_b")]
    assert any("0.293" in l for l in lines)  # local2d-30 on vit_b global blocks
    assert "* depends on the prompts" in r.stdout  # region_focused
    # issue 25, item 17: which density this is (bench gives another: all encoder layers)
    assert "density: share of (query token, key token) pairs attended, per layer kind" in r.stdout
    assert "`sam-sparse bench` reports the mean over all patched encoder layers" in r.stdout


def test_show_prints_yaml_and_per_head_densities():
    r = invoke("show", "hybrid", "--model", "vit_h")
    assert r.exit_code == 0, r.output
    assert "pattern: hybrid" in r.stdout
    line = next(l for l in r.stdout.splitlines() if l.startswith("image_encoder.blocks.7.attn"))
    assert "heads 0-3 1.000, heads 4-15 0.215" in line
    assert "mask_decoder.transformer.final_attn_token_to_image" in r.stdout


def test_show_a_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nrules:\n  - match: encoder.global\n    pattern: local2d\n    params: {radius: 0}\n")
    r = invoke("show", str(path))
    assert r.exit_code == 0, r.output
    assert "radius: 0" in r.stdout and "0.031 (all 12 heads)" in r.stdout


def test_render_writes_a_png(tmp_path):
    out = tmp_path / "masks.png"
    r = invoke("render", "hierarchical", "--model", "vit_b", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "9 panels" in r.stdout  # 4 head groups of encoder.global + 5 other layer kinds
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300


def test_check_accepts_a_valid_file(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\ntoken_order: tiles\nrules:\n  - match: encoder.global\n    pattern: local2d\n")
    r = invoke("check", str(path))
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"ok: {path}") and "vit_b, vit_l, vit_h" in r.stdout


def test_check_warns_about_rules_that_match_nothing(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: t\nrules:\n  - match: 're:image_encoder.blokcs'\n    pattern: dense\n")
    r = invoke("check", str(path), "--model", "vit_b")
    assert r.exit_code == 0
    assert "warning: rule 0 (match re:image_encoder.blokcs, pattern dense) matches no layer of vit_b" in r.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: b\nrules:\n  - match: '*'\n    pattern: local2d\n    params: {radius: -1}\n",
         "b.yaml:5: rules[0].params.radius: -1 is negative"),
        ("name: b\nrules: [\n", "b.yaml:3: YAML syntax error"),
        ("name: b\nrules:\n  - match: encoder.global\n    heads: [12]\n    pattern: dense\n",
         "lists head 12, but layer image_encoder.blocks.2.attn (encoder.global) has num_heads=12"),
        # issue 25, item 11: a sink past the layer's key blocks was ignored, and check said ok
        ("name: b\nrules:\n  - match: encoder.global\n    pattern: relative_blocks\n    params: {sinks: [0, 32]}\n",
         "b.yaml:3: rules[0]: rule 0 (match encoder.global, pattern relative_blocks) on layer image_encoder.blocks.2.attn: "
         "sinks lists key block 32, but layer image_encoder.blocks.2.attn has 32 key blocks (0..31)"),
        ("name: b\nrules:\n  - match: encoder.global\n    pattern: relative_blocks\n    params: {offsets: ["
         + ", ".join(f"[{i}, 0]" for i in range(10_001)) + "]}\n",
         "b.yaml:5: rules[0].params.offsets: lists 10001 offsets; expected at most 10000"),
    ],
)
def test_check_rejects_a_bad_file_with_exit_2_and_one_line(tmp_path, text, message):
    path = tmp_path / "b.yaml"
    path.write_text(text)
    r = invoke("check", str(path))
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.startswith("error: ") and message in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_check_heads_only_against_the_chosen_model(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("name: h\nrules:\n  - match: encoder.global\n    heads: [15]\n    pattern: dense\n")
    assert invoke("check", str(path), "--model", "vit_l").exit_code == 0
    assert invoke("check", str(path), "--model", "vit_b").exit_code == 2


def test_unknown_policy_and_missing_file_exit_2():
    for args in (("show", "nope"), ("check", "missing.yaml"), ("render", "nope", "--out", "x.png")):
        r = invoke(*args)
        assert r.exit_code == 2 and r.stderr.startswith("error: "), (args, r.output)


@pytest.mark.parametrize("command", ["list", "show", "render", "check"])
def test_every_command_has_help_with_an_example(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "Example:" in r.stdout and "sam-sparse policies" in r.stdout


def test_check_refuses_a_huge_file_before_parsing_it(tmp_path):
    """Issue 25, item 11: a 200,000-entry list took over 20 s to load."""
    import time

    path = tmp_path / "huge.yaml"
    path.write_text("name: huge\nrules:\n  - match: encoder.global\n    pattern: relative_blocks\n    params:\n"
                    "      offsets: [" + ", ".join(f"[{i}, 0]" for i in range(200_000)) + "]\n")
    t0 = time.perf_counter()
    r = invoke("check", str(path))
    assert r.exit_code == 2 and "huge.yaml: is 2,488,991 characters long; a policy is at most 1,000,000" in r.stderr
    assert time.perf_counter() - t0 < 10  # no parsing: under a second on an idle machine
