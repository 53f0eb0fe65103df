// Runplane dashboard: plain JS against the gateway's API (/v1 management, /v2 client),
// authenticated with the admin API key kept in this tab's sessionStorage. Polls every 2 s.
"use strict";

const KEY_ITEM = "runplane.apiKey";
const REFRESH_MS = 2000;
const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]);
const state = { endpoints: [], names: {}, selected: null, timer: null, busy: false };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "style") node.style.cssText = value; // CSSOM: allowed by the page's CSP
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(KEY_ITEM) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : body });
  if (resp.status === 401) throw new Unauthorized("the API key was refused");
  const data = await resp.json().catch(() => null);
  if (!resp.ok) throw new Error((data && data.error) || `HTTP ${resp.status}`);
  return data;
}

function ago(atMs) {
  if (!atMs) return "-";
  const s = Math.max(0, Math.round((Date.now() - atMs) / 1000));
  return s < 120 ? `${s}s ago` : s < 7200 ? `${Math.round(s / 60)}m ago` : `${Math.round(s / 3600)}h ago`;
}

function ms(value) {
  if (value === undefined || value === null) return "-";
  return value < 10000 ? `${value} ms` : `${(value / 1000).toFixed(1)} s`;
}

function epName(id) { return state.names[id] || id; }

// -- sign in -------------------------------------------------------------------------------------

function showLogin(message) {
  clearTimeout(state.timer);
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("api-key").value.trim());
  try {
    await api("GET", "/v1/endpoints");
  } catch (err) {
    sessionStorage.removeItem(KEY_ITEM);
    showLogin(err instanceof Unauthorized ? "That key was refused." : String(err.message || err));
    return;
  }
  $("api-key").value = "";
  start();
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  refresh();
}

// -- live views ----------------------------------------------------------------------------------

async function refresh() {
  if (state.busy) { state.again = true; return; }
  clearTimeout(state.timer);
  state.busy = true;
  try {
    const [endpoints, nodes] = await Promise.all([api("GET", "/v1/endpoints"), api("GET", "/v1/nodes")]);
    state.endpoints = endpoints;
    state.names = Object.fromEntries(endpoints.map((ep) => [ep.id, ep.name]));
    const health = await Promise.all(endpoints.map((ep) =>
      api("GET", `/v2/${ep.id}/health`).catch(() => null)));
    renderEndpoints(endpoints, health, nodes);
    renderNodes(nodes);
    renderSelects(endpoints);
    await renderJobs();
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    if (err instanceof Unauthorized) { showLogin("The API key was refused."); state.busy = false; return; }
    $("updated").textContent = "update failed: " + (err.message || err);
  }
  state.busy = false;
  if (state.again) { state.again = false; refresh(); return; }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

function renderEndpoints(endpoints, health, nodes) {
  const parked = {};
  for (const node of nodes) {
    if (node.lost) continue;
    for (const w of node.workers) if (w.state === "parked") parked[w.endpointId] = (parked[w.endpointId] || 0) + 1;
  }
  const rows = endpoints.map((ep, i) => {
    const h = health[i] || { jobs: {}, workers: {} };
    const num = (v) => el("td", { class: "num", text: v === undefined ? "-" : v });
    return el("tr", {
      "data-endpoint": ep.id, class: ep.id === state.selected ? "selected" : null,
      onclick: () => { state.selected = ep.id; $("jobs-endpoint").value = ep.id; refresh(); },
    },
    el("td", {}, el("strong", { text: ep.name }), el("br"), el("code", { class: "muted", text: ep.id })),
    el("td", { text: `${ep.workersMin}–${ep.workersMax}` + (ep.gpuCount ? ` · ${ep.gpuCount} GPU` : "") }),
    num(h.jobs.inQueue), num(h.jobs.inProgress), num(h.workers.idle), num(h.workers.running),
    num(h.workers.initializing), num(parked[ep.id] || 0), num(h.workers.throttled),
    num(h.jobs.completed), num(h.jobs.failed));
  });
  $("endpoints").tBodies[0].replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: 11, class: "muted", text: "No endpoints yet." }))]));
  const pending = health.map((h, i) => h && h.placement
    ? `${endpoints[i].name}: ${h.placement.pendingWorkers} worker(s) pending — ${h.placement.reason}` : null)
    .filter(Boolean);
  $("placement").textContent = pending.join(" · ");
}

