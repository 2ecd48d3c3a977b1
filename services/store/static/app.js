// CatTube's page: upload straight to the upload service, follow the catalog live (server-sent
// events from the store), play renditions, chart the autoscaler. No build step, no libraries.
"use strict";

const config = JSON.parse(document.getElementById("cattube-config").textContent);
const $ = (selector, root = document) => root.querySelector(selector);
const TOKEN_KEY = "cattube.token";
const PAGE_SIZE = 50;
const CHART_WINDOW_MS = 15 * 60 * 1000;

const versions = new Map(); // video_id -> highest version seen (a late copy never overwrites a newer one)
let scaling = []; // autoscaler changes, oldest first
let nextCursor = null;

// -- the token (only when CATTUBE_TOKEN is set) ---------------------------------------------------

// The browser may refuse storage (a private window, a policy): the page then keeps the token in memory.
let memoryToken = null;
function storedToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || memoryToken;
  } catch {
    return memoryToken;
  }
}
function storeToken(token) {
  memoryToken = token;
  try {
    localStorage.setItem(TOKEN_KEY, token);
  } catch {}
}

// `cattube up` prints the page's address with the token after `#`: never sent to any server. A link
// cut short or mangled on the way (`#token=%E0%A4%A`) must not stop the page: say so and go on.
function takeTokenFromAddress() {
  const match = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (!match) return;
  history.replaceState(null, "", location.pathname + location.search);
  let token = null;
  try {
    token = decodeURIComponent(match[1]).trim();
  } catch {}
  if (token) {
    storeToken(token);
  } else {
    $("#token-problem").hidden = false;
    $("#token-problem").textContent =
      "The token in this page's address could not be read (the link looks cut short or mangled). " +
      "Open the link `cattube up` printed again, or paste the token below.";
  }
}

// Without the token (when the stack has one), uploading, retrying and deleting would only fail: the page
// shows what a visitor can do (watch) and how to get the rest.
function canChange() {
  return !config.token_required || Boolean(storedToken());
}

function authHeaders() {
  const token = storedToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function showControls() {
  const allowed = canChange();
  $("#upload-form").hidden = !allowed;
  $("#upload-locked").hidden = allowed;
  $("#token-panel").hidden = allowed;
  for (const card of document.querySelectorAll(".video")) renderActions(card);
}

function askForToken() {
  // A token that was refused: forget it, so the page stops offering what it cannot do.
  memoryToken = null;
  try {
    localStorage.removeItem(TOKEN_KEY);
  } catch {}
  showControls();
  $("#token-input").focus();
}

$("#token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("#token-input").value.trim();
  if (!token) return;
  storeToken(token);
  $("#token-input").value = "";
  $("#token-problem").hidden = true;
  showControls();
});

async function problemText(response) {
  try {
    const problem = await response.json();
    return problem.detail || problem.title || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// -- upload ---------------------------------------------------------------------------------------

function setupUploadForm() {
  const form = $("#upload-form");
  form.action = `${config.upload_url}/videos`;
  const choices = $("#upload-renditions");
  for (const name of config.renditions) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = name;
    box.checked = config.default_renditions.includes(name);
    box.dataset.testid = `rendition-choice-${name}`;
    label.append(box, ` ${name}`);
    choices.append(label);
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    upload(form);
  });
}

function upload(form) {
  const status = $("#upload-status");
  const bar = $("#upload-progress");
  const button = $("#upload-submit");
  const renditions = [...form.querySelectorAll("#upload-renditions input:checked")].map((box) => box.value);
  if (!renditions.length) {
    showStatus(status, "error", "Choose at least one rendition.");
    return;
  }
  const file = $("#upload-file").files[0];
  const body = new FormData();
  body.append("title", $("#upload-title").value.trim() || file.name);
  body.append("renditions", renditions.join(","));
  body.append("file", file);

  // XMLHttpRequest, not fetch: it reports upload progress.
  const request = new XMLHttpRequest();
  request.open("POST", `${config.upload_url}/videos`);
  for (const [name, value] of Object.entries(authHeaders())) request.setRequestHeader(name, value);
  request.upload.addEventListener("progress", (event) => {
    if (event.lengthComputable) bar.value = (100 * event.loaded) / event.total;
  });
  request.addEventListener("load", () => {
    button.disabled = false;
    bar.hidden = true;
    let answer = {};
    try {
      answer = JSON.parse(request.responseText);
    } catch {}
    if (request.status === 202) {
      showStatus(status, "done", `Uploaded: video ${answer.video_id} is on its way.`);
      form.reset();
      $("#upload-renditions").querySelectorAll("input").forEach((box) => {
        box.checked = config.default_renditions.includes(box.value);
      });
    } else {
      if (request.status === 401) askForToken();
      showStatus(status, "error", `Upload refused: ${answer.detail || answer.title || request.status}`);
    }
  });
  request.addEventListener("error", () => {
    button.disabled = false;
    bar.hidden = true;
    showStatus(status, "error", `The upload service at ${config.upload_url} cannot be reached.`);
  });
  button.disabled = true;
  bar.hidden = false;
  bar.value = 0;
  showStatus(status, "uploading", `Uploading ${file.name}…`);
  request.send(body);
}

