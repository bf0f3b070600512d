"""The graph viewer in a real browser (Debian's headless ``chromium``, installed by ``.ci/run``): opened from
the file system, it draws every node and the strongest links of a known graph, applies the URL state
(clicked node, pinned nodes), fills the detail panel, and logs no console error. Skipped where chromium
is missing, except under CI, where that is a failure."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import torch

from featurelens.circuits.export import graph_json
from featurelens.circuits.graph import AttributionGraph
from featurelens.circuits.prune import prune
from featurelens.circuits.viewer import write_viewer
from tests.helpers.chromium import chromium as _chromium


def _graph() -> AttributionGraph:
    """Two layers, three positions, a feature at every (layer, position >= 1), weights that keep most nodes."""
    feats = torch.tensor([[la, p, 10 * la + p] for la in range(2) for p in (1, 2)])
    nf, n_layers, n_pos = len(feats), 2, 3
    n = nf + n_layers * n_pos + n_pos + 2
    a = torch.zeros(n, n)
    tok0 = nf + n_layers * n_pos
    g = torch.Generator().manual_seed(0)
    for i, (la, p, _) in enumerate(feats.tolist()):
        for q in range(p + 1):
            a[i, tok0 + q] = float(torch.rand(1, generator=g)) + 0.5
        if la == 1:
            a[i, :2] = torch.tensor([0.7, -0.4])
        a[i, nf + la * n_pos + p] = 0.05
    for j in range(2):
        a[n - 2 + j, :nf] = torch.tensor([0.3, 1.0, -0.6, 2.0]) * (1 - 0.5 * j)
        a[n - 2 + j, nf + n_pos + 2] = 0.2
    return AttributionGraph(torch.tensor([1, 33, 44]), feats, torch.tensor([1.0, 2.0, 0.5, 3.0]),
                            torch.tensor([70, 71]), torch.tensor([0.6, 0.3]), a, n_layers)


def test_viewer_renders_a_known_graph_in_chromium(tmp_path: Path) -> None:
    exe = _chromium()
    g = _graph()
    p = prune(g, node_threshold=1.0, edge_threshold=1.0)
    names = {1: "<bos>", 33: "a</script>", 44: "b&c", 70: "x", 71: "y"}
    data = graph_json(g, p, lambda t: names.get(t, "?"), slug="t", scan="tiny", transcoder_list=[],
                      node_threshold=1.0, extra={"details": {"1_12_2": {"promotes": ["up"], "suppresses": ["down"],
                                                                         "contexts": []}},
                                                 "scores": {"replacement": 0.5, "completeness": 0.9},
                                                 "heads": {"E_33_1->1_12_2": [[0, 1, 0.75], [1, 3, -0.1]]}})
    page = write_viewer(tmp_path / "index.html", data, "test graph <i>")
    clicked, pins = "1_12_2", ["0_1_1", "1_11_1"]
    url = page.absolute().as_uri() + f"#clickedId={clicked}&pinnedIds={','.join(pins)}"
    run = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    dom = run.stdout
    assert run.returncode == 0, run.stderr[-2000:]
    console = [ln for ln in run.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console
    node_ids = re.findall(r'class="node[^"]*" data-id="([^"]+)"', dom)
    assert sorted(node_ids) == sorted(n["node_id"] for n in data["nodes"])
    assert len(re.findall(r'class="link"', dom)) == len(data["links"]) > 10
    status = re.search(r'<span id="status"([^>]*)>', dom)
    assert status is not None
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', status.group(1)))
    assert attrs["nodes"] == str(len(data["nodes"])) and attrs["links"] == str(len(data["links"]))
    assert attrs["clicked"] == clicked and attrs["pinned"] == "2"
    assert re.search(rf'class="node[^"]*clicked[^"]*" data-id="{clicked}"', dom)
    for pid in pins:
        assert re.search(rf'class="node[^"]*pinned[^"]*" data-id="{pid}"', dom)
    assert "promotes: \"up\"" in dom and "strongest inputs" in dom
    assert "via L0.H1 0.75, L1.H3 -0.10" in dom  # the heads carrying the clicked node's input edge
    assert "a&lt;/script&gt;" in dom  # the token text stayed text (drawn as an axis label)
    assert "<i>" not in dom.split("<body>")[1].split("</h1>")[0]   # the title was escaped
    # one row per layer between the embeddings and the logits: no empty row for the logits' id layer (2 + 1)
    assert re.findall(r'<text x="4"[^>]*class="lbl"[^>]*>([^<]*)</text>', dom) == ["emb", "L0", "L1", "logit"]
