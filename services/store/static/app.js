// CatTube's home page: upload straight to the upload service, follow the catalog live (server-sent
// events from the store) as a grid of posters, chart the autoscaler. No player here: a card leads to
// the video's watch page (watch.js). No build step, no libraries.
"use strict";

import { addScaling, drawScaling, loadScaling } from "./chart.js";
import {
  $,
  STATUS_WORDS,
  ago,
  authHeaders,
  canChange,
  config,
  duration,
  follow,
  forgetToken,
  problemText,
  size,
  storeToken,
  takeTokenFromAddress,
  watchPath,
} from "./shared.js";

const PAGE_SIZE = 50;
const versions = new Map(); // video_id -> highest version seen (a late copy never overwrites a newer one)
let nextCursor = null;

// -- the token ------------------------------------------------------------------------------------

function showControls() {
  const allowed = canChange();
  $("#upload-form").hidden = !allowed;
  $("#upload-locked").hidden = allowed;
  $("#token-panel").hidden = allowed;
}

function askForToken() {
  forgetToken();
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
  const summarize = () => {
    const chosen = [...choices.querySelectorAll("input:checked")].map((box) => box.value);
    $("#upload-renditions-summary").textContent = chosen.join(", ") || "none chosen";
  };
  choices.addEventListener("change", summarize);
  form.addEventListener("reset", () => setTimeout(summarize));
  summarize();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    upload(form);
  });
}

// Resumable (tus 1.0): the upload's URL is kept in localStorage under the file's name, size and date, so
// choosing the same file again after a reload or a lost connection sends only what the server lacks.
const TUS = { "Tus-Resumable": "1.0.0" };
const CHUNK_BYTES = 8 * 1024 * 1024; // per PATCH: a connection lost mid-way costs at most this much again
const RETRY_DELAYS_MS = [1000, 3000, 10000, 30000];

class UploadRefused extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function resumeKey(file) {
  return `cattube.upload.${file.name}.${file.size}.${file.lastModified}`;
}
function rememberedUpload(file) {
  try {
    return localStorage.getItem(resumeKey(file));
  } catch {
    return null;
  }
}
function rememberUpload(file, url) {
  try {
    localStorage.setItem(resumeKey(file), url);
  } catch {}
}
function forgetUpload(file) {
  try {
    localStorage.removeItem(resumeKey(file));
  } catch {}
}

function base64Text(text) {
  let binary = "";
  for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary);
}

async function refusedBy(response) {
  return new UploadRefused(response.status, `Upload refused: ${await problemText(response)}`);
}

// How much of the upload at `url` the server has; null when it no longer knows it (expired, refused).
async function tusOffset(url) {
  const response = await fetch(url, { method: "HEAD", headers: { ...TUS, ...authHeaders() } });
  if (response.status === 401) throw new UploadRefused(401, "Upload refused: the token was not accepted.");
  const offset = response.headers.get("Upload-Offset");
  return response.ok && offset !== null ? Number(offset) : null;
}

async function tusCreate(file, title, renditions) {
  const metadata = { filename: file.name, title, renditions };
  const response = await fetch(`${config.upload_url}/uploads`, {
    method: "POST",
    headers: {
      ...TUS,
      ...authHeaders(),
      "Upload-Length": String(file.size),
      "Upload-Metadata": Object.entries(metadata)
        .map(([key, value]) => `${key} ${base64Text(value)}`)
        .join(","),
    },
  });
  if (response.status !== 201 || !response.headers.get("Location")) throw await refusedBy(response);
  return response.headers.get("Location");
}

// One PATCH with XMLHttpRequest (fetch reports no upload progress); rejects only when the connection fails.
function tusPatch(url, piece, offset, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("PATCH", url);
    const headers = { ...TUS, ...authHeaders(), "Upload-Offset": String(offset) };
    headers["Content-Type"] = "application/offset+octet-stream";
    for (const [name, value] of Object.entries(headers)) request.setRequestHeader(name, value);
    request.upload.addEventListener("progress", (event) => onProgress(offset + event.loaded));
    request.addEventListener("load", () => resolve(request));
    request.addEventListener("error", () => reject(new Error("connection lost")));
    request.send(piece);
  });
}

