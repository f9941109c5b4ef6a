// The t2v page. It uses only the public API (the same routes curl users have), with no framework.
"use strict";

const $ = (selector) => document.querySelector(selector);
const POLL_MS = 500; // the job being watched, when its event stream cannot be had
const STREAM_AGAIN_MS = 15000; // after a stream was refused or lost, poll this long before trying one again
const REFRESH_MS = 3000; // the queue, and the history while any job of this session is waiting or running
const TERMINAL = new Set(["completed", "failed", "canceled"]);
const FORM_KEY = "t2v.form"; // the form's values, kept across reloads
const CURRENT_KEY = "t2v.current"; // the job being watched, followed again after a reload
const SAVED_FIELDS = ["model", "prompt", "negative", "size", "frames", "fps", "steps", "guidance", "seed", "upscale",
                      "outscale", "audio"];
// What a generation job's params hold that /generate_video takes back, for a re-run.
const RERUN_FIELDS = ["model", "prompt", "negative_prompt", "width", "height", "num_frames", "fps",
                      "num_inference_steps", "guidance_scale", "seed", "upscale", "outscale", "loras", "audio"];
const MAX_LORAS = 4; // and scales within +-LORA_SCALE: the API's own bounds (pipeline/spec.py)
const LORA_SCALE = 4;
const INPUT_WORDS = { text: "text to video", image: "image to video", both: "text or image to video" };
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"]; // what the server decodes (pipeline/spec.py)
let limits = null; // GET /limits: the server's caps (prompt, upscaling, uploads, images)
let health = null; // GET /health, as last read: why this server's worker cannot run jobs, if it cannot
let catalog = null; // GET /models: {default, loras, models}
let model = null; // the chosen model's entry in the catalog: its presets, limits and defaults shape the form
let image = null; // the chosen image (a File), for a model that takes one
let imageUrl = null; // its preview's object URL
let tracking = null; // {id, timer, shown, job, stream, streamAfter}
let sessionJobs = []; // the session's jobs, newest first, as /history last answered
let queueLength = null; // jobs queued on the whole server, from /health
let refreshTimer = null;
let originalPrompt = null; // the user's own prompt, once they took the model's suggestion in its place
const canceling = new Set(); // jobs whose cancel was asked for and that have not ended yet

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

function apiFailure(status, data, statusText) {
  const error = (data && data.error) || {};
  if (status === 401) showKeyPanel(error.message);
  return new ApiError(status, error.code || "http_error", error.message || statusText);
}

async function api(path, { method = "GET", json } = {}) {
  const headers = {};
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: json === undefined ? undefined : JSON.stringify(json) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw apiFailure(response.status, data, response.statusText);
  return data;
}

/** A multipart upload with progress; fetch() cannot report an upload's progress. */
function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    if (apiKey()) xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    xhr.responseType = "json";
    xhr.upload.onprogress = (event) => { if (event.lengthComputable) onProgress(event.loaded / event.total); };
    xhr.onload = () => (xhr.status >= 200 && xhr.status < 300 ? resolve(xhr.response) : reject(apiFailure(xhr.status, xhr.response, xhr.statusText)));
    xhr.onerror = () => reject(new ApiError(0, "network_error", "The upload did not reach the server."));
    xhr.send(form);
  });
}

const path = (id, rest = "") => `/jobs/${encodeURIComponent(id)}${rest}`;

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

// ------------------------------------------------------------------ the form: shaped by the server's limits, kept

function applyLimits() {
  $("#prompt").maxLength = limits.max_prompt_chars;
  $("#negative").maxLength = limits.max_prompt_chars;
  $("#suggestion").maxLength = limits.max_prompt_chars;
  for (const select of [$("#outscale"), $("#clip-outscale")]) {
    select.replaceChildren(...limits.outscales.map((n) => new Option(`${n}x`, String(n))));
    select.value = String(Math.max(...limits.outscales));
  }
  $("#upscale").disabled = !limits.upscale;
  $("#upscale").checked = limits.upscale;
  for (const id of ["#clip", "#clip-outscale", "#upload"]) $(id).disabled = !limits.upscale;
  $("#clip-hint").textContent = limits.upscale ? `(at most ${limits.max_upload_mb} MB)` : "(this server has no upscaler)";
  applyModels();
  restoreForm();
  $("#outscale").disabled = !$("#upscale").checked;
  updateCount();
}

