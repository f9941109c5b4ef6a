// The t2v page. It uses only the public API (the same routes curl users have), with no framework.
"use strict";

const $ = (selector) => document.querySelector(selector);
const POLL_MS = 500;
const TERMINAL = new Set(["completed", "failed", "canceled"]);
let limits = null;
let tracking = null; // {id, timer}

// ------------------------------------------------------------------ identity, kept in this browser

function apiKey() { return localStorage.getItem("t2v.apiKey") || ""; }

function sessionId() {
  let id = localStorage.getItem("t2v.session");
  if (!id) {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    id = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    localStorage.setItem("t2v.session", id);
  }
  return id;
}

// ------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, { method = "GET", json } = {}) {
  const headers = {};
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: json === undefined ? undefined : JSON.stringify(json) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    if (response.status === 401) showKeyPanel(error.message);
    throw new ApiError(response.status, error.code || "http_error", error.message || response.statusText);
  }
  return data;
}

// ------------------------------------------------------------------ key panel

function showKeyPanel(message) {
  $("#key-panel").hidden = false;
  $("#key-error").textContent = apiKey() ? (message || "That key was not accepted.") : "";
  $("#api-key").focus();
}

$("#key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  localStorage.setItem("t2v.apiKey", $("#api-key").value.trim());
  $("#api-key").value = "";
  if (await start()) $("#key-panel").hidden = true;
});

// ------------------------------------------------------------------ the form, shaped by the server's limits

function applyLimits() {
  const prompt = $("#prompt");
  prompt.maxLength = limits.max_prompt_chars;
  $("#negative").maxLength = limits.max_prompt_chars;
  $("#size").replaceChildren(...limits.sizes.map((s, i) =>
    new Option(`${s.label} (${s.width}x${s.height})`, String(i))));
  const frames = $("#frames");
  frames.max = limits.max_frames;
  frames.value = limits.max_frames;
  const steps = $("#steps");
  steps.max = limits.max_steps;
  steps.value = limits.default_steps;
  $("#outscale").replaceChildren(...limits.outscales.map((n) => new Option(`${n}x`, String(n))));
  $("#outscale").value = String(Math.max(...limits.outscales));
  $("#upscale").disabled = !limits.upscale;
  $("#upscale").checked = limits.upscale;
  $("#outscale").disabled = !limits.upscale;
  updateCount();
}

function updateCount() {
  const n = $("#prompt").value.length;
  $("#prompt-count").textContent = `${n} / ${limits ? limits.max_prompt_chars : "?"} characters`;
}

$("#prompt").addEventListener("input", updateCount);
$("#upscale").addEventListener("change", () => { $("#outscale").disabled = !$("#upscale").checked; });

function formBody() {
  const size = limits.sizes[Number($("#size").value)];
  const frames = Number($("#frames").value);
  const steps = Number($("#steps").value);
  const prompt = $("#prompt").value;
  if (!prompt.trim()) throw new Error("Write a prompt first.");
  if (!Number.isInteger(frames) || frames < 1 || frames > limits.max_frames || frames % 4 !== 1) {
    throw new Error(`Frames must be 1, 5, 9, ... up to ${limits.max_frames}.`);
  }
  if (!Number.isInteger(steps) || steps < 1 || steps > limits.max_steps) {
    throw new Error(`Steps must be between 1 and ${limits.max_steps}.`);
  }
  const body = { session_id: sessionId(), prompt, width: size.width, height: size.height, num_frames: frames,
                 num_inference_steps: steps, upscale: $("#upscale").checked, outscale: Number($("#outscale").value) };
  if ($("#negative").value.trim()) body.negative_prompt = $("#negative").value;
  if ($("#seed").value !== "") body.seed = Number($("#seed").value);
  return body;
}

$("#job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#form-error").textContent = "";
  let body;
  try { body = formBody(); } catch (error) { $("#form-error").textContent = error.message; return; }
  $("#submit").disabled = true;
  try {
    const accepted = await api("/generate_video", { method: "POST", json: body });
    track(accepted.reference_id);
    loadHistory();
  } catch (error) {
    $("#form-error").textContent = error.message;
  } finally {
    $("#submit").disabled = false;
  }
});

