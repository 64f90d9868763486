"""YAML for policies: a safe loader that records the line of every key (for file:line errors) and
rejects duplicate keys, and a dumper that writes rules readably."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import yaml

from .errors import PolicyError

class Flow(dict):
    """A mapping dumped on one line ({radius: 1})."""


class FlowList(list):
    """A list dumped on one line ([0, 1, 2])."""


class Dumper(yaml.SafeDumper):
    pass


Dumper.add_representer(Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v.items(), flow_style=True))
Dumper.add_representer(FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def flow_leaves(v):
    """Block style for the policy and its rules, one-line style for mappings / lists of scalars."""
    if isinstance(v, dict):
        inner = {k: flow_leaves(x) for k, x in v.items()}
        flat = all(not isinstance(x, (dict, list)) or isinstance(x, (Flow, FlowList)) for x in inner.values())
        return Flow(inner) if flat and "rules" not in v and "match" not in v else inner
    if isinstance(v, list):
        inner = [flow_leaves(x) for x in v]
        return FlowList(inner) if all(not isinstance(x, (dict, list)) for x in inner) else inner
    return v


class _Map(dict):
    """A dict that remembers the line of each key (lines) and of itself (line), 1-based."""

    line: Optional[int] = None
    lines: Dict[Any, int] = {}


class _Seq(list):
    line: Optional[int] = None
    lines: List[int] = []


# libyaml's parser when PyYAML has it (the same safe constructors, about 6x faster on long lists).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# A policy file is at most this many characters: calibrated policies of SAM's largest model are far
# below it, and YAML parsing costs seconds per megabyte.
MAX_CHARS = 1_000_000


class _LineLoader(_SafeLoader):
    """A safe loader (yaml.safe_load's rules) that records line numbers and rejects duplicate keys."""


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


def load_yaml(text: str, source: str, expected: str = "a mapping") -> Any:
    """Parse YAML text into dicts / lists that know their lines; PolicyError with source:line on errors."""
    if len(text) > MAX_CHARS:
        raise PolicyError(f"is {len(text):,} characters long; a policy is at most {MAX_CHARS:,} (a list of "
                          "offsets or sinks is at most 10,000 entries)", source=source)
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
        raise PolicyError(f"the file is empty; expected {expected}", source=source, line=1)
    return data


def line_of(d: Any, path: Sequence) -> Optional[int]:
    """The line of the deepest part of `path` that `d` (from load_yaml) records, else None."""
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