/** The models offered: those installed on this server, or, when none is (its workers run elsewhere), every model
 * it accepts jobs for. The default model is always offered, and chosen unless the saved form names another. */
function applyModels() {
  const anyHere = catalog.models.some((m) => m.installed);
  const offered = catalog.models.filter((m) => m.installed || m.id === catalog.default || !anyHere);
  $("#model").replaceChildren(...offered.map((m) =>
    new Option(`${m.id}${m.tiny ? " (tiny build)" : ""}: ${INPUT_WORDS[m.inputs]}`, m.id)));
  const saved = savedForm().model;
  $("#model").value = offered.some((m) => m.id === saved) ? saved : catalog.default;
  if (!$("#model").value && offered.length) $("#model").value = offered[0].id;
  $("#submit").disabled = offered.length === 0;
  showServerNotice();
  applyModel();
}

/** What a newcomer's server (no weights yet) or a broken one says on /health, above the form (Generate is off
 * while no model is offered). Shown again at each refresh, as the worker finds out. */
function showServerNotice() {
  const canGenerate = $("#model").options.length > 0;
  const problem = health && health.model_error;
  const notice = $("#server-notice");
  notice.hidden = canGenerate && !problem;
  notice.textContent = canGenerate ? `This server's worker cannot run every job: ${problem}`
    : `This server cannot make videos yet: ${problem || "it serves no model"}. `
      + "To try the page without weights, start it with T2V_MODEL=tiny T2V_UPSCALER=tiny.";
}

/** Shape the form to the chosen model: its sizes, frame rule, step cap and defaults, and an image where it takes one. */
function applyModel() {
  model = catalog.models.find((m) => m.id === $("#model").value) || null;
  applyLoras();
  if (!model) { $("#size").replaceChildren(); return; }
  const { limits: caps, defaults } = model;
  $("#size").replaceChildren(...model.presets.map((s, i) =>
    new Option(`${s.label} (${s.width}x${s.height})`, String(i))));
  $("#size").disabled = model.size_from_image;
  $("#size-hint").textContent = model.size_from_image ? "(the image's shape sets it)" : "";
  $("#frames-rule").textContent = `(${caps.frame_multiple}k+1)`;
  $("#frames").max = caps.max_frames;
  $("#frames").step = caps.frame_multiple;
  $("#frames").value = defaults.num_frames;
  $("#steps").max = caps.max_steps;
  $("#steps").value = defaults.num_inference_steps;
  $("#fps").value = defaults.fps;
  $("#guidance").value = defaults.guidance_scale;
  $("#audio-field").hidden = !model.audio; // only a model that makes sound (LTX-2) offers it, on by default
  $("#audio").checked = model.audio;
  $("#enhance-field").hidden = !model.prompt_enhancer; // LTX-2 suggests prompts (POST /prompts/enhance)
  if (!model.prompt_enhancer) closeSuggestion();
  $("#image-field").hidden = model.inputs === "text";
  $("#image-hint").textContent = model.inputs === "image" ? "(required)" : `(optional; without one, ${INPUT_WORDS.text})`;
  if (model.inputs === "text") chooseImage(null);
}

/** One row per installed LoRA (GET /models), for a model that takes them: tick it, set its scale. */
function applyLoras() {
  const offered = model && model.lora ? catalog.loras : [];
  $("#lora-field").hidden = offered.length === 0;
  $("#loras").replaceChildren(...offered.map((name, i) => {
    const row = document.createElement("div");
    row.className = "lora";
    row.dataset.name = name;
    row.innerHTML = `<span class="check"><input id="lora-${i}" type="checkbox"> <label for="lora-${i}"></label></span>`
      + `<label for="lora-scale-${i}">Scale</label> <input id="lora-scale-${i}" type="number" min="-${LORA_SCALE}" `
      + `max="${LORA_SCALE}" step="0.05" value="1" inputmode="decimal">`;
    row.querySelector(`label[for="lora-${i}"]`).textContent = name; // a file's name: text, never markup
    return row;
  }));
}

