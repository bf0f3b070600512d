"""Read JSON that a user or an earlier run handed us: any failure is one line naming the file and the fix.

``json.loads`` alone lets through ``RecursionError`` (deeply nested brackets), ``UnicodeDecodeError``
(non-UTF-8 bytes) and bare ``OSError`` tracebacks; here each becomes a :class:`FeatureLensError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from featurelens.errors import FeatureLensError


def parse_json(text: str | bytes, where: str, fix: str) -> Any:
    """``json.loads(text)``, with every parse failure a one-line error naming ``where`` and ``fix``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError:
        raise FeatureLensError(f"{where} is not UTF-8 text: {fix}") from None
    except RecursionError:
        raise FeatureLensError(f"{where} nests brackets too deeply to be read: {fix}") from None
    except json.JSONDecodeError as e:
        raise FeatureLensError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): {fix}") from None
    except ValueError as e:  # e.g. numbers too long to convert
        raise FeatureLensError(f"{where} is not valid JSON ({e}): {fix}") from None


def read_json(path: str | os.PathLike[str], fix: str, expect: type | None = dict) -> Any:
    """Parse the JSON file at ``path``; a missing, unreadable or malformed file, or (with ``expect``) one
    whose top level is of another type, is a one-line :class:`FeatureLensError` ending in ``fix``."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FeatureLensError(f"{p} does not exist: {fix}") from None
    except IsADirectoryError:
        raise FeatureLensError(f"{p} is a folder, not a JSON file: {fix}") from None
    except OSError as e:
        raise FeatureLensError(f"{p} cannot be read ({e.strerror or e}): {fix}") from None
    out = parse_json(data, str(p), fix)
    if expect is not None and not isinstance(out, expect):
        raise FeatureLensError(f"{p} holds a JSON {type(out).__name__}, not a JSON {expect.__name__}: {fix}")
    return out


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN / Inf float replaced by ``None`` (JSON has no spelling for them)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps_strict(obj: Any, indent: int | None = 1, sort_keys: bool = False) -> str:
    """Strict JSON text (non-finite numbers become ``null``, never ``NaN``), ending in a newline."""
    return json.dumps(finite_or_none(obj), indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
