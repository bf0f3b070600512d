"""The feature browser (issue 16): per-latent summaries against brute force, the sparse collection against a
dense encode, and the static site in headless Chromium (index, sort, search, latent page, no console
messages, a screenshot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featurelens.browse.collect import SparseActivations, collect, summarize
from featurelens.errors import UsageError
from tests.helpers.chromium import chromium as _chromium


def _random_acts(seed: int = 0, n_ctx: int = 30, T: int = 8, L: int = 12) -> tuple[SparseActivations, np.ndarray]:
    rng = np.random.default_rng(seed)
    dense = rng.random((n_ctx * T, L)) * (rng.random((n_ctx * T, L)) < 0.3) * rng.integers(1, 5, L)
    dense[:, 11] = 0  # a dead latent
    row, lat = np.nonzero(dense)
    acts = SparseActivations(rng.integers(0, 50, (n_ctx, T)).astype(np.int32), row.astype(np.int32),
                             lat.astype(np.int32), dense[row, lat].astype(np.float32), L, n_ctx * T)
    return acts, dense.astype(np.float32)


def test_summaries_equal_brute_force() -> None:
    acts, dense = _random_acts()
    t = summarize(acts, n_top=5, n_quantiles=4, per_quantile=3, n_hist=6, n_cooc=3, cooc_tokens=10_000)
    on = dense > 0
    np.testing.assert_array_equal(t.fires, on.sum(0))
    np.testing.assert_allclose(t.max_act, dense.max(0))
    np.testing.assert_allclose(t.mean_act, np.where(on.any(0), dense.sum(0) / np.maximum(on.sum(0), 1), 0), rtol=1e-5)
    for j in range(12):
        col = dense[:, j]
        want = np.sort(col[col > 0])[::-1][:5]
        got = t.top_value[j][t.top_flat[j] >= 0]
        np.testing.assert_allclose(got, want)
        assert np.allclose(col[t.top_flat[j][t.top_flat[j] >= 0]], got)  # the positions hold those values
        if not on[:, j].any():
            assert (t.top_flat[j] == -1).all() and t.hist[j].sum() == 0 and (t.cooc[j] == -1).all()
            continue
        m = col.max()
        for q in range(4):
            lo, hi = q / 4 * m, (q + 1) / 4 * m
            n_in = int(((col > lo) & (col <= hi)).sum())
            got_f = t.quant_flat[j, q][t.quant_flat[j, q] >= 0]
            assert got_f.size == min(3, n_in)
            assert ((col[got_f] > lo - 1e-6) & (col[got_f] <= hi + 1e-6)).all()
        edges = np.linspace(0, m, 7)
        want_h = [int(((col > a) & (col <= b)).sum()) for a, b in zip(edges[:-1], edges[1:])]
        assert t.hist[j].tolist() == want_h
        both = (on[:, j:j + 1] & on).sum(0).astype(float) / on[:, j].sum()
        both[j] = -1
        best = np.sort(both)[::-1][:3]
        np.testing.assert_allclose(t.cooc_p[j], best, rtol=1e-6)
        np.testing.assert_allclose(both[t.cooc[j]], best, rtol=1e-6)


def test_collect_keeps_every_nonzero_activation(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    from featurelens.models.hooks import ActivationCapture
    from featurelens.saes import SAEConfig, get_architecture

    site = "blocks.1.hook_resid_post"
    d = tiny_llama.model.config.hidden_size
    sae = get_architecture("topk")(SAEConfig(architecture="topk", d_in=d, d_sae=40, k=4, hook_name=site)).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, (5, 12)).astype(np.int32)
    keep = np.ones_like(tokens, bool)
    keep[:, 0] = False
    acts = collect(tiny_llama.model, sae.encode, site, tokens, keep, 40, batch_size=2, progress=False)
    with torch.no_grad(), ActivationCapture(tiny_llama.model, [site]) as cap:
        f = sae.encode(cap.forward(torch.as_tensor(tokens, dtype=torch.long))[site]).reshape(-1, 40).numpy()
    f[~keep.reshape(-1)] = 0
    dense = np.zeros_like(f)
    dense[acts.flat, acts.latent] = acts.value
    np.testing.assert_allclose(dense, f, rtol=1e-5, atol=1e-6)
    assert acts.n_tokens == 55 and (acts.value > 0).all()
    huge = np.broadcast_to(np.int32(0), (2**16, 2**15 + 1))  # 2^31+ positions, as a view: no memory
    with pytest.raises(UsageError, match="int32"):
        collect(tiny_llama.model, sae.encode, site, huge, np.zeros((1, 1), bool), 40)


def _dump(exe: str, url: str, shot: str | None = None) -> tuple[str, list[str]]:
    import subprocess

    extra = [f"--screenshot={shot}", "--window-size=1200,900"] if shot else ["--dump-dom"]
    run = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          "--virtual-time-budget=5000", *extra, url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, [ln for ln in run.stderr.splitlines() if ":CONSOLE" in ln]


def _status(dom: str) -> dict[str, str]:
    import re

    m = re.search(r'<span id="status"([^>]*)>', dom)
    assert m is not None
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(1)))


def test_browser_pages_in_chromium(tiny_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A planted latent (its encoder the embedding of 'q') is found by searching 'q', its page shows contexts
    peaking on 'q'; the index lists every latent and sorts; no console message; a screenshot is written."""
    import json
    import re

    from featurelens.browse.run import BrowseConfig, browse
    from featurelens.saes import SAEConfig, get_architecture

    exe = _chromium()
    site, L, planted = "blocks.0.hook_resid_pre", 150, 7
    emb = tiny_llama.model.get_input_embeddings().weight.detach()
    d = emb.shape[1]
    sae = get_architecture("topk")(SAEConfig(architecture="topk", d_in=d, d_sae=L, k=3, hook_name=site,
                                             apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.mul_(0.05)
        q_id = ord("q")
        sae.W_enc[:, planted] = 4 * emb[q_id] / emb[q_id].pow(2).sum()
    path = sae.eval().save(tmp_path / "saes" / "planted")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    (corpus / "a.txt").write_text("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz <>&\""), 6000)))
    res = browse(BrowseConfig(out=str(tmp_path / "b"), corpus=str(corpus), split="all", tokens=4000, context_length=32,
                              device="cpu"), sae_paths=[str(path)], lm=tiny_llama, progress=False)
    page = Path(res["dictionaries"][0]["index"])
    rows = json.loads(re.sub(r"^window\.featurelens_data\(\"index\", |\);\s*$", "", (page.parent / "data" / "index.js").read_text()))["rows"]
    assert len(rows) == L
    # the index: every latent counted, 100 shown, sorted by max activation, descending
    dom, console = _dump(exe, page.as_uri() + "#sort=max&desc=1")
    assert not console, console
    st = _status(dom)
    assert st["total"] == str(L) and st["matching"] == str(L) and st["shown"] == "100" and st["sort"] == "max:desc"
    assert st["first"] == str(max(rows, key=lambda r: r[2])[0])
    assert len(re.findall(r'<tr class="row"', dom)) == 100
    dom, console = _dump(exe, page.as_uri() + "#sort=density&desc=0")
    assert _status(dom)["first"] == str(min(rows, key=lambda r: r[1])[0]) and not console
    # search: the planted latent fires most on 'q'
    dom, console = _dump(exe, page.as_uri() + "#q=q")
    assert not console, console
    assert _status(dom)["hits"].split(",")[0] == str(planted)
    # its page: contexts whose peak token is 'q', every token's activation on hover, the decoder's tokens
    dom, console = _dump(exe, (page.parent / "latent.html").as_uri() + f"#id={planted}")
    assert not console, console
    st = _status(dom)
    assert st["id"] == str(planted) and int(st["top"]) == 20
    peaks = re.findall(r'<span class="t peak"[^>]*>([^<]*)</span>', dom)
    assert len(peaks) >= 20 and all(p == "q" for p in peaks[:20])
    assert "&amp;" in dom or "&lt;" in dom  # the corpus' < > & came through as text
    shot = tmp_path / "latent.png"
    _dump(exe, (page.parent / "latent.html").as_uri() + f"#id={planted}", shot=str(shot))
    assert shot.stat().st_size > 5000


