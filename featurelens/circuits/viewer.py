"""A self-contained HTML viewer for one attribution graph: no server, no CDN, no library (plain SVG and a
few hundred lines of our own JavaScript, inlined). Opens from the file system.

Layout: one column per prompt position, one row per layer (token embeddings at the bottom, logits on
top); features are circles, errors squares. Edge width follows |weight|, colour its sign; hovering an edge
or node shows its numbers. Clicking a node shows its details (activation, influence, strongest inputs and
outputs with the attention heads that carry them between positions, the tokens its decoder promotes and suppresses, its top activating contexts with every token
shaded by activation). Nodes can be pinned and pinned nodes grouped into named supernodes; the state
(circuit-tracer's ``qParams``: ``pinnedIds``, ``supernodes``, ``clickedId``) can be downloaded, and is read
from the URL hash on load (``#clickedId=ID&pinnedIds=A,B``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from featurelens.atomic import atomic_write_bytes

_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:0;color:#1a202c;background:#fff}
header{padding:8px 14px;border-bottom:1px solid #e2e8f0}
header h1{font-size:16px;margin:0 0 2px}
.small{color:#4a5568;font-size:12px}
#wrap{display:flex;align-items:flex-start}
#canvas{flex:1;overflow:auto;max-height:calc(100vh - 70px)}
#side{width:360px;border-left:1px solid #e2e8f0;padding:8px 12px;overflow:auto;max-height:calc(100vh - 70px)}
.link{stroke-opacity:.35;fill:none}
.link:hover{stroke-opacity:.9}
.node{cursor:pointer;stroke:#1a202c;stroke-width:.6}
.node.pinned{stroke:#d69e2e;stroke-width:3}
.node.clicked{stroke:#000;stroke-width:2.5}
.lbl{font-size:11px;fill:#2d3748}
.tok{font-family:ui-monospace,monospace;white-space:pre;background:#edf2f7;border-radius:3px;padding:0 2px}
#tip{position:fixed;pointer-events:none;background:#1a202cdd;color:#fff;padding:3px 6px;border-radius:3px;
font-size:12px;display:none}
button{font-size:12px;margin:2px 4px 2px 0}
table{border-collapse:collapse;font-size:12px}td{padding:1px 6px 1px 0;vertical-align:top}
.ctx span{font-family:ui-monospace,monospace;white-space:pre}
"""

