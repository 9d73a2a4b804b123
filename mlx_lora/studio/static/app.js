// mlx_lora studio: the page. Plain JavaScript over the studio's JSON API; charts by uPlot.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null, found: null, jobs: {}, lines: {}, polling: new Set(),
  trainJob: null, exportJob: null, selected: new Set(), focus: null,
  conv: { main: [], base: [] }, cmp: { key: "", cols: [] }, aborts: [], charts: {}, runsTimer: null,
};
let lang = localStorage.getItem("mlx_lora.lang") || (navigator.language.startsWith("zh") ? "zh" : "en");

// ------------------------------------------------------------------ texts, errors, requests

function t(key, vars = {}) {
  const s = (I18N[lang] && I18N[lang][key]) || I18N.en[key] || key;
  return s.replace(/\{(\w+)\}/g, (_, k) => (k in vars ? vars[k] : `{${k}}`));
}

function applyLang() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-ph]").forEach((el) => { el.placeholder = t(el.dataset.i18nPh); });
  $("lang").textContent = lang === "zh" ? "English" : "中文";
  Object.values(state.jobs).forEach(showJob);
  if (state.found) { fillAdapters(); fillRunPicks(); renderRunList(); }
  if (state.preview) renderPreview();
  redrawCharts();
}

function showError(msg) {
  $("banner-text").textContent = `${t("msg.error")}: ${msg}`;
  $("banner").hidden = false;
}

function clearError() { $("banner").hidden = true; $("banner-text").textContent = ""; }

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  let res;
  try { res = await fetch(path, opts); } catch (e) { throw new Error(`the studio is not reachable (${e.message})`); }
  let data;
  try { data = await res.json(); } catch (e) { throw new Error(`${res.status} ${res.statusText}`); }
  if (!res.ok) { throw new Error(data.error || `${res.status}`); }
  return data;
}

// Run an async action from a button: errors go to the banner, the button is busy meanwhile.
function action(button, fn) {
  button.addEventListener("click", async () => {
    if (button.disabled) return;
    clearError();
    button.disabled = true;
    try { await fn(); } catch (e) { showError(e.message); } finally { button.disabled = false; updateButtons(); }
  });
}

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmtTime(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return (h ? `${h}:${String(m).padStart(2, "0")}` : `${m}`) + `:${String(sec).padStart(2, "0")}`;
}

function fmtMem(gb) {
  if (gb === null || gb === undefined) return "–";
  return gb >= 1 ? `${gb.toFixed(2)} GB` : `${Math.round(gb * 1000)} MB`;
}

// ------------------------------------------------------------------ tabs and start-up

function showTab(name) {
  document.querySelectorAll(".tab").forEach((s) => { s.hidden = s.id !== `tab-${name}`; });
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "watch") pollRuns();
  if (name === "chat" || name === "export") refreshScan().catch((e) => showError(e.message));
}

async function refreshScan() {
  state.found = await api("/api/scan");
  const fill = (id, items) => {
    const list = $(id);
    list.replaceChildren(...items.map((v) => el("option", { value: v })));
  };
  fill("models-list", state.found.models);
  fill("data-list", state.found.data);
  fill("runs-list", state.found.runs);
  fillAdapters();
  fillRunPicks();
  renderRunList();
}

function fillAdapters() {
  for (const [id, first] of [["c-adapter", "opt.no_adapter"], ["e-adapter", "opt.no_adapter"]]) {
    const sel = $(id), keep = sel.value;
    const opts = [el("option", { value: "" }, t(first))];
    state.found.adapters.forEach((a) => opts.push(el("option", { value: a }, a)));
    sel.replaceChildren(...opts);
    if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
    else if (state.found.adapters.length) sel.value = state.found.adapters[0];
  }
}

// Compare mode's run list: a checkbox per run, ticks kept across rescans.
function fillRunPicks() {
  const list = $("c-runs-list");
  const ticked = new Set([...list.querySelectorAll("input:checked")].map((i) => i.value));
  const picks = state.found.adapters.map((a) => {
    const box = el("input", { type: "checkbox", value: a, "data-run": a });
    box.checked = ticked.has(a);
    const label = el("label", { class: "check" });
    label.append(box, ` ${a}`);
    return label;
  });
  list.replaceChildren(...(picks.length ? picks : [el("span", { class: "muted" }, t("chat.no_runs"))]));
}