function problemOf(request) {
  try {
    const problem = JSON.parse(request.responseText);
    return problem.detail || problem.title || String(request.status);
  } catch {
    return String(request.status);
  }
}

// Send `file` from wherever the server is; returns the video id (a tus upload's id is its video id).
async function sendResumably(file, title, renditions, onProgress, onResume) {
  let url = rememberedUpload(file);
  let offset = url ? await tusOffset(url) : null;
  if (offset === null) {
    url = await tusCreate(file, title, renditions);
    rememberUpload(file, url);
    offset = 0;
  } else if (offset > 0) {
    onResume(offset);
  }
  let failures = 0;
  while (offset < file.size) {
    const end = Math.min(file.size, offset + CHUNK_BYTES);
    let request = null;
    try {
      request = await tusPatch(url, file.slice(offset, end), offset, onProgress);
    } catch {} // the connection was lost: ask where the server is, after a pause
    if (request?.status === 204) {
      offset = Number(request.getResponseHeader("Upload-Offset"));
      failures = 0;
      continue;
    }
    if (request && request.status < 500 && request.status !== 409) {
      if (request.status !== 401) forgetUpload(file); // refused for good: the server kept nothing of it
      throw new UploadRefused(request.status, `Upload refused: ${problemOf(request)}`);
    }
    if (failures === RETRY_DELAYS_MS.length) {
      throw new Error(`The upload service at ${config.upload_url} cannot be reached; choose the file again to resume.`);
    }
    await new Promise((resolve) => setTimeout(resolve, RETRY_DELAYS_MS[failures++]));
    const known = await tusOffset(url).catch(() => undefined);
    if (known === null) throw new Error("The upload was lost on the server (it expired): choose the file again.");
    if (known !== undefined) offset = known;
  }
  forgetUpload(file);
  return url.split("/").pop();
}

async function upload(form) {
  const status = $("#upload-status");
  const bar = $("#upload-progress");
  const button = $("#upload-submit");
  const renditions = [...form.querySelectorAll("#upload-renditions input:checked")].map((box) => box.value);
  if (!renditions.length) {
    showStatus(status, "error", "Choose at least one rendition.");
    return;
  }
  const file = $("#upload-file").files[0];
  const title = $("#upload-title").value.trim() || file.name;
  button.disabled = true;
  bar.hidden = false;
  bar.value = 0;
  showStatus(status, "uploading", `Uploading ${file.name}…`);
  const progress = (sent) => {
    bar.value = file.size ? (100 * sent) / file.size : 100;
  };
  const resumed = (offset) => {
    progress(offset);
    showStatus(status, "uploading", `Resuming ${file.name} at ${Math.floor((100 * offset) / file.size)}%…`);
  };
  try {
    const videoId = await sendResumably(file, title, renditions.join(","), progress, resumed);
    const link = document.createElement("a");
    link.href = watchPath(videoId);
    link.textContent = title;
    showStatus(status, "done", "Uploaded: ");
    status.append(link, " is on its way.");
    form.reset();
    $("#upload-renditions").querySelectorAll("input").forEach((box) => {
      box.checked = config.default_renditions.includes(box.value);
    });
  } catch (error) {
    if (error.status === 401) askForToken();
    // fetch rejects with a TypeError when the service cannot be reached at all.
    const unreachable = error instanceof TypeError;
    showStatus(status, "error", unreachable ? `The upload service at ${config.upload_url} cannot be reached.` : error.message);
  } finally {
    button.disabled = false;
    bar.hidden = true;
  }
}

function showStatus(element, state, text) {
  element.dataset.state = state;
  element.textContent = text;
}

// -- the grid of videos ---------------------------------------------------------------------------