/** The ticked LoRAs as a job's `loras`, checked as the API checks them. */
function chosenLoras() {
  const chosen = [...document.querySelectorAll("#loras .lora")]
    .filter((row) => row.querySelector("[type=checkbox]").checked)
    .map((row) => ({ name: row.dataset.name, scale: Number(row.querySelector("[type=number]").value) }));
  if (chosen.length > MAX_LORAS) throw new Error(`Choose at most ${MAX_LORAS} LoRAs.`);
  const bad = chosen.find((l) => !(Math.abs(l.scale) <= LORA_SCALE));
  if (bad) throw new Error(`The scale of ${bad.name} must be between -${LORA_SCALE} and ${LORA_SCALE}.`);
  return chosen;
}

function saveForm() {
  const values = {};
  for (const id of SAVED_FIELDS) {
    const field = $(`#${id}`);
    values[id] = field.type === "checkbox" ? field.checked : field.value;
  }
  const size = model && model.presets[Number($("#size").value)];
  if (size) values.size = `${size.width}x${size.height}`; // a size, not a place in a list that may change
  localStorage.setItem(FORM_KEY, JSON.stringify(values));
}

function savedForm() {
  try { return JSON.parse(localStorage.getItem(FORM_KEY)) || {}; } catch { return {}; }
}

/** The saved values, over the chosen model's defaults (applyModels has chosen the saved model already). */
function restoreForm() {
  const values = savedForm();
  for (const id of SAVED_FIELDS) {
    if (values[id] === undefined || id === "model") continue;
    const field = $(`#${id}`);
    if (id === "size") {
      if (!model) continue;
      const index = model.presets.findIndex((s) => `${s.width}x${s.height}` === values.size);
      if (index >= 0) field.value = String(index);
    } else if (field.type === "checkbox") {
      if (!field.disabled) field.checked = Boolean(values[id]);
    } else if (field.tagName !== "SELECT" || [...field.options].some((o) => o.value === values[id])) {
      field.value = values[id];
    }
  }
}

function updateCount() {
  const n = $("#prompt").value.length;
  $("#prompt-count").textContent = `${n} / ${limits ? limits.max_prompt_chars : "?"} characters`;
}

$("#prompt").addEventListener("input", updateCount);
$("#model").addEventListener("change", () => { applyModel(); originalPrompt = null; $("#form-error").textContent = ""; });
$("#upscale").addEventListener("change", () => { $("#outscale").disabled = !$("#upscale").checked; });
$("#job-form").addEventListener("input", saveForm);
$("#job-form").addEventListener("change", saveForm);
for (const chip of document.querySelectorAll(".examples .chip")) {
  chip.addEventListener("click", () => {
    $("#prompt").value = chip.textContent;
    originalPrompt = null;
    updateCount();
    saveForm();
    $("#prompt").focus();
  });
}

