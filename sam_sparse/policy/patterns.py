"""The named patterns a policy may use: each YAML pattern name, its factory, its parameters and their
checks (PATTERNS), and PatternSpec, a validated pattern item as written in a rule.

The factories are the mask functions of sam_sparse.masks; composite patterns (hybrid's sparse part,
any_of / all_of) are built here from their already-built parts, so masks never reads a spec.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .. import masks
from ..masks import MaskError, MaskMod
from .errors import PolicyError, reject_unknown_keys, type_name

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Distances, strides and counts are in blocks: no grid has a million blocks per side, and a bound keeps
# absurd values (10**23) out of tensor arithmetic, where they would overflow.
MAX_BLOCKS = 1_000_000
MAX_SEED = 2**63 - 1
# Entries of one list parameter (offsets, sinks). A layer has far fewer block pairs worth listing (SAM's
# largest, 64 x 64 tokens at block size 16, has 961 lattice offsets); the bound keeps a malformed file
# from costing minutes.
MAX_ENTRIES = 10_000


def _bounded(v, what: str):
    if len(v) > MAX_ENTRIES:
        raise PolicyError(f"lists {len(v)} {what}; expected at most {MAX_ENTRIES}")


def _nonneg_number(v):
    if not _is_number(v):
        raise PolicyError(f"expected a number >= 0, got {type_name(v)}")
    if v < 0:
        raise PolicyError(f"{v} is negative; expected a number >= 0 (in blocks)")
    if v > MAX_BLOCKS:
        raise PolicyError(f"{v:g} is too large; expected at most {MAX_BLOCKS} (in blocks)")
    return v


def _nonneg_tokens(v):
    if not _is_number(v):
        raise PolicyError(f"expected a number >= 0, got {type_name(v)}")
    if v < 0 or v > MAX_BLOCKS:
        raise PolicyError(f"{v:g} is outside [0, {MAX_BLOCKS}]; expected a number >= 0 (in grid "
                          "tokens)")
    return v


def _int_at_least(lo: int):
    def check(v):
        if not isinstance(v, int) or isinstance(v, bool):
            raise PolicyError(f"expected an integer >= {lo}, got {type_name(v)}")
        if v < lo:
            raise PolicyError(f"{v} is below {lo}; expected an integer >= {lo}")
        if v > MAX_BLOCKS:
            raise PolicyError(f"{v} is too large; expected an integer from {lo} to {MAX_BLOCKS}")
        return v

    return check


def _optional(check):
    def opt(v):
        return None if v is None else check(v)

    return opt


def _fraction(v):
    if not _is_number(v):
        raise PolicyError(f"expected a number in (0, 1], got {type_name(v)}")
    if not 0 < v <= 1:
        raise PolicyError(f"{v} is outside (0, 1]; expected a number greater than 0 and at most 1")
    return v


def _seed(v):
    if not isinstance(v, int) or isinstance(v, bool):
        raise PolicyError(f"expected an integer seed, got {type_name(v)}")
    if not 0 <= v <= MAX_SEED:
        raise PolicyError(f"{v} is outside [0, 2**63 - 1]; expected a seed from 0 to {MAX_SEED}")
    return v


def _boolean(v):
    if not isinstance(v, bool):
        raise PolicyError(f"expected true or false, got {type_name(v)}")
    return v


def _choice(*options):
    def check(v):
        if v not in options:
            raise PolicyError(f"got {type_name(v)}; expected one of {', '.join(options)}")
        return v

    return check


def _radii(v):
    if not isinstance(v, (list, tuple)) or not v:
        raise PolicyError(f'expected a non-empty list of radii (numbers >= 0 or "all"), got {type_name(v)}')
    out = []
    for i, r in enumerate(v):
        if r == "all":
            out.append(r)
            continue
        if not _is_number(r) or r < 0:
            raise PolicyError(f'expected a number >= 0 or "all", got {type_name(r)}', path=(i,))
        if r > MAX_BLOCKS:
            raise PolicyError(f'{r:g} is too large; expected at most {MAX_BLOCKS} (in blocks) or "all"', path=(i,))
        out.append(r)
    return tuple(out)


def _offsets(v):
    if not isinstance(v, (list, tuple)):
        raise PolicyError(f"expected a list of [d_row, d_col] pairs of integers, got {type_name(v)}")
    _bounded(v, "offsets")
    out = []
    for i, pair in enumerate(v):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise PolicyError(f"expected a pair [d_row, d_col] of integers, got {type_name(pair)}", path=(i,))
        for x in pair:
            if not isinstance(x, int) or isinstance(x, bool) or abs(x) > MAX_BLOCKS:
                raise PolicyError(f"expected integers from -{MAX_BLOCKS} to {MAX_BLOCKS}, got {type_name(x)}", path=(i,))
        out.append(tuple(pair))
    if len(set(out)) != len(out):
        raise PolicyError(f"repeats an offset: {[list(o) for o in out]}")
    return tuple(out)


def _block_indices(v):
    if not isinstance(v, (list, tuple)):
        raise PolicyError(f"expected a list of key block indices (integers >= 0), got {type_name(v)}")
    _bounded(v, "block indices")
    for i, x in enumerate(v):
        if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x <= MAX_BLOCKS:
            raise PolicyError(f"expected an integer from 0 to {MAX_BLOCKS}, got {type_name(x)}", path=(i,))
    if len(set(v)) != len(v):
        raise PolicyError(f"repeats a block index: {list(v)}")
    return tuple(v)


def _pattern_item(v):
    return PatternSpec.from_dict(v)


@dataclass(frozen=True)
class Param:
    """One pattern parameter: default, validator (value -> normalized value), and what it accepts."""

    default: Any
    check: Callable[[Any], Any]
    accepts: str


_METRICS = ("chebyshev", "manhattan", "euclidean")


@dataclass(frozen=True)
class PatternDef:
    """A YAML pattern: its factory (params -> mask_mod), params, and whether it needs image tokens on
    both sides of a layer (patterns measured by 2-D block distances do)."""

    name: str
    factory: Callable[..., MaskMod]
    params: Dict[str, Param]
    needs_grid: bool = False
    uses_prompts: bool = False
    needs_memory: bool = False  # measures places in memory frames: memory.cross layers only

    def describe_params(self) -> str:
        if not self.params:
            return f"pattern {self.name} takes no parameters"
        ps = ", ".join(f"{k} ({p.accepts}, default {_yaml_scalar(p.default)})" for k, p in self.params.items())
        return f"pattern {self.name} takes: {ps}"


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_yaml_scalar(x)}" for k, x in v.items()) + "}"
    return str(v)


_RADIUS = Param(1, _nonneg_number, "number >= 0, in blocks")
_METRIC = Param("chebyshev", _choice(*_METRICS), "chebyshev (square) | manhattan (diamond) | euclidean (disc)")
_DENSITY = Param(0.5, _fraction, "number in (0, 1]")

def _hybrid(dense_fraction: float = 0.25, sparse: Optional["PatternSpec"] = None) -> MaskMod:
    return masks.hybrid((sparse or PatternSpec("local2d", {"radius": 1})).build(), dense_fraction)


def _image_to_prompt(image_sparsity: float = 0.6, windows: bool = False) -> MaskMod:
    """The seed project's default SAM pattern, on SAM's real layers: image-to-image attention (the
    encoder's global layers, and its window layers if `windows`) keeps the (1 - image_sparsity) * KB
    nearest key blocks; everything that involves prompt/output tokens (all decoder layers) stays dense."""
    kinds = ("encoder.global", "encoder.window") if windows else ("encoder.global",)
    return masks.only_on_kinds(kinds, masks.nearest(1.0 - image_sparsity))


PATTERNS: Dict[str, PatternDef] = {
    p.name: p
    for p in (
        PatternDef("dense", masks.dense, {}),
        PatternDef("local2d", masks.local2d, {"radius": _RADIUS, "metric": _METRIC}, needs_grid=True),
        PatternDef("axial", masks.axial, {"width": Param(0, _int_at_least(0), "integer >= 0, in blocks")}, needs_grid=True),
        PatternDef(
            "dilated",
            masks.dilated,
            {
                "stride": Param(2, _int_at_least(1), "integer >= 1, in blocks"),
                "radius": Param(None, _optional(_int_at_least(0)), "integer >= 0 lattice steps, or null for unlimited"),
            },
            needs_grid=True,
        ),
        PatternDef(
            "relative_blocks",
            masks.relative_blocks,
            {
                "offsets": Param(((0, 0),), _offsets, "list of [d_row, d_col] block-grid offsets (query minus key), integers"),
                "sinks": Param((), _block_indices, "list of key block indices every query keeps (below the layer's number of key blocks)"),
            },
            needs_grid=True,
        ),
        PatternDef("sink", masks.sink, {"blocks": Param(1, _int_at_least(0), "integer >= 0")}),
        PatternDef("random", masks.random_blocks, {"density": _DENSITY, "seed": Param(0, _seed, "integer from 0 to 2**63 - 1")}),
        PatternDef("nearest", masks.nearest, {"density": _DENSITY}, needs_grid=True),
        PatternDef(
            "hierarchical",
            masks.hierarchical,
            {"radii": Param((1, 2, 4, "all"), _radii, 'list of numbers >= 0 or "all", one per head group'), "metric": _METRIC},
            needs_grid=True,
        ),
        PatternDef(
            "hybrid",
            _hybrid,
            {
                "dense_fraction": Param(0.25, _fraction, "number in (0, 1]: share of heads kept dense, first heads first"),
                "sparse": Param({"pattern": "local2d", "params": {"radius": 1}}, _pattern_item, "a pattern item {pattern: NAME, params: {...}}"),
            },
        ),
        PatternDef(
            "image_to_prompt",
            _image_to_prompt,
            {
                "image_sparsity": Param(0.6, _fraction, "number in (0, 1]: share of image-to-image blocks dropped"),
                "windows": Param(False, _boolean, "true | false: also sparsify encoder.window layers"),
            },
        ),
        PatternDef(
            "region_focused",
            masks.region_focused,
            {
                "radius": _RADIUS,
                "background_stride": Param(4, _int_at_least(0), "integer >= 0: keep ~1/stride background key blocks, 0 none"),
            },
            uses_prompts=True,
        ),
        PatternDef(
            "memory_local",
            masks.memory_local,
            {
                "radius": Param(4, _nonneg_tokens,
                                "number >= 0, in grid tokens (16 px at 1024 px), for tracked frames"),
                "cond_radius": Param(None, _optional(_nonneg_tokens),
                                     "number >= 0 in grid tokens for conditioning (prompted) frames, or null: whole frame"),
            },
            needs_memory=True,
        ),
    )
}

COMBINATORS = ("any_of", "all_of")  # union (or_masks) / intersection (and_masks) of pattern items
PATTERN_KEYS = ("pattern", "params") + COMBINATORS


@dataclass(frozen=True)
class PatternSpec:
    """A validated pattern: a name from PATTERNS with its params (defaults filled in), or a combinator
    ("any_of" / "all_of") over `items`.

    params: tuple of (name, value) pairs in the pattern's declared order; lists are tuples and a nested
    pattern (hybrid's sparse) is a PatternSpec, so a spec is hashable. A Mapping is accepted too.
    """

    name: str
    params: Any = ()
    items: Tuple["PatternSpec", ...] = ()

    def __post_init__(self):
        if self.name in COMBINATORS:
            if self.params:
                raise PolicyError(f"{self.name} takes a list of pattern items, not params", path=("params",))
            if isinstance(self.items, list):
                object.__setattr__(self, "items", tuple(self.items))
            if not isinstance(self.items, tuple) or not self.items:
                raise PolicyError(f"{self.name} needs a non-empty list of pattern items", path=(self.name,))
            return
        if not isinstance(self.name, str) or self.name not in PATTERNS:
            hint = difflib.get_close_matches(str(self.name), list(PATTERNS), n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise PolicyError(
                f"unknown pattern {self.name!r}{did}; known patterns: {', '.join(PATTERNS)}", path=("pattern",)
            )
        if self.items:
            raise PolicyError(f"pattern {self.name} takes params, not items", path=("pattern",))
        object.__setattr__(self, "params", self._checked_params(self.params))

    def _checked_params(self, given) -> Tuple[Tuple[str, Any], ...]:
        pdef = PATTERNS[self.name]
        if isinstance(given, tuple):
            given = dict(given)
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            raise PolicyError(f"expected a mapping of parameters, got {type_name(given)}; {pdef.describe_params()}", path=("params",))
        for key in given:
            if key not in pdef.params:
                hint = difflib.get_close_matches(str(key), list(pdef.params), n=1)
                did = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise PolicyError(f"unknown parameter {key!r}{did}; {pdef.describe_params()}", path=("params", key))
        out = []
        for key, p in pdef.params.items():
            value = given.get(key, p.default)
            if isinstance(value, PatternSpec):
                out.append((key, value))
                continue
            try:
                out.append((key, p.check(value)))
            except PolicyError as e:
                raise e.prefixed(("params", key)) from None
        return tuple(out)

    @property
    def kwargs(self) -> Dict[str, Any]:
        return dict(self.params)

    @classmethod
    def from_dict(cls, d: Any) -> "PatternSpec":
        """From {pattern: NAME, params: {...}} or {any_of: [items]} / {all_of: [items]}."""
        if not isinstance(d, Mapping):
            raise PolicyError(f"expected a pattern item {{pattern: NAME, params: {{...}}}}, got {type_name(d)}")
        reject_unknown_keys(d, PATTERN_KEYS)
        given = [key for key in ("pattern",) + COMBINATORS if key in d]
        if not given:
            raise PolicyError(f"missing key 'pattern'; known patterns: {', '.join(PATTERNS)} (or any_of / all_of: [items])")
        if len(given) > 1:
            raise PolicyError(f"give one of pattern, any_of, all_of, not {' and '.join(given)}", path=(given[1],))
        key = given[0]
        if key in COMBINATORS:
            raw = d[key]
            if "params" in d:
                raise PolicyError(f"{key} takes no params; put params on its items", path=("params",))
            if not isinstance(raw, (list, tuple)) or not raw:
                raise PolicyError(f"expected a non-empty list of pattern items, got {type_name(raw)}", path=(key,))
            items = []
            for i, item in enumerate(raw):
                try:
                    items.append(cls.from_dict(item))
                except PolicyError as e:
                    raise e.prefixed((key, i)) from None
            return cls(key, (), tuple(items))
        if not isinstance(d["pattern"], str):
            raise PolicyError(f"expected a pattern name, got {type_name(d['pattern'])}; known patterns: {', '.join(PATTERNS)}", path=("pattern",))
        return cls(d["pattern"], d.get("params", {}))

    def to_dict(self) -> Dict[str, Any]:
        if self.name in COMBINATORS:
            return {self.name: [i.to_dict() for i in self.items]}
        out: Dict[str, Any] = {"pattern": self.name}
        if self.params:
            out["params"] = {k: _plain(v) for k, v in self.params}
        return out

    def build(self) -> MaskMod:
        """The mask_mod this spec describes; a MaskError while it runs comes out as a PolicyError."""
        if self.name == "any_of":
            mod = masks.or_masks(*(i.build() for i in self.items))
        elif self.name == "all_of":
            mod = masks.and_masks(*(i.build() for i in self.items))
        else:
            mod = PATTERNS[self.name].factory(**self.kwargs)

        def checked(ctx, b, h, q, k):
            try:
                return mod(ctx, b, h, q, k)
            except MaskError as e:
                raise PolicyError(str(e)) from None

        checked.__name__ = mod.__name__
        return checked

    def walk(self):
        """This spec and every spec nested in it (combinator items, hybrid's sparse)."""
        yield self
        for item in self.items:
            yield from item.walk()
        for _, v in self.params:
            if isinstance(v, PatternSpec):
                yield from v.walk()

    @property
    def needs_grid(self) -> bool:
        return any(s.name in PATTERNS and PATTERNS[s.name].needs_grid for s in self.walk())

    @property
    def needs_memory(self) -> bool:
        return any(s.name in PATTERNS and PATTERNS[s.name].needs_memory for s in self.walk())

    @property
    def uses_prompts(self) -> bool:
        return any(s.name in PATTERNS and PATTERNS[s.name].uses_prompts for s in self.walk())

    @property
    def keeps_all(self) -> bool:
        """Whether the pattern keeps every block whatever the layer (dense, or any_of with a dense item): its
        mask is known without building it, also inside a torch.compile'd forward, which cannot branch on a
        mask's values."""
        if self.name == "any_of":
            return any(i.keeps_all for i in self.items)
        if self.name == "all_of":
            return all(i.keeps_all for i in self.items)
        return self.name == "dense"

    def describe(self) -> str:
        if self.name in COMBINATORS:
            return f"{self.name}(" + ", ".join(i.describe() for i in self.items) + ")"
        return self.name


def _plain(v):
    """A param value as plain YAML data."""
    if isinstance(v, PatternSpec):
        return v.to_dict()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v
