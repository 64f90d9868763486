"""The package's import directions (docs/architecture.md): each module imports only from the places its
layer may, nothing below patches/ and models/ imports segment_anything, and no module imports another
module's private names. Static: reads the source with ast, imports nothing."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sam_sparse"

# What each part of the package may import from sam_sparse (besides itself). Keys and values are
# module paths relative to sam_sparse; a key names a module or a package (every module under it).
ALLOWED = {
    "kernels": set(),
    "geometry": set(),
    "files": set(),
    "images": set(),
    "table": set(),
    "devices": set(),
    "cuda_graphs": set(),
    "masks": {"geometry"},
    "sam_layers": {"geometry"},
    "sam2_layers": {"geometry", "sam_layers"},
    "families": {"geometry", "sam_layers", "sam2_layers"},
    "policy": {"geometry", "masks", "families", "kernels.layout"},
    "patches": {"cuda_graphs", "geometry", "images", "kernels", "masks", "policy", "sam_layers", "sam2_layers", "table"},
    "models": {"files", "families", "sam_layers", "sam2_layers", "policy", "patches"},
    "maskgen": {"kernels", "patches"},
    "predictor": {"cuda_graphs", "images", "maskgen", "patches"},
    "segment": {"files", "predictor"},
    "bench": {"devices", "files", "models", "patches", "policy", "table"},
    "convert": {"__init__", "files", "models", "patches", "policy"},
    "amg": {"files", "segment", "predictor", "maskgen"},
    "calibration": {"__init__", "geometry", "images", "kernels", "masks", "patches", "policy", "predictor", "sam2_layers",
                    "table"},
    "cli": {"*"},
    "__main__": {"cli"},
    "__init__": {"*"},
}
NO_SEGMENT_ANYTHING = ("kernels", "geometry", "files", "images", "table", "devices", "cuda_graphs", "masks", "sam_layers", "sam2_layers",
                       "families", "policy")
# sam2 is an optional extra: only the SAM 2 family's patch module and what runs SAM 2 models import it.
SAM2_IMPORTERS = ("patches.sam2", "patches.sam2_attention", "patches.sam2_memory", "patches.sam2_video",
                  "patches.parity", "models.build", "predictor", "amg",
                  "maskgen", "calibration", "segment", "video")


def _part(rel: str) -> str:
    """The ALLOWED key a module path falls under ("policy.patterns" -> "policy")."""
    for key in sorted(ALLOWED, key=len, reverse=True):
        if rel == key or rel.startswith(key + "."):
            return key
    raise AssertionError(f"sam_sparse.{rel} is in no part of docs/architecture.md; add it to ALLOWED and the doc")


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        if rel.endswith(".__init__"):
            rel = rel[: -len(".__init__")]
        yield rel, path, path.name == "__init__.py"


def _imports(rel: str, path: Path, is_pkg: bool):
    """(imported sam_sparse module path or an outside top-level name, names imported, line), every import
    in the file, including the ones inside functions."""
    package = rel.split(".") if is_pkg else rel.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                name = a.name
                yield (name[len("sam_sparse."):] if name.startswith("sam_sparse.") else name), [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                target = target or "__init__"
            elif (node.module or "").startswith("sam_sparse"):
                target = node.module[len("sam_sparse."):] if node.module != "sam_sparse" else "__init__"
            else:
                yield node.module, [], node.lineno
                continue
            yield "sam:" + target, [a.name for a in node.names], node.lineno


def _violations():
    out = []
    for rel, path, is_pkg in _modules():
        if rel == "":
            rel = "__init__"
        part = _part(rel)
        for target, names, line in _imports(rel, path, is_pkg):
            where = f"{path.relative_to(ROOT.parent)}:{line}"
            if not target.startswith("sam:"):
                if target.split(".")[0] == "segment_anything" and part in NO_SEGMENT_ANYTHING:
                    out.append(f"{where}: {part} must not import segment_anything")
                if target.split(".")[0] == "sam2" and not rel.startswith(SAM2_IMPORTERS):
                    out.append(f"{where}: {rel} must not import sam2 (an optional extra; see SAM2_IMPORTERS)")
                continue
            target = target[4:]
            base = "" if target == "__init__" else target
            subs = [f"{base}.{n}".lstrip(".") for n in names]
            subs = [m for m in subs if (ROOT / (m.replace(".", "/") + ".py")).exists() or (ROOT / m.replace(".", "/")).is_dir()]
            if subs:  # "from . import masks": the submodules it names
                for m in subs:
                    out += _check(part, rel, m, [], where)
                continue
            out += _check(part, rel, target, names, where)
    return out


def _check(part, rel, target, names, where):
    out = []
    tpart = _part(target) if target != "__init__" else "__init__"
    allowed = ALLOWED[part]
    ok = tpart == part or "*" in allowed or tpart in allowed or any(target == a or target.startswith(a + ".") for a in allowed)
    if not ok:
        out.append(f"{where}: {part} imports sam_sparse.{target}; docs/architecture.md allows only {sorted(allowed) or 'nothing'}")
    if target != rel and tpart != "__init__":
        out += [f"{where}: imports the private name {n} from sam_sparse.{target}" for n in names if n.startswith("_")]
    return out


def test_imports_follow_the_documented_directions():
    bad = _violations()
    assert not bad, "\n".join(bad)


def test_every_module_belongs_to_a_documented_part():
    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    for key in ALLOWED:
        if key not in ("__init__", "__main__"):
            assert f"`{key}" in doc, f"docs/architecture.md does not describe {key}"


def test_the_check_catches_a_wrong_direction(tmp_path, monkeypatch):
    """The checker itself can fail: a kernel module importing the policy is reported."""
    pkg = tmp_path / "sam_sparse" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text("from ..policy import load_policy\nimport segment_anything\nfrom .interface import _describe\n"
                                "import sam2\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path / "sam_sparse")
    bad = _violations()
    assert any("kernels imports sam_sparse.policy" in b for b in bad), bad
    assert any("kernels must not import segment_anything" in b for b in bad), bad
    assert any("private name _describe" in b for b in bad), bad
    assert any("kernels.bad must not import sam2" in b for b in bad), bad


def test_every_public_call_the_docs_name_is_exported():
    """`sam_sparse.NAME(` in a docstring, the README or docs/ is a promise that the name is public: each one is in
    sam_sparse.__all__ (load_sparse_sam's docstring once named convert_checkpoint, which was not)."""
    import re

    import sam_sparse

    texts = [p.read_text() for p in ROOT.rglob("*.py")]
    texts += [p.read_text() for p in (ROOT.parent / "docs").glob("*.md")] + [(ROOT.parent / "README.md").read_text()]
    named = {m for t in texts for m in re.findall(r"\bsam_sparse\.([a-z_][a-z_0-9]*)\(", t)}
    assert "convert_checkpoint" in named and "video_parity" in named, sorted(named)
    assert sorted(n for n in named if n not in sam_sparse.__all__) == []


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
