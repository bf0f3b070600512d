"""The feature browser on the bundled SmolLM2-135M-Instruct and the bundled corpus, in headless Chromium: a
latent planted on the token " the" (its encoder row that token's embedding, at the embedding output) is the
first hit when searching "the", its page's peak tokens are " the" decoded by the real BPE tokenizer, and the
prompt view over the local server reports it on exactly the prompt's " the" tokens."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

from featurelens.browse.run import BrowseConfig, browse
from featurelens.browse.serve import PromptView, make_server
from featurelens.models.loading import load_model
from featurelens.saes import SAEConfig, get_architecture
from tests.helpers.chromium import chromium
from tests.unit.test_browse import _dump, _status

pytestmark = pytest.mark.integration

PLANTED = 11


def test_browser_on_the_bundled_model(tmp_path: Path) -> None:
    exe = chromium()
    lm = load_model("smollm2-135m-instruct", device="cpu")
    tok = lm.tokenizer
    (the,) = tok(" the", add_special_tokens=False)["input_ids"]
    site = "blocks.0.hook_resid_pre"
    emb = lm.model.get_input_embeddings().weight.detach()
    sae = get_architecture("topk")(SAEConfig(architecture="topk", d_in=emb.shape[1], d_sae=64, k=4, hook_name=site,
                                             apply_b_dec_to_input=False))
    with torch.no_grad():  # random latents at small scale; the planted one reads " the" (activation 1 there)
        sae.W_enc.mul_(0.01)
        sae.W_enc[:, PLANTED] = 4 * emb[the] / emb[the].pow(2).sum()
        sae.b_enc[PLANTED] = -3.0  # tokens projecting under 3/4 of " the" on its embedding stay at 0
    path = sae.eval().save(tmp_path / "saes" / "planted")
    res = browse(BrowseConfig(out=str(tmp_path / "b"), tokens=3000, context_length=64, device="cpu"),
                 sae_paths=[str(path)], lm=lm, progress=False)
    d = res["dictionaries"][0]
    page = Path(d["index"])
    assert d["n_latents"] == 64 and d["n_tokens"] >= 2900
    dom, console = _dump(exe, page.as_uri() + "#q=the")
    assert not console, console
    assert _status(dom)["hits"].split(",")[0] == str(PLANTED)
    dom, console = _dump(exe, (page.parent / "latent.html").as_uri() + f"#id={PLANTED}")
    assert not console, console
    peaks = re.findall(r'<span class="t peak"[^>]*>([^<]*)</span>', dom)
    assert len(peaks) >= 10 and all(p == " the" for p in peaks[:10]), peaks[:10]
    assert _status(dom)["id"] == str(PLANTED)
    shot = tmp_path / "latent.png"
    _dump(exe, (page.parent / "latent.html").as_uri() + f"#id={PLANTED}", shot=str(shot))
    assert shot.stat().st_size > 5000
    # the prompt view: the planted latent on the " the" tokens, and only there
    server = make_server(tmp_path / "b", PromptView(lm, {d["name"]: sae}, top=4), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        text = "I saw the cat and the dog near a tree."
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/api/prompt",
                                     json.dumps({"text": text, "dictionary": d["name"]}).encode(),
                                     {"Content-Type": "application/json"})
        got = json.loads(urllib.request.urlopen(req, timeout=60).read())
    finally:
        server.shutdown()
        server.server_close()
    ids = tok(text, add_special_tokens=True)["input_ids"]
    on = [i for i, row in enumerate(got["tokens"]) if PLANTED in [j for j, _ in row["latents"]]]
    assert on == [i for i, t in enumerate(ids) if t == the] and len(on) == 2
