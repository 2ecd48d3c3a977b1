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
  const title = $("#upload-title").value.trim() || file.name;
  const body = new FormData();
  body.append("title", title);
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
      const link = document.createElement("a");
      link.href = watchPath(answer.video_id);
      link.textContent = title;
      showStatus(status, "done", "Uploaded: ");
      status.append(link, " is on its way.");
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
