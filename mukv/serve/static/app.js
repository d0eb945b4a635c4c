// mukv serve: the page. Plain JavaScript, no build step. Polls /v1/streams, streams answers
// from POST /v1/streams/{id}/ask ("stream": true, server-sent events), draws the retrieved
// moments on each stream's timeline with their thumbnails.
"use strict";

const state = { token: localStorage.getItem("mukv-token") || "", cards: new Map(), status: new Map() };
const LEVEL_ORDER = ["patch", "frame", "segment"];

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

async function api(path, options) {
  const r = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  if (r.status === 401) { showToken(); throw new Error("this server needs a bearer token"); }
  return r;
}

function showToken() { document.getElementById("token-form").hidden = false; }

function fmtBytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function fmtTime(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
  const mm = String(m).padStart(2, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${m}:${ss}`;
}

function card(id) {
  let el = state.cards.get(id);
  if (el) return el;
  el = document.getElementById("stream-card").content.firstElementChild.cloneNode(true);
  el.dataset.id = id;
  el.querySelector(".sid").textContent = id;
  el.querySelector("form.ask").addEventListener("submit", (ev) => { ev.preventDefault(); ask(id, el); });
  document.getElementById("streams").appendChild(el);
  state.cards.set(id, el);
  return el;
}

function span(st) { return Math.max(st.t_end || 0, 1e-9); }

function render(st) {
  const el = card(st.id);
  state.status.set(st.id, st);
  const role = el.querySelector(".role");
  role.textContent = st.role; role.className = "role badge " + st.role;
  const stateEl = el.querySelector(".state");
  stateEl.textContent = st.state + (st.owner ? " · written by " + st.owner : "");
  stateEl.classList.toggle("failed", st.state.startsWith("failed") || st.state.startsWith("source failed"));
  const set = (cls, text) => { el.querySelector(cls).textContent = text; };
  set(".n-frames", st.frames.toLocaleString());
  set(".n-time", fmtTime(st.t_end));
  set(".n-received", st.received.toLocaleString());
  set(".n-dropped", st.dropped.toLocaleString());
  el.querySelector(".n-dropped").classList.toggle("warn", st.dropped > 0);
  set(".n-queued", st.queued.toLocaleString());
  set(".n-lag", st.lag_s.toFixed(1) + " s");
  set(".n-bytes", fmtBytes(st.bytes));
  set(".n-tiers", fmtBytes(st.hot_bytes) + " / " + fmtBytes(st.disk_bytes));
  drawTimeline(el, st, el._moments || []);
}

function drawTimeline(el, st, blocks) {
  const tl = el.querySelector(".timeline");
  tl.textContent = "";
  const total = span(st);
  const pct = (t) => (100 * Math.min(Math.max(t, 0), total) / total).toFixed(3) + "%";
  const fill = document.createElement("div"); fill.className = "fill"; fill.style.width = st.t_end ? "100%" : "0";
  tl.appendChild(fill);
  for (const g of st.gaps || []) {
    const d = document.createElement("div"); d.className = "gap";
    d.style.left = pct(g.t_start); d.style.width = `calc(${pct(g.t_end)} - ${pct(g.t_start)})`;
    d.title = `gap: ${g.frames} frames dropped, ${fmtTime(g.t_start)}–${fmtTime(g.t_end)}`;
    tl.appendChild(d);
  }
  for (const b of blocks) {
    const d = document.createElement("div"); d.className = "mark " + (LEVEL_ORDER.includes(b.level) ? b.level : "frame");
    d.style.left = pct(b.t_start);
    d.style.width = `calc(${pct(b.t_end)} - ${pct(b.t_start)})`;
    d.title = `${b.level} #${b.block_id} ${fmtTime(b.t_start)}–${fmtTime(b.t_end)} (score ${b.score.toFixed(3)})`;
    tl.appendChild(d);
  }
  for (const [x, label] of [[0, "0:00"], [total, fmtTime(st.t_end)]]) {
    if (!st.t_end) break;
    const t = document.createElement("span"); t.className = "tick"; t.textContent = label;
    if (x) t.style.right = "0"; else t.style.left = "0";
    tl.appendChild(t);
  }
}

async function thumb(id, index) {
  const r = await api(`/v1/streams/${encodeURIComponent(id)}/frames/${index}.jpg`);
  if (!r.ok) return null;
  return URL.createObjectURL(await r.blob());
}

