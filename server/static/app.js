// The munet web page: polls the JSON API and draws the tasks table, each task's score over
// time, and the graph of the multitask system (muNet paper style). No dependencies, no build.
"use strict";

const POLL_MS = 3000;
const ROOT_COLOUR = "#a3a9b3";
const PALETTE = ["#2f6fdf", "#e8590c", "#2b9a66", "#c2255c", "#7048e8", "#0c8599", "#d9480f", "#5c940d",
                 "#862e9c", "#1971c2", "#e67700", "#087f5b"];
const SVG_NS = "http://www.w3.org/2000/svg";

const state = { tasks: [], graph: null, history: null, status: null, seen: {}, colours: {}, focus: null };

// -- helpers ------------------------------------------------------------------------------------
const $ = sel => document.querySelector(sel);
const esc = s => String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const int = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const fmtPct = x => (x === null || x === undefined) ? "–" : (100 * x).toFixed(1) + "%";
const fmtScore = x => (x === null || x === undefined) ? "–" : x.toFixed(4);
const fmtInt = x => (x === null || x === undefined) ? "–" : int.format(Math.round(x));
function fmtCompact(x) {
  if (x === null || x === undefined) return "–";
  if (Math.abs(x) >= 1e6) return (x / 1e6).toFixed(2) + "M";
  if (Math.abs(x) >= 1e3) return (x / 1e3).toFixed(1) + "k";
  return String(Math.round(x));
}
function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
  return (s / 86400).toFixed(1) + " days ago";
}
const timeOf = iso => new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });

async function api(url, opts) {
  const r = await fetch(url, opts);
  let body = null;
  try { body = await r.json(); } catch (e) { body = { error: "bad_response", detail: `HTTP ${r.status}` }; }
  if (!r.ok) { const err = new Error(body.detail || body.error || `HTTP ${r.status}`); err.body = body; err.status = r.status; throw err; }
  return body;
}