def test_prompt_view_over_the_local_server(tiny_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``/api/prompt`` answers the latents an independent encode gives; the prompt page shows them through the
    server; files outside the folder are not served; bad requests are 400s with a message."""
    import json
    import threading
    import urllib.error
    import urllib.request

    from featurelens.browse.run import BrowseConfig, browse
    from featurelens.browse.serve import PromptView, make_server
    from featurelens.models.hooks import ActivationCapture
    from featurelens.saes import SAEConfig, get_architecture

    exe = _chromium()
    site = "blocks.1.hook_resid_post"
    d = tiny_llama.model.config.hidden_size
    sae = get_architecture("topk")(SAEConfig(architecture="topk", d_in=d, d_sae=30, k=3, hook_name=site)).eval()
    path = sae.save(tmp_path / "s" / "sae")
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the cat sat on the mat. " * 80)
    res = browse(BrowseConfig(out=str(tmp_path / "b"), corpus=str(corpus), split="all", tokens=1000, context_length=32,
                              device="cpu"), sae_paths=[str(path)], lm=tiny_llama, progress=False)
    name = res["dictionaries"][0]["name"]
    (tmp_path / "secret.txt").write_text("no")
    server = make_server(tmp_path / "b", PromptView(tiny_llama, {name: sae}, top=2), 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{port}"
        req = urllib.request.Request(base + "/api/prompt", json.dumps({"text": "the cat", "dictionary": name}).encode(),
                                     {"Content-Type": "application/json"})
        got = json.loads(urllib.request.urlopen(req, timeout=30).read())
        ids = tiny_llama.tokenizer("the cat", add_special_tokens=True)["input_ids"]
        with torch.no_grad(), ActivationCapture(tiny_llama.model, [site]) as cap:
            a = sae.encode(cap.forward(torch.tensor([ids]))[site][0])
        assert len(got["tokens"]) == len(ids)
        for row, col in zip(got["tokens"], a):
            v, i = col.topk(2)
            assert [j for j, _ in row["latents"]] == [int(j) for x, j in zip(v, i) if x > 0]
        for bad, code in [({"text": "", "dictionary": name}, 400), ({"text": "x", "dictionary": "nope"}, 400)]:
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(base + "/api/prompt", json.dumps(bad).encode()), timeout=30)
            assert e.value.code == code and "error" in json.loads(e.value.read())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/../secret.txt", timeout=30)
        assert e.value.code == 404
        dom, console = _dump(exe, f"{base}/{name}/prompt.html#text=the%20cat")
        assert not console, console
        st = _status(dom)
        assert st["tokens"] == str(len(ids))
        assert st["first"].split(",") == [str(r["latents"][0][0]) if r["latents"] else "" for r in got["tokens"]]
    finally:
        server.shutdown()
        server.server_close()


def test_directions_are_browsed_by_their_projection(tiny_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A direction along the embedding of 'q' (read at the embeddings) peaks on 'q'; a second, random one does
    not; labels become the explanations; a bad file is a one-line error."""
    from safetensors.torch import save_file

    from featurelens.browse.run import BrowseConfig, browse
    from featurelens.browse.site import read_data

    emb = tiny_llama.model.get_input_embeddings().weight.detach()
    save_file({"probe": torch.stack([emb[ord("q")], torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))])},
              str(tmp_path / "dirs.safetensors"))
    corpus = tmp_path / "c"
    corpus.mkdir()
    rng = np.random.default_rng(2)
    (corpus / "a.txt").write_text("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), 3000)))
    res = browse(BrowseConfig(out=str(tmp_path / "b"), corpus=str(corpus), split="all", tokens=2000, context_length=32,
                              device="cpu", directions=str(tmp_path / "dirs.safetensors"),
                              directions_site="blocks.0.hook_resid_pre"), sae_paths=[], lm=tiny_llama, progress=False)
    (d,) = res["dictionaries"]
    folder = Path(d["index"]).parent
    shard = read_data(folder, "l0")
    assert [c["t"][c["p"]] for c in shard[0]["top"]] == ["q"] * 20
    assert read_data(folder, "index")["rows"][1][6] == "probe:1"
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(Exception, match="not a readable safetensors"):
        browse(BrowseConfig(out=str(tmp_path / "b2"), directions=str(tmp_path / "bad.safetensors"),
                            directions_site="blocks.0.hook_resid_pre"), sae_paths=[], lm=tiny_llama, progress=False)
    with pytest.raises(UsageError, match="go together"):
        BrowseConfig(directions="x.safetensors")