function cardOf(videoId) {
  return document.querySelector(`.card[data-video-id="${CSS.escape(videoId)}"]`);
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

// One link per card (the title); the poster repeats it for the pointer, hidden from the keyboard and
// screen readers so a card is one stop, not two.
function newCard(video) {
  const card = document.createElement("li");
  card.className = "card";
  card.dataset.videoId = video.video_id;
  const titleId = `title-${video.video_id}`;
  const href = watchPath(video.video_id);
  card.innerHTML = `
    <a class="thumb" tabindex="-1" aria-hidden="true">
      <img alt="" decoding="async" data-testid="poster" hidden>
      <span class="placeholder" hidden><span class="placeholder-text"></span>
        <progress max="100" value="0" data-testid="progress" hidden></progress></span>
      <span class="duration" hidden></span>
    </a>
    <div class="card-body">
      <h3 id="${titleId}" class="card-title"><a data-testid="title"></a></h3>
      <p class="byline"><span class="status" data-testid="status"></span><span class="facts"></span></p>
      <p class="error" hidden></p>
      <details class="details"><summary>Details</summary><dl></dl></details>
    </div>`;
  for (const link of card.querySelectorAll("a")) link.href = href;
  card.setAttribute("aria-labelledby", titleId);
  return card;
}

function render(card, video) {
  card.dataset.status = video.status;
  card.dataset.version = video.version;
  const title = video.title || "Untitled";
  $(".card-title a", card).textContent = title;

  const poster = $("img", card);
  const showPoster = video.status === "ready" && Boolean(video.poster_url);
  poster.hidden = !showPoster;
  if (showPoster && poster.getAttribute("src") !== video.poster_url) poster.src = video.poster_url;
  const placeholder = $(".placeholder", card);
  placeholder.hidden = showPoster;
  const processing = video.status === "processing" || video.status === "uploaded";
  const percent = Math.round(video.progress ?? 0);
  $(".placeholder-text", card).textContent =
    video.status === "processing" ? `Processing ${percent}%` : STATUS_WORDS[video.status] || video.status;
  const bar = $("progress", placeholder);
  bar.hidden = !processing;
  bar.value = percent;
  bar.setAttribute("aria-label", `Transcoding progress of ${title}`);
  const length = $(".duration", card);
  length.hidden = !video.duration_s;
  length.textContent = duration(video.duration_s);

  const status = $(".status", card);
  status.hidden = video.status === "ready";
  status.textContent = STATUS_WORDS[video.status] || video.status;
  card.dataset.createdAt = video.created_at || "";
  $(".facts", card).textContent = ago(video.created_at);
  const error = $(".error", card);
  error.hidden = video.status !== "failed";
  error.textContent = video.error || "";

  // What a person rarely needs, out of the way: ids, sizes, what was skipped.
  const facts = [["Video id", video.video_id]];
  if (video.width && video.height) facts.push(["Source", `${video.width}×${video.height}`]);
  if (video.renditions.length) {
    facts.push(["Renditions", video.renditions.map((r) => `${r.name} (${size(r.size_bytes)})`).join(", ")]);
  }
  if (video.skipped?.length) facts.push(["Skipped", `${video.skipped.join(", ")} (larger than the source)`]);
  if (video.created_at) facts.push(["Uploaded", new Date(video.created_at).toLocaleString()]);
  $(".details dl", card).replaceChildren(
    ...facts.flatMap(([term, value]) => [element("dt", term), element("dd", value)]),
  );
}

function element(name, text) {
  const node = document.createElement(name);
  node.textContent = text;
  return node;
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

// -- start ----------------------------------------------------------------------------------------

if (takeTokenFromAddress()) {
  $("#token-problem").hidden = false;
  $("#token-problem").textContent =
    "The token in this page's address could not be read (the link looks cut short or mangled). " +
    "Open the link `cattube up` printed again, or paste the token below.";
}
setupUploadForm();
showControls();
drawScaling();
follow("/events", {
  onReady: () => {
    loadVideos();
    loadScaling();
  },
  onVideo: upsert,
  onScaled: addScaling,
});
// The chart's time axis and the cards' "3 minutes ago" move on while nothing changes.
setInterval(() => {
  if (document.visibilityState !== "visible") return;
  drawScaling();
  for (const card of document.querySelectorAll(".card")) $(".facts", card).textContent = ago(card.dataset.createdAt);
}, 5000);
