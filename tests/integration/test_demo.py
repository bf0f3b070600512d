"""Integration: the main job end to end on the bundled model, at a small size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featurelens.demo import DemoConfig, run_demo
from featurelens.saes import load_sae

pytestmark = pytest.mark.integration


def test_demo_small(tmp_path: Path) -> None:
    s = run_demo(DemoConfig(tokens=6000, width=512, k=16, steps=40, batch_size=512, eval_tokens=1200, browse_tokens=3000,
                            out=str(tmp_path / "demo"), device="cpu"))
    assert s["harvested_tokens"] == 6000 and s["l0"] == pytest.approx(16.0)
    assert 0 < s["fvu"] < 1.0 and s["ce_loss_clean"] > 0
    assert s["ce_loss_recovered"] > 0.3  # even a barely trained SAE beats zero ablation by far
    page = Path(s["report"]).read_text()
    assert "blocks.10.hook_resid_post" in page and "<img" in page
    assert "href='../browser/" in page and Path(s["browser"]).is_file()  # the report links the feature browser
    assert (Path(s["browser"]).parent / "data" / "l7.js").is_file()  # 512 latents: 8 shards
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["sae"] == s["sae"]
    sae = load_sae(s["sae"])
    assert sae.cfg.hook_name == "blocks.10.hook_resid_post" and sae.cfg.model_name == "smollm2-135m-instruct"