function select(name, values, labels) {
  const s = el("select", { name, id: `t-${name}` });
  values.forEach((v, i) => s.append(el("option", { value: v }, labels ? labels[i] : v)));
  return s;
}

const TRAIN_FIELDS = ["method", "beta", "num_train_epochs", "max_steps", "per_device_train_batch_size",
  "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
  "max_seq_length", "val_split", "eval_steps", "logging_steps", "save_steps", "seed"];
const LORA_FIELDS = ["lora_r", "lora_alpha", "lora_dropout", "target_modules", "quantize"];

function buildForms() {
  const d = state.info.train_defaults;
  const mk = (name) => {
    let input;
    if (name === "lr_scheduler_type") input = select(name, ["linear", "cosine", "constant"]);
    else if (name === "method") input = select(name, state.info.methods || ["sft"]);
    else if (name === "quantize") input = select(name, ["", "4", "8"], ["–", "4 bit", "8 bit"]);
    else input = el("input", { name, id: `t-${name}`, type: name === "target_modules" ? "text" : "number", step: "any" });
    input.value = d[name] === null || d[name] === undefined ? "" : d[name];
    const label = el("label");
    label.append(el("span", { "data-i18n": `f.${name}` }, t(`f.${name}`)), input);
    return label;
  };
  $("train-numbers").replaceChildren(...TRAIN_FIELDS.map(mk));
  $("lora-numbers").replaceChildren(...LORA_FIELDS.map(mk));
  $("t-format").replaceChildren(...state.info.formats.map((f) => el("option", { value: f }, f)));
  $("t-model").value = d.model;
  $("t-data").value = d.data;
  $("t-output").value = d.output_dir;
  const gc = d.gradient_checkpointing;
  $("t-gc").value = gc === null || gc === undefined ? "auto" : gc ? "on" : "off";
  $("e-type").replaceChildren(...state.info.gguf_types.map((g) => el("option", { value: g }, g)));
  $("e-type").value = state.info.export_defaults.gguf_type;
  $("e-mode").replaceChildren(...state.info.export_modes.map((m) => el("option", { value: m }, m)));
  $("e-ctx").value = state.info.export_defaults.num_ctx;
  $("roots").textContent = state.info.roots.join(" : ");
}

function formBody(form) {
  const body = {};
  form.querySelectorAll("input[name], select[name], textarea[name]").forEach((i) => {
    if (i.type === "checkbox") body[i.name] = i.checked;
    else if (i.value.trim() !== "") body[i.name] = i.value.trim();
  });
  return body;
}

// ------------------------------------------------------------------ jobs

function trackJob(snap) {
  state.jobs[snap.id] = snap;
  state.lines[snap.id] = state.lines[snap.id] || [];
  if (!state.polling.has(snap.id)) { state.polling.add(snap.id); pollJob(snap.id, 0); }
  showJob(snap);
}

async function pollJob(id, since) {
  let snap;
  try { snap = await api(`/api/job?id=${encodeURIComponent(id)}&since=${since}`); } catch (e) {
    setTimeout(() => pollJob(id, since), 2000);
    return;
  }
  state.lines[id].push(...snap.lines);
  state.jobs[id] = snap;
  showJob(snap);
  if (["starting", "running", "stopping"].includes(snap.status)) setTimeout(() => pollJob(id, snap.next), 700);
  else { state.polling.delete(id); jobEnded(snap); }
}

function jobText(snap) {
  let s = t("msg.job", { kind: snap.kind, id: snap.id, status: t(`status.${snap.status}`) });
  if (snap.message) s += ` — ${snap.message}`;
  return s;
}