function formBody() {
  if (!model) throw new Error($("#server-notice").textContent);
  const { limits: caps } = model;
  const size = model.presets[Number($("#size").value)];
  const frames = Number($("#frames").value);
  const steps = Number($("#steps").value);
  const fps = Number($("#fps").value);
  const guidance = Number($("#guidance").value);
  const prompt = $("#prompt").value;
  const k = caps.frame_multiple;
  if (!prompt.trim()) throw new Error("Write a prompt first.");
  if (model.inputs === "image" && !image) {
    throw new Error(`${model.id} makes video from an image: choose or drop one first.`);
  }
  if (!Number.isInteger(frames) || frames < 1 || frames > caps.max_frames || (frames - 1) % k !== 0) {
    throw new Error(`Frames must be 1, ${1 + k}, ${1 + 2 * k}, ... up to ${caps.max_frames} for ${model.id}.`);
  }
  if (!Number.isInteger(steps) || steps < 1 || steps > caps.max_steps) {
    throw new Error(`Steps must be between 1 and ${caps.max_steps}.`);
  }
  if (!Number.isInteger(fps) || fps < 1 || fps > 60) throw new Error("FPS must be between 1 and 60.");
  if ($("#guidance").value === "" || !(guidance >= 1 && guidance <= 30)) {
    throw new Error("Guidance must be between 1 and 30.");
  }
  const body = { session_id: sessionId(), model: model.id, prompt, num_frames: frames, fps, num_inference_steps: steps,
                 guidance_scale: guidance, upscale: $("#upscale").checked, outscale: Number($("#outscale").value) };
  if (!model.size_from_image) Object.assign(body, { width: size.width, height: size.height });
  if ($("#negative").value.trim()) body.negative_prompt = $("#negative").value;
  if (originalPrompt !== null && originalPrompt !== prompt) body.original_prompt = originalPrompt;
  if ($("#seed").value !== "") body.seed = Number($("#seed").value);
  const loras = chosenLoras();
  if (loras.length) body.loras = loras;
  if (model.audio) body.audio = $("#audio").checked; // a silent model refuses `audio: true`
  return body;
}

/** Send a job: as JSON, or with an image as multipart, its other fields as text under their JSON names. */
async function generate(body, file = null) {
  let accepted;
  if (file) {
    const form = new FormData();
    for (const [name, value] of Object.entries(body)) form.append(name, String(value));
    form.append("image", file);
    const shown = (fraction) => { $("#submit-progress").textContent = `Sending the image: ${Math.round(fraction * 100)}%`; };
    try { accepted = await upload("/generate_video", form, shown); } finally { $("#submit-progress").textContent = ""; }
  } else {
    accepted = await api("/generate_video", { method: "POST", json: body });
  }
  originalPrompt = null;
  track(accepted.reference_id);
  loadHistory();
}

// ------------------------------------------------------------------ the model's prompt suggestion (LTX-2)

/** Ask the model's enhancer for a richer prompt (a short job, claimed ahead of the videos) and show it beside
 * the user's; nothing changes in the form until they take it. */
async function suggestPrompt() {
  const prompt = $("#prompt").value;
  if (!prompt.trim()) { $("#enhance-status").textContent = "Write a prompt first."; return; }
  const body = { session_id: sessionId(), model: model.id, prompt };
  $("#enhance").disabled = true;
  $("#enhance-status").textContent = "Asking the model for a suggestion...";
  try {
    let accepted;
    if (image) {
      const form = new FormData();
      for (const [name, value] of Object.entries(body)) form.append(name, value);
      form.append("image", image);
      accepted = await upload("/prompts/enhance", form, () => {});
    } else {
      accepted = await api("/prompts/enhance", { method: "POST", json: body });
    }
    const job = await finished(accepted.reference_id);
    if (job.status !== "completed") throw new Error(job.error ? job.error.message : `The suggestion was ${job.status}.`);
    showSuggestion(job.result.prompt);
  } catch (error) {
    $("#enhance-status").textContent = `No suggestion: ${error.message}`;
  } finally {
    $("#enhance").disabled = false;
  }
}

/** A job once it has ended, polled. */
async function finished(id) {
  for (;;) {
    const job = await api(path(id));
    if (TERMINAL.has(job.status)) return job;
    await new Promise((done) => setTimeout(done, POLL_MS));
  }
}

function showSuggestion(text) {
  $("#suggestion").value = text;
  $("#suggestion-box").hidden = false;
  $("#enhance-status").textContent = "Here is the model's suggestion.";
  $("#suggestion").focus();
}

function closeSuggestion() {
  $("#suggestion-box").hidden = true;
  $("#suggestion").value = "";
}

$("#enhance").addEventListener("click", suggestPrompt);
$("#use-suggestion").addEventListener("click", () => {
  if (originalPrompt === null) originalPrompt = $("#prompt").value; // the job keeps the user's own
  $("#prompt").value = $("#suggestion").value;
  closeSuggestion();
  $("#enhance-status").textContent = "The suggestion is your prompt now; edit it as you like.";
  updateCount();
  saveForm();
  $("#prompt").focus();
});
$("#dismiss-suggestion").addEventListener("click", () => {
  closeSuggestion();
  $("#enhance-status").textContent = "";
});

