"""Mask policies: which block mask each SAM attention layer (and head) gets.

A Policy is a frozen dataclass, validated on construction; YAML is only its serialization. Rules are
tried in order and the first rule that matches a layer *and lists the head* decides that head's mask;
a head no rule takes stays dense. See docs/policies.md for the YAML reference.

    policy = load_policy("local2d-30")            # built-in name, YAML path, or a Policy
    mask = policy.block_mask(layer)               # bool (1, H|1, QB, KB) or None (dense)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml

from .geometry import LAYER_KINDS, TOKEN_ORDERS, LayerGeometry, Prompts, default_key_tile
from .kernels.layout import BLOCK_SIZES_ACCEPTED, is_block_size
from .masks import (
    PATTERN_KEYS,
    PolicyError,
    PatternSpec,
    _type_name,
    block_context,
    evaluate,
    reject_unknown_keys,
    sam_layer_geometries,
)

TOP_KEYS = ("name", "description", "block_size", "token_order", "allow_empty_rows", "rules")
RULE_KEYS = ("match", "layers", "heads") + PATTERN_KEYS
GRID_KINDS = ("encoder.global", "encoder.window")  # image tokens on both sides
SELF_KINDS = ("encoder.global", "encoder.window", "decoder.self")  # queries and keys are the same tokens

_MATCH_ACCEPTS = f'a layer kind ({", ".join(LAYER_KINDS)}), "re:<regex on module name>" or "*"'


# ---------------------------------------------------------------------------------------------------
# Rule
# ---------------------------------------------------------------------------------------------------


def _int_list(v, what: str) -> Tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise PolicyError(f"expected a non-empty list of {what} (integers >= 0), got {_type_name(v)}")
    for i, x in enumerate(v):
        if not isinstance(x, int) or isinstance(x, bool):
            raise PolicyError(f"expected an integer >= 0, got {_type_name(x)}", path=(i,))
        if x < 0:
            raise PolicyError(f"{x} is negative; expected an integer >= 0", path=(i,))
    if len(set(v)) != len(v):
        raise PolicyError(f"repeats an index: {list(v)}")
    return tuple(v)


@dataclass(frozen=True)
class Rule:
    """One rule: which layers and heads it takes, and the pattern that builds their masks.

    match: tuple of selectors, any of which may match: a layer kind, "re:<regex>" (re.search on the
        module name, e.g. "re:blocks\\.(2|5)\\.attn$") or "*". A single string is accepted.
    heads: None for all heads, else head indices; heads it does not list fall through to later rules.
    layers: None for all, else LayerGeometry.layer_index values (position among layers of the same kind:
        layers: [0] with match encoder.global is the first global block).
    line, key_lines: where the rule and each of its keys start in its YAML file, for messages (not part
        of equality).
    """

    match: Any
    pattern: PatternSpec
    heads: Optional[Tuple[int, ...]] = None
    layers: Optional[Tuple[int, ...]] = None
    line: Optional[int] = field(default=None, compare=False, repr=False)
    key_lines: Mapping = field(default_factory=dict, compare=False, repr=False)  # YAML line of each key

    def __post_init__(self):
        match = (self.match,) if isinstance(self.match, str) else self.match
        if not isinstance(match, (list, tuple)) or not match:
            raise PolicyError(f"expected {_MATCH_ACCEPTS}, or a list of them; got {_type_name(self.match)}", path=("match",))
        for i, m in enumerate(match):
            where = ("match",) if isinstance(self.match, str) else ("match", i)
            if not isinstance(m, str):
                raise PolicyError(f"expected {_MATCH_ACCEPTS}; got {_type_name(m)}", path=where)
            if m.startswith("re:"):
                try:
                    re.compile(m[3:])
                except re.error as e:
                    raise PolicyError(f"bad regular expression {m[3:]!r}: {e}", path=where) from None
            elif m != "*" and m not in LAYER_KINDS:
                raise PolicyError(f"{m!r} is not a layer selector; expected {_MATCH_ACCEPTS}", path=where)
        object.__setattr__(self, "match", tuple(match))
        if not isinstance(self.pattern, PatternSpec):
            raise PolicyError(f"expected a PatternSpec, got {_type_name(self.pattern)}", path=("pattern",))
        for name in ("heads", "layers"):
            v = getattr(self, name)
            if v is not None:
                try:
                    object.__setattr__(self, name, _int_list(v, "head indices" if name == "heads" else "layer indices"))
                except PolicyError as e:
                    raise e.prefixed((name,)) from None
        # A grid pattern on a layer kind without image tokens on both sides can never work: say so now.
        if self.pattern.needs_grid:
            for m in self.match:
                if m in LAYER_KINDS and m not in GRID_KINDS:
                    raise PolicyError(
                        f"pattern {self.pattern.describe()} measures 2-D distances between blocks and needs image "
                        f"tokens on both sides, but {m} has prompt/output tokens on one side; "
                        f"use it on {' or '.join(GRID_KINDS)}",
                        path=("pattern",),
                    )

    @classmethod
    def from_dict(cls, d: Any) -> "Rule":
        if not isinstance(d, Mapping):
            raise PolicyError(f"expected a rule mapping (match, pattern, params, ...), got {_type_name(d)}")
        reject_unknown_keys(d, RULE_KEYS)
        if "match" not in d:
            raise PolicyError(f"missing key 'match'; expected {_MATCH_ACCEPTS}")
        heads = d.get("heads", "all")
        if heads == "all":
            heads = None
        elif not isinstance(heads, (list, tuple)):
            raise PolicyError(f'expected "all" or a list of head indices, got {_type_name(heads)}', path=("heads",))
        spec = PatternSpec.from_dict({k: d[k] for k in PATTERN_KEYS if k in d})
        return cls(d["match"], spec, heads, d.get("layers"), line=getattr(d, "line", None), key_lines=getattr(d, "lines", {}))

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"match": self.match[0] if len(self.match) == 1 else list(self.match)}
        if self.layers is not None:
            out["layers"] = list(self.layers)
        if self.heads is not None:
            out["heads"] = list(self.heads)
        out.update(self.pattern.to_dict())
        return out

    def matches(self, layer: LayerGeometry) -> bool:
        """Whether this rule's match and layers select the layer (heads aside)."""
        if self.layers is not None and layer.layer_index not in self.layers:
            return False
        for m in self.match:
            if m == "*" or m == layer.kind or (m.startswith("re:") and re.search(m[3:], layer.name)):
                return True
        return False

    def describe(self, index: int) -> str:
        return f"rule {index} (match {', '.join(self.match)}, pattern {self.pattern.describe()})"


