"""`featurelens lens` and `featurelens patch` on the bundled models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from featurelens.lens.run import LensConfig, PatchConfig, run_lens, run_patch
from featurelens.models.loading import BUNDLED_MODELS, LoadedModel, load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=list(BUNDLED_MODELS))
def bundled(request: pytest.FixtureRequest) -> LoadedModel:
    return load_model(request.param, device="cpu")


def _strict(path: Path) -> dict:  # type: ignore[type-arg]
    def bad(name: str) -> None:
        raise AssertionError(name)
    return json.loads(path.read_text(), parse_constant=bad)  # type: ignore[no-any-return]


def test_lens_report_on_a_real_model(bundled: LoadedModel, tmp_path: Path) -> None:
    res = run_lens(LensConfig(prompt="The Eiffel Tower is in the city of", out=str(tmp_path / "lens"), device="cpu"),
                   lm=bundled)
    ids = bundled.tokenizer("The Eiffel Tower is in the city of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = int(bundled.model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
    assert res["top_token"][-1][-1] == bundled.tokenizer.decode([greedy]) == res["target"]
    assert res["kl_to_final_last"][-1] < 1e-5 and res["kl_to_final_last"][0] > 1.0
    d = res["dla"]
    assert abs(d["total"] - d["value"]) < 1e-2 * (1 + abs(d["value"]))
    saved = _strict(tmp_path / "lens" / "lens.json")
    assert saved["target"] == res["target"] and "<script" not in (tmp_path / "lens" / "report.html").read_text()
    if bundled.spec == "smollm2-135m-instruct":
        assert res["target"] == " Paris"  # measured: the model knows it, and the lens shows it only at the top


def test_patching_the_one_changed_token_restores_the_clean_answer(tmp_path: Path) -> None:
    """The prompts differ in one token: patching the embedding stream there (block 0's input) is swapping
    the token back, so it restores the clean metric exactly; patching an unchanged token does nothing."""
    lm = load_model("smollm2-135m-instruct", device="cpu")
    cfg = PatchConfig(clean="When John and Mary left, John gave it to", corrupt="When John and Mary left, Mary gave it to",
                      kinds="hook_resid_pre", out=str(tmp_path / "patch"), device="cpu")
    res = run_patch(cfg, lm=lm, progress=False)
    e = res["kinds"]["hook_resid_pre"]
    clean = lm.tokenizer(cfg.clean)["input_ids"]
    corrupt = lm.tokenizer(cfg.corrupt)["input_ids"]
    (changed,) = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
    norm = torch.tensor(e["normalized"])
    assert abs(float(norm[0, changed]) - 1.0) < 1e-3
    assert float(norm[0, :changed].abs().max()) < 1e-3  # same tokens, and causal attention: no effect
    assert e["clean"] > e["corrupt"]  # the model prefers the indirect object on the clean prompt
    assert -1.0 <= e["attribution_corr"] <= 1.0 and (tmp_path / "patch" / "report.html").is_file()
    h = res["heads"]  # the heads whose patching restores the most hurt the clean answer more than random ones
    assert len(h["top"]) == 3 and h["ablated_top"] < h["ablated_random"]
    attn = torch.tensor(h["top_attention_from_last"])
    assert attn.shape == (3, len(clean)) and torch.allclose(attn.sum(-1), torch.ones(3), atol=1e-4)


def test_tuned_lens_train_then_read_and_neurons_on_smollm2(tmp_path: Path) -> None:
    """The three commands on the bundled model, small: a tuned lens on two rows (trained, evaluated on
    held-out text, reloaded into `featurelens lens --tuned`), and `featurelens neurons` on one neuron."""
    from featurelens.lens.neurons_run import NeuronsConfig, run_neurons
    from featurelens.lens.tuned_run import LensTrainConfig, train_lens

    lm = load_model("smollm2-135m-instruct", device="cpu")
    res = train_lens(LensTrainConfig(layers="10,20", steps=4, tokens_per_step=64, micro_batch=64, eval_tokens=128,
                                     context_length=64, out=str(tmp_path / "tl"), device="cpu"), lm=lm, progress=False)
    ev = res["eval"]
    assert ev["rows"] == ["L10", "L20"]
    # four tiny steps already beat the logit lens on held-out text (the paper's finding, at every row)
    assert all(t < g for t, g in zip(ev["kl_tuned"], ev["kl_logit"])), ev
    shown = run_lens(LensConfig(tuned=str(tmp_path / "tl"), out=str(tmp_path / "lens"), device="cpu"), lm=lm)
    assert shown["tuned"]["rows_trained"] == ["L10", "L20"]
    assert shown["tuned"]["top_token"][-1] == shown["top_token"][-1]  # the last row is the model's own output
    n = run_neurons(NeuronsConfig(top=1, tokens=512, contexts=2, layers="29", out=str(tmp_path / "n"), device="cpu"),
                    lm=lm, progress=False)
    e = n["neurons"][0]
    assert e["layer"] == 29 and len(e["contexts"]) == 2 and len(e["ablated"]) == 3
    assert _strict(tmp_path / "n" / "neurons.json")["neurons"][0]["token"] == e["token"]
