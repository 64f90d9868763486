"""The policy error type and the did-you-mean helpers every policy message uses."""

from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional, Sequence


def format_path(path: Sequence) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class PolicyError(ValueError):
    """An invalid mask policy, pattern or parameter.

    One line: ``<source>:<line>: <field>: <what is wrong>; <what is accepted>``, where the parts that
    are unknown are left out. Attributes: reason, path (tuple of keys / list indices from the top of
    the policy, e.g. ("rules", 0, "params", "radius")), source (file or "<dict>"), line (1-based).
    """

    def __init__(self, reason: str, *, path: Sequence = (), source: Optional[str] = None, line: Optional[int] = None):
        self.reason = " ".join(str(reason).split())  # always one line (YAML errors bring newlines)
        self.path = tuple(path)
        self.source = source
        self.line = line
        super().__init__(self._message())

    @property
    def field(self) -> str:
        return format_path(self.path)

    def _message(self) -> str:
        where = ""
        if self.source is not None:
            where = f"{self.source}:{self.line}: " if self.line is not None else f"{self.source}: "
        field = f"{self.field}: " if self.path else ""
        return f"{where}{field}{self.reason}"

    def prefixed(self, prefix: Sequence) -> "PolicyError":
        """The same error with its path under ``prefix`` (used while descending into a policy)."""
        return PolicyError(self.reason, path=tuple(prefix) + self.path, source=self.source, line=self.line)


def type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {v!r}"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, str):
        return f"the string {v!r}"
    return f"{type(v).__name__} {v!r}"


def unknown_key_message(key: Any, accepted: Sequence[str], what: str = "key") -> str:
    """'unknown key 'radious' (did you mean 'radius'?); accepted keys: a, b' ."""
    hint = difflib.get_close_matches(str(key), accepted, n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {what} {key!r}{did}; accepted {what}s: {', '.join(accepted)}"


def reject_unknown_keys(d: Mapping, accepted: Sequence[str]) -> None:
    """PolicyError at the first key of d that is not accepted (its path is that key)."""
    for key in d:
        if key not in accepted:
            raise PolicyError(unknown_key_message(key, accepted), path=(key,))