# ---------------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------------

_MISSING = object()


@dataclass(frozen=True)
class Policy:
    """A named mask policy.

    name, description: for humans and the CLI.
    rules: tuple of Rule, first match wins per head; a head no rule takes is dense.
    block_size: mask granularity in tokens, a power of two from 16 to 65536.
    token_order: "raster", or "tiles": encoder.global layers put image tokens in th x tw tiles
        (default_key_tile) so that a block is a compact patch of the grid; see key_tile.
    allow_empty_rows: False (default): each self-attention-shaped layer keeps every query block's own
        block, and in cross-attention layers a query block left with no key block keeps all of them.
        True: masks are used exactly as the patterns build them (empty rows give zero output).
    source: where the policy came from, for messages (not part of equality).
    """

    name: str
    rules: Tuple[Rule, ...]
    description: str = ""
    block_size: int = 128
    token_order: str = "raster"
    allow_empty_rows: bool = False
    source: str = field(default="<code>", compare=False, repr=False)
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise PolicyError(f"expected a non-empty string, got {_type_name(self.name)}", path=("name",))
        if not isinstance(self.description, str):
            raise PolicyError(f"expected a string, got {_type_name(self.description)}", path=("description",))
        bs = self.block_size
        if not is_block_size(bs):
            raise PolicyError(f"got {_type_name(bs)}; expected {BLOCK_SIZES_ACCEPTED}", path=("block_size",))
        if self.token_order not in TOKEN_ORDERS:
            raise PolicyError(f"got {_type_name(self.token_order)}; expected one of {', '.join(TOKEN_ORDERS)}", path=("token_order",))
        if not isinstance(self.allow_empty_rows, bool):
            raise PolicyError(f"expected true or false, got {_type_name(self.allow_empty_rows)}", path=("allow_empty_rows",))
        if not isinstance(self.rules, (list, tuple)):
            raise PolicyError(f"expected a list of rules, got {_type_name(self.rules)}", path=("rules",))
        if not self.rules:
            raise PolicyError('the rule list is empty; give at least one rule (e.g. match: "*", pattern: dense)', path=("rules",))
        for i, r in enumerate(self.rules):
            if not isinstance(r, Rule):
                raise PolicyError(f"expected a Rule, got {_type_name(r)}", path=("rules", i))
        object.__setattr__(self, "rules", tuple(self.rules))

    # --- construction / serialization ------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> "Policy":
        """Build and validate a policy from plain data (as loaded from YAML).

        Raises PolicyError naming source, line (when d came from load_policy's YAML loader), field and
        what is accepted.
        """
        try:
            return cls._from_dict(d, source)
        except PolicyError as e:
            if e.source is not None:
                raise
            raise PolicyError(e.reason, path=e.path, source=source, line=_line_of(d, e.path)) from None

    @classmethod
    def _from_dict(cls, d: Any, source: str) -> "Policy":
        if not isinstance(d, Mapping):
            raise PolicyError(f"the top level is {_type_name(d)}; expected a mapping with keys {', '.join(TOP_KEYS)}")
        reject_unknown_keys(d, TOP_KEYS)
        for key in ("name", "rules"):
            if key not in d:
                raise PolicyError(f"missing required key {key!r}; a policy needs name and rules")
        raw_rules = d["rules"]
        if not isinstance(raw_rules, (list, tuple)):
            raise PolicyError(f"expected a list of rules, got {_type_name(raw_rules)}", path=("rules",))
        rules = []
        for i, r in enumerate(raw_rules):
            try:
                rules.append(Rule.from_dict(r))
            except PolicyError as e:
                raise e.prefixed(("rules", i)) from None
        kwargs = {k: d[k] for k in ("description", "block_size", "token_order", "allow_empty_rows") if k in d}
        return cls(name=d["name"], rules=tuple(rules), source=source, **kwargs)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> "Policy":
        """Parse YAML text (yaml.safe_load rules; duplicate keys rejected) into a Policy."""
        return cls.from_dict(_load_yaml(text, source), source=source)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "block_size": self.block_size,
            "token_order": self.token_order,
        }
        if self.allow_empty_rows:
            out["allow_empty_rows"] = True
        out["rules"] = [r.to_dict() for r in self.rules]
        return out

    def to_yaml(self) -> str:
        """YAML text that load_policy / from_yaml turn back into an equal Policy (params spelled out)."""
        return yaml.dump(_flow_leaves(self.to_dict()), Dumper=_Dumper, sort_keys=False, width=100)

    # --- what the patcher asks --------------------------------------------------------------------

    def key_tile(self, layer: LayerGeometry) -> Optional[Tuple[int, int]]:
        """(th, tw) tile order for the layer's image tokens, or None for raster.

        Only encoder.global layers of a "tiles" policy are tiled (default_key_tile of their grid and
        this policy's block_size; None when no tile divides the grid). Window and decoder layers stay
        raster: a window is 2x2 blocks anyway, and the decoder's image tokens are shared by layers.
        """
        if self.token_order != "tiles" or layer.kind != "encoder.global" or layer.k_grid is None:
            return None
        return default_key_tile(layer.k_grid, self.block_size)

    def geometries(self, model_type: str, **kwargs) -> List[LayerGeometry]:
        """sam_layer_geometries for this policy's block_size and token order."""
        return sam_layer_geometries(model_type, self.block_size, self.key_tile, **kwargs)

    def head_rules(self, layer: LayerGeometry) -> Tuple[Optional[int], ...]:
        """For each head of the layer, the index of the rule that decides its mask (None: dense).

        Raises PolicyError if a rule that matches the layer lists a head >= layer.num_heads.
        """
        for i, rule in enumerate(self.rules):
            if rule.matches(layer) and rule.heads is not None and max(rule.heads) >= layer.num_heads:
                raise PolicyError(
                    f"{rule.describe(i)} lists head {max(rule.heads)}, but layer {layer.name} ({layer.kind}) has "
                    f"num_heads={layer.num_heads}; head indices must be 0..{layer.num_heads - 1}",
                    path=("rules", i, "heads"),
                    source=self.source,
                    line=rule.key_lines.get("heads", rule.line),
                )
        out = []
        for h in range(layer.num_heads):
            out.append(next((i for i, r in enumerate(self.rules) if r.matches(layer) and (r.heads is None or h in r.heads)), None))
        return tuple(out)

    def needs_prompts(self, layer: LayerGeometry) -> bool:
        """True when this layer's mask depends on the call's prompts (region_focused on a layer with an
        image side); the patcher must then pass Prompts to block_mask.

        A layer with one key block (SAM's image-to-token attention: a handful of token keys) never
        does unless allow_empty_rows: every query block keeps that block or, left empty, gets it back.
        """
        if layer.q_grid is None and layer.k_grid is None:
            return False
        if layer.k_blocks == 1 and not self.allow_empty_rows:
            return False
        return any(i is not None and self.rules[i].pattern.uses_prompts for i in set(self.head_rules(layer)))

    def matched_layers(self, layers: Sequence[LayerGeometry]) -> Dict[int, List[str]]:
        """{rule index: names of the layers its match / layers select}, every rule present.

        A rule with an empty list matches no module of the model: likely a typo in a "re:" pattern or a
        layer index; the patcher warns about it. Shadowing by earlier rules is not considered (a rule
        behind a heads-limited rule still applies to the other heads).
        """
        return {i: [l.name for l in layers if r.matches(l)] for i, r in enumerate(self.rules)}

    def block_mask(
        self, layer: LayerGeometry, prompts: Optional[Prompts] = None, device=None
    ) -> Optional[torch.Tensor]:
        """The block mask of one layer, or None when every head is dense (a per-prompt mask on a GPU
        may instead come back all True, which the kernel treats the same: checking would sync).

        layer: its geometry (block_size and key_tile are read from it, so build it with this policy's
            block_size and key_tile()).
        prompts: the call's prompts in token-grid units, used only where needs_prompts(layer).
        Returns bool (1 or prompts.batch, num_heads or 1, layer.q_blocks, layer.k_blocks) on `device`,
        True = attend. Masks that do not depend on prompts are built once per (layer, device) and the
        same tensor is returned afterwards.
        """
        device = torch.device(device if device is not None else "cpu")
        use_prompts = prompts is not None and prompts.batch > 0 and self.needs_prompts(layer)
        key = (layer, device)
        if not use_prompts:
            hit = self._cache.get(key, _MISSING)
            if hit is not _MISSING:
                return hit
        mask = self._build(layer, prompts if use_prompts else None, device)
        if not use_prompts:
            self._cache[key] = mask
        return mask

    def _build(self, layer: LayerGeometry, prompts: Optional[Prompts], device) -> Optional[torch.Tensor]:
        head_rules = self.head_rules(layer)
        if all(i is None for i in head_rules):
            return None
        ctx = block_context(layer, prompts, device)
        qb, kb = layer.q_blocks, layer.k_blocks
        per_rule = {None: torch.ones(1, 1, qb, kb, dtype=torch.bool, device=device)}
        for i in sorted(set(head_rules) - {None}):
            try:
                per_rule[i] = evaluate(self.rules[i].pattern.build(), ctx)
            except PolicyError as e:
                raise PolicyError(
                    f"{self.rules[i].describe(i)} on layer {layer.name}: {e.reason}",
                    path=("rules", i),
                    source=self.source,
                    line=self.rules[i].line,
                ) from None
        if len(set(head_rules)) == 1:
            mask = per_rule[head_rules[0]]
        else:
            nb = max(m.shape[0] for m in per_rule.values())
            heads = [per_rule[r][:, h if per_rule[r].shape[1] > 1 else 0] for h, r in enumerate(head_rules)]
            mask = torch.stack([m.expand(nb, qb, kb) for m in heads], dim=1)
        if not self.allow_empty_rows:
            mask = _guard_rows(mask, layer)
        if prompts is not None and mask.device.type != "cpu":
            # Per-call masks on a GPU skip the two simplifications below (an all-True mask means the
            # same as None to the kernel): each reads the mask back to the host, a GPU sync in every
            # decoder attention of every predict call.
            return mask.contiguous()
        if bool(mask.all()):
            return None
        if mask.shape[1] > 1 and bool((mask == mask[:, :1]).all()):
            mask = mask[:, :1]  # every head the same: one head row broadcasts
        return mask.contiguous()

    def densities(self, model_type: str, prompts: Optional[Prompts] = None) -> Dict[str, List[float]]:
        """{layer name: per-head token-level density} for a SAM model type (see masks.mask_density)."""
        from .masks import head_densities

        return {l.name: head_densities(self.block_mask(l, prompts), l) for l in self.geometries(model_type)}