// ------------------------------------------------------------------ the image, for a model that takes one

/** Take `file` as the job's image (null clears it); a file the server would refuse is named at once. */
function chooseImage(file) {
  if (imageUrl) URL.revokeObjectURL(imageUrl);
  image = imageUrl = null;
  $("#image-preview").hidden = $("#image-clear").hidden = true;
  $("#image-preview").removeAttribute("src");
  if (!file) { $("#image").value = ""; return; }
  if (!IMAGE_TYPES.includes(file.type)) {
    $("#image").value = "";
    $("#form-error").textContent = `${file.name} is not a PNG, JPEG or WebP image.`;
    return;
  }
  if (file.size > limits.max_image_mb * 2 ** 20) {
    $("#image").value = "";
    $("#form-error").textContent = `That image is over ${limits.max_image_mb} MB.`;
    return;
  }
  $("#form-error").textContent = "";
  image = file;
  imageUrl = URL.createObjectURL(file);
  $("#image-preview").src = imageUrl;
  $("#image-preview").hidden = $("#image-clear").hidden = false;
}

$("#image").addEventListener("change", () => chooseImage($("#image").files[0] || null));
$("#image-clear").addEventListener("click", () => { chooseImage(null); $("#image").focus(); });
const drop = $("#image-drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (!file) return;
  chooseImage(file);
  if (image) $("#image").files = event.dataTransfer.files; // the file field names what was dropped
});

$("#job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#form-error").textContent = "";
  let body;
  try { body = formBody(); } catch (error) { $("#form-error").textContent = error.message; return; }
  $("#submit").disabled = true;
  try {
    await generate(body, model.inputs === "text" ? null : image);
    $("#current").scrollIntoView(); // as after an upload: the job, its preview, progress and Cancel in view
  } catch (error) {
    $("#form-error").textContent = error.message;
  } finally {
    $("#submit").disabled = !model;
  }
});

// ------------------------------------------------------------------ a clip to upscale

$("#upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#upload-error").textContent = "";
  const file = $("#clip").files[0];
  if (!file) { $("#upload-error").textContent = "Choose a video file first."; return; }
  if (file.size > limits.max_upload_mb * 2 ** 20) {
    $("#upload-error").textContent = `That file is over ${limits.max_upload_mb} MB.`;
    return;
  }
  const form = new FormData();
  form.append("session_id", sessionId());
  form.append("outscale", $("#clip-outscale").value);
  form.append("video", file);
  $("#upload").disabled = true;
  const shown = (fraction) => { $("#upload-progress").textContent = `Uploading: ${Math.round(fraction * 100)}%`; };
  shown(0);
  try {
    const accepted = await upload("/upscale_video", form, shown);
    $("#upload-form").reset();
    track(accepted.reference_id);
    $("#current").scrollIntoView();
    loadHistory();
  } catch (error) {
    $("#upload-error").textContent = error.message;
  } finally {
    $("#upload").disabled = !limits.upscale;
    $("#upload-progress").textContent = "";
  }
});

// ------------------------------------------------------------------ one job: progress, cancel, result

function track(id) {
  stopFollowing();
  tracking = { id, timer: null, shown: null, job: null, stream: null, streamAfter: 0 };
  localStorage.setItem(CURRENT_KEY, id);
  $("#current").hidden = false;
  $("#result").hidden = true;
  delete $("#current").dataset.status; // the last job's, until this one's first answer
  clearPlayer();
  showPreview(null);
  $("#job-error").textContent = "";
  poll(id);
}

function stopFollowing() {
  if (!tracking) return;
  clearTimeout(tracking.timer);
  if (tracking.stream) tracking.stream.close();
  tracking.stream = null;
}

function forget(id) {
  if (!following(id)) return;
  stopFollowing();
  tracking = null;
  localStorage.removeItem(CURRENT_KEY);
  clearPlayer();
  showPreview(null);
  $("#current").hidden = true;
}

