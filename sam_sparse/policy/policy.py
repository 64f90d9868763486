"""Mask policies: which block mask each SAM attention layer (and head) gets.

A Policy is a frozen dataclass, validated on construction; YAML is only its serialization. Rules are
tried in order and the first rule that matches a layer *and lists the head* decides that head's mask;
a head no rule takes stays dense. See docs/policies.md for the YAML reference.

    policy = load_policy("local2d-30")            # built-in name, YAML path, or a Policy
    mask = policy.block_mask(layer)               # bool (1, H|1, QB, KB) or None (dense)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml

from ..geometry import GRID_KINDS, LAYER_KINDS, LayerGeometry, Prompts
from ..kernels.layout import BLOCK_SIZES_ACCEPTED, is_block_size
from ..masks import MaskError, block_context, default_key_tile, evaluate, head_densities
from ..families import layer_geometries
from .errors import PolicyError, reject_unknown_keys, type_name
from .patterns import PATTERN_KEYS, PatternSpec
from .yaml_io import Dumper, flow_leaves, line_of, load_yaml

TOP_KEYS = ("name", "description", "block_size", "token_order", "allow_empty_rows", "rules")
RULE_KEYS = ("match", "layers", "stages", "heads") + PATTERN_KEYS
TOKEN_ORDERS = ("raster", "tiles")

_MATCH_ACCEPTS = f'a layer kind ({", ".join(LAYER_KINDS)}), "re:<regex on module name>" or "*"'


# ---------------------------------------------------------------------------------------------------
# Rule
# ---------------------------------------------------------------------------------------------------


def _int_list(v, what: str) -> Tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise PolicyError(f"expected a non-empty list of {what} (integers >= 0), got {type_name(v)}")
    for i, x in enumerate(v):
        if not isinstance(x, int) or isinstance(x, bool):
            raise PolicyError(f"expected an integer >= 0, got {type_name(x)}", path=(i,))
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
    stages: None for all, else encoder stages (1-4) of a multi-scale encoder (SAM 2's Hiera: stages: [3]
        with match encoder.window is the 14x14 windows of hiera_t); layers without a stage (SAM's ViT,
        decoders) never match a rule that lists stages.
    line, key_lines: where the rule and each of its keys start in its YAML file, for messages (not part
        of equality).
    """

    match: Any
    pattern: PatternSpec
    heads: Optional[Tuple[int, ...]] = None
    layers: Optional[Tuple[int, ...]] = None
    stages: Optional[Tuple[int, ...]] = None
    line: Optional[int] = field(default=None, compare=False, repr=False)
    key_lines: Mapping = field(default_factory=dict, compare=False, repr=False)  # YAML line of each key

    def __post_init__(self):
        match = (self.match,) if isinstance(self.match, str) else self.match
        if not isinstance(match, (list, tuple)) or not match:
            raise PolicyError(f"expected {_MATCH_ACCEPTS}, or a list of them; got {type_name(self.match)}", path=("match",))
        for i, m in enumerate(match):
            where = ("match",) if isinstance(self.match, str) else ("match", i)
            if not isinstance(m, str):
                raise PolicyError(f"expected {_MATCH_ACCEPTS}; got {type_name(m)}", path=where)
            if m.startswith("re:"):
                try:
                    re.compile(m[3:])
                except re.error as e:
                    raise PolicyError(f"bad regular expression {m[3:]!r}: {e}", path=where) from None
            elif m != "*" and m not in LAYER_KINDS:
                raise PolicyError(f"{m!r} is not a layer selector; expected {_MATCH_ACCEPTS}", path=where)
        object.__setattr__(self, "match", tuple(match))
        if not isinstance(self.pattern, PatternSpec):
            raise PolicyError(f"expected a PatternSpec, got {type_name(self.pattern)}", path=("pattern",))
        for name in ("heads", "layers", "stages"):
            v = getattr(self, name)
            if v is not None:
                try:
                    object.__setattr__(self, name, _int_list(v, name[:-1] + " indices"))
                except PolicyError as e:
                    raise e.prefixed((name,)) from None
        if self.stages is not None and min(self.stages) < 1:
            raise PolicyError(f"stage {min(self.stages)}: encoder stages count from 1 (Hiera has stages 1-4)",
                              path=("stages",))
        # A grid pattern on a layer kind without image tokens on both sides can never work: say so now.
        if self.pattern.needs_grid:
            for m in self.match:
                if m in LAYER_KINDS and m not in GRID_KINDS:
                    other = ("keys spanning several memory frames and pointer tokens" if m == "memory.cross"
                             else "prompt/output tokens on one side")
                    raise PolicyError(
                        f"pattern {self.pattern.describe()} measures 2-D distances between blocks and needs image "
                        f"tokens on both sides, but {m} has {other}; use it on {' or '.join(GRID_KINDS)}"
                        + (" (memory_local is memory.cross's)" if m == "memory.cross" else ""),
                        path=("pattern",),
                    )
        if self.pattern.needs_memory:
            for m in self.match:
                if m in LAYER_KINDS and m != "memory.cross":
                    raise PolicyError(
                        f"pattern {self.pattern.describe()} keeps places in memory frames and needs a memory.cross "
                        f"layer (video memory attention), but the rule matches {m}; use it with match: memory.cross",
                        path=("pattern",),
                    )

    @classmethod
    def from_dict(cls, d: Any) -> "Rule":
        if not isinstance(d, Mapping):
            raise PolicyError(f"expected a rule mapping (match, pattern, params, ...), got {type_name(d)}")
        reject_unknown_keys(d, RULE_KEYS)
        if "match" not in d:
            raise PolicyError(f"missing key 'match'; expected {_MATCH_ACCEPTS}")
        heads = d.get("heads", "all")
        if heads == "all":
            heads = None
        elif not isinstance(heads, (list, tuple)):
            raise PolicyError(f'expected "all" or a list of head indices, got {type_name(heads)}', path=("heads",))
        spec = PatternSpec.from_dict({k: d[k] for k in PATTERN_KEYS if k in d})
        return cls(d["match"], spec, heads, d.get("layers"), d.get("stages"), line=getattr(d, "line", None),
                   key_lines=getattr(d, "lines", {}))

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"match": self.match[0] if len(self.match) == 1 else list(self.match)}
        if self.layers is not None:
            out["layers"] = list(self.layers)
        if self.stages is not None:
            out["stages"] = list(self.stages)
        if self.heads is not None:
            out["heads"] = list(self.heads)
        out.update(self.pattern.to_dict())
        return out

    def matches(self, layer: LayerGeometry) -> bool:
        """Whether this rule's match and layers select the layer (heads aside)."""
        if self.layers is not None and layer.layer_index not in self.layers:
            return False
        if self.stages is not None and layer.stage not in self.stages:
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
            raise PolicyError(f"expected a non-empty string, got {type_name(self.name)}", path=("name",))
        if not isinstance(self.description, str):
            raise PolicyError(f"expected a string, got {type_name(self.description)}", path=("description",))
        bs = self.block_size
        if not is_block_size(bs):
            raise PolicyError(f"got {type_name(bs)}; expected {BLOCK_SIZES_ACCEPTED}", path=("block_size",))
        if self.token_order not in TOKEN_ORDERS:
            raise PolicyError(f"got {type_name(self.token_order)}; expected one of {', '.join(TOKEN_ORDERS)}", path=("token_order",))
        if not isinstance(self.allow_empty_rows, bool):
            raise PolicyError(f"expected true or false, got {type_name(self.allow_empty_rows)}", path=("allow_empty_rows",))
        if not isinstance(self.rules, (list, tuple)):
            raise PolicyError(f"expected a list of rules, got {type_name(self.rules)}", path=("rules",))
        if not self.rules:
            raise PolicyError('the rule list is empty; give at least one rule (e.g. match: "*", pattern: dense)', path=("rules",))
        for i, r in enumerate(self.rules):
            if not isinstance(r, Rule):
                raise PolicyError(f"expected a Rule, got {type_name(r)}", path=("rules", i))
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
            raise PolicyError(e.reason, path=e.path, source=source, line=line_of(d, e.path)) from None

    @classmethod
    def _from_dict(cls, d: Any, source: str) -> "Policy":
        if not isinstance(d, Mapping):
            raise PolicyError(f"the top level is {type_name(d)}; expected a mapping with keys {', '.join(TOP_KEYS)}")
        reject_unknown_keys(d, TOP_KEYS)
        for key in ("name", "rules"):
            if key not in d:
                raise PolicyError(f"missing required key {key!r}; a policy needs name and rules")
        raw_rules = d["rules"]
        if not isinstance(raw_rules, (list, tuple)):
            raise PolicyError(f"expected a list of rules, got {type_name(raw_rules)}", path=("rules",))
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
        return cls.from_dict(load_yaml(text, source, f"a mapping with keys {', '.join(TOP_KEYS)}"), source=source)

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
        return yaml.dump(flow_leaves(self.to_dict()), Dumper=Dumper, sort_keys=False, width=100)

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
        """The layers of a model type (any family: families.layer_geometries) for this policy's block_size
        and token order."""
        return layer_geometries(model_type, self.block_size, self.key_tile, **kwargs)

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

    def unmatched_rules(self, layers: Sequence[LayerGeometry]) -> List[int]:
        """Indices of the rules that select none of `layers` (likely a typo in a "re:" pattern or a layer
        index), leaving out rules that select only layer kinds absent from `layers` (a rule for the
        image encoder is expected to match nothing on MobileSAM, whose encoder is not SAM's ViT) and
        rules for encoder stages on a model without stages (SAM's ViT)."""
        kinds = {layer.kind for layer in layers}
        staged = any(layer.stage is not None for layer in layers)

        def expected(rule) -> bool:
            return (all(m in LAYER_KINDS and m not in kinds for m in rule.match)
                    or (rule.stages is not None and not staged))

        return [i for i, names in self.matched_layers(layers).items() if not names and not expected(self.rules[i])]

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
        # A forward traced by torch.compile neither reads the cache (dynamo would guard on its keys, and
        # compile again whenever it grows) nor stores into it (a side effect it cannot replay).
        cached = not use_prompts and not torch.compiler.is_compiling()
        key = (layer, device)
        if cached:
            hit = self._cache.get(key, _MISSING)
            if hit is not _MISSING:
                return hit
        mask = self._build(layer, prompts if use_prompts else None, device)
        if cached:
            self._cache[key] = mask
        return mask

    def keeps_all(self, layer: LayerGeometry) -> bool:
        """Whether every head of the layer is dense by rule (no rule, or a pattern that keeps every block):
        known from the rules alone, without building a mask."""
        return all(i is None for i in self._masking_rules(layer))

    def _masking_rules(self, layer: LayerGeometry) -> Tuple[Optional[int], ...]:
        """head_rules, with None also for the rules whose pattern keeps every block: no mask to build."""
        return tuple(None if i is not None and self.rules[i].pattern.keeps_all else i for i in self.head_rules(layer))

    def _build(self, layer: LayerGeometry, prompts: Optional[Prompts], device) -> Optional[torch.Tensor]:
        head_rules = self._masking_rules(layer)
        if all(i is None for i in head_rules):
            return None
        try:
            ctx = block_context(layer, prompts, device)
        except MaskError as e:  # a tile that does not divide this layer's grid
            raise PolicyError(str(e), source=self.source) from None
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
        if (prompts is not None and mask.device.type != "cpu") or torch.compiler.is_compiling():
            # Per-call masks on a GPU skip the two simplifications below (an all-True mask means the
            # same as None to the kernel): each reads the mask back to the host, a GPU sync in every
            # decoder attention of every predict call; and a traced forward cannot branch on values.
            return mask.contiguous()
        if bool(mask.all()):
            return None
        if mask.shape[1] > 1 and bool((mask == mask[:, :1]).all()):
            mask = mask[:, :1]  # every head the same: one head row broadcasts
        return mask.contiguous()

    def densities(self, model_type: str, prompts: Optional[Prompts] = None) -> Dict[str, List[float]]:
        """{layer name: per-head token-level density} for a model type of any family (see masks.mask_density)."""
        return {l.name: head_densities(self.block_mask(l, prompts), l) for l in self.geometries(model_type)}


def _guard_rows(mask: torch.Tensor, layer: LayerGeometry) -> torch.Tensor:
    """Self-attention-shaped layers keep each query block's own block; in cross-attention layers a query
    block with no key block keeps all of them (a softmax over nothing has no meaning)."""
    if layer.same_tokens:
        eye = torch.eye(layer.q_blocks, layer.k_blocks, dtype=torch.bool, device=mask.device)
        return mask | eye
    return mask | ~mask.any(dim=-1, keepdim=True)
