// The watch page of one video: the player (player.js), its title and description (editable with the
// token), the renditions to download, the status while it is processed (live, from the store's
// server-sent events: this video's changes), and a link to share.
"use strict";

import { mountPlayer } from "./player.js";
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
  takeTokenFromAddress,
  watchPath,
} from "./shared.js";

const videoId = config.video_id;
let shown = null; // the record on the page (the highest version seen)
// An upload's page may be opened before the store hears of the video: the live stream then brings it.
const NOT_HERE =
  "This video is not here: it was deleted, or it was uploaded a moment ago and appears here by itself once the store hears of it.";

// -- showing the video ----------------------------------------------------------------------------

function show(video) {
  if (shown && shown.version > video.version) return; // a late copy never overwrites a newer one
  if (video.status === "deleted") {
    shown = video;
    return missing("This video was deleted.");
  }
  shown = video;
  $("#missing").hidden = true;
  $("#video").hidden = false;
  const title = video.title || "Untitled";
  document.title = `${title} · CatTube`;
  $("#title").textContent = title;
  const status = $("#status");
  status.dataset.status = video.status;
  status.textContent = STATUS_WORDS[video.status] || video.status;
  status.hidden = video.status === "ready";

  const facts = [];
  if (video.duration_s) facts.push(duration(video.duration_s));
  if (video.width && video.height) facts.push(`${video.width}×${video.height}`);
  if (video.created_at) facts.push(`uploaded ${ago(video.created_at)}`);
  $("#byline").textContent = facts.join(" · ");

  // The description as text, its line breaks kept by CSS (white-space: pre-line): never as HTML.
  const description = $("#description");
  description.textContent = video.description || "";
  description.hidden = !video.description;

  showStage(video);
  showDownloads(video);
  showFacts(video);
  showActions();
}

function showStage(video) {
  const playable = video.status === "ready" && video.renditions.length > 0;
  $("#player").hidden = !playable;
  $("#pending").hidden = playable;
  if (playable) {
    mountPlayer($("#player"), video);
    return;
  }
  $("#player").replaceChildren();
  const processing = video.status === "processing" || video.status === "uploaded";
  const percent = Math.round(video.progress ?? 0);
  const words = {
    uploaded: "Uploaded: waiting for a transcoding worker…",
    processing: `Transcoding: ${percent}%${video.speed ? ` at ${video.speed}× real time` : ""}`,
    failed: "This video could not be transcoded.",
    ready: "Ready, but there is nothing to play.",
  };
  $(".pending-status").textContent = words[video.status] || video.status;
  const row = $("#pending .progress-row");
  row.hidden = !processing;
  $("progress", row).value = percent;
  $(".percent", row).textContent = `${percent}%`;
  const note = $("#pending .note");
  note.hidden = !(processing && video.last_error);
  note.textContent = video.last_error ? `An attempt failed, trying again: ${video.last_error}` : "";
  const error = $("#pending .error");
  error.hidden = video.status !== "failed";
  error.textContent = video.error || "";
}

function showDownloads(video) {
  const items = video.renditions.map((rendition) => {
    const link = document.createElement("a");
    link.href = rendition.url;
    // A file name worth keeping: the title, then the rung (the server's own name would be "720p").
    link.download = `${(video.title || video.video_id).replace(/[\\/:*?"<>|]+/g, "_")} ${rendition.name}.mp4`;
    link.dataset.testid = `download-${rendition.name}`;
    link.textContent = `${rendition.name} · ${rendition.width}×${rendition.height} · ${size(rendition.size_bytes)}`;
    const item = document.createElement("li");
    item.append(link);
    return item;
  });
  $("#download-list").replaceChildren(...items);
  $("#downloads").hidden = items.length === 0;
}

function showFacts(video) {
  const facts = [
    ["Video id", video.video_id],
    ["Status", video.status],
    ["Renditions asked for", (video.requested || []).join(", ") || "—"],
  ];
  if (video.skipped?.length) facts.push(["Skipped", `${video.skipped.join(", ")} (larger than the source)`]);
  if (video.retries) facts.push(["Retries", String(video.retries)]);
  if (video.created_at) facts.push(["Uploaded", new Date(video.created_at).toLocaleString()]);
  if (video.updated_at) facts.push(["Changed", new Date(video.updated_at).toLocaleString()]);
  const nodes = facts.flatMap(([term, value]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    return [dt, dd];
  });
  $("#facts").replaceChildren(...nodes);
}

function missing(text) {
  $("#video").hidden = true;
  const note = $("#missing");
  note.hidden = false;
  note.replaceChildren(text, " ");
  const home = document.createElement("a");
  home.href = "/";
  home.textContent = "See all videos.";
  note.append(home);
}