function el(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Task colours follow task order (by id), so a task keeps its colour as others are added.
function colourOf(task) {
  if (!task) return ROOT_COLOUR;
  if (!(task in state.colours)) {
    let h = 0;
    for (const c of task) h = (h * 31 + c.charCodeAt(0)) >>> 0;  // a deleted creator: a stable colour
    return PALETTE[h % PALETTE.length];
  }
  return state.colours[task];
}

// -- header and summary --------------------------------------------------------------------------
function renderHealth() {
  const st = state.status, pills = [];
  if (st) {
    pills.push(pill(st.ready ? "ok" : "warn", st.ready ? "serving" : "loading", `${st.served_tasks} task(s) served`));
    pills.push(pill(st.database && st.database.up ? "ok" : "bad", "database", st.database && st.database.up ? "up" : "down"));
    const r = st.redis || {};
    pills.push(pill(!r.configured ? "off" : r.connected ? "ok" : "bad", "redis",
      !r.configured ? "not configured" : r.connected ? "connected" : "down"));
  } else if (state.error) {
    pills.push(pill("bad", "server", state.error));
  }
  pills.push(`<span class="updated" title="the page polls every ${POLL_MS / 1000} s"><span class="dot${state.error ? " stale" : ""}"></span>` +
    `${state.updated ? "updated " + state.updated.toLocaleTimeString() : "connecting…"}</span>`);
  $("#health").innerHTML = pills.join("");
}
const pill = (kind, label, value) => `<span class="pill ${kind}" title="${esc(label)}: ${esc(value)}"><b>${esc(label)}</b> ${esc(value)}</span>`;

function renderSummary() {
  const g = state.graph, st = state.status;
  if (!g) return;
  const s = g.summary, root = (s.roots || [])[0];
  const cards = [
    ["tasks", s.tasks, `${s.tasks_with_live_path} with a live path`],
    ["live components", s.live_components, `${s.shared_components} shared by 2+ tasks`],
    ["unique live params", fmtCompact(s.unique_params), `${fmtCompact(s.params_per_task)} per task`],
    ["root", root ? root.name : "–", root ? `${root.timm}, ${fmtCompact(root.root_params)} params` : "no root yet"],
  ];
  if (st && st.cache) cards.push(["module cache", `${(st.cache.bytes / 1e6).toFixed(1)} MB`, `${st.cache.components} components`]);
  $("#summary").innerHTML = cards.map(([k, v, sub]) =>
    `<div class="card" data-card="${esc(k)}"><div class="k">${esc(k)}</div><div class="v">${esc(v)}</div><div class="sub">${esc(sub)}</div></div>`).join("");
}

// -- tasks table ---------------------------------------------------------------------------------
function renderTasks() {
  const body = $("#tasks tbody");
  $("#no-tasks").hidden = state.tasks.length > 0;
  body.innerHTML = state.tasks.map(t => {
    const l = t.live_path || {};
    const status = t.pinned ? `${t.status} · pinned` : t.status;
    const cell = (col, value, text, cls = "num") => `<td class="${cls}" data-col="${col}" data-value="${value ?? ""}">${text}</td>`;
    return `<tr data-task="${esc(t.name)}">` +
      `<td data-col="name"><span class="swatch" style="background:${colourOf(t.name)}"></span><b>${esc(t.name)}</b>` +
      (t.error ? ` <span class="err" title="${esc(t.error)}">!</span>` : "") + `</td>` +
      `<td data-col="status"><span class="badge ${esc(t.status)}">${esc(status)}</span></td>` +
      `<td data-col="live_path" data-value="${esc(l.id || "")}"><code title="${esc(l.id || "")}">${esc((l.id || "–").slice(0, 12))}</code>` +
      (l.image_size ? ` <span class="muted">${l.image_size}px</span>` : "") + `</td>` +
      cell("val_acc", l.val_acc, fmtPct(l.val_acc)) + cell("test_acc", l.test_acc, fmtPct(l.test_acc)) +
      cell("score", l.score, fmtScore(l.score)) + cell("accounted_params", l.accounted_params, fmtInt(l.accounted_params)) +
      cell("classes", t.classes.length, t.classes.length) + cell("candidates_tried", t.candidates_tried, fmtInt(t.candidates_tried)) +
      `<td data-col="last_improvement" data-value="${esc(t.last_improvement || "")}" title="${esc(t.last_improvement || "")}">${ago(t.last_improvement)}</td></tr>`;
  }).join("");
  body.querySelectorAll("tr").forEach(tr => {
    tr.onmouseenter = () => setFocus(tr.dataset.task);
    tr.onmouseleave = () => setFocus(null);
    tr.onclick = () => { $("#predict-task").value = tr.dataset.task; };
  });
  // The task picker keeps the user's choice across refreshes.
  const sel = $("#predict-task"), keep = sel.value;
  const served = state.tasks.filter(t => t.live_path);
  sel.innerHTML = served.map(t => `<option value="${esc(t.name)}">${esc(t.name)}</option>`).join("");
  if (served.some(t => t.name === keep)) sel.value = keep;
}

function setFocus(task) {
  state.focus = task;
  const svg = $("#graph");
  if (task) svg.setAttribute("data-focus", task); else svg.removeAttribute("data-focus");
  svg.querySelectorAll("[data-task]").forEach(e => e.classList.toggle("focus", e.dataset.task === task));
  svg.querySelectorAll("g.node").forEach(e => e.classList.toggle("focus", (e.dataset.users || "").split(" ").includes(task)));
}

// -- score charts --------------------------------------------------------------------------------
function renderCharts() {
  const h = state.history;
  if (!h) return;
  const box = $("#charts");
  box.innerHTML = "";
  for (const t of state.tasks) {
    const rec = h.tasks[t.name] || { swaps: [], candidates: [] };
    const card = document.createElement("div");
    card.className = "chart-card";
    card.dataset.task = t.name;
    const best = rec.swaps.length ? rec.swaps[rec.swaps.length - 1].score : null;
    card.innerHTML = `<div class="chart-title"><span class="swatch" style="background:${colourOf(t.name)}"></span>` +
      `<b>${esc(t.name)}</b><span class="muted">${rec.swaps.length} swap${rec.swaps.length === 1 ? "" : "s"}, ` +
      `${rec.candidates.length} scored candidate${rec.candidates.length === 1 ? "" : "s"}</span>` +
      `<span class="chart-best">${fmtScore(best)}</span></div>`;
    card.appendChild(scoreChart(t.name, rec));
    box.appendChild(card);
  }
}

function scoreChart(name, rec) {
  const W = 360, H = 150, L = 44, R = 12, T = 10, B = 24;
  const svg = el("svg", { class: "score-chart", viewBox: `0 0 ${W} ${H}`, width: W, height: H, "data-task": name });
  const swaps = rec.swaps.filter(s => s.score !== null), cands = rec.candidates.filter(c => c.score !== null);
  if (!swaps.length && !cands.length) {
    svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty-text" }, "no scores yet"));
    return svg;
  }
  const times = [...swaps, ...cands].map(p => Date.parse(p.at)), now = Date.now();
  let t0 = Math.min(...times), t1 = Math.max(now, ...times);
  if (t1 - t0 < 60e3) t0 = t1 - 60e3;
  const scores = [...swaps, ...cands].map(p => p.score);
  let lo = Math.min(...scores), hi = Math.max(...scores);
  const pad = Math.max((hi - lo) * 0.12, 0.02);
  lo = Math.max(0, lo - pad); hi = Math.min(1, hi + pad);
  if (hi <= lo) hi = lo + 0.05;
  const x = t => L + (W - L - R) * (t - t0) / (t1 - t0);
  const y = s => T + (H - T - B) * (1 - (s - lo) / (hi - lo));
  for (let i = 0; i <= 4; i++) {  // grid and y labels
    const v = lo + (hi - lo) * i / 4;
    svg.appendChild(el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "gridline" }));
    svg.appendChild(el("text", { x: L - 6, y: y(v) + 3.5, "text-anchor": "end", class: "axis" }, v.toFixed(2)));
  }
  svg.appendChild(el("text", { x: L, y: H - 6, class: "axis" }, timeOf(new Date(t0).toISOString())));
  svg.appendChild(el("text", { x: W - R, y: H - 6, "text-anchor": "end", class: "axis" }, "now"));
  for (const c of cands) {
    const dot = el("circle", { cx: x(Date.parse(c.at)), cy: y(c.score), r: 2.2, class: `cand ${c.outcome === "improved" ? "kept" : ""}` });
    dot.appendChild(el("title", {}, `candidate ${c.outcome}: ${fmtScore(c.score)} at ${timeOf(c.at)}`));
    svg.appendChild(dot);
  }
  if (swaps.length) {  // the live score is a step function that holds until the next swap
    const pts = [];
    swaps.forEach((s, i) => {
      const xi = x(Date.parse(s.at));
      if (i > 0) pts.push(`${xi},${y(swaps[i - 1].score)}`);
      pts.push(`${xi},${y(s.score)}`);
    });
    pts.push(`${x(t1)},${y(swaps[swaps.length - 1].score)}`);
    svg.appendChild(el("polyline", { points: pts.join(" "), class: "live-line", stroke: colourOf(name) }));
    swaps.forEach((s, i) => {
      const cx = x(Date.parse(s.at));
      svg.appendChild(el("line", { x1: cx, x2: cx, y1: T, y2: H - B, class: "swap-rule" }));
      const m = el("circle", { cx, cy: y(s.score), r: 4.5, class: "swap", fill: colourOf(name), "data-score": s.score, "data-path": s.path_id });
      m.appendChild(el("title", {}, `swap ${i + 1}: ${fmtScore(s.score)} → path ${s.path_id.slice(0, 12)} (${s.reason}) at ${timeOf(s.at)}`));
      svg.appendChild(m);
    });
  }
  return svg;
}