// ------------------------------------------------------------------ one job: progress, cancel, result

function track(id) {
  if (tracking) clearTimeout(tracking.timer);
  tracking = { id, timer: null, shown: null };
  $("#current").hidden = false;
  $("#result").hidden = true;
  $("#player").removeAttribute("src");
  $("#job-error").textContent = "";
  poll(id);
}

async function poll(id) {
  if (!tracking || tracking.id !== id) return;
  try {
    const job = await api(`/jobs/${encodeURIComponent(id)}`);
    render(job);
    if (TERMINAL.has(job.status)) { loadHistory(); return; }
  } catch (error) {
    $("#job-error").textContent = error.message;
  }
  tracking.timer = setTimeout(() => poll(id), POLL_MS);
}

function stageText(job) {
  if (job.status === "queued") return `Queued, position ${job.queue_position}`;
  if (job.status === "completed") return "Done";
  if (job.status === "canceled") return "Canceled";
  if (job.status === "failed") return "Failed";
  const stage = job.stage || "starting";
  const eta = job.eta_s == null ? "" : `, about ${Math.ceil(job.eta_s)} s left`;
  return `${stage[0].toUpperCase()}${stage.slice(1)}: ${Math.round(job.progress * 100)}%${eta}`;
}

function render(job) {
  const percent = Math.round((job.status === "completed" ? 1 : job.progress || 0) * 100);
  $("#current-prompt").textContent = job.params.prompt || job.params.filename || "";
  $("#progress").setAttribute("aria-valuenow", String(percent));
  $("#progress").setAttribute("aria-valuetext", stageText(job));
  $("#progress-fill").style.width = `${percent}%`;
  $("#stage").textContent = stageText(job);
  $("#current").dataset.status = job.status;
  $("#cancel").hidden = TERMINAL.has(job.status);
  $("#job-error").textContent = job.status === "failed" && job.error ? job.error.message : "";
  if (job.status === "completed" && tracking && tracking.shown !== job.reference_id) {
    tracking.shown = job.reference_id;
    $("#player").src = job.video_url;
    $("#player").poster = job.poster_url;
    $("#download").href = job.video_url;
    $("#seed-used").textContent = job.params.seed == null ? "" : `Seed ${job.params.seed}`;
    $("#result").hidden = false;
  }
}

$("#cancel").addEventListener("click", async () => {
  if (!tracking) return;
  try {
    await api(`/jobs/${encodeURIComponent(tracking.id)}/cancel`, { method: "POST" });
  } catch (error) {
    $("#job-error").textContent = error.message;
  }
});

// ------------------------------------------------------------------ history

async function loadHistory() {
  let data;
  try { data = await api("/history", { method: "POST", json: { session_id: sessionId() } }); } catch { return; }
  $("#history").replaceChildren(...data.history.map(historyItem));
}

function historyItem(job) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "secondary";
  button.dataset.id = job.reference_id;
  let thumb;
  if (job.poster_url) {
    thumb = document.createElement("img");
    thumb.src = job.poster_url;
    thumb.alt = "";
  } else {
    thumb = document.createElement("span");
    thumb.className = "thumb";
  }
  const text = document.createElement("span");
  const prompt = document.createElement("span");
  prompt.textContent = job.params.prompt || job.params.filename || job.reference_id;
  const status = document.createElement("span");
  status.className = "status";
  status.textContent = ` ${job.status}`;
  text.append(prompt, document.createElement("br"), status);
  button.append(thumb, text);
  button.setAttribute("aria-label", `${job.status}: ${prompt.textContent}`);
  button.addEventListener("click", () => { track(job.reference_id); $("#current").scrollIntoView(); });
  item.append(button);
  return item;
}

// ------------------------------------------------------------------ start

async function start() {
  $("#session").textContent = sessionId();
  try {
    limits = await api("/limits");
  } catch (error) {
    if (error.status !== 401) $("#form-error").textContent = `The server did not answer: ${error.message}`;
    return false;
  }
  applyLimits();
  loadHistory();
  return true;
}

start();