_JS = r"""
(function(){
const G = JSON.parse(document.getElementById('graph-data').textContent);
const NS = 'http://www.w3.org/2000/svg';
const meta = G.metadata, extra = G.featurelens || {}, details = extra.details || {}, heads = extra.heads || {};
const q = Object.assign({pinnedIds: [], supernodes: [], clickedId: ''}, G.qParams || {});
const hash = new URLSearchParams(location.hash.slice(1));
if (hash.get('clickedId')) q.clickedId = hash.get('clickedId');
if (hash.get('pinnedIds')) q.pinnedIds = hash.get('pinnedIds').split(',').filter(Boolean);
const pinned = new Set(q.pinnedIds);
const byId = {}; G.nodes.forEach(n => byId[n.node_id] = n);
// logits sit at layer n_layers + 1 in the ids: their row comes right after the last layer's
const isLogit = n => n.feature_type === 'logit';
const nLayers = Math.max(0, ...G.nodes.filter(isLogit).map(n => +n.layer - 1),
  ...G.nodes.filter(n => n.layer !== 'E' && !isLogit(n)).map(n => +n.layer + 1));
const nPos = meta.prompt_tokens.length;
const rowOf = n => n.layer === 'E' ? 0 : (isLogit(n) ? nLayers + 1 : +n.layer + 1);
const colW = Math.max(70, Math.min(140, 1100 / Math.max(1, nPos))), rowH = Math.max(18, Math.min(40, 760 / (nLayers + 2)));
const W = 60 + colW * nPos, H = 40 + rowH * (nLayers + 2);
const cells = {};
G.nodes.forEach(n => { const k = rowOf(n) + ':' + n.ctx_idx; (cells[k] = cells[k] || []).push(n); });
Object.values(cells).forEach(list => {
  list.sort((a, b) => (a.influence ?? 1) - (b.influence ?? 1));
  list.forEach((n, i) => {
    const spread = Math.min(colW - 14, 9 * (list.length - 1));
    n._x = 50 + colW * n.ctx_idx + colW / 2 + (list.length > 1 ? -spread / 2 + spread * i / (list.length - 1) : 0);
    n._y = H - 25 - rowH * rowOf(n);
  });
});
const svg = document.createElementNS(NS, 'svg');
svg.setAttribute('width', W); svg.setAttribute('height', H); svg.setAttribute('id', 'graph');
const tip = document.getElementById('tip');
function showTip(ev, text){ tip.textContent = text; tip.style.display = 'block';
  tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px'; }
function hideTip(){ tip.style.display = 'none'; }
for (let r = 0; r < nLayers + 2; r++) {
  const t = document.createElementNS(NS, 'text'); t.setAttribute('x', 4); t.setAttribute('y', H - 21 - rowH * r);
  t.setAttribute('class', 'lbl'); t.textContent = r === 0 ? 'emb' : (r === nLayers + 1 ? 'logit' : 'L' + (r - 1));
  svg.appendChild(t);
}
meta.prompt_tokens.forEach((tok, p) => {
  const t = document.createElementNS(NS, 'text'); t.setAttribute('x', 50 + colW * p + colW / 2); t.setAttribute('y', H - 4);
  t.setAttribute('text-anchor', 'middle'); t.setAttribute('class', 'lbl'); t.textContent = JSON.stringify(tok).slice(1, -1);
  svg.appendChild(t);
});
const sorted = G.links.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
const maxW = Math.max(1e-12, ...sorted.slice(0, 1).map(l => Math.abs(l.weight)));
let linkEls = [];
const gl = document.createElementNS(NS, 'g'); svg.appendChild(gl);
function drawLinks(n){
gl.replaceChildren(); linkEls = [];
sorted.slice(0, n).forEach(l => {
  const s = byId[l.source], t = byId[l.target]; if (!s || !t) return;
  const e = document.createElementNS(NS, 'line');
  e.setAttribute('x1', s._x); e.setAttribute('y1', s._y); e.setAttribute('x2', t._x); e.setAttribute('y2', t._y);
  e.setAttribute('class', 'link'); e.setAttribute('stroke', l.weight >= 0 ? '#2b6cb0' : '#c53030');
  e.setAttribute('stroke-width', (0.4 + 4 * Math.abs(l.weight) / maxW).toFixed(2));
  e.dataset.source = l.source; e.dataset.target = l.target; e.dataset.weight = l.weight;
  e.addEventListener('mousemove', ev => showTip(ev, l.source + ' \u2192 ' + l.target + ': ' + l.weight.toPrecision(4)));
  e.addEventListener('mouseleave', hideTip);
  gl.appendChild(e); linkEls.push(e);
});
const st = document.getElementById('status');
st.dataset.links = linkEls.length; st.dataset.totalLinks = sorted.length;
st.textContent = Object.keys(nodeEls).length + ' nodes, ' + linkEls.length + ' of ' + sorted.length + ' links drawn';
}
const nodeEls = {};
G.nodes.forEach(n => {
  let e;
  if (n.feature_type === 'mlp reconstruction error') { e = document.createElementNS(NS, 'rect');
    e.setAttribute('x', n._x - 5); e.setAttribute('y', n._y - 5); e.setAttribute('width', 10); e.setAttribute('height', 10);
    e.setAttribute('fill', '#a0aec0');
  } else { e = document.createElementNS(NS, 'circle'); e.setAttribute('cx', n._x); e.setAttribute('cy', n._y);
    e.setAttribute('r', n.feature_type === 'logit' || n.feature_type === 'embedding' ? 7 : 5);
    e.setAttribute('fill', n.feature_type === 'logit' ? '#38a169' : n.feature_type === 'embedding' ? '#805ad5' : '#ed8936');
  }
  e.setAttribute('class', 'node'); e.dataset.id = n.node_id;
  e.addEventListener('mousemove', ev => showTip(ev, label(n)));
  e.addEventListener('mouseleave', hideTip);
  e.addEventListener('click', () => select(n.node_id));
  svg.appendChild(e); nodeEls[n.node_id] = e;
});
document.getElementById('canvas').appendChild(svg);
function label(n){
  if (n.feature_type === 'logit') return n.clerp;
  if (n.feature_type === 'embedding') return 'token ' + JSON.stringify(meta.prompt_tokens[n.ctx_idx]) + ' @' + n.ctx_idx;
  if (n.feature_type === 'mlp reconstruction error') return 'error L' + n.layer + ' @' + n.ctx_idx;
  return 'feature ' + n.node_id + (n.activation != null ? ' act ' + n.activation.toPrecision(3) : '');
}
function el(tag, text, cls){ const e = document.createElement(tag); if (text != null) e.textContent = text; if (cls) e.className = cls; return e; }
function refreshPins(){
  Object.entries(nodeEls).forEach(([id, e]) => e.classList.toggle('pinned', pinned.has(id)));
  const box = document.getElementById('pins'); box.replaceChildren();
  box.appendChild(el('div', 'pinned: ' + (pinned.size ? [...pinned].join(', ') : 'none'), 'small'));
  q.supernodes.forEach(sn => box.appendChild(el('div', 'supernode ' + sn[0] + ': ' + sn.slice(1).join(', '), 'small')));
  document.getElementById('status').dataset.pinned = pinned.size;
  document.getElementById('status').dataset.supernodes = q.supernodes.length;
}
function select(id){
  const n = byId[id]; if (!n) return;
  Object.values(nodeEls).forEach(e => e.classList.remove('clicked'));
  nodeEls[id].classList.add('clicked'); q.clickedId = id;
  const d = document.getElementById('detail'); d.replaceChildren();
  d.appendChild(el('h3', label(n)));
  const t = el('table');
  const rows = [['id', n.node_id], ['type', n.feature_type], ['layer', n.layer], ['position', n.ctx_idx + ' ' + JSON.stringify(meta.prompt_tokens[n.ctx_idx])]];
  if (n.activation != null) rows.push(['activation', n.activation.toPrecision(4)]);
  if (n.influence != null) rows.push(['cumulative influence', n.influence.toPrecision(3)]);
  rows.forEach(([k, v]) => { const tr = el('tr'); tr.appendChild(el('td', k)); tr.appendChild(el('td', v)); t.appendChild(tr); });
  d.appendChild(t);
  const pin = el('button', pinned.has(id) ? 'unpin' : 'pin'); pin.id = 'pin-btn';
  pin.addEventListener('click', () => { pinned.has(id) ? pinned.delete(id) : pinned.add(id); refreshPins(); select(id); });
  d.appendChild(pin);
  const info = details[id];
  if (info && info.promotes) { d.appendChild(el('div', 'promotes: ' + info.promotes.map(s => JSON.stringify(s)).join(' '), 'small'));
    d.appendChild(el('div', 'suppresses: ' + info.suppresses.map(s => JSON.stringify(s)).join(' '), 'small')); }
  if (info && info.contexts && info.contexts.length) {
    d.appendChild(el('h4', 'top activating contexts'));
    info.contexts.forEach(c => { const line = el('div', null, 'ctx');
      c.tokens.forEach((tok, i) => { const s = el('span', tok); const a = c.acts[i] / (c.max || 1);
        s.style.background = 'rgba(237,137,54,' + Math.max(0, Math.min(1, a)).toFixed(2) + ')';
        if (i === c.peak) s.style.outline = '1px solid #1a202c';
        s.title = 'activation ' + c.acts[i]; line.appendChild(s); });
      d.appendChild(line); });
  }
  for (const [dir, key, other] of [['inputs', 'target', 'source'], ['outputs', 'source', 'target']]) {
    const ls = G.links.filter(l => l[key] === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 10);
    if (!ls.length) continue;
    d.appendChild(el('h4', 'strongest ' + dir));
    const tb = el('table');
    ls.forEach(l => { const tr = el('tr'); const a = el('td', l[other]); a.style.cursor = 'pointer';
      a.addEventListener('click', () => select(l[other])); tr.appendChild(a); tr.appendChild(el('td', l.weight.toPrecision(4)));
      const hv = heads[l.source + '->' + l.target];
      tr.appendChild(el('td', hv ? 'via ' + hv.map(v => 'L' + v[0] + '.H' + v[1] + ' ' + v[2].toFixed(2)).join(', ') : '', 'small'));
      tb.appendChild(tr); });
    d.appendChild(tb);
  }
  linkEls.forEach(e => e.style.strokeOpacity = (e.dataset.source === id || e.dataset.target === id) ? '0.95' : '0.12');
  document.getElementById('status').dataset.clicked = id;
}
document.getElementById('group-btn').addEventListener('click', () => {
  if (pinned.size < 2) return;
  const name = document.getElementById('sn-name').value.trim() || ('group ' + (q.supernodes.length + 1));
  q.supernodes.push([name, ...pinned]); refreshPins();
});
document.getElementById('save-btn').addEventListener('click', () => {
  const state = {pinnedIds: [...pinned], supernodes: q.supernodes, linkType: 'both', clickedId: q.clickedId || '', sg_pos: ''};
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([JSON.stringify(state, null, 1)], {type: 'application/json'}));
  a.download = (meta.slug || 'graph') + '-qparams.json'; a.click();
});
document.getElementById('status').dataset.nodes = Object.keys(nodeEls).length;
const nBox = document.getElementById('n-links');
if (hash.get('links')) nBox.value = hash.get('links');
drawLinks(+nBox.value || sorted.length);
nBox.addEventListener('change', () => { drawLinks(+nBox.value || sorted.length); if (q.clickedId) select(q.clickedId); });
refreshPins();
if (q.clickedId) select(q.clickedId);
})();
"""


