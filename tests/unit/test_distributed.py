"""Harvest under torchrun with 2 CPU processes (gloo) equals a single-process harvest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def test_torchrun_two_ranks_matches_single_process(tmp_path: Path) -> None:
    script = str(ROOT / "tests" / "helpers" / "dist_harvest.py")
    _run([sys.executable, script, str(tmp_path / "single")])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
          str(tmp_path / "multi")])
    single, multi = tmp_path / "single", tmp_path / "multi"
    ms = json.loads((single / "manifest.json").read_text())
    mm = json.loads((multi / "manifest.json").read_text())
    assert ms["n_tokens"] == mm["n_tokens"] == 500
    assert ms["n_shards"] == mm["n_shards"] >= 4
    assert {s["rank"] for s in mm["shards"]} == {0, 1}
    assert [s["files"] for s in ms["shards"]] == [s["files"] for s in mm["shards"]]  # same bytes, by sha256
    files_s = sorted(p.relative_to(single) for p in single.rglob("*.npy"))
    files_m = sorted(p.relative_to(multi) for p in multi.rglob("*.npy"))
    assert files_s == files_m
    for rel in files_s:
        assert (single / rel).read_bytes() == (multi / rel).read_bytes()