function renderNodes(nodes) {
  const cards = nodes.map((node) => {
    const status = node.lost ? "lost" : node.draining ? "draining" : "up";
    const gpus = node.gpus.map((gpu) => {
      const memPct = gpu.memoryTotalMb ? Math.round(100 * gpu.memoryUsedMb / gpu.memoryTotalMb) : 0;
      return el("div", { class: "gpu", "data-gpu": gpu.uuid },
        el("div", {}, `#${gpu.index} ${gpu.name}`,
          el("div", { class: "muted", text: `${gpu.utilizationPct}% · ${gpu.memoryUsedMb}/${gpu.memoryTotalMb} MB` }),
          el("div", { class: "bar" }, el("span", { style: `width:${memPct}%` }))),
        el("div", { class: gpu.workerId ? "running" : "idle",
          text: gpu.workerId ? `${epName(gpu.endpointId)} / ${gpu.workerId}` : "free" }));
    });
    const workers = node.workers.map((w) => el("li", { "data-worker": w.id },
      el("span", {}, el("code", { text: w.id }), " ", epName(w.endpointId)),
      el("span", { class: "state " + w.state, text: w.state })));
    return el("div", { class: "node", "data-node": node.id },
      el("h3", {}, el("span", { text: node.id }), el("span", { class: "state " + status, text: status })),
      el("div", { class: "muted", text: `${node.hostname} · ${node.runtime} · ${node.cpuCount} CPUs · ` +
        `${Math.round(node.memoryTotalMb / 1024)} GB · GPUs ${node.gpusUsed}/${node.gpus.length} used · ` +
        `heartbeat ${ago(node.heartbeatAtMs)}` }),
      gpus, workers.length ? el("ul", { class: "workers" }, workers)
        : el("div", { class: "muted", text: "no workers" }));
  });
  $("nodes").replaceChildren(...(cards.length ? cards : [el("p", { class: "muted", text: "No nodes." })]));
}

function renderSelects(endpoints) {
  if (!state.selected || !state.names[state.selected]) state.selected = endpoints.length ? endpoints[0].id : null;
  for (const id of ["jobs-endpoint", "job-endpoint"]) {
    const select = $(id);
    const current = id === "jobs-endpoint" ? state.selected : select.value;
    const wanted = endpoints.map((ep) => ep.id).join(",");
    if (select.dataset.ids !== wanted) {
      select.replaceChildren(...endpoints.map((ep) => el("option", { value: ep.id, text: ep.name })));
      select.dataset.ids = wanted;
    }
    if (current && state.names[current]) select.value = current;
  }
}

async function renderJobs() {
  const body = $("jobs").tBodies[0];
  if (!state.selected) { body.replaceChildren(); return; }
  const jobs = await api("GET", `/v1/endpoints/${state.selected}/jobs?limit=15`);
  body.replaceChildren(...(jobs.length ? jobs.map((job) => el("tr", { "data-job": job.id },
    el("td", {}, el("code", { text: job.id })),
    el("td", { class: "status " + job.status, text: job.status }),
    el("td", { text: ago(job.submittedAtMs) }),
    el("td", { class: "num", text: ms(job.delayTime) }),
    el("td", { class: "num", text: ms(job.executionTime) }),
    el("td", {}, el("code", { text: job.workerId || "-" })),
    el("td", { class: "error", text: job.error || "" })))
    : [el("tr", {}, el("td", { colspan: 7, class: "muted", text: "No recent jobs." }))]));
}

// -- test job ------------------------------------------------------------------------------------