function showJob(snap) {
  if (snap.kind === "train" && state.trainJob === snap.id) {
    $("t-status").textContent = jobText(snap);
    $("t-status").className = `status ${snap.status}`;
    $("t-status").dataset.status = snap.status;
    const p = snap.progress || {};
    $("t-progress").hidden = !p.total_steps;
    if (p.total_steps) { $("t-progress").max = p.total_steps; $("t-progress").value = p.step || 0; }
  }
  if (snap.kind === "export" && state.exportJob === snap.id) {
    $("e-status").textContent = jobText(snap);
    $("e-status").className = `status ${snap.status}`;
    $("e-status").dataset.status = snap.status;
    $("e-log").textContent = state.lines[snap.id].join("\n");
    $("e-log").scrollTop = $("e-log").scrollHeight;
  }
  if (snap.kind === "train" && state.focus && snap.dir === state.focus) showLog(snap.id);
  updateButtons();
}

function jobEnded(snap) {
  if (snap.status === "failed") showError(snap.message || jobText(snap));
  if (snap.kind === "export" && state.exportJob === snap.id) showExportResult(snap.id);
  refreshScan().catch(() => {});
  pollRuns();
}

function runningTrain() {
  const j = state.jobs[state.trainJob];
  return j && ["starting", "running", "stopping"].includes(j.status) ? j : null;
}

function updateButtons() {
  const train = runningTrain();
  $("t-start").disabled = !!train;
  $("t-resume").disabled = !!train;
  $("t-stop").disabled = !train || train.status === "stopping";
  const focusJob = jobForDir(state.focus);
  const fr = focusJob && ["starting", "running", "stopping"].includes(focusJob.status);
  $("w-stop").disabled = !fr || focusJob.status === "stopping";
  $("w-resume").disabled = !focusJob || fr || focusJob.status === "finished";
  const exp = state.jobs[state.exportJob];
  $("e-start").disabled = !!exp && ["starting", "running", "stopping"].includes(exp.status);
}

function jobForDir(dir) {
  const mine = Object.values(state.jobs).filter((j) => j.kind === "train" && j.dir === dir);
  return mine.length ? mine.reduce((a, b) => (a.started > b.started ? a : b)) : null;
}

async function startTrain(resume) {
  const body = formBody($("train-form"));
  if (resume) { body.resume = true; delete body.overwrite_output_dir; }
  const snap = await api("/api/train", body);
  state.trainJob = snap.id;
  state.selected.add(snap.dir);
  state.focus = snap.dir;
  trackJob(snap);
  renderRunList();
}

async function stopJob(id) { if (id) trackJob(await api("/api/stop", { id })); }

// ------------------------------------------------------------------ Train tab

async function preview() {
  const body = formBody($("train-form"));
  $("preview-info").textContent = t("preview.loading");
  $("preview").replaceChildren();
  state.preview = await api("/api/preview", {
    model: body.model, data: body.data, format: body.format,
    system_prompt: body.system_prompt, max_seq_length: body.max_seq_length,
  }).catch((e) => { $("preview-info").textContent = ""; throw e; });
  renderPreview();
}

function renderPreview() {
  const res = state.preview;
  delete $("preview-info").dataset.i18n;
  $("preview-info").textContent = t("preview.summary", { records: res.records, format: res.format })
    + (res.partial ? t("preview.partial", { records: res.records }) : "");
  const blocks = res.examples.map((ex) => {
    const box = el("div", { class: "example" });
    box.append(el("div", { class: "muted" }, t("preview.record", {
      n: ex.record, tokens: ex.tokens, trained: ex.trained_tokens,
      trunc: ex.clipped ? t("preview.clipped") : ex.truncated ? t("preview.truncated") : "",
    })));
    const pre = el("pre", { class: "rendered" });
    ex.segments.forEach((s) => pre.append(el("span", { class: s.trained ? "trained" : "prompt" }, s.text)));
    box.append(pre);
    return box;
  });
  $("preview").replaceChildren(...blocks);
}

async function memoryPlan() {
  const body = formBody($("train-form"));
  $("plan-panel").hidden = false;
  $("plan-text").textContent = "…";
  const res = await api("/api/plan", body).catch((e) => { $("plan-text").textContent = ""; throw e; });
  $("plan-text").textContent = res.text;
  $("plan-text").classList.toggle("bad", !res.ok);
}

// ------------------------------------------------------------------ Watch tab

