"""Autointerp (issue 16): AUROC against scikit-learn; on a browser with a latent planted on the letter 'q', a
scorer that knows the truth gives that latent's explanation detection and fuzzing 1.0 and the random
explanation 0.5; an interrupted run resumes to the same result without redoing work; explanations reach the
pages and their search; the endpoint client reads an OpenAI-compatible server's logprobs; the local backend
runs a real (tiny) model."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from featurelens.browse.autointerp import EndpointBackend, LocalBackend, auroc, balanced_accuracy
from featurelens.browse.explain_run import ExplainConfig, explain_browser

PLANTED = 7


def test_auroc_equals_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        pos, neg = rng.integers(0, 5, rng.integers(1, 12)) / 4, rng.integers(0, 5, rng.integers(1, 12)) / 4
        y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
        assert auroc(pos, neg) == pytest.approx(roc_auc_score(y, np.r_[pos, neg]))
    assert balanced_accuracy([0.9, 0.2], [0.1, 0.7]) == 0.5
    assert auroc([], [0.1]) != auroc([], [0.1])  # NaN without positives


class Oracle:
    """Explains latent 7 as 'the letter q' and everything else vaguely; scores by looking at the text."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        self.calls += 1
        marks = re.findall(r"<<(.*?)>>", messages[-1]["content"])
        return "the letter q" if marks and all(m == "q" for m in marks) else "something vague"

    def yes_probs(self, prompts: list[str]) -> list[float]:
        self.calls += 1
        out = []
        for p in prompts:
            expl = p.split("\n", 1)[0]
            if "letter q" not in expl:
                out.append(0.3)
            elif "marked" in p:
                marks = re.findall(r"<<(.*?)>>", p.split(":", 2)[2])
                out.append(1.0 if marks and all(m == "q" for m in marks) else 0.0)
            else:
                out.append(1.0 if "q" in p.split("Text: ", 1)[1].split("\nIs this")[0] else 0.0)
        return out