function showStatus(element, state, text) {
  element.dataset.state = state;
  element.textContent = text;
}

// -- the list of videos ---------------------------------------------------------------------------

function cardOf(videoId) {
  return document.querySelector(`.video[data-video-id="${CSS.escape(videoId)}"]`);
}

function upsert(video, { append = false } = {}) {
  const known = versions.get(video.video_id);
  if (known !== undefined && known > video.version) return;
  versions.set(video.video_id, video.version);
  let card = cardOf(video.video_id);
  if (video.status === "deleted") {
    card?.remove();
    updateEmpty();
    return;
  }
  if (!card) {
    card = newCard(video);
    const list = $("#videos");
    if (append) list.append(card);
    else list.prepend(card);
  }
  render(card, video);
  updateEmpty();
}

function newCard(video) {
  const card = document.createElement("li");
  card.className = "video";
  card.dataset.videoId = video.video_id;
  const titleId = `title-${video.video_id}`;
  card.innerHTML = `
    <header><h3 id="${titleId}"></h3><span class="status" data-testid="status"></span></header>
    <div class="progress-row" hidden><progress max="100" value="0" data-testid="progress"></progress><span class="percent"></span></div>
    <p class="error" role="alert" hidden></p>
    <p class="note" hidden></p>
    <div class="player" hidden></div>
    <div class="actions">
      <button type="button" data-action="retry" hidden>Retry</button>
      <button type="button" class="danger" data-action="delete">Delete</button>
      <button type="button" class="danger" data-action="confirm-delete" hidden>Delete for good</button>
      <button type="button" class="secondary" data-action="cancel-delete" hidden>Keep it</button>
    </div>
    <p class="meta"></p>`;
  card.setAttribute("aria-labelledby", titleId);
  card.querySelector(".actions").addEventListener("click", (event) => act(card, event.target.closest("button")));
  return card;
}

function render(card, video) {
  card.dataset.status = video.status;
  card.dataset.version = video.version;
  const title = video.title || video.video_id;
  $("h3", card).textContent = title;
  $(".status", card).textContent = video.status;

  const processing = video.status === "processing" || video.status === "uploaded";
  const row = $(".progress-row", card);
  row.hidden = !processing;
  const percent = Math.round(video.progress ?? 0);
  $("progress", row).value = percent;
  $("progress", row).setAttribute("aria-label", `Transcoding progress of ${title}`);
  $(".percent", row).textContent =
    video.status === "uploaded" ? "waiting for a worker" : `${percent}%${video.speed ? ` · ${video.speed}× real time` : ""}`;

  const error = $(".error", card);
  error.hidden = video.status !== "failed";
  error.textContent = video.error || "";
  const note = $(".note", card);
  note.hidden = !(processing && video.last_error);
  note.textContent = video.last_error ? `An attempt failed, trying again: ${video.last_error}` : "";

  // Only what the store's retry accepts (its record says so): a button that can only get a 409 is a lie.
  card.dataset.retryable = String(Boolean(video.retryable));
  renderActions(card);
  renderPlayer($(".player", card), video, title);

  const facts = [video.video_id];
  if (video.width && video.height) facts.push(`${video.width}×${video.height}`);
  if (video.duration_s) facts.push(`${video.duration_s.toFixed(1)} s`);
  if (video.skipped?.length) facts.push(`skipped ${video.skipped.join(", ")} (larger than the source)`);
  if (video.created_at) facts.push(new Date(video.created_at).toLocaleString());
  $(".meta", card).textContent = facts.join(" · ");
}

function renderActions(card) {
  const allowed = canChange();
  $(".actions", card).hidden = !allowed;
  $('[data-action="retry"]', card).hidden = !(allowed && card.dataset.retryable === "true");
}