/** Stop and empty the player: hidden, it would play on (its sound too), and it keeps its media without load(). */
function clearPlayer() {
  const player = $("#player");
  player.pause();
  player.removeAttribute("src");
  player.removeAttribute("poster");
  player.load(); // with no source: the old video is dropped (readyState 0)
}

const following = (id) => tracking !== null && tracking.id === id;

/** One GET for the whole job; then its event stream, or, where a stream cannot be had, a GET every POLL_MS. */
async function poll(id) {
  if (!following(id)) return;
  try {
    const job = await api(path(id));
    if (!following(id)) return;
    tracking.job = job;
    render(job);
    if (TERMINAL.has(job.status)) { showPreview(null); loadHistory(); return; }
    if (window.EventSource && job.events_url && Date.now() >= tracking.streamAfter) {
      openStream(id, job.events_url);
      return;
    }
  } catch (error) {
    if (error.status === 404) { forget(id); return; } // deleted, or another key's
    if (error.status === 401) return; // start() follows it again once a key is given
    $("#job-error").textContent = error.message;
  }
  tracking.timer = setTimeout(() => poll(id), POLL_MS);
}

/** Follow the job on GET /jobs/<id>/events (a signed link: EventSource sends no header). The browser resumes a
 * dropped stream by itself with Last-Event-ID; one that is refused (429 when the server has T2V_MAX_STREAMS
 * open) or fails for good falls back to polling, and a stream is tried again after STREAM_AGAIN_MS. */
function openStream(id, url) {
  const source = new EventSource(url);
  tracking.stream = source;
  const update = (fields) => {
    if (!following(id) || tracking.stream !== source) return;
    Object.assign(tracking.job, fields);
    render(tracking.job);
  };
  source.addEventListener("queued", (event) => update({ status: "queued", ...JSON.parse(event.data) }));
  source.addEventListener("progress", (event) => {
    const { progress, stage, eta_s } = JSON.parse(event.data);
    update({ status: "processing", queue_position: 0, progress, stage, eta_s });
  });
  source.addEventListener("preview", (event) => {
    if (following(id) && tracking.stream === source) showPreview(JSON.parse(event.data).url);
  });
  for (const name of TERMINAL) {
    source.addEventListener(name, (event) => {
      source.close();
      if (!following(id) || tracking.stream !== source) return;
      tracking.stream = null;
      showPreview(null);
      tracking.job = JSON.parse(event.data); // the job view, as GET /jobs/<id> gives it
      render(tracking.job);
      loadHistory();
    });
  }
  source.onerror = () => {
    if (source.readyState !== EventSource.CLOSED || !following(id) || tracking.stream !== source) return;
    tracking.stream = null;
    tracking.streamAfter = Date.now() + STREAM_AGAIN_MS;
    tracking.timer = setTimeout(() => poll(id), POLL_MS);
  };
}

/** The latest preview of the latents while the job denoises (an animated WebP), or none. */
function showPreview(url) {
  const image = $("#live-preview");
  if (url) image.src = url; else image.removeAttribute("src");
  image.hidden = !url;
}

/** How many jobs are ahead of a queued job, and how many of those are this session's. */
function ahead(job) {
  const total = Math.max(job.queue_position - 1, 0);
  const mine = sessionJobs.filter((j) => j.status === "queued" && j.queue_position > 0
                                     && j.queue_position < job.queue_position).length;
  return { total, mine: Math.min(mine, total) };
}

function stageText(job) {
  if (canceling.has(job.reference_id) && !TERMINAL.has(job.status)) return "Canceling...";
  if (job.status === "queued") {
    const { total, mine } = ahead(job);
    const place = total === 0 ? "Queued: next"
      : `Queued, position ${job.queue_position}: ${total} ahead${mine ? ` (${mine} of them yours)` : ""}`;
    // The server says so when no live worker would take the job (none running, or none with its model).
    const waiting = (job.stage || "").startsWith("waiting for") ? job.stage : "";
    return waiting ? `${place}. ${waiting[0].toUpperCase()}${waiting.slice(1)}` : place;
  }
  if (job.status === "completed") return "Done";
  if (job.status === "canceled") return "Canceled";
  if (job.status === "failed") return "Failed";
  const stage = job.stage || "starting";
  const eta = job.eta_s == null ? "" : `, about ${Math.ceil(job.eta_s)} s left`;
  return `${stage[0].toUpperCase()}${stage.slice(1)}: ${Math.round(job.progress * 100)}%${eta}`;
}

