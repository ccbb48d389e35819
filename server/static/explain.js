// The attention explorer page: fetches /explain/model, posts /explain/attention, draws every head's causal
// attention as a canvas heatmap grouped by KV head, and walks one query token through the layer.
// Plain browser JavaScript, no build step; all text goes in through textContent (never innerHTML).
"use strict";

const state = { info: null, prompt: "", layer: 0, counts: [], selected: null, results: new Map() };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

const shown = (text) => text.replace(/ /g, "·").replace(/\n/g, "⏎").replace(/\t/g, "⇥");
const fmt = (x) => (Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(2) : x.toFixed(4));
const norm = (v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, body) {
  const resp = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await resp.json();
  if (!resp.ok) throw new Error(typeof data.error === "string" ? data.error : JSON.stringify(data));
  return data;
}

// --- colour scales -------------------------------------------------------------------------------
const BLUES = [[255, 255, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
function sequential(t) {  // t in [0, 1]
  const x = Math.min(1, Math.max(0, t)) * (BLUES.length - 1), i = Math.min(BLUES.length - 2, Math.floor(x));
  const f = x - i, a = BLUES[i], b = BLUES[i + 1];
  return `rgb(${a.map((c, k) => Math.round(c + f * (b[k] - c))).join(",")})`;
}
function diverging(v, maxAbs) {
  const t = maxAbs > 0 ? Math.min(1, Math.abs(v) / maxAbs) : 0, w = Math.round(255 * (1 - t));
  return v >= 0 ? `rgb(255,${w},${w})` : `rgb(${w},${w},255)`;
}

// --- heatmap --------------------------------------------------------------------------------------
function drawHeatmap(canvas, weights, tokens, selected) {
  const T = weights.length, cell = Math.max(2, Math.min(16, Math.floor(220 / T))), labels = T <= 40;
  const ctx = canvas.getContext("2d"), font = `${Math.min(11, cell)}px sans-serif`;
  ctx.font = font;
  const names = tokens.map((t) => shown(t.text).slice(0, 9));
  const margin = labels ? Math.ceil(Math.min(64, Math.max(...names.map((n) => ctx.measureText(n).width)) + 6)) : 4;
  const size = margin + T * cell + 2;
  canvas.width = size; canvas.height = size;  // resizing resets the context state
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, size, size);
  for (let i = 0; i < T; i++) {
    for (let j = 0; j < T; j++) {
      ctx.fillStyle = j > i ? "#e6e9ee" : sequential(Math.sqrt(weights[i][j]));
      ctx.fillRect(margin + j * cell, margin + i * cell, cell, cell);
    }
  }
  if (labels) {
    ctx.fillStyle = "#1d2330"; ctx.font = font; ctx.textBaseline = "middle";
    names.forEach((label, i) => {
      ctx.textAlign = "right"; ctx.fillText(label, margin - 3, margin + (i + 0.5) * cell);
      ctx.save(); ctx.translate(margin + (i + 0.5) * cell, margin - 3); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left"; ctx.fillText(label, 0, 0); ctx.restore();
    });
  }
  if (selected != null) {
    ctx.strokeStyle = "#c2185b"; ctx.lineWidth = 2;
    ctx.strokeRect(margin, margin + selected * cell, T * cell, cell);
  }
  const cellAt = (ev) => {
    const r = canvas.getBoundingClientRect(), sx = canvas.width / r.width;
    const i = Math.floor(((ev.clientY - r.top) * sx - margin) / cell), j = Math.floor(((ev.clientX - r.left) * sx - margin) / cell);
    return i >= 0 && i < T && j >= 0 && j < T ? [i, j] : null;
  };
  canvas.onmousemove = (ev) => {
    const at = cellAt(ev);
    canvas.title = !at ? "" : at[1] > at[0] ? "masked (future token)"
      : `query ${at[0]} “${tokens[at[0]].text}” → key ${at[1]} “${tokens[at[1]].text}”: ${fmt(weights[at[0]][at[1]])}`;
  };
  canvas.onclick = (ev) => { const at = cellAt(ev); if (at) selectToken(at[0]); };
}

// One cell per value, red positive / blue negative; `segment` draws a divider every that many values.
function vectorStrip(values, width, segment) {
  const canvas = el("canvas", { class: "vector", width, height: 12 });
  const ctx = canvas.getContext("2d"), maxAbs = Math.max(...values.map(Math.abs)), w = width / values.length;
  values.forEach((v, i) => { ctx.fillStyle = diverging(v, maxAbs); ctx.fillRect(i * w, 0, Math.ceil(w), 12); });
  if (segment) {
    ctx.fillStyle = "#1d2330";
    for (let i = segment; i < values.length; i += segment) ctx.fillRect(Math.round(i * w) - 1, 0, 2, 12);
  }
  return canvas;
}

function vectorRow(label, values, width = 256, segment = 0) {
  const head = values.slice(0, 6).map(fmt).join(", ");
  return el("div", { class: "vec", title: values.map(fmt).join(", ") }, el("span", { class: "label", text: label }),
    vectorStrip(values, width, segment), el("span", { class: "values",
      text: `‖${label}‖=${fmt(norm(values))}  [${head}${values.length > 6 ? ", …" : ""}] (${values.length})` }));
}

// --- rendering --------------------------------------------------------------------------------------
function renderTokens(tokens) {
  $("tokens-section").hidden = false;
  $("tokens").replaceChildren(...tokens.map((t) => el("button", {
    type: "button", class: "token" + (t.index === state.selected ? " selected" : ""), "data-index": t.index,
    title: `id ${t.id} · piece ${t.piece}`, onclick: () => selectToken(t.index) },
  el("span", { class: "idx", text: String(t.index) }), shown(t.text))));
}

function renderPanel(count, data) {
  const layer = data.layers[0], native = count === data.native_num_kv_heads;
  const byHead = new Map(layer.heads.map((h) => [h.head, h]));
  const panel = el("div", { class: "panel", "data-kv-heads": count },
    el("h2", { text: `num_kv_heads = ${count}${native ? " (native)" : " (pooled from " + data.native_num_kv_heads + ")"} · layer ${layer.layer}` }),
    el("div", { class: "legend", text: "queries ↓, keys →; colour = √(softmax weight), white 0 → dark blue 1; grey = masked" }));
  for (const g of data.kv_groups) {
    const maps = g.query_heads.filter((h) => byHead.has(h)).map((h) => {
      const canvas = el("canvas", { class: "heatmap", "data-head": h });
      drawHeatmap(canvas, byHead.get(h).weights, data.tokens, state.selected);
      return el("figure", { class: "head-map" }, canvas, el("figcaption", { text: `head ${h} · kv ${g.kv_head}` }));
    });
    panel.append(el("div", { class: "kv-group" }, el("div", { class: "group-title",
      text: `KV head ${g.kv_head} ← query heads ${g.query_heads.join(", ")}` }), el("div", { class: "maps" }, ...maps)));
  }
  panel.append(renderWalk(data, layer));
  return panel;
}

function renderWalk(data, layer) {
  const walk = layer.walkthrough, i = walk.query_index, tok = data.tokens[i];
  const keys = data.tokens.slice(0, i + 1), d = data.head_dim;
  const byHead = new Map(walk.heads.map((s) => [s.head, s]));
  const box = el("div", { class: "walk", "data-query-index": i },
    el("div", { class: "walk-title", text: `Walkthrough: token ${i} “${shown(tok.text)}” at layer ${layer.layer}` }),
    el("div", { class: "step" }, el("span", { class: "step-name", text: "1. per head: " }), el("span", { class: "formula",
      text: `q = rotary(W_q x);  score_j = q·k_j / √${d} (= × ${fmt(data.scale)});  w = softmax(scores);  z = Σ_j w_j v_j` })));
  for (const g of data.kv_groups) {
    const cards = g.query_heads.map((h) => {
      const s = byHead.get(h), top = Math.max(...s.weights);
      const rows = keys.map((k, j) => el("tr", {}, el("td", { class: "key", text: `${j} ${shown(k.text)}` }),
        el("td", { class: "score", text: fmt(s.scores[j]) }), el("td", { class: "weight", text: fmt(s.weights[j]) }),
        el("td", {}, el("span", { class: "bar", style: `width:${Math.round(60 * s.weights[j] / (top || 1))}px` }))));
      return el("div", { class: "head-step", "data-head": h },
        el("h4", { text: `head ${h} — reads KV head ${s.kv_head}` }), vectorRow("q", s.q, 150),
        el("div", { class: "scores-wrap" }, el("table", { class: "scores" },
          el("thead", {}, el("tr", {}, el("th", { text: "key" }), el("th", { text: `q·k/√${d}` }),
            el("th", { text: "softmax" }), el("th", {}))), el("tbody", {}, ...rows))),
        vectorRow("z", s.z, 150));
    });
    box.append(el("div", { class: "kv-group" }, el("div", { class: "group-title",
      text: `KV head ${g.kv_head}: its keys and values are shared by query heads ${g.query_heads.join(", ")}` }),
    el("div", { class: "head-steps" }, ...cards)));
  }
  box.append(el("div", { class: "step concat" }, el("span", { class: "step-name", text: "2. concat: " }),
    el("span", { class: "formula", text: `[z_0 | … | z_${data.num_heads - 1}], ${data.num_heads} × ${d} = ${walk.concat.length} values` }),
    vectorRow("cat", walk.concat, 384, d)));
  box.append(el("div", { class: "step output" }, el("span", { class: "step-name", text: "3. output projection: " }),
    el("span", { class: "formula", text: `o_proj(concat) → ${walk.output.length} values (added to the residual stream)` }),
    vectorRow("out", walk.output, 384)));
  return box;
}

function renderAll() {
  const first = state.results.get(state.counts[0]);
  renderTokens(first.tokens);
  $("panels").replaceChildren(...state.counts.map((n) => renderPanel(n, state.results.get(n))));
}

// --- actions --------------------------------------------------------------------------------------
// With maps already on screen (a token click), only the walkthrough is fetched and merged in.
async function fetchAll(queryIndex) {
  const walkOnly = queryIndex !== null;
  const replies = await Promise.all(state.counts.map((n) => api("/explain/attention", {
    prompt: state.prompt, layers: [state.layer], num_kv_heads: n, query_index: queryIndex,
    include_weights: !walkOnly })));
  state.counts.forEach((n, k) => {
    const reply = replies[k], previous = state.results.get(n);
    if (walkOnly) reply.layers[0].heads = previous.layers[0].heads;
    state.results.set(n, reply);
  });
  state.selected = replies[0].query_index;
}

async function run(ev) {
  if (ev) ev.preventDefault();
  state.prompt = $("prompt").value;
  state.layer = Number($("layer").value);
  const primary = Number($("kv-heads").value), other = $("compare-kv-heads").value;
  state.counts = other === "" || Number(other) === primary ? [primary] : [primary, Number(other)];
  state.results = new Map();
  setStatus("computing…");
  try {
    await fetchAll(null);
    renderAll();
    const first = state.results.get(state.counts[0]);
    setStatus(`${first.tokens.length} tokens · layer ${state.layer} · ${first.num_heads} query heads · ` +
      `num_kv_heads ${state.counts.join(" vs ")}`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function selectToken(index) {
  if (!state.counts.length) return;
  setStatus(`following token ${index}…`);
  try {
    await fetchAll(index);
    renderAll();
    setStatus(`token ${index} selected`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function init() {
  try {
    state.info = await api("/explain/model");
  } catch (err) {
    setStatus(`cannot load model information: ${err.message}`, true);
    return;
  }
  const info = state.info;
  $("model-info").textContent = `${info.model}: ${info.num_layers} layers, ${info.num_heads} query heads, ` +
    `${info.native_num_kv_heads} KV heads natively, head_dim ${info.head_dim}; prompts up to ${info.max_prompt_tokens} tokens`;
  $("layer").replaceChildren(...Array.from({ length: info.num_layers }, (_, i) => el("option", { value: i, text: String(i) })));
  const label = (n) => `${n}${n === info.native_num_kv_heads ? " (native)" : ""}`;
  $("kv-heads").replaceChildren(...info.valid_num_kv_heads.map((n) => el("option", { value: n, text: label(n) })));
  $("kv-heads").value = String(info.native_num_kv_heads);
  $("compare-kv-heads").append(...info.valid_num_kv_heads.map((n) => el("option", { value: n, text: label(n) })));
  $("explain-form").addEventListener("submit", run);
  setStatus("type a prompt and press Explain");
}

init();
