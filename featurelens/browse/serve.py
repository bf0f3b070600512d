"""``featurelens serve runs/browse``: the browser folder over a local HTTP server (127.0.0.1 only), plus the
prompt view: ``POST /api/prompt {"text": ..., "dictionary": name}`` runs the model and answers, for every
token, the latents that fire on it most. Static files are served from the folder and nothing else (paths are
resolved and must stay inside it)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from featurelens.configs import check_device, check_ranges
from featurelens.errors import UsageError

MAX_TEXT = 4000
"""Longest prompt accepted (characters)."""


@dataclass
class ServeConfig:
    """Serve a feature browser folder with the prompt view (the model runs behind a local HTTP server)."""

    model: str = ""
    """Model spec; empty: the one the browser was built with."""
    port: int = 8765
    """Port on 127.0.0.1 (0: any free port)."""
    top: int = 5
    """Latents listed per token."""
    device: str = "auto"
    """cpu, cuda or auto."""

    def __post_init__(self) -> None:
        check_ranges(self, positive=("top",), non_negative=("port",))
        check_device(self.device)


class PromptView:
    """The model and dictionaries behind ``/api/prompt``."""

    def __init__(self, lm: Any, saes: dict[str, Any], top: int = 5) -> None:
        self.lm, self.saes, self.top = lm, saes, top

    @torch.no_grad()
    def answer(self, text: str, dictionary: str) -> dict[str, Any]:
        from featurelens.models.hooks import ActivationCapture

        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            raise UsageError(f"give a non-empty text of at most {MAX_TEXT} characters")
        sae = self.saes.get(dictionary)
        if sae is None:
            raise UsageError(f"no dictionary {dictionary!r}: this browser has {sorted(self.saes)}")
        tok = self.lm.tokenizer
        ids = list(tok(text, add_special_tokens=True)["input_ids"])
        x = torch.tensor([ids], device=self.lm.device)
        site = sae.cfg.hook_name
        with ActivationCapture(self.lm.model, [site]) as cap:
            a = sae.encode(cap.forward(x)[site][0].to(sae.W_dec.dtype)).float()
        v, i = a.topk(min(self.top, a.shape[-1]), dim=-1)
        rows = []
        for t, vals, idx in zip(ids, v.tolist(), i.tolist()):
            rows.append({"token": tok.decode([t]), "latents": [[j, round(x, 4)] for x, j in zip(vals, idx) if x > 0]})
        return {"dictionary": dictionary, "tokens": rows}


def _handler(root: Path, view: PromptView) -> type[BaseHTTPRequestHandler]:
    root = root.resolve()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per request is noise here
            return

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the http.server interface
            rel = self.path.split("?", 1)[0].split("#", 1)[0].lstrip("/") or "index.html"
            p = (root / rel).resolve()
            if root not in p.parents or not p.is_file():  # nothing outside the folder, no listings
                self._send(404, b"not found", "text/plain")
                return
            ctype = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                     ".json": "application/json", ".png": "image/png"}.get(p.suffix, "application/octet-stream")
            self._send(200, p.read_bytes(), ctype)

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/api/prompt":
                self._send(404, b"not found", "text/plain")
                return
            try:
                n = min(int(self.headers.get("Content-Length", "0")), 4 * MAX_TEXT + 1000)
                req = json.loads(self.rfile.read(n) or b"{}")
                out = view.answer(req.get("text", ""), req.get("dictionary", ""))
                self._send(200, json.dumps(out).encode(), "application/json")
            except (UsageError, ValueError, AttributeError) as e:
                self._send(400, json.dumps({"error": str(e)}).encode(), "application/json")

    return Handler


def make_server(root: Path, view: PromptView, port: int = 0) -> ThreadingHTTPServer:
    return ThreadingHTTPServer(("127.0.0.1", port), _handler(root, view))


def serve(cfg: ServeConfig, folder: str, lm: Any = None) -> None:
    """Load the model and the browser's dictionaries and serve until interrupted."""
    from featurelens.jsonio import read_json
    from featurelens.models.loading import load_model
    from featurelens.saes import load_sae

    root = Path(folder)
    summary = root / "summary.json"
    if not summary.is_file():
        raise UsageError(f"{root} is not a feature browser (no summary.json): build one with featurelens browse")
    info = read_json(summary, "rebuild it with featurelens browse")
    lm = lm or load_model(cfg.model or str(info.get("model", "")), device=cfg.device)
    from featurelens.browse.directions import load_directions

    saes = {d["name"]: (load_sae(d["sae_path"]) if d.get("sae_path") else load_directions(d["directions"], d["site"]))
            .to(lm.device).eval() for d in info["dictionaries"]}
    server = make_server(root, PromptView(lm, saes, cfg.top), cfg.port)
    port = server.server_address[1]
    print(f"serving {root} at http://127.0.0.1:{port}/ (prompt view: <dictionary>/prompt.html); Ctrl-C stops",
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