function renderPlayer(player, video, title) {
  if (video.status !== "ready" || !video.renditions.length) {
    player.hidden = true;
    player.replaceChildren();
    return;
  }
  player.hidden = false;
  const signature = video.renditions.map((r) => `${r.name}:${r.size_bytes}`).join(",") + (video.hls_url || "");
  if (player.dataset.signature === signature) return; // keep playing: nothing to change
  player.dataset.signature = signature;
  const element = document.createElement("video");
  element.controls = true;
  element.preload = "metadata";
  element.playsInline = true;
  element.dataset.testid = "player";
  element.setAttribute("aria-label", `${title}, video`);
  if (video.poster_url) element.poster = video.poster_url;
  const picker = document.createElement("div");
  picker.className = "rendition-picker";
  picker.setAttribute("role", "group");
  picker.setAttribute("aria-label", `Renditions of ${title}`);
  const choices = sources(video, element);
  for (const source of choices) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.rendition = source.name;
    button.dataset.testid = `rendition-${source.name}`;
    button.textContent = source.label;
    button.addEventListener("click", () => choose(element, picker, source));
    picker.append(button);
  }
  player.replaceChildren(element, picker);
  choose(element, picker, choices[0]);
}

// Adaptive streaming (the rung follows the connection) where the browser plays HLS itself, as Safari and
// recent Chromium do; elsewhere the MP4 rungs, one at a time. Either way each rung stays a choice of its own.
function sources(video, element) {
  const rungs = video.renditions.map((r) => ({
    name: r.name,
    url: r.url,
    label: `${r.name} · ${r.width}×${r.height} · ${size(r.size_bytes)}`,
  }));
  if (!video.hls_url || !element.canPlayType("application/vnd.apple.mpegurl")) return rungs;
  return [{ name: "auto", url: video.hls_url, label: "auto · adaptive (HLS)" }, ...rungs];
}

function choose(element, picker, rendition) {
  const at = element.currentTime;
  const playing = !element.paused;
  element.src = rendition.url;
  element.dataset.rendition = rendition.name;
  if (at) element.currentTime = at;
  if (playing) element.play().catch(() => {});
  for (const button of picker.querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(button.dataset.rendition === rendition.name));
  }
}

async function act(card, button) {
  if (!button) return;
  const id = card.dataset.videoId;
  const confirm = $('[data-action="confirm-delete"]', card);
  const cancel = $('[data-action="cancel-delete"]', card);
  const remove = $('[data-action="delete"]', card);
  const asking = (on) => {
    confirm.hidden = cancel.hidden = !on;
    remove.hidden = on;
    if (on) confirm.focus();
  };
  if (button.dataset.action === "delete") return asking(true);
  if (button.dataset.action === "cancel-delete") return asking(false);
  const [method, url] =
    button.dataset.action === "retry"
      ? ["POST", `/videos/${encodeURIComponent(id)}/retry`]
      : ["DELETE", `/videos/${encodeURIComponent(id)}`];
  button.disabled = true;
  try {
    const response = await fetch(url, { method, headers: authHeaders() });
    if (response.status === 401) askForToken();
    if (!response.ok) throw new Error(await problemText(response));
    upsert(await response.json());
  } catch (error) {
    const note = $(".note", card);
    note.hidden = false;
    note.textContent = String(error.message || error);
  } finally {
    button.disabled = false;
    if (cardOf(id)) asking(false);
  }
}

function size(bytes) {
  if (bytes == null) return "?";
  const units = ["B", "KB", "MB", "GB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function updateEmpty() {
  $("#videos-empty").hidden = $("#videos").children.length > 0;
}

async function loadVideos({ more = false } = {}) {
  const params = new URLSearchParams({ limit: PAGE_SIZE });
  if (more && nextCursor) params.set("cursor", nextCursor);
  const response = await fetch(`/videos?${params}`);
  if (!response.ok) return;
  const page = await response.json();
  const list = $("#videos");
  for (const video of page.items) upsert(video, { append: true });
  if (!more) {
    // A fresh start (or a reconnect): what is not in the newest page is gone, or further down.
    const keep = new Set(page.items.map((video) => video.video_id));
    for (const card of [...list.children]) if (!keep.has(card.dataset.videoId)) card.remove();
    for (const video of page.items) {
      const card = cardOf(video.video_id);
      if (card) list.append(card); // newest first, as listed
    }
  }
  nextCursor = page.next_cursor;
  $("#videos-more").hidden = !nextCursor;
  updateEmpty();
}

$("#videos-more").addEventListener("click", () => loadVideos({ more: true }));

// -- the autoscaler chart -------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function addScaling(point) {
  const key = (p) => `${p.at}|${p.from}|${p.to}|${p.backlog}`;
  if (scaling.some((p) => key(p) === key(point))) return;
  scaling.push(point);
  scaling.sort((a, b) => new Date(a.at) - new Date(b.at));
  drawScaling();
}

