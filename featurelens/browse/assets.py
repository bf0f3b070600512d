"""The browser's two pages. Plain JavaScript, no library, no network: data arrive through
``window.featurelens_data(name, payload)`` from ``data/*.js`` script tags, and every text from the data is
put in the page with ``textContent`` (never parsed as HTML)."""

from __future__ import annotations

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 3px 7px; font-size: 13px; }
th { background: #f3f3f3; cursor: pointer; user-select: none; } th.sorted { background: #dde7f5; }
.t { font-family: monospace; white-space: pre; font-size: 12px; padding: 1px 0; }
.t.peak { outline: 1px solid #a33; } .ctx { margin: 3px 0; } .small { color: #666; font-size: 12px; }
.box { display: inline-block; vertical-align: top; margin: 0 2em 1em 0; } a { color: #1f5fbf; }
input { font-size: 14px; padding: 3px 6px; margin-right: 8px; } #hits span { margin-right: 1em; }
.bar { fill: #e07b00; } .lbar { fill: #5b7fc7; }
"""

_COMMON = """
const NS = 'http://www.w3.org/2000/svg';
const DATA = {};
window.featurelens_data = (name, payload) => { DATA[name] = payload; };
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
function params() { return new URLSearchParams(location.hash.slice(1)); }
function load(src) { return new Promise((ok, bad) => { const s = document.createElement('script'); s.src = src; s.onload = ok;
  s.onerror = () => bad(new Error('cannot load ' + src)); document.head.appendChild(s); }); }
function fmt(v, d) { return v === null || v === undefined ? '' : (typeof v === 'number' ? (Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(d ?? 3) : v.toExponential(1)) : String(v)); }
function bars(counts, cls, w, h) {
  const svg = document.createElementNS(NS, 'svg'); svg.setAttribute('width', w); svg.setAttribute('height', h);
  const m = Math.max(1, ...counts), bw = w / Math.max(1, counts.length);
  counts.forEach((c, i) => { const r = document.createElementNS(NS, 'rect'); const bh = (h - 2) * c / m;
    r.setAttribute('x', i * bw); r.setAttribute('y', h - bh); r.setAttribute('width', Math.max(1, bw - 1)); r.setAttribute('height', bh);
    r.setAttribute('class', cls); const t = document.createElementNS(NS, 'title'); t.textContent = String(c); r.appendChild(t); svg.appendChild(r); });
  return svg;
}
"""

INDEX_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>featurelens browser</title>
<style>""" + _STYLE + """</style></head><body>
<h2 id="title">featurelens browser</h2>
<div class="small" id="meta"></div>
<p><input id="q" placeholder="search: a token, a word, or explanation text" size="40">
density from <input id="dmin" size="7" placeholder="0"> to <input id="dmax" size="7" placeholder="1">
<span id="status"></span></p>
<div id="hits"></div>
<table id="tbl"><thead><tr id="head"></tr></thead><tbody id="body"></tbody></table>
<p><button id="prev">previous</button> <span id="pageinfo"></span> <button id="next">next</button></p>
<script>""" + _COMMON + """
const PER_PAGE = 100;
let rows = [], view = [], page = 0, sortCol = 'max', desc = true;
const COLS = [['id', 'latent'], ['density', 'density'], ['max', 'max act'], ['mean', 'mean act'], ['peak_tokens', 'top tokens'],
  ['promotes', 'promotes'], ['explanation', 'explanation'], ['score', 'score']];
function colIndex(name) { return DATA.index.meta.columns.indexOf(name); }
function matches(r, q) { if (!q) return true; const e = (r[colIndex('explanation')] || '').toLowerCase();
  return e.includes(q) || r[colIndex('peak_tokens')].some(t => t.toLowerCase().trim() === q) || String(r[0]) === q; }
async function tokenHits(q) {
  if (!q) return [];
  if (!DATA.tokens) await load('data/tokens.js');
  const words = q.split(/\\s+/).filter(Boolean), score = {};
  for (const [tok, list] of Object.entries(DATA.tokens)) {
    const t = tok.toLowerCase().trim();
    if (!t || !words.includes(t)) continue;
    list.forEach(([lat, v]) => { score[lat] = (score[lat] || 0) + v; });
  }
  return Object.entries(score).sort((a, b) => b[1] - a[1]).slice(0, 20);
}
function render() {
  const q = document.getElementById('q').value.trim().toLowerCase();
  const dmin = parseFloat(document.getElementById('dmin').value), dmax = parseFloat(document.getElementById('dmax').value);
  const ci = colIndex(sortCol), di = colIndex('density');
  view = rows.filter(r => matches(r, q) && !(r[di] < dmin) && !(r[di] > dmax));
  view.sort((a, b) => { let x = a[ci], y = b[ci]; if (Array.isArray(x)) { x = x.join(' '); y = y.join(' '); }
    if (x === null) return 1; if (y === null) return -1; return (x < y ? -1 : x > y ? 1 : 0) * (desc ? -1 : 1); });
  const pages = Math.max(1, Math.ceil(view.length / PER_PAGE)); page = Math.min(page, pages - 1);
  const body = document.getElementById('body'); body.replaceChildren();
  view.slice(page * PER_PAGE, (page + 1) * PER_PAGE).forEach(r => {
    const tr = el('tr'); tr.className = 'row'; tr.dataset.id = r[0];
    COLS.forEach(([name]) => { const v = r[colIndex(name)]; const td = el('td');
      if (name === 'id') { const a = el('a', v); a.href = 'latent.html#id=' + v; td.appendChild(a); }
      else td.textContent = Array.isArray(v) ? v.map(t => JSON.stringify(t)).join(' ') : fmt(v, name === 'density' ? 5 : 3);
      tr.appendChild(td); });
    body.appendChild(tr); });
  document.querySelectorAll('#head th').forEach(th => th.classList.toggle('sorted', th.dataset.col === sortCol));
  document.getElementById('pageinfo').textContent = 'page ' + (page + 1) + ' of ' + pages + ' (' + view.length + ' latents)';
  const st = document.getElementById('status'); st.dataset.shown = Math.min(PER_PAGE, view.length - page * PER_PAGE);
  st.dataset.matching = view.length; st.dataset.total = rows.length; st.dataset.sort = sortCol + (desc ? ':desc' : ':asc');
  st.dataset.first = view.length ? view[page * PER_PAGE][0] : '';
  const h = new URLSearchParams(); if (q) h.set('q', q); h.set('sort', sortCol); h.set('desc', desc ? 1 : 0); if (page) h.set('page', page);
  history.replaceState(null, '', '#' + h.toString());
  tokenHits(q).then(hits => { const box = document.getElementById('hits'); box.replaceChildren();
    st.dataset.hits = hits.map(h => h[0]).join(',');
    if (!hits.length) return; box.appendChild(el('b', 'latents firing most on "' + q + '": '));
    hits.forEach(([lat, v]) => { const s = el('span'); const a = el('a', lat); a.href = 'latent.html#id=' + lat; s.appendChild(a);
      s.appendChild(el('span', ' ' + fmt(v), 'small')); box.appendChild(s); }); }).catch(e => console.error(e.message));
}
window.addEventListener('DOMContentLoaded', () => {
  const d = DATA.index; rows = d.rows;
  const ex = DATA.explanations || {};
  rows.forEach(r => { const e = ex[r[0]]; if (e) { r[colIndex('explanation')] = e.text; r[colIndex('score')] = e.score ?? null; } });
  document.getElementById('title').textContent = 'featurelens browser: ' + d.meta.name;
  document.getElementById('meta').textContent = d.meta.n_latents + ' latents, ' + d.meta.n_tokens + ' tokens' +
    (d.meta.model ? ', model ' + d.meta.model : '') + (d.meta.site ? ', site ' + d.meta.site : '');
  const head = document.getElementById('head');
  COLS.forEach(([name, label]) => { const th = el('th', label); th.dataset.col = name;
    th.onclick = () => { if (sortCol === name) desc = !desc; else { sortCol = name; desc = true; } page = 0; render(); }; head.appendChild(th); });
  const p = params(); document.getElementById('q').value = p.get('q') || '';
  if (p.get('sort') && COLS.some(c => c[0] === p.get('sort'))) sortCol = p.get('sort');
  if (p.get('desc') !== null) desc = p.get('desc') !== '0'; page = parseInt(p.get('page') || '0') || 0;
  ['q', 'dmin', 'dmax'].forEach(id => document.getElementById(id).addEventListener('input', () => { page = 0; render(); }));
  document.getElementById('prev').onclick = () => { page = Math.max(0, page - 1); render(); };
  document.getElementById('next').onclick = () => { page += 1; render(); };
  render();
});
</script><script src="data/index.js"></script><script src="data/explanations.js"></script></body></html>
"""

LATENT_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>featurelens latent</title>
<style>""" + _STYLE + """</style></head><body>
<p><a href="index.html">all latents</a> <span id="status"></span></p>
<h2 id="title"></h2><div id="stats" class="small"></div><div id="expl"></div>
<div><div class="box"><b>activation histogram</b><div id="hist"></div><div class="small" id="histax"></div></div>
<div class="box"><b>promotes</b><table id="up"></table></div><div class="box"><b>suppresses</b><table id="down"></table></div>
<div class="box"><b>decoder logits</b><div id="lhist"></div><div class="small" id="lhistax"></div></div>
<div class="box"><b>fires with</b><table id="cooc"></table></div><div class="box"><b>nearest decoders</b><table id="near"></table></div></div>
<h3>top activations</h3><div id="top"></div><div id="quant"></div>
<script>""" + _COMMON + """
function context(c, max) {
  const div = el('div', null, 'ctx'); div.dataset.ctx = c.ctx;
  c.t.forEach((tok, i) => { const s = el('span', tok.replace(/\\n/g, '\\u23ce'), 't' + (i === c.p ? ' peak' : ''));
    const a = c.a[i]; s.style.background = 'rgba(255,120,0,' + (max > 0 ? Math.max(0, Math.min(1, a / max)) : 0).toFixed(2) + ')';
    s.title = a.toFixed(3); s.dataset.act = a; div.appendChild(s); });
  return div;
}
function linkTable(id, list, label) { const t = document.getElementById(id);
  list.forEach(([j, v]) => { const tr = el('tr'); const td = el('td'); const a = el('a', j); a.href = '#id=' + j; td.appendChild(a);
    tr.appendChild(td); tr.appendChild(el('td', fmt(v))); t.appendChild(tr); }); }
async function show() {
  const id = parseInt(params().get('id') || '0');
  document.querySelectorAll('table').forEach(t => t.replaceChildren());
  ['top', 'quant', 'hist', 'lhist'].forEach(i => document.getElementById(i).replaceChildren());
  const name = 'l' + Math.floor(id / SHARD);
  if (!DATA[name]) await load('data/' + name + '.js');
  const L = DATA[name].find(x => x.id === id);
  const st = document.getElementById('status');
  if (!L) { document.getElementById('title').textContent = 'no latent ' + id; st.dataset.id = ''; return; }
  document.title = 'latent ' + id;
  document.getElementById('title').textContent = 'latent ' + id;
  document.getElementById('stats').textContent = 'fires on ' + L.fires + ' tokens (density ' + fmt(L.density, 5) + '), max ' +
    fmt(L.max) + ', mean when firing ' + fmt(L.mean);
  const ex = document.getElementById('expl'); ex.replaceChildren();
  const E = L.explanation || (DATA.explanations || {})[id];
  if (E) { ex.appendChild(el('b', 'explanation: ')); ex.appendChild(el('span', E.text));
    if (E.score !== undefined && E.score !== null) ex.appendChild(el('span', ' (detection ' + fmt(E.score) +
      (E.fuzzing !== undefined ? ', fuzzing ' + fmt(E.fuzzing) : '') + '; random explanation: ' + fmt(E.random_score) + ')', 'small'));
    st.dataset.explanation = E.text; }
  document.getElementById('hist').appendChild(bars(L.hist, 'bar', 260, 80));
  document.getElementById('histax').textContent = '0 .. ' + fmt(L.max);
  [['up', L.up || []], ['down', L.down || []]].forEach(([tid, list]) => { const t = document.getElementById(tid);
    list.forEach(([tok, v]) => { const tr = el('tr'); tr.appendChild(el('td', JSON.stringify(tok), 't')); tr.appendChild(el('td', fmt(v))); t.appendChild(tr); }); });
  if (L.lhist) { document.getElementById('lhist').appendChild(bars(L.lhist.n, 'lbar', 260, 80));
    document.getElementById('lhistax').textContent = fmt(L.lhist.lo) + ' .. ' + fmt(L.lhist.hi); }
  linkTable('cooc', L.cooc, 'P'); linkTable('near', L.near, 'cos');
  const top = document.getElementById('top'); L.top.forEach(c => top.appendChild(context(c, L.max)));
  const quant = document.getElementById('quant');
  for (let q = L.quant.length - 1; q >= 0; q--) { if (!L.quant[q].length) continue;
    quant.appendChild(el('h4', 'interval ' + (q / L.quant.length).toFixed(2) + ' - ' + ((q + 1) / L.quant.length).toFixed(2) + ' of max'));
    L.quant[q].forEach(c => quant.appendChild(context(c, L.max))); }
  st.dataset.id = id; st.dataset.top = L.top.length; st.dataset.quant = L.quant.map(x => x.length).join(',');
}
window.addEventListener('hashchange', () => show().catch(e => console.error(e.message)));
window.addEventListener('DOMContentLoaded', () => show().catch(e => console.error(e.message)));
</script><script src="data/explanations.js"></script></body></html>
"""


def latent_page(shard: int) -> str:
    """The latent page with its shard size filled in."""
    return LATENT_HTML.replace("const NS =", f"const SHARD = {int(shard)};\nconst NS =", 1)


PROMPT_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>featurelens prompt view</title>
<style>""" + _STYLE + """ .tok { display: inline-block; vertical-align: top; margin: 0 4px 10px 0; border: 1px solid #eee; padding: 2px 4px; }
.tok .t { background: #f6f6f6; } .lat { display: block; font-size: 11px; }</style></head><body>
<p><a href="index.html">all latents</a> <span id="status"></span></p>
<h2>prompt view</h2>
<p class="small" id="note">Runs the model: open this page through <code>featurelens serve</code> (from the file system it cannot).</p>
<p><textarea id="text" rows="3" cols="80"></textarea><br><button id="go">show latents</button></p>
<div id="out"></div>
<script>""" + _COMMON + """
async function run() {
  const text = document.getElementById('text').value, st = document.getElementById('status');
  const out = document.getElementById('out'); out.replaceChildren();
  if (location.protocol === 'file:') { st.dataset.error = 'file'; return; }
  const r = await fetch('/api/prompt', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({text: text, dictionary: DATA.index.meta.name})});
  const res = await r.json();
  if (!r.ok) { out.appendChild(el('p', res.error)); st.dataset.error = res.error; return; }
  res.tokens.forEach(t => { const d = el('div', null, 'tok'); d.appendChild(el('span', JSON.stringify(t.token), 't'));
    t.latents.forEach(([j, v]) => { const a = el('a', j + ' ' + fmt(v), 'lat'); a.href = 'latent.html#id=' + j; d.appendChild(a); });
    out.appendChild(d); });
  st.dataset.tokens = res.tokens.length; st.dataset.first = res.tokens.map(t => (t.latents[0] || [''])[0]).join(',');
  history.replaceState(null, '', '#text=' + encodeURIComponent(text));
}
window.addEventListener('DOMContentLoaded', () => {
  document.getElementById('go').onclick = () => run().catch(e => console.error(e.message));
  const t = params().get('text'); if (t) { document.getElementById('text').value = t; run().catch(e => console.error(e.message)); }
});
</script><script src="data/index.js"></script></body></html>
"""
