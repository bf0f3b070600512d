"""Strict JSON out, untrusted JSON in, and the output-folder helpers' own rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featurelens.atomic import MARKER, artifact_kind
from featurelens.errors import FeatureLensError, UsageError
from featurelens.jsonio import dumps_strict, parse_json, read_json
from featurelens.outputs import check_out, make_out, output_lock


def _no_constants(name: str) -> None:
    raise AssertionError(f"non-standard JSON constant {name}")


def test_strict_json_has_no_nan_or_infinity() -> None:
    text = dumps_strict({"fvu": float("nan"), "kl": [1.0, float("inf"), -float("inf")], "ok": 0.5, "n": 3})
    # a strict parser (no NaN / Infinity extensions) reads it back, with the non-finite values as null
    assert json.loads(text, parse_constant=_no_constants) == {"fvu": None, "kl": [1.0, None, None], "ok": 0.5, "n": 3}


@pytest.mark.parametrize("data, says", [
    (b"[" * 100_000 + b"]" * 100_000, "nests brackets too deeply"),
    (b'{"a": "\xff\xfe"}', "not UTF-8"),
    (b'{"a": 1,}', "line 1 column 9"),
    (b"", "not valid JSON"),
])
def test_untrusted_json_is_one_line_naming_the_file(tmp_path: Path, data: bytes, says: str) -> None:
    p = tmp_path / "in.json"
    p.write_bytes(data)
    with pytest.raises(FeatureLensError, match=says) as e:
        read_json(p, "fix it")
    assert str(p) in str(e.value) and str(e.value).endswith("fix it") and "\n" not in str(e.value)


def test_read_json_checks_the_top_level_type_and_the_path(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(FeatureLensError, match="JSON list, not a JSON dict"):
        read_json(tmp_path / "list.json", "x")
    assert read_json(tmp_path / "list.json", "x", expect=list) == [1]
    with pytest.raises(FeatureLensError, match="does not exist"):
        read_json(tmp_path / "missing.json", "x")
    with pytest.raises(FeatureLensError, match="is a folder"):
        read_json(tmp_path, "x")
    assert parse_json('{"a": 1}', "where", "fix") == {"a": 1}


def test_check_out_rules(tmp_path: Path) -> None:
    assert check_out(tmp_path / "new" / "deeper", "eval-report") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking writes nothing
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", "eval-report")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a.txt").write_text("x")
    with pytest.raises(UsageError, match="did not write"):
        check_out(tmp_path / "user", "eval-report")
    ours = make_out(tmp_path / "ours", "eval-report")
    (ours / "report.html").write_text("old report")
    check_out(ours, "eval-report")  # its own kind: may be rewritten
    with pytest.raises(UsageError, match="a featurelens eval-report"):
        check_out(ours, "compare-report")  # another kind: refused
    assert artifact_kind(ours) == "eval-report" and (ours / MARKER).is_file()
    legacy = tmp_path / "legacy"  # written before markers existed: recognised by its files
    legacy.mkdir()
    (legacy / "metrics.json").write_text("[]")
    (legacy / "report.html").write_text("")
    check_out(legacy, "eval-report")


def test_lock_is_reentrant_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out"
    with output_lock(target):
        assert (tmp_path / "a" / "b" / ".out.featurelens-lock").read_text().strip().isdigit()
        with output_lock(target):  # the same process may take it again (e.g. refusal -> export)
            pass
        assert (tmp_path / "a" / "b" / ".out.featurelens-lock").exists()
    assert list(tmp_path.iterdir()) == []  # the lock file and the folders made for it are gone
    with output_lock(target):  # and it can be taken again
        target.mkdir(parents=True)
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["out"]