function renderRunList() {
  const dirs = new Set(state.found ? state.found.runs : []);
  Object.values(state.jobs).filter((j) => j.kind === "train" && j.dir).forEach((j) => dirs.add(j.dir));
  const list = $("run-list");
  if (!dirs.size) { list.replaceChildren(el("p", { class: "muted" }, t("watch.none"))); return; }
  list.replaceChildren(...[...dirs].sort().map((d) => {
    const label = el("label", { class: "check" });
    const box = el("input", { type: "checkbox", value: d, "data-run": d });
    box.checked = state.selected.has(d);
    box.addEventListener("change", () => {
      if (box.checked) { state.selected.add(d); state.focus = d; } else state.selected.delete(d);
      if (!state.selected.has(state.focus)) state.focus = [...state.selected][0] || null;
      pollRuns();
    });
    label.append(box, el("span", {}, ` ${d}`));
    return label;
  }));
}

async function pollRuns() {
  clearTimeout(state.runsTimer);
  const watching = !$("tab-watch").hidden;
  if (state.selected.size && watching) {
    try {
      const res = await api("/api/runs", { dirs: [...state.selected] });
      state.runs = res.runs;
      redrawCharts();
      showCards();
    } catch (e) { showError(e.message); state.selected.clear(); renderRunList(); }
  }
  const live = runningTrain();
  if (watching) state.runsTimer = setTimeout(pollRuns, live ? 1000 : 4000);
}

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];

function drawChart(key, series) {
  const box = $(`chart-${key}`);
  const xs = [...new Set(series.flatMap((s) => s.pts.map((p) => p[0])))].sort((a, b) => a - b);
  const at = new Map(xs.map((x, i) => [x, i]));
  const data = [xs, ...series.map((s) => {
    const ys = new Array(xs.length).fill(null);
    s.pts.forEach(([x, y]) => { ys[at.get(x)] = y; });
    return ys;
  })];
  box.dataset.points = String(series.reduce((n, s) => n + s.pts.length, 0));
  box.dataset.maxStep = String(xs.length ? xs[xs.length - 1] : 0);
  const sig = series.map((s) => s.label).join("|") + lang;
  const old = state.charts[key];
  if (old && old.sig === sig) { old.u.setData(data); return; }
  if (old) old.u.destroy();
  const opts = {
    width: Math.max(box.clientWidth, 300), height: 220,
    scales: { x: { time: false } },
    series: [{ label: "step" }, ...series.map((s, i) => ({
      label: s.label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
      points: { show: key === "eval" },
    }))],
    axes: [{ label: "step" }, { label: key === "loss" ? "loss" : "eval_loss", size: 60 }],
  };
  state.charts[key] = { sig, u: new uPlot(opts, data, box) };
}

function redrawCharts() {
  if (!state.runs) return;
  drawChart("loss", state.runs.map((r) => ({ label: r.dir, pts: r.curves.loss })));
  drawChart("eval", state.runs.map((r) => ({ label: r.dir, pts: r.curves.eval_loss })));
}

function showCards() {
  const run = (state.runs || []).find((r) => r.dir === state.focus) || (state.runs || [])[0];
  if (!run) return;
  const p = (run.job && run.job.progress) || {};
  const last = (pts) => (pts.length ? pts[pts.length - 1][1].toFixed(4) : "–");
  const status = run.job ? run.job.status : run.finished ? "saved" : "unfinished";
  $("w-status").textContent = t(`status.${status}`);
  $("w-status").dataset.status = status;
  const step = p.step !== undefined ? p.step : run.global_step;
  const total = p.total_steps || run.max_steps;
  $("w-step").textContent = total ? `${step} / ${total}` : `${step}`;
  $("w-loss").textContent = p.loss !== undefined && run.job && run.job.status === "running" ? p.loss.toFixed(4) : last(run.curves.loss);
  $("w-eval").textContent = last(run.curves.eval_loss);
  const tps = p.tokens_per_second !== undefined ? p.tokens_per_second : run.figures.train_tokens_per_second;
  $("w-tps").textContent = tps !== undefined ? Math.round(tps).toLocaleString() : "–";
  const mem = p.peak_memory_gb !== undefined ? p.peak_memory_gb : run.figures.peak_memory_gb;
  $("w-mem").textContent = fmtMem(mem);
  $("w-eta").textContent = run.job && run.job.status === "running" ? fmtTime(p.eta_s) : "–";
  const job = jobForDir(run.dir);
  if (job) showLog(job.id); else $("w-log").textContent = t("watch.nolog");
  updateButtons();
}