// -- the system graph ----------------------------------------------------------------------------
function renderGraph() {
  const g = state.graph, svg = $("#graph");
  svg.innerHTML = "";
  const tasks = g.tasks.filter(t => t.components.length);
  if (!tasks.length) {
    svg.setAttribute("width", 400); svg.setAttribute("height", 60);
    svg.appendChild(el("text", { x: 12, y: 34, class: "empty-text" }, "no live paths yet"));
    $("#legend").innerHTML = "";
    return;
  }
  const colW = Math.max(150, Math.min(240, 960 / tasks.length)), boxW = 112, boxH = 18, rowH = 25, left = 70, top = 64, gap = 8;
  const comps = Object.fromEntries(g.components.map(c => [c.id, c]));
  const colX = Object.fromEntries(tasks.map((t, i) => [t.name, left + i * colW + colW / 2]));
  const width = left + tasks.length * colW + 20, height = top + g.rows * rowH + 40;
  const rowY = r => top + (g.rows - 1 - r) * rowH;  // row 0 (input side) at the bottom
  // x: the mean of the columns of the tasks using it; collisions in a row are pushed apart.
  const pos = {};
  const byRow = {};
  for (const c of g.components) (byRow[c.row] = byRow[c.row] || []).push(c);
  let maxX = width;
  for (const row of Object.values(byRow)) {
    row.forEach(c => { c._x = c.used_by.reduce((a, n) => a + (colX[n] ?? 0), 0) / Math.max(1, c.used_by.length); });
    row.sort((a, b) => a._x - b._x);
    let prev = -Infinity;
    for (const c of row) {
      const x = Math.max(c._x, prev + boxW + gap);
      pos[c.id] = { x, y: rowY(c.row) };
      prev = x;
      maxX = Math.max(maxX, x + boxW / 2 + 20);
    }
  }
  svg.setAttribute("width", maxX); svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${maxX} ${height}`);
  // row guides, and input/output labels just left of the leftmost box
  const x0 = Math.max(8, Math.min(...Object.values(pos).map(p => p.x)) - boxW / 2 - 52);
  const x1 = Math.max(...Object.values(pos).map(p => p.x)) + boxW / 2 + 12;
  const guides = el("g", { class: "guides" });
  for (let r = 0; r < g.rows; r++) guides.appendChild(el("line", { x1: x0 + 44, x2: x1, y1: rowY(r) + boxH / 2, y2: rowY(r) + boxH / 2, class: "row-guide" }));
  guides.appendChild(el("text", { x: x0, y: rowY(0) + boxH / 2 + 4, class: "axis" }, "input"));
  guides.appendChild(el("text", { x: x0, y: rowY(g.rows - 1) + boxH / 2 + 4, class: "axis" }, "output"));
  svg.appendChild(guides);
  // edges: one polyline per task through its components, slightly offset per task at shared boxes
  const edges = el("g", { class: "edges" });
  tasks.forEach((t, ti) => {
    const off = (ti - (tasks.length - 1) / 2) * Math.min(6, 60 / tasks.length);
    const pts = t.components.map(cid => pos[cid]).filter(Boolean);
    let d = "";
    for (let i = 0; i + 1 < pts.length; i++) {
      const a = pts[i], b = pts[i + 1], x1 = a.x + (comps[t.components[i]].used_by.length > 1 ? off : 0),
        x2 = b.x + (comps[t.components[i + 1]].used_by.length > 1 ? off : 0), y1 = a.y, y2 = b.y + boxH, my = (y1 + y2) / 2;
      d += `M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2} `;
    }
    const head = pts[pts.length - 1];
    d += `M${head.x},${head.y} C${head.x},${head.y - 16} ${colX[t.name]},${top - 30} ${colX[t.name]},${top - 22}`;
    const input = pts[0];
    d += ` M${input.x + (comps[t.components[0]].used_by.length > 1 ? off : 0)},${input.y + boxH} L${input.x + (comps[t.components[0]].used_by.length > 1 ? off : 0)},${input.y + boxH + 12}`;
    edges.appendChild(el("path", { d, class: "edge", stroke: colourOf(t.name), "data-task": t.name }));
  });
  svg.appendChild(edges);
  // task labels on top
  for (const t of tasks) {
    const gl = el("g", { class: "task-label", "data-task": t.name, transform: `translate(${colX[t.name]},${top - 36})` });
    gl.appendChild(el("rect", { x: -boxW / 2, y: -14, width: boxW, height: 26, rx: 13, fill: colourOf(t.name) }));
    gl.appendChild(el("text", { y: 4, "text-anchor": "middle" }, t.name));
    gl.appendChild(el("title", {}, `${t.name}: live path ${t.live_path_id} (${t.components.length} components)`));
    gl.onmouseenter = () => setFocus(t.name);
    gl.onmouseleave = () => setFocus(null);
    svg.appendChild(gl);
  }
  // component boxes, each drawn once
  const nodes = el("g", { class: "nodes" });
  for (const c of g.components) {
    const p = pos[c.id], fill = colourOf(c.created_by);
    const shared = c.used_by.length > 1;
    const gn = el("g", { class: `node${c.created_by ? " private" : " root"}${shared ? " shared" : ""}`, transform: `translate(${p.x - boxW / 2},${p.y})`,
      "data-id": c.id, "data-name": c.name, "data-created-by": c.created_by || "", "data-users": c.used_by.join(" "), "data-params": c.params });
    gn.appendChild(el("rect", { width: boxW, height: boxH, rx: 4, fill }));
    gn.appendChild(el("text", { x: boxW / 2, y: 12.5, "text-anchor": "middle" }, c.name + (shared ? ` ×${c.used_by.length}` : "")));
    gn.appendChild(el("title", {}, `${c.name} (${c.id.slice(0, 12)})\n${int.format(c.params)} params\ncreated by ${c.created_by || "root " + (c.root || "")}\nused by ${c.used_by.join(", ")}`));
    nodes.appendChild(gn);
  }
  svg.appendChild(nodes);
  if (state.focus) setFocus(state.focus);
  // legend: creators present in the graph
  const creators = [...new Set(g.components.map(c => c.created_by))];
  const count = who => g.components.filter(c => c.created_by === who).length;
  $("#legend").innerHTML = creators.sort((a, b) => (a === null) - (b === null) || String(a).localeCompare(String(b))).map(who =>
    `<span class="legend-item" data-creator="${esc(who || "")}"><span class="swatch" style="background:${colourOf(who)}"></span>` +
    `${who ? "created by " + esc(who) : "pretrained root" + (g.summary.roots[0] ? " " + esc(g.summary.roots[0].name) : "")} ` +
    `<span class="muted">(${count(who)})</span></span>`).join("");
}

// -- polling -------------------------------------------------------------------------------------
async function refresh() {
  try {
    const [tasks, graph, history, status] = await Promise.all([
      api("tasks"), api("system/graph"), api("system/history"), api("status").catch(() => null)]);
    state.error = null;
    state.updated = new Date();
    state.tasks = tasks;
    state.status = status;
    state.colours = {};
    [...tasks].forEach((t, i) => { state.colours[t.name] = PALETTE[i % PALETTE.length]; });
    // Redraw only what changed, so hovering and tooltips survive a poll.
    const changed = (key, value) => { const s = JSON.stringify(value); if (state.seen[key] === s) return false; state.seen[key] = s; return true; };
    const tasksChanged = changed("tasks", tasks), graphChanged = changed("graph", graph), histChanged = changed("history", history);
    state.graph = graph; state.history = history;
    if (tasksChanged) renderTasks();
    else document.querySelectorAll('#tasks td[data-col="last_improvement"]').forEach(td => { td.textContent = ago(td.dataset.value); });
    if (tasksChanged || histChanged) renderCharts();
    if (tasksChanged || graphChanged) renderGraph();
    renderSummary();  // the cache size comes from /status
    document.body.dataset.loaded = "true";
  } catch (e) {
    state.error = e.message;
  }
  renderHealth();
}

// -- forms ---------------------------------------------------------------------------------------
function showResult(box, kind, html) { box.className = `result ${kind}`; box.innerHTML = html; }
const errorHtml = e => `<b>${esc(e.body && e.body.error ? e.body.error : "error")}</b>: ${esc(e.message)}`;

$("#predict-file").addEventListener("change", () => {
  const f = $("#predict-file").files[0], img = $("#predict-preview");
  if (!f) { img.hidden = true; return; }
  img.src = URL.createObjectURL(f);
  img.hidden = false;
});

$("#predict-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const box = $("#predict-result"), task = $("#predict-task").value, file = $("#predict-file").files[0];
  if (!task || !file) { showResult(box, "bad", "choose a task and an image"); return; }
  const form = new FormData();
  form.append("task", task);
  form.append("files", file, file.name);
  form.append("top", "5");
  showResult(box, "busy", "classifying…");
  const t0 = performance.now();
  try {
    const r = await api("predict/upload", { method: "POST", body: form });
    const p = r.predictions[0], ms = Math.round(performance.now() - t0);
    showResult(box, "ok",
      `<div class="prediction" data-class="${esc(p.class)}" data-label="${p.label}" data-score="${p.score}" data-path="${esc(r.path_id)}">` +
      `<div class="big">${esc(p.class)} <span class="muted">label ${p.label}, ${(100 * p.score).toFixed(1)}%</span></div>` +
      p.top.map(c => `<div class="bar-row"><span class="bar-label">${esc(c.class)}</span><span class="bar"><span style="width:${(100 * c.score).toFixed(1)}%;` +
        `background:${colourOf(task)}"></span></span><span class="bar-value">${(100 * c.score).toFixed(1)}%</span></div>`).join("") +
      `<div class="muted small">task ${esc(r.task)} · path <code>${esc(r.path_id.slice(0, 12))}</code> · ${ms} ms</div></div>`);
  } catch (e) { showResult(box, "bad", errorHtml(e)); }
});

$("#task-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const box = $("#task-result"), name = $("#task-name").value.trim(), file = $("#task-file").files[0];
  const token = $("#task-token").value.trim();
  if (!name || !file) { showResult(box, "bad", "give a name and a data set file"); return; }
  const form = new FormData();
  form.append("name", name);
  form.append("file", file, file.name);
  showResult(box, "busy", `uploading ${esc(file.name)} (${fmtCompact(file.size)}B)…`);
  try {
    const t = await api("tasks", { method: "POST", body: form, headers: token ? { Authorization: `Bearer ${token}` } : {} });
    showResult(box, "ok", `task <b>${esc(t.name)}</b> queued: ${t.classes.length} classes, ${fmtInt(t.n_train)} training ` +
      `(${Math.round(100 * t.val_fraction)}% of them held for validation) and ${fmtInt(t.n_test)} test images. The evolver serves a first path within minutes.`);
    $("#task-form").reset();
    refresh();
  } catch (e) { showResult(box, "bad", errorHtml(e)); }
});

refresh();
setInterval(refresh, POLL_MS);