async function load() {
  const response = await fetch(`/videos/${encodeURIComponent(videoId)}`);
  if (response.ok) return show(await response.json());
  // Shown before and gone now: deleted while this page was away from the stream.
  if (response.status === 404) missing(shown ? "This video was deleted." : NOT_HERE);
}

// -- what a person with the token may do ----------------------------------------------------------

function showActions() {
  const allowed = canChange();
  $("#actions").hidden = !allowed;
  $("#locked").hidden = allowed || !config.token_required;
  $('[data-action="retry"]').hidden = !(allowed && shown?.retryable);
  if (!allowed) $("#edit-form").hidden = true;
}

function refused(response) {
  if (response.status === 401) {
    forgetToken(); // refused: stop offering what cannot be done
    showActions();
  }
}

function say(element, state, text) {
  element.hidden = !text;
  element.dataset.state = state;
  element.textContent = text;
}

function openEditor() {
  $("#edit-title").value = shown.title || "";
  $("#edit-description").value = shown.description || "";
  say($("#edit-status"), "", "");
  $("#edit-form").hidden = false;
  $("#edit-title").focus();
}

$("#edit-cancel").addEventListener("click", () => {
  $("#edit-form").hidden = true;
});

$("#edit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const save = $("#edit-save");
  const status = $("#edit-status");
  save.disabled = true;
  say(status, "uploading", "Saving…");
  try {
    const response = await fetch(`/videos/${encodeURIComponent(videoId)}`, {
      method: "PATCH",
      headers: { "Content-Type": "application/merge-patch+json", ...authHeaders() },
      body: JSON.stringify({ title: $("#edit-title").value, description: $("#edit-description").value }),
    });
    refused(response);
    if (!response.ok) return say(status, "error", await problemText(response));
    show(await response.json());
    $("#edit-form").hidden = true;
    say($("#action-status"), "done", "Saved.");
  } catch (error) {
    say(status, "error", `The store cannot be reached: ${error.message || error}`);
  } finally {
    save.disabled = false;
  }
});

$("#actions").addEventListener("click", async (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  const action = button.dataset.action;
  const asking = (on) => {
    $('[data-action="confirm-delete"]').hidden = $('[data-action="cancel-delete"]').hidden = !on;
    $('[data-action="delete"]').hidden = on;
    if (on) $('[data-action="confirm-delete"]').focus();
  };
  if (action === "edit") return openEditor();
  if (action === "delete") return asking(true);
  if (action === "cancel-delete") return asking(false);
  const [method, url] =
    action === "retry"
      ? ["POST", `/videos/${encodeURIComponent(videoId)}/retry`]
      : ["DELETE", `/videos/${encodeURIComponent(videoId)}`];
  button.disabled = true;
  try {
    const response = await fetch(url, { method, headers: authHeaders() });
    refused(response);
    if (!response.ok) return say($("#action-status"), "error", await problemText(response));
    say($("#action-status"), "", "");
    show(await response.json());
  } catch (error) {
    say($("#action-status"), "error", `The store cannot be reached: ${error.message || error}`);
  } finally {
    button.disabled = false;
    asking(false);
  }
});

// -- sharing --------------------------------------------------------------------------------------

// The page's own address as the person reached it, never with the token (it lives after `#`, and is
// taken out of the address before this runs).
const shareUrl = `${location.origin}${watchPath(videoId)}`;
$("#share-url").value = shareUrl;
$("#share-url").addEventListener("focus", (event) => event.target.select());
$("#share-copy").addEventListener("click", async () => {
  const status = $("#share-status");
  try {
    // The clipboard API needs a secure context (https, or this machine); otherwise the selected text is copied.
    if (navigator.clipboard) await navigator.clipboard.writeText(shareUrl);
    else {
      $("#share-url").select();
      if (!document.execCommand("copy")) throw new Error("copy refused");
    }
    say(status, "done", "Copied.");
  } catch {
    $("#share-url").select();
    say(status, "error", "Copy it from the box (press Ctrl+C).");
  }
});

// -- start ----------------------------------------------------------------------------------------

if (takeTokenFromAddress()) {
  say($("#action-status"), "error", "The token in this page's address could not be read (the link looks cut short).");
}
if (config.video) show(config.video);
else missing(NOT_HERE);
follow("/events", { onReady: load, onVideo: (video) => video.video_id === videoId && show(video) });
// "uploaded 3 minutes ago" moves on while nothing changes.
setInterval(() => {
  if (document.visibilityState === "visible" && shown && shown.status !== "deleted") show(shown);
}, 30000);