function showLog(id) {
  const log = $("w-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 20;
  log.textContent = (state.lines[id] || []).join("\n");
  if (atEnd) log.scrollTop = log.scrollHeight;
}

async function resumeFocus() {
  const job = jobForDir(state.focus);
  if (!job) throw new Error(t("msg.need_run"));
  const snap = await api("/api/resume", { id: job.id });
  state.trainJob = snap.id;
  trackJob(snap);
}

// ------------------------------------------------------------------ Chat tab

function bubble(box, role, text) {
  const b = el("div", { class: `msg ${role}` });
  b.append(el("div", { class: "who" }, role === "user" ? t("chat.you") : ""), el("div", { class: "text" }, text));
  box.append(b);
  return b;
}

// POST a chat request; the response once it is a stream (an error answer throws its message).
async function postStream(path, payload) {
  const ctrl = new AbortController();
  state.aborts.push(ctrl);
  const res = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload), signal: ctrl.signal,
  });
  if (!res.ok) {
    let msg = `${res.status}`;
    try { msg = (await res.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return res;
}

// Each JSON line of a streamed answer to onEvent; {"error"} throws; Stop (abort) just ends it.
async function readLines(res, onEvent) {
  const reader = res.body.getReader(), dec = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i); buf = buf.slice(i + 1);
        if (!line.trim()) continue;
        const ev = JSON.parse(line);
        if (ev.error) throw new Error(ev.error);
        onEvent(ev);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") throw e;
  }
}

async function streamAnswer(side, payload, b) {
  const textEl = b.querySelector(".text");
  textEl.textContent = t("chat.loading");
  const res = await postStream("/api/chat", payload);
  let text = "";
  textEl.textContent = "";
  b.classList.add("streaming");
  try {
    await readLines(res, (ev) => {
      if (ev.delta) { text += ev.delta; textEl.textContent = text; }
      if (ev.done) { b.append(el("div", { class: "stats muted" }, ev.stats)); b.dataset.done = "1"; }
    });
  } finally { b.classList.remove("streaming"); }
  state.conv[side].push({ role: "assistant", content: text });
  return text;
}

function chatSettings() {
  return {
    model: $("c-model").value.trim() || null, system_prompt: $("c-system").value,
    temperature: $("c-temp").value, top_p: $("c-top-p").value, max_tokens: $("c-max").value,
  };
}

async function sendChat() {
  const input = $("c-input"), text = input.value.trim();
  if (!text) return;
  if ($("c-runs-mode").checked) return sendCompare(text);
  const compare = $("c-compare").checked;
  const settings = { adapter: $("c-adapter").value || null, ...chatSettings() };
  input.value = "";
  $("c-stop").disabled = false;
  try {
    for (const side of compare ? ["main", "base"] : ["main"]) {
      state.conv[side].push({ role: "user", content: text });
      bubble($(side === "main" ? "c-main" : "c-base"), "user", text);
      const b = bubble($(side === "main" ? "c-main" : "c-base"), "assistant", "");
      const payload = { ...settings, messages: state.conv[side], base: side === "base" };
      try { await streamAnswer(side, payload, b); } catch (e) {
        state.conv[side].pop();
        b.remove();
        throw e;
      }
    }
  } finally { $("c-stop").disabled = true; state.aborts = []; }
}