def _safe_json(data: Any) -> str:
    """JSON for a ``<script type="application/json">`` block (no ``</script>`` or comment break-outs)."""
    s = json.dumps(data, allow_nan=False, ensure_ascii=True)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_viewer(path: Path, graph: dict[str, Any], title: str) -> Path:
    """Write the viewer page for ``graph`` (the frontend JSON of :func:`graph_json`), whole or not at all."""
    import html

    s = graph.get("featurelens", {}).get("scores", {})
    score = (f"replacement score {s['replacement']:.3f}, completeness {s['completeness']:.3f}; "
             if "replacement" in s else "")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<div class='small'>{html.escape(score)}<span id='status'></span>. Click a node for details; pin nodes and "
            "group them into supernodes on the right.</div></header><div id='wrap'><div id='canvas'></div>"
            "<div id='side'><div class='small'>strongest links drawn: <input id='n-links' type='number' min='0' "
            "value='2000' size='6'> (0: all)</div><div id='pins'></div><input id='sn-name' placeholder='supernode name' size='16'>"
            "<button id='group-btn'>group pinned</button><button id='save-btn'>download state</button>"
            "<div id='detail' class='small'>No node selected.</div></div></div><div id='tip'></div>"
            f"<script id='graph-data' type='application/json'>{_safe_json(graph)}</script>"
            f"<script>{_JS}</script></body></html>")
    atomic_write_bytes(path, page.encode())
    return path