class _Flow(dict):
    """A mapping dumped on one line ({radius: 1})."""


class _FlowList(list):
    """A list dumped on one line ([0, 1, 2])."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True))
_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _flow_leaves(v):
    """Block style for the policy and its rules, one-line style for mappings / lists of scalars."""
    if isinstance(v, dict):
        inner = {k: _flow_leaves(x) for k, x in v.items()}
        flat = all(not isinstance(x, (dict, list)) or isinstance(x, (_Flow, _FlowList)) for x in inner.values())
        return _Flow(inner) if flat and "rules" not in v and "match" not in v else inner
    if isinstance(v, list):
        inner = [_flow_leaves(x) for x in v]
        return _FlowList(inner) if all(not isinstance(x, (dict, list)) for x in inner) else inner
    return v


def _guard_rows(mask: torch.Tensor, layer: LayerGeometry) -> torch.Tensor:
    """Self-attention-shaped layers keep each query block's own block; in cross-attention layers a query
    block with no key block keeps all of them (a softmax over nothing has no meaning)."""
    if layer.kind in SELF_KINDS and layer.seqlen_q == layer.seqlen_k:
        eye = torch.eye(layer.q_blocks, layer.k_blocks, dtype=torch.bool, device=mask.device)
        return mask | eye
    return mask | ~mask.any(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------------------------------


class _Map(dict):
    """A dict that remembers the line of each key (lines) and of itself (line), 1-based."""

    line: Optional[int] = None
    lines: Dict[Any, int] = {}


class _Seq(list):
    line: Optional[int] = None
    lines: List[int] = []


class _LineLoader(yaml.SafeLoader):
    """yaml.SafeLoader that records line numbers and rejects duplicate keys."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    # Keys written in this mapping (not brought in by a "<<" merge): only these may not repeat. A written
    # key overrides a merged one, as YAML's merge key specifies.
    own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
    loader.flatten_mapping(node)
    out, lines, written = _Map(), {}, set()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise PolicyError("a mapping key must be a plain value, not a list or mapping", line=key_node.start_mark.line + 1) from None
        is_own = id(key_node) in own
        if is_own and key in written:
            raise PolicyError(
                f"duplicate key {key!r} (first given on line {lines[key]}); each key may appear once",
                line=key_node.start_mark.line + 1,
            )
        if is_own:
            written.add(key)
        lines[key] = key_node.start_mark.line + 1
        out[key] = loader.construct_object(value_node, deep=True)
    out.lines, out.line = lines, node.start_mark.line + 1
    return out


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.lines, out.line = [child.start_mark.line + 1 for child in node.value], node.start_mark.line + 1
    return out


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _load_yaml(text: str, source: str) -> Any:
    try:
        data = yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass: same rules as yaml.safe_load
    except PolicyError as e:
        raise PolicyError(e.reason, path=e.path, source=source, line=e.line) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        where = f" (column {mark.column + 1})" if mark is not None else ""
        reason = f"YAML syntax error: {problem}{where}" + (f", {context}" if context else "")
        raise PolicyError(reason, source=source, line=mark.line + 1 if mark is not None else None) from None
    if data is None:
        raise PolicyError(f"the file is empty; expected a mapping with keys {', '.join(TOP_KEYS)}", source=source, line=1)
    return data