// Compare mode's columns: the ticked runs, then the base if "side by side" is ticked. Another
// pick starts new columns (each keeps its own conversation while the pick stays).
function compareColumns() {
  const runs = [...$("c-runs-list").querySelectorAll("input:checked")].map((i) => i.value);
  const picked = [...runs, ...($("c-compare").checked ? [null] : [])];
  const key = JSON.stringify(picked);
  if (state.cmp.key === key) return state.cmp.cols;
  state.cmp = { key, cols: picked.map((adapter) => ({ adapter, conv: [] })) };
  $("c-cmp").replaceChildren(...state.cmp.cols.map((c, i) => {
    const col = el("div", { class: "conv-col" });
    const title = c.adapter === null ? el("h3", { "data-i18n": "chat.base" }, t("chat.base")) : el("h3", {}, c.adapter);
    col.append(title, el("div", { class: "conv", id: `c-col-${i}`, "data-run": c.adapter ?? "" }));
    return col;
  }));
  return state.cmp.cols;
}

// One question to every column: one request, the base loaded once with every run beside it.
async function sendCompare(text) {
  const cols = compareColumns();
  $("c-input").value = "";
  $("c-stop").disabled = false;
  const sent = cols.map((c, i) => {
    c.conv.push({ role: "user", content: text });
    const box = $(`c-col-${i}`);
    return { user: bubble(box, "user", text), b: bubble(box, "assistant", t("chat.loading")), text: "" };
  });
  const columns = cols.map((c) => (c.adapter === null ? { base: true, messages: c.conv } : { adapter: c.adapter, messages: c.conv }));
  try {
    const res = await postStream("/api/chat/compare", { ...chatSettings(), columns });
    sent.forEach((s) => { s.b.querySelector(".text").textContent = ""; s.b.classList.add("streaming"); });
    await readLines(res, (ev) => {
      const s = sent[ev.column];
      if (!s) return;
      if (ev.delta) { s.text += ev.delta; s.b.querySelector(".text").textContent = s.text; }
      if (ev.done) { s.b.append(el("div", { class: "stats muted" }, ev.stats)); s.b.dataset.done = "1"; }
    });
    cols.forEach((c, i) => c.conv.push({ role: "assistant", content: sent[i].text }));
  } catch (e) {
    cols.forEach((c, i) => { c.conv.pop(); sent[i].user.remove(); sent[i].b.remove(); });
    throw e;
  } finally {
    sent.forEach((s) => s.b.classList.remove("streaming"));
    $("c-stop").disabled = true; state.aborts = [];
  }
}

function showChatMode() {
  const runs = $("c-runs-mode").checked;
  $("c-runs").hidden = !runs;
  $("c-adapter").disabled = runs;
  $("c-single").hidden = runs;
  $("c-cmp").hidden = !runs;
  $("c-base-col").hidden = runs || !$("c-compare").checked;
}

function resetChat() {
  state.aborts.forEach((a) => a.abort());
  state.conv = { main: [], base: [] };
  state.cmp = { key: "", cols: [] };
  $("c-main").replaceChildren();
  $("c-base").replaceChildren();
  $("c-cmp").replaceChildren();
}

// ------------------------------------------------------------------ Export tab

async function startExport() {
  ["e-verify-report", "e-modelfile", "e-log"].forEach((id) => { $(id).textContent = ""; });
  $("e-cmd").value = "";
  $("e-verify-badge").hidden = true;
  const snap = await api("/api/export", formBody($("export-form")));
  state.exportJob = snap.id;
  trackJob(snap);
}

// The verify report as verify recorded it (Report.to_dict() and the quality figures in
// export.json), laid out like the table the command prints.
function verifyText(v, quality) {
  const width = Math.max(5, ...v.checks.map((c) => c.name.length));
  const lines = [`verify ${v.target} (${v.gguf_type})`];
  v.checks.forEach((c) => lines.push(`  ${c.name.padEnd(width)}  ${c.status.padEnd(7)}  ${c.figures}`));
  v.notes.forEach((n) => lines.push(`  note: ${n}`));
  if (quality) {
    lines.push(`  quality on ${quality.texts} texts, ${quality.scored_tokens} scored tokens (${quality.eval_source})`);
    lines.push(`    ${"model".padEnd(28)} ${"type".padEnd(10)} ${"bits/w".padStart(7)} ${"perplexity".padStart(11)} ${"vs ref".padStart(8)} ${"top-1 = MLX".padStart(11)}`);
    quality.rows.forEach((r) => {
      const bpw = r.bits_per_weight ? r.bits_per_weight.toFixed(2) : "-";
      const pct = 100 * r.perplexity_vs_reference;
      const delta = r.reference ? "—" : `${pct >= 0 ? "+" : ""}${pct.toFixed(2)}%`;
      const agree = r.top1_agreement_mlx == null ? "-" : `${(100 * r.top1_agreement_mlx).toFixed(1)}%`;
      lines.push(`    ${r.label.slice(0, 28).padEnd(28)} ${r.type.padEnd(10)} ${bpw.padStart(7)} ${r.perplexity.toPrecision(4).padStart(11)} ${delta.padStart(8)} ${agree.padStart(11)}`);
    });
  }
  lines.push(`  result: ${v.ok ? "all checks passed" : "MISMATCH (see FAIL lines)"}`);
  return lines.join("\n");
}

