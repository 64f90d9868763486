"""The built-in policies (sam_sparse/configs/*.yaml, package data) and loading a policy by name or path."""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import List, Union

from .errors import PolicyError, type_name
from .policy import Policy


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
        raise PolicyError(f"expected a built-in policy name, a path to a YAML file or a Policy, got {type_name(name_or_path)}")
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