async function submitJob(event) {
  event.preventDefault();
  $("job-error").textContent = "";
  const endpoint = $("job-endpoint").value;
  let input;
  try {
    input = JSON.parse($("job-input").value);
  } catch (err) {
    $("job-error").textContent = "The input is not valid JSON: " + err.message;
    return;
  }
  $("job-submit").disabled = true;
  try {
    const job = await api("POST", `/v2/${endpoint}/run`, JSON.stringify({ input }));
    $("job-result").hidden = false;
    $("job-id").textContent = job.id;
    $("job-output").textContent = "";
    $("job-stream").textContent = "";
    $("job-stream").hidden = true;
    await followJob(endpoint, job.id);
  } catch (err) {
    $("job-error").textContent = String(err.message || err);
  } finally {
    $("job-submit").disabled = false;
  }
}

async function followJob(endpoint, jobId) {
  for (;;) {
    const [job, stream] = await Promise.all([
      api("GET", `/v2/${endpoint}/status/${jobId}`),
      api("GET", `/v2/${endpoint}/stream/${jobId}`),
    ]);
    if (stream.stream && stream.stream.length) {
      $("job-stream").hidden = false;
      $("job-stream").textContent += stream.stream.map((c) => JSON.stringify(c.output)).join("\n") + "\n";
    }
    $("job-status").textContent = job.status;
    $("job-status").className = "status " + job.status;
    $("job-timing").textContent = job.delayTime === undefined ? ""
      : `delay ${ms(job.delayTime)} · execution ${ms(job.executionTime)}` + (job.workerId ? ` · worker ${job.workerId}` : "");
    renderQueue(job);
    renderPhases(job.timings);
    if (job.output !== undefined) $("job-output").textContent = JSON.stringify(job.output, null, 2);
    if (job.error) $("job-output").textContent = job.error;
    if (TERMINAL.has(job.status) && !(stream.stream && stream.stream.length)) return;
    await new Promise((resolve) => setTimeout(resolve, 400));
  }
}

// Where the job's time went (/status `timings`): one bar per phase, its share of the total.
const PHASES = [
  ["waitingForCapacityMs", "waiting for capacity"],
  ["workerStartMs", "worker start"],
  ["queuedMs", "queued"],
  ["handlerMs", "handler"],
  ["resultUploadMs", "result upload"],
];

function renderPhases(timings) {
  const list = $("job-phases");
  list.hidden = !timings;
  if (!timings) return;
  const total = Math.max(timings.totalMs, 1);
  list.replaceChildren(...PHASES.filter(([key]) => timings[key] !== undefined).map(([key, label]) => {
    const name = key === "workerStartMs" && timings.workerStart ? `${label} (${timings.workerStart})` : label;
    return el("li", { "data-phase": key },
      el("span", { class: "phase-name", text: name }),
      el("span", { class: "phase-bar", style: `width: ${Math.round((100 * timings[key]) / total)}%` }),
      el("span", { class: "num", text: ms(timings[key]) }));
  }), el("li", { "data-phase": "totalMs" }, el("span", { class: "phase-name", text: "total" }),
    el("span", { class: "phase-bar total" }), el("span", { class: "num", text: ms(timings.totalMs) })));
}

function renderQueue(job) {
  const line = $("job-queue");
  line.hidden = job.queuePosition === undefined;
  if (line.hidden) return;
  line.textContent = `${job.queuePosition} job${job.queuePosition === 1 ? "" : "s"} ahead`
    + (job.etaMs === undefined ? " · no estimate yet" : ` · starts in about ${ms(job.etaMs)}`);
}

// -- wiring --------------------------------------------------------------------------------------

$("login-form").addEventListener("submit", signIn);
$("job-form").addEventListener("submit", submitJob);
$("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY_ITEM); showLogin(); });
$("jobs-endpoint").addEventListener("change", (e) => { state.selected = e.target.value; refresh(); });
if (sessionStorage.getItem(KEY_ITEM)) start(); else showLogin();