function render(job) {
  const percent = Math.round((job.status === "completed" ? 1 : job.progress || 0) * 100);
  if (TERMINAL.has(job.status)) canceling.delete(job.reference_id);
  $("#current-prompt").textContent = job.params.prompt || job.params.filename || "";
  $("#progress").setAttribute("aria-valuenow", String(percent));
  $("#progress").setAttribute("aria-valuetext", stageText(job));
  $("#progress-fill").style.width = `${percent}%`;
  $("#stage").textContent = stageText(job);
  $("#current").dataset.status = job.status;
  showCancel(TERMINAL.has(job.status) ? "hidden" : canceling.has(job.reference_id) ? "pending" : "ready");
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

function showCancel(state) {
  const button = $("#cancel");
  button.hidden = state === "hidden";
  button.disabled = state === "pending";
  button.textContent = state === "pending" ? "Canceling..." : "Cancel";
}

$("#cancel").addEventListener("click", async () => {
  if (!tracking || canceling.has(tracking.id)) return;
  const id = tracking.id;
  canceling.add(id); // shown at once; the worker stops at its next check
  showCancel("pending");
  $("#stage").textContent = "Canceling...";
  renderHistory();
  try {
    await api(path(id, "/cancel"), { method: "POST" });
  } catch (error) {
    canceling.delete(id);
    if (error.code !== "already_finished") $("#job-error").textContent = error.message;
    if (tracking && tracking.id === id) showCancel("ready");
  }
  loadHistory();
});

// ------------------------------------------------------------------ queue and history

async function loadHistory() {
  try {
    const { history } = await api("/history", { method: "POST", json: { session_id: sessionId() } });
    sessionJobs = history.filter((job) => job.kind !== "enhance"); // a suggestion is no video
  } catch {
    return;
  }
  renderHistory();
  renderQueue();
}

function active(job) { return !TERMINAL.has(job.status); }

function renderQueue() {
  const waiting = sessionJobs.filter((j) => j.status === "queued").sort((a, b) => a.queue_position - b.queue_position);
  const running = sessionJobs.filter((j) => j.status === "processing");
  const total = queueLength == null ? "" : queueLength === 0 ? "No job is waiting on this server. "
    : `${queueLength} ${queueLength === 1 ? "job is" : "jobs are"} waiting on this server. `;
  const mine = running.length + waiting.length === 0 ? "None of yours is waiting or running."
    : `Yours: ${running.length} running, ${waiting.length} waiting.`;
  $("#queue-summary").textContent = total + mine;
  $("#queue").replaceChildren(...[...running, ...waiting].map((job) => {
    const item = document.createElement("li");
    item.dataset.id = job.reference_id;
    const where = job.status === "processing" ? `running, ${Math.round(job.progress * 100)}%`
      : `position ${job.queue_position}`;
    item.textContent = `${where}: ${job.params.prompt || job.params.filename || job.reference_id}`;
    return item;
  }));
}

async function refresh() {
  if (document.hidden || !limits) return;
  try {
    health = await api("/health");
    queueLength = health.queue_length;
    showServerNotice();
  } catch { queueLength = null; }
  if (sessionJobs.some(active)) await loadHistory(); else renderQueue();
}

function renderHistory() {
  $("#history").replaceChildren(...sessionJobs.map(historyItem));
}

function statusText(job) {
  if (canceling.has(job.reference_id) && active(job)) return "canceling...";
  if (job.status === "queued") return `queued, position ${job.queue_position}`;
  if (job.status === "processing") return `processing, ${Math.round(job.progress * 100)}%`;
  return job.status;
}

function paramsText(job) {
  const p = job.params;
  if (job.kind === "upscale") {
    return `clip ${p.width}x${p.height}, ${p.frames} frames at ${p.fps} fps, upscaled ${p.outscale}x${soundText(job)}`;
  }
  const upscaled = p.upscale ? `, upscaled ${p.outscale}x` : "";
  const loras = (p.loras || []).map((l) => `${l.name} at ${l.scale}`);
  const source = p.model ? `${p.model}${p.image_key ? " from an image" : ""}, ` : "";
  const size = (job.result && job.result.rendered) || p; // a model may size its video by the image
  return `${source}${size.width}x${size.height}, ${p.num_frames} frames at ${p.fps} fps, `
    + `${p.num_inference_steps} steps, guidance ${p.guidance_scale}, seed ${p.seed}${upscaled}`
    + `${loras.length ? `, LoRA ${loras.join(", ")}` : ""}${soundText(job)}`;
}

/** Whether the finished video has a soundtrack, from its result's `audio` (null: a silent MP4). */
function soundText(job) {
  if (!job.result || !("audio" in job.result)) return ""; // not finished, or a record from before audio
  const sound = job.result.audio;
  if (!sound) return ", silent";
  const channels = { 1: "mono", 2: "stereo" }[sound.channels] || `${sound.channels} channels`;
  return `, with sound (${sound.sample_rate / 1000} kHz ${channels})`;
}

function historyItem(job) {
  const item = document.createElement("li");
  item.dataset.id = job.reference_id;
  item.dataset.status = job.status;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
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
  status.textContent = statusText(job);
  const params = document.createElement("span");
  params.className = "params";
  params.textContent = paramsText(job);
  text.append(prompt, document.createElement("br"), status, document.createElement("br"), params);
  open.append(thumb, text);
  open.setAttribute("aria-label", `${statusText(job)}: ${prompt.textContent}`);
  open.addEventListener("click", () => { track(job.reference_id); $("#current").scrollIntoView(); });

  const actions = document.createElement("span");
  actions.className = "actions";
  // An image job's image is not kept after it ends, so only a text job can be run again.
  if (job.kind === "generate" && !job.params.image_key) {
    actions.append(actionButton("Re-run", "rerun", `Re-run with seed ${job.params.seed}`, () => rerun(job)));
  }
  actions.append(actionButton("Delete", "delete", "Delete this job and its video", () => remove(job)));
  item.append(open, actions);
  return item;
}

function actionButton(label, name, title, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = name;
  button.textContent = label;
  button.title = title;
  button.setAttribute("aria-label", title);
  button.addEventListener("click", async () => {
    button.disabled = true;
    $("#history-error").textContent = "";
    try { await onClick(); } catch (error) { $("#history-error").textContent = error.message; }
    button.disabled = false;
  });
  return button;
}

async function rerun(job) {
  const body = { session_id: sessionId() };
  for (const name of RERUN_FIELDS) if (job.params[name] != null) body[name] = job.params[name];
  await generate(body);
  $("#current").scrollIntoView();
}

async function remove(job) {
  if (!confirm(`Delete "${job.params.prompt || job.params.filename || job.reference_id}" and its video?`)) return;
  await api(path(job.reference_id), { method: "DELETE" });
  canceling.delete(job.reference_id);
  forget(job.reference_id);
  await loadHistory();
}

// ------------------------------------------------------------------ start

async function start() {
  $("#session").textContent = sessionId();
  try {
    [limits, catalog, health] = await Promise.all([api("/limits"), api("/models"), api("/health")]);
  } catch (error) {
    if (error.status !== 401) $("#form-error").textContent = `The server did not answer: ${error.message}`;
    return false;
  }
  applyLimits();
  await loadHistory();
  const current = localStorage.getItem(CURRENT_KEY);
  if (current) track(current); // follow it again after a reload (or once a key is given)
  if (refreshTimer === null) refreshTimer = setInterval(refresh, REFRESH_MS);
  refresh();
  return true;
}

start();