async function showExportResult(id) {
  const r = await api(`/api/export/result?id=${encodeURIComponent(id)}`);
  const badge = $("e-verify-badge");
  const key = r.verify === undefined ? "export.noverify" : r.verify_ok ? "export.passed" : "export.failed";
  badge.dataset.i18n = key;  // re-translated by applyLang
  badge.textContent = t(key);
  badge.className = `badge ${r.verify === undefined ? "" : r.verify_ok ? "ok" : "bad"}`;
  badge.dataset.ok = r.verify === undefined ? "" : r.verify_ok ? "1" : "0";
  $("e-verify-report").textContent = r.verify ? verifyText(r.verify, r.quality) : "";
  badge.hidden = false;
  if (r.modelfile) {
    $("e-modelfile").textContent = r.modelfile;
    $("e-modelfile-path").textContent = r.modelfile_path;
    $("e-cmd").value = r.ollama_create;
  }
}

// ------------------------------------------------------------------ wiring

function wire() {
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("lang").addEventListener("click", () => {
    lang = lang === "zh" ? "en" : "zh";
    localStorage.setItem("mlx_lora.lang", lang);
    applyLang();
  });
  $("banner-close").addEventListener("click", clearError);
  action($("t-preview"), preview);
  action($("t-plan"), memoryPlan);
  action($("t-start"), () => startTrain(false));
  action($("t-resume"), () => startTrain(true));
  action($("t-stop"), () => stopJob(state.trainJob));
  action($("w-stop"), () => stopJob((jobForDir(state.focus) || {}).id));
  action($("w-resume"), resumeFocus);
  action($("runs-refresh"), refreshScan);
  action($("c-send"), sendChat);
  $("c-stop").addEventListener("click", () => state.aborts.forEach((a) => a.abort()));
  $("c-reset").addEventListener("click", resetChat);
  $("c-compare").addEventListener("change", showChatMode);
  $("c-runs-mode").addEventListener("change", showChatMode);
  $("c-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("c-send").click();
  });
  action($("e-start"), startExport);
  $("e-copy").addEventListener("click", async () => {
    $("e-cmd").select();
    try { await navigator.clipboard.writeText($("e-cmd").value); } catch (e) { document.execCommand("copy"); }
    $("e-copy").textContent = t("msg.copied");
    setTimeout(() => { $("e-copy").textContent = t("btn.copy"); }, 1500);
  });
  window.addEventListener("resize", () => {
    Object.entries(state.charts).forEach(([key, c]) => c.u.setSize({ width: Math.max($(`chart-${key}`).clientWidth, 300), height: 220 }));
  });
}

async function init() {
  wire();
  applyLang();
  try {
    state.info = await api("/api/info");
    buildForms();
    applyLang();
    await refreshScan();
    const { jobs } = await api("/api/jobs");
    jobs.forEach((j) => {  // a reload keeps showing what this studio runs
      if (j.kind === "train") { state.trainJob = j.id; state.selected.add(j.dir); state.focus = j.dir; }
      if (j.kind === "export") state.exportJob = j.id;
      trackJob(j);
    });
    renderRunList();
  } catch (e) { showError(e.message); }
  showTab((location.hash || "#train").slice(1));
  document.body.dataset.ready = "1";
}

init();
