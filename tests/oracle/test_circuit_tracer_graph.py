"""Oracle: our attribution graph equals circuit-tracer's (0.5, nnsight backend, ``.ct-venv``) on the same model,
prompt and transcoders: same active features, same logit targets and probabilities, adjacency to 1e-4
relative, the same pruning masks and scores. A tiny random Llama saved as a local folder (with a word-level
tokenizer) stands in for a hub model. Run with ``.ct-venv/bin/python -m pytest tests/oracle/test_circuit_tracer_graph.py``;
skipped where circuit-tracer is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from featurelens.saes.base import SAE
from featurelens.saes.circuit_tracer import save_circuit_tracer
from featurelens.testing import random_transcoders, tiny_model

pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (see benchmarks/setup_peers.sh)")


def _folder(tmp: Path) -> tuple[Path, torch.nn.Module]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama")
    out = tmp / "tiny-llama"
    model.save_pretrained(out)
    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0",
                            unk_token="t0").save_pretrained(out)
    return out, model


def _transcoders(arch: str, skip: bool) -> list[SAE]:
    return random_transcoders(arch, 3, 64, 48, skip=skip, scale=0.15, seed=20, k=6)


def _both(folder: Path, model: torch.nn.Module, ours_tc: Any, theirs_tc: Any) -> tuple[Any, Any]:
    """circuit-tracer's graph and ours of one prompt, after checking they agree on the features, their
    activations, the logit targets and probabilities, and the adjacency (to 1e-4 of its largest entry)."""
    from circuit_tracer import ReplacementModel
    from circuit_tracer import attribute as ct_attribute

    from featurelens.circuits.graph import attribute

    rm = ReplacementModel.from_pretrained_and_transcoders(str(folder), theirs_tc, backend="nnsight", device="cpu",
                                                          dtype=torch.float32)
    ids = torch.tensor([1, 17, 40, 99, 5, 63, 17, 40, 88, 12, 77])
    theirs = ct_attribute(ids, rm, max_n_logits=10, desired_logit_prob=0.95, batch_size=16)
    ours = attribute(model, ours_tc, ids, batch_size=16, progress=False)
    assert torch.equal(ours.active_features, theirs.active_features.cpu())
    assert ours.n_features > 50  # enough features for the comparison to mean something
    torch.testing.assert_close(ours.activations, theirs.activation_values.cpu(), rtol=1e-4, atol=1e-5)
    assert ours.logit_tokens.tolist() == [t.vocab_idx for t in theirs.logit_targets]
    torch.testing.assert_close(ours.logit_probs, theirs.logit_probabilities.cpu(), rtol=1e-4, atol=1e-6)
    a, b = ours.adjacency, theirs.adjacency_matrix.cpu()
    assert a.shape == b.shape
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= 1e-4 * scale, float((a - b).abs().max()) / scale
    assert float(b.abs().sum()) > 0 and float((b != 0).float().mean()) > 0.05
    return ours, theirs


@pytest.mark.parametrize(("arch", "skip"), [("relu", True), ("jumprelu", False)])
def test_graph_equals_circuit_tracer(arch: str, skip: bool, tmp_path: Path) -> None:
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    from featurelens.circuits.prune import graph_scores, prune

    folder, model = _folder(tmp_path)
    ours_tc = _transcoders(arch, skip)
    path = save_circuit_tracer(ours_tc, tmp_path / "set")
    import yaml

    cfg = yaml.safe_load((path / "config.yaml").read_text())  # the hook names we write are ones it maps
    theirs_tc = load_transcoder_set({i: str(path / f"layer_{i}.safetensors") for i in range(3)}, scan="x",
                                    feature_input_hook=cfg["feature_input_hook"],
                                    feature_output_hook=cfg["feature_output_hook"],
                                    device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
    ours, theirs = _both(folder, model, ours_tc, theirs_tc)

    p_ours = prune(ours, 0.8, 0.98)
    p_theirs = prune_graph(theirs, 0.8, 0.98)
    assert torch.equal(p_ours.node_mask, p_theirs.node_mask.cpu())
    assert torch.equal(p_ours.edge_mask, p_theirs.edge_mask.cpu())
    rs, cs = graph_scores(ours)
    rs_t, cs_t = compute_graph_scores(theirs)
    assert abs(rs - rs_t) < 1e-4 and abs(cs - cs_t) < 1e-4
    assert 0.0 < rs < 1.0 and 0.0 < cs < 1.0


def test_clt_graph_equals_circuit_tracer(tmp_path: Path) -> None:
    """A cross-layer transcoder written in circuit-tracer's CLT layout, loaded there with its own ``load_clt``:
    the same features, logits, adjacency (every feature writes to every later layer) and scores."""
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    from featurelens.circuits.prune import graph_scores
    from featurelens.saes.circuit_tracer import save_circuit_tracer_clt
    from featurelens.testing import random_clt

    folder, model = _folder(tmp_path)
    ours_tc = random_clt(3, 64, 48, skip=False, scale=0.15, seed=21, threshold=0.15)
    path = save_circuit_tracer_clt(ours_tc, tmp_path / "clt")
    import yaml

    cfg = yaml.safe_load((path / "config.yaml").read_text())
    theirs_tc = load_clt(str(path), feature_input_hook=cfg["feature_input_hook"],
                         feature_output_hook=cfg["feature_output_hook"], scan="x", device=torch.device("cpu"),
                         dtype=torch.float32, lazy_decoder=False)
    ours, theirs = _both(folder, model, ours_tc, theirs_tc)
    rs, cs = graph_scores(ours)
    rs_t, cs_t = compute_graph_scores(theirs)
    assert abs(rs - rs_t) < 1e-4 and abs(cs - cs_t) < 1e-4