function drawScaling() {
  const chart = $("#scaling-chart");
  for (const child of [...chart.children]) if (!["title", "desc"].includes(child.tagName)) child.remove();
  const [width, height, left, right, top, bottom] = [640, 220, 34, 12, 10, 26];
  const now = Date.now();
  const points = scaling.map((p) => ({ ...p, t: new Date(p.at).getTime() }));

  const counts = points.length ? [points[0].from, ...points.map((p) => p.to)] : [0];
  const story = counts.filter((count, i) => i === 0 || count !== counts[i - 1]).slice(-12);
  $("#scaling-story").textContent = story.join(" → ");

  const start = points.length ? Math.max(points[0].t - 2000, now - CHART_WINDOW_MS) : now - 60000;
  const end = Math.max(now, start + 10000);
  const before = points.filter((p) => p.t <= start).at(-1);
  let workers = before ? before.to : points.length ? points[0].from : 0;
  let backlog = before ? before.backlog : 0;
  const visible = points.filter((p) => p.t > start);
  const max = Math.max(1, workers, backlog, ...visible.map((p) => Math.max(p.to, p.backlog)));
  const x = (t) => left + ((t - start) / (end - start)) * (width - left - right);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);

  const step = Math.max(1, Math.ceil(max / 5));
  for (let value = 0; value <= max; value += step) {
    chart.append(svg("line", { class: "axis", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
    chart.append(svg("text", { class: "label", x: left - 6, y: y(value) + 4, "text-anchor": "end" }, value));
  }
  const clock = (t) => new Date(t).toLocaleTimeString();
  chart.append(svg("text", { class: "label", x: left, y: height - 6 }, clock(start)));
  chart.append(svg("text", { class: "label", x: width - right, y: height - 6, "text-anchor": "end" }, clock(end)));

  let workersPath = `M ${x(start)} ${y(workers)}`;
  let backlogPath = `M ${x(start)} ${y(backlog)}`;
  for (const p of visible) {
    workersPath += ` H ${x(p.t)} V ${y(p.to)}`;
    backlogPath += ` H ${x(p.t)} V ${y(p.backlog)}`;
    workers = p.to;
    backlog = p.backlog;
  }
  workersPath += ` H ${x(end)}`;
  backlogPath += ` H ${x(end)}`;
  // Backlog on top, dashed: with one job per worker the two lines often coincide.
  chart.append(svg("path", { class: "workers", d: workersPath, "data-testid": "workers-line" }));
  chart.append(svg("path", { class: "backlog", d: backlogPath, "data-testid": "backlog-line" }));
  $("#scaling-desc").textContent = points.length
    ? `Workers went ${story.join(", then ")}; now ${workers} running with a backlog of ${backlog}.`
    : "No scaling yet: no workers are running.";

  const rows = points.slice(-20).reverse().map((p) => {
    const row = document.createElement("tr");
    for (const text of [clock(p.t), `${p.from} → ${p.to}`, p.backlog, p.reason]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  });
  $("#scaling-table tbody").replaceChildren(...rows);
}

async function loadScaling() {
  const response = await fetch("/autoscaler/history?limit=1000");
  if (!response.ok) return;
  const live = scaling;
  scaling = (await response.json()).items;
  for (const point of live) addScaling(point);
  drawScaling();
}

// -- live updates ---------------------------------------------------------------------------------

function connect() {
  const connection = $("#connection");
  const events = new EventSource("/events");
  // `ready` comes once the store listens for us: load the lists then, so no change falls in between.
  events.addEventListener("ready", () => {
    connection.dataset.state = "live";
    connection.textContent = "Live";
    loadVideos();
    loadScaling();
  });
  events.addEventListener("video", (event) => upsert(JSON.parse(event.data)));
  events.addEventListener("scaled", (event) => addScaling(JSON.parse(event.data)));
  events.addEventListener("error", () => {
    // EventSource reconnects by itself; `ready` reloads the lists when it is back.
    connection.dataset.state = "reconnecting";
    connection.textContent = "Reconnecting…";
  });
}

takeTokenFromAddress();
setupUploadForm();
showControls();
drawScaling();
connect();
// The chart's time axis moves on while nothing changes.
setInterval(() => document.visibilityState === "visible" && drawScaling(), 5000);
