"""Reading a YAML file that must be a mapping of known keys (a task file, a recipe).

One function, so every such file fails the same way: a missing file, invalid YAML, a top level that
is not a mapping, or a key that is not allowed is a ``ValueError`` (``FileNotFoundError`` for a
missing file) naming the file, and the key at fault with the keys that are allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Collection


def read_yaml_mapping(
    path: str | os.PathLike,
    allowed: Collection[str] | Callable[[dict[str, Any]], Collection[str]],
    *,
    what: str = "file",
    empty_ok: bool = False,
) -> dict[str, Any]:
    """The mapping in the YAML file ``path``. ``allowed`` is the set of keys it may have, or a
    function of the mapping that returns it (when one key, such as ``kind``, decides the others).
    ``what`` names the file in errors ("task file", "recipe"); ``empty_ok`` reads an empty file as
    an empty mapping (a recipe that keeps every default)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {path} is not valid YAML: {e}") from None
    if data is None and empty_ok:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must be a YAML mapping of fields, got {type(data).__name__}")
    known = allowed(data) if callable(allowed) else allowed
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ValueError(f"{what} {path}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return data
