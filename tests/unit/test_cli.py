"""The generated CLI: flags and help come from the config dataclasses; errors are one line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from featurelens.activations.harvest import HarvestConfig
from featurelens.cli import build_parser, main
from featurelens.compare.run import CompareConfig
from featurelens.configs import field_docs
from featurelens.demo import DemoConfig
from featurelens.training import TrainConfig


@pytest.mark.parametrize("cls", [HarvestConfig, DemoConfig, CompareConfig, TrainConfig])
def test_every_config_field_is_documented(cls: type) -> None:
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing


def test_harvest_flags_generated_from_config() -> None:
    ns = build_parser().parse_args(["harvest", "--sites", "blocks.1.hook_mlp_out", "--tokens", "7", "--no-early-exit",
                                    "--dtype", "bfloat16", "--context-length", "33"])
    assert (ns.sites, ns.tokens, ns.early_exit, ns.dtype, ns.context_length) == ("blocks.1.hook_mlp_out", 7, False, "bfloat16", 33)
    assert ns.batch_size == HarvestConfig().batch_size
    with pytest.raises(SystemExit):
        build_parser().parse_args(["harvest", "--dtype", "int4"])


def test_help_shows_field_docs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["harvest", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Stop each forward pass right after the deepest requested site" in out


def test_bad_site_is_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(["harvest", "--sites", "blocks.1.resid", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("featurelens: error: unknown site")


def test_store_command_on_missing_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["store", str(tmp_path)]) == 2
    assert "not an activation store" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    res = subprocess.run([sys.executable, "-m", "featurelens", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "featurelens" in res.stdout


def test_train_grid_expands_architectures_and_settings() -> None:
    from featurelens.cli import TrainSource, _grid

    specs = _grid(TrainSource(arch="topk,relu", width="256,512", k="8,16", sparsity_coeff="1,3"))
    names = sorted(s.default_name() for s in specs)
    assert len(specs) == 2 * 2 + 2 * 2 and len(set(names)) == len(names)  # k for topk, coeff for relu
    assert "topk-w512-k16" in names and "relu-w256-c3" in names


def test_train_command_needs_a_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--arch", "topk"]) == 2
    assert "--acts STORE" in capsys.readouterr().err


def test_compare_flags_and_bad_triple_error(capsys: pytest.CaptureFixture[str]) -> None:
    ns = build_parser().parse_args(["compare", "--a", "m:blocks.1.hook_resid_post:s", "--b", "m:blocks.2.hook_resid_post:t",
                                    "--svcca-compat", "lan2024", "--draws", "7"])
    assert (ns.svcca_compat, ns.draws, ns.min_corr) == ("lan2024", 7, CompareConfig().min_corr)
    assert main(["compare", "--a", "nonsense", "--b", "m:blocks.1.hook_resid_post:s"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MODEL:SITE:SAE" in err[0]


BAD_FLAGS = [
    ["train", "--acts", "x", "--steps", "0"],
    ["train", "--acts", "x", "--steps", "-3"],
    ["train", "--acts", "x", "--batch-size", "0"],
    ["train", "--acts", "x", "--width", "abc"],
    ["train", "--acts", "x", "--width", "-5"],
    ["train", "--acts", "x", "--width", "0"],
    ["train", "--acts", "x", "--width", ","],
    ["train", "--acts", "x", "--k", "1.5"],
    ["train", "--acts", "x", "--lr", "-1"],
    ["train", "--acts", "x", "--device", "tpu"],
    ["train", "--acts", "x", "--decay-start", "1.5"],
    ["train", "--acts", "x", "--log-every", "0"],
    ["train", "--acts", "x", "--arch", "jumprelu", "--bandwidth", "0"],
    ["eval", "sae", "--tokens", "0"],
    ["eval", "sae", "--tokens", "-10"],
    ["eval", "sae", "--latents-shown", "-5"],
    ["eval", "sae", "--device", "gpu0"],
    ["harvest", "--shard-tokens", "0"],
    ["harvest", "--tokens", "-1"],
    ["harvest", "--batch-size", "0"],
]


@pytest.mark.parametrize("argv", BAD_FLAGS, ids=[" ".join(a) for a in BAD_FLAGS])
def test_bad_numeric_flags_are_one_line_errors(argv: list[str], capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any work (no file is written), with exit code 2 and one line naming the flag."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("featurelens: error: --") and "Traceback" not in err
    flag = [a for a in argv if a.startswith("--")][-1]  # the bad one is the last flag given
    assert flag in err
    assert list(tmp_path.iterdir()) == []