def _planted_browser(tiny_llama: Any, tmp_path: Path) -> Path:
    from featurelens.browse.run import BrowseConfig, browse
    from featurelens.saes import SAEConfig, get_architecture

    site = "blocks.0.hook_resid_pre"
    emb = tiny_llama.model.get_input_embeddings().weight.detach()
    sae = get_architecture("relu")(SAEConfig(architecture="relu", d_in=emb.shape[1], d_sae=40, hook_name=site,
                                             apply_b_dec_to_input=False))
    with torch.no_grad():  # ReLU with negative biases: sparse latents, the planted one on 'q' only
        sae.b_enc.zero_()
        sae.W_enc[:, PLANTED] = 4 * emb[ord("q")] / emb[ord("q")].pow(2).sum()
        sae.b_enc[PLANTED] = -2.0
    path = sae.eval().save(tmp_path / "saes" / "planted")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    (corpus / "a.txt").write_text("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), 6000)))
    res = browse(BrowseConfig(out=str(tmp_path / "b"), corpus=str(corpus), split="all", tokens=4000, context_length=32,
                              device="cpu"), sae_paths=[str(path)], lm=tiny_llama, progress=False)
    return Path(res["dictionaries"][0]["index"]).parent


def test_scores_baseline_resume_and_pages(tiny_llama: Any, tmp_path: Path) -> None:
    folder = _planted_browser(tiny_llama, tmp_path)
    cfg = ExplainConfig(explainer="oracle", latents=12, seed=3)
    live = [r[0] for r in json.loads((folder / "data" / "index.js").read_text()[len('window.featurelens_data("index", '):-3])["rows"]
            if r[1] > 0]
    assert PLANTED in live
    cfg = ExplainConfig(explainer="oracle", latents=len(live), seed=3)  # every live latent, so the planted one too
    full = explain_browser(cfg, folder, backends={"oracle": Oracle()}, progress=False)
    scores = {json.loads(x)["id"]: json.loads(x) for x in (folder / "scores.jsonl").read_text().splitlines()}
    s = scores[PLANTED]
    assert s["detection"] == 1.0 and s["fuzzing"] == 1.0
    assert s["random_detection"] == 0.5 and s["random_fuzzing"] == 0.5  # a vague explanation: constant answers
    assert s["random_from"] != PLANTED
    assert full["n_latents"] == len(live) and full["random_detection"]["mean"] == pytest.approx(
        np.nanmean([v["random_detection"] for v in scores.values()]))  # latents with no quiet window: NaN, dropped
    # resumed: nothing redone, same summary; after a torn line and a lost tail, the same records again
    again = Oracle()
    assert explain_browser(cfg, folder, backends={"oracle": again}, progress=False) == full and again.calls == 0
    lines = (folder / "scores.jsonl").read_text().splitlines()
    (folder / "scores.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    third = Oracle()
    assert explain_browser(cfg, folder, backends={"oracle": third}, progress=False) == full
    assert 0 < third.calls <= 2 * (len(live) - 3)
    # the pages: the explanation in the index (searchable) and on the latent page
    from tests.unit.test_browse import _chromium, _dump, _status

    exe = _chromium()
    dom, console = _dump(exe, (folder / "index.html").as_uri() + "#q=letter")
    assert not console, console
    st = _status(dom)
    assert st["matching"] == "1" and st["first"] == str(PLANTED)
    dom, console = _dump(exe, (folder / "latent.html").as_uri() + f"#id={PLANTED}")
    assert not console and _status(dom)["explanation"] == "the letter q"


def test_endpoint_backend_reads_logprobs() -> None:
    seen: list[dict[str, Any]] = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            return

        def do_POST(self) -> None:  # noqa: N802
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(req)
            text = req["messages"][-1]["content"]
            if req.get("logprobs"):
                lp = [{"token": "Yes", "logprob": float(np.log(0.6))}, {"token": " no", "logprob": float(np.log(0.2))}]
                body = {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"top_logprobs": lp}]}}]}
            else:
                body = {"choices": [{"message": {"content": f"  words   about {len(text)} chars "}}]}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        b = EndpointBackend(f"http://127.0.0.1:{srv.server_address[1]}/v1", model="m")
        assert b.generate([{"role": "user", "content": "abcd"}], 10) == "words about 4 chars"
        assert b.yes_probs(["x", "y"]) == pytest.approx([0.75, 0.75])
        assert seen[0]["model"] == "m" and seen[0]["temperature"] == 0 and seen[1]["max_tokens"] == 1
    finally:
        srv.shutdown()
        srv.server_close()
    from featurelens.errors import FeatureLensError

    with pytest.raises(FeatureLensError, match="is the server running"):
        EndpointBackend("http://127.0.0.1:9/v1", timeout=2).generate([{"role": "user", "content": "x"}], 5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary and absolute positions
def test_local_backend_on_a_real_model(family: str) -> None:
    from featurelens.models.loading import LoadedModel
    from featurelens.testing import CharTokenizer, tiny_model

    lm = LoadedModel(model=tiny_model(family), tokenizer=CharTokenizer(), spec=f"tiny-{family}", name=f"tiny-{family}")
    b = LocalBackend(lm, batch_size=2)
    qs = ["Feature: y\nText: a much longer text here\nIs it?", "Feature: x\nText: abc\nIs it?",
          "Feature: z\nText: medium text\nIs it?", "Feature: w\nText: the longest text of all of these, by far\nIs it?",
          "Feature: v\nText: ab\nIs it?"]
    p = b.yes_probs(qs)  # sorted by length into batches of 2, left-padded, answers back in the prompts' order
    assert len(p) == len(qs) and all(0.0 <= v <= 1.0 for v in p)
    one = [b.yes_probs([q])[0] for q in qs]
    assert p == pytest.approx(one, abs=1e-5)
    assert len(set(np.round(one, 6))) == len(qs)  # distinct answers, so a permutation would show
    # and equal the full model's next-token distribution on the unpadded prompt
    ids = torch.tensor([b._ids([{"role": "user", "content": qs[3]}])])
    pr = torch.softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
    y, n = pr[b.yes].sum(), pr[b.no].sum()
    assert p[3] == pytest.approx(float(y / (y + n)), abs=1e-5)
    assert isinstance(b.generate([{"role": "user", "content": "hello"}], 5), str)