def _line_of(d: Any, path: Sequence) -> Optional[int]:
    """The line of the deepest part of `path` that `d` (from _LineLoader) records, else None."""
    line = getattr(d, "line", None)
    cur = d
    for part in path:
        lines = getattr(cur, "lines", None)
        if isinstance(cur, _Map) and part in cur:
            line = lines.get(part, line)
        elif isinstance(cur, _Seq) and isinstance(part, int) and 0 <= part < len(cur):
            line = lines[part]
        else:
            break
        cur = cur[part]
    return line


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _configs():
    return resources.files("sam_sparse") / "configs"


def list_policies() -> List[str]:
    """Names of the built-in policies (sam_sparse/configs/*.yaml)."""
    return sorted(p.name[: -len(".yaml")] for p in _configs().iterdir() if p.name.endswith(".yaml"))


@lru_cache(maxsize=None)
def _builtin(name: str) -> Policy:
    # One object per built-in, so its mask cache is shared by everyone who loads it by name.
    f = _configs() / f"{name}.yaml"
    return Policy.from_yaml(f.read_text(), source=str(f))


def policy_text(name_or_path: Union[str, os.PathLike, Policy]) -> str:
    """The YAML text of a built-in or file as written (comments included); to_yaml() for a Policy."""
    if isinstance(name_or_path, Policy):
        return name_or_path.to_yaml()
    if isinstance(name_or_path, str) and name_or_path in list_policies():
        return (_configs() / f"{name_or_path}.yaml").read_text()
    return Path(name_or_path).read_text()


def load_policy(name_or_path: Union[str, os.PathLike, Policy]) -> Policy:
    """A Policy from a built-in name (list_policies()), a path to a YAML file, or a Policy (returned as is).

    A built-in name wins over a file of that name in the working directory (write ./dense to mean the
    file). Raises PolicyError for an unknown name, a missing file, or an invalid policy.
    """
    if isinstance(name_or_path, Policy):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise PolicyError(f"expected a built-in policy name, a path to a YAML file or a Policy, got {_type_name(name_or_path)}")
    if isinstance(name_or_path, str) and name_or_path in list_policies():
        return _builtin(name_or_path)
    path = Path(name_or_path)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyError(f"cannot read the file: {e}", source=str(path)) from None
        return Policy.from_yaml(text, source=str(path))
    if path.exists():
        raise PolicyError("is not a file; expected a YAML policy file", source=str(path))
    text = str(name_or_path)
    if isinstance(name_or_path, os.PathLike) or path.suffix in (".yaml", ".yml") or os.sep in text or "/" in text:
        raise PolicyError(f"no such file: {text}")
    raise PolicyError(
        f"unknown policy {text!r}; built-in policies: {', '.join(list_policies())}; or give a path to a YAML file"
    )