async function showMoments(id, el, answer) {
  el._moments = answer.blocks;
  const st = state.status.get(id);
  if (st) drawTimeline(el, st, answer.blocks);
  const box = el.querySelector(".moments");
  box.textContent = "";
  // the best three blocks of each level (one thumbnail per frame), in stream order
  const best = [], frames = new Set();
  for (const level of new Set(answer.blocks.map((b) => b.level))) {
    const top = answer.blocks.filter((b) => b.level === level).sort((a, b) => b.score - a.score);
    let taken = 0;
    for (const b of top) {
      const middle = Math.floor((b.frame_start + Math.max(b.frame_start, b.frame_end - 1)) / 2);
      if (taken >= 3 || frames.has(middle)) continue;
      frames.add(middle); best.push(b); taken++;
    }
  }
  best.sort((a, b) => a.t_start - b.t_start || LEVEL_ORDER.indexOf(a.level) - LEVEL_ORDER.indexOf(b.level));
  for (const b of best) {
    const fig = document.createElement("figure"); fig.className = "moment " + b.level;
    const img = document.createElement("img"); img.className = "thumb"; img.alt = `${b.level} #${b.block_id}`;
    const cap = document.createElement("figcaption");
    cap.textContent = `${b.level} · ${fmtTime(b.t_start)}`;
    fig.appendChild(img); fig.appendChild(cap); box.appendChild(fig);
    const middle = Math.floor((b.frame_start + Math.max(b.frame_start, b.frame_end - 1)) / 2);
    thumb(id, middle).then((url) => { if (url) { img.src = url; img.dataset.loaded = "1"; } }).catch(() => {});
  }
}

function parseEvents(buffer, onEvent) {
  let idx;
  while ((idx = buffer.indexOf("\n\n")) >= 0) {
    const raw = buffer.slice(0, idx); buffer = buffer.slice(idx + 2);
    let event = "message", data = "";
    for (const line of raw.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (data) onEvent(event, JSON.parse(data));
  }
  return buffer;
}

async function ask(id, el) {
  const input = el.querySelector(".ask-input"), button = el.querySelector(".ask-button");
  const out = el.querySelector(".answer"), text = el.querySelector(".answer-text"), meta = el.querySelector(".answer-meta");
  const err = el.querySelector(".error");
  const question = input.value.trim();
  if (!question) return;
  button.disabled = true; err.hidden = true; out.hidden = false;
  text.textContent = ""; meta.textContent = ""; text.classList.add("streaming");
  el.querySelector(".moments").textContent = "";
  try {
    const r = await api(`/v1/streams/${encodeURIComponent(id)}/ask`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question: question, stream: true }),
    });
    if (!r.ok) { const e = await r.json(); throw new Error(e.detail || r.statusText); }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + dec.decode(value, { stream: true }), (event, data) => {
        if (event === "token") text.textContent += data.text;
        else if (event === "answer") {
          text.textContent = data.text || "(empty answer)";
          const t = data.timings;
          meta.textContent = `${data.blocks.length} moments · ${data.kv_tokens.toLocaleString()} KV tokens · ` +
            `first token ${((t.wait || 0) + (t.query || 0) + (t.retrieve || 0) + (t.page_in || 0) + (t.first_token || 0)).toFixed(3)} s · ` +
            `total ${((t.wait || 0) + (t.total || 0)).toFixed(3)} s` + (data.notes.length ? " · " + data.notes.join("; ") : "");
          showMoments(id, el, data);
        } else if (event === "error") throw new Error(data.detail);
      });
    }
  } catch (e) {
    err.textContent = e.message; err.hidden = false;
  } finally {
    text.classList.remove("streaming"); button.disabled = false;
  }
}

async function poll() {
  try {
    const h = await (await fetch("/healthz")).json();
    document.getElementById("health").textContent = `${h.status} · model ${h.model || "?"} · ${h.server}`;
    const r = await api("/v1/streams");
    if (r.ok) {
      const { streams } = await r.json();
      document.getElementById("empty").hidden = streams.length > 0;
      const seen = new Set();
      for (const st of streams) { render(st); seen.add(st.id); }
      for (const [id, el] of state.cards) if (!seen.has(id)) { el.remove(); state.cards.delete(id); }
    }
  } catch (e) {
    document.getElementById("health").textContent = "unreachable: " + e.message;
  }
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = document.getElementById("token").value.trim();
  localStorage.setItem("mukv-token", state.token);
  document.getElementById("token-form").hidden = true;
  poll();
});
poll();
setInterval(poll, 1000);
