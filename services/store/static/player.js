// The player of the watch page: one <video> and a choice of quality. What it may play is decided by
// `choicesFor` (adaptive HLS where the browser plays it, the MP4 rungs always) and `sourceFor`.
"use strict";

const HLS_TYPE = "application/vnd.apple.mpegurl";
const AUTO = { name: "auto", title: "Adaptive streaming (HLS): the quality follows the connection" };

// What a viewer may choose: "auto", the HLS playlist (the browser switches rungs as the connection allows),
// where the browser plays HLS itself, as Safari and recent Chromium do; then each rendition's MP4.
export function choicesFor(video, element) {
  const adaptive = Boolean(video.hls_url) && element.canPlayType(HLS_TYPE) !== "";
  return adaptive ? [AUTO, ...video.renditions] : video.renditions;
}

// The address the <video> loads for `choice`, one of `choicesFor(video, ...)`.
export function sourceFor(video, choice) {
  return choice === AUTO ? video.hls_url : choice.url;
}

// Show `video` (ready, with renditions) in `container`; a later call with the same renditions keeps playing.
export function mountPlayer(container, video) {
  const title = video.title || video.video_id;
  const signature = video.renditions.map((r) => `${r.name}:${r.size_bytes}`).join(",") + (video.hls_url || "");
  const current = container.querySelector("video");
  if (current && container.dataset.signature === signature) {
    current.setAttribute("aria-label", `${title}, video`);
    return current;
  }
  container.dataset.signature = signature;
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
  picker.setAttribute("aria-label", "Quality");
  const choices = choicesFor(video, element);
  for (const choice of choices) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.rendition = choice.name;
    button.dataset.testid = `rendition-${choice.name}`;
    button.textContent = choice.name;
    button.title = choice.title || `${choice.width}×${choice.height}`;
    button.addEventListener("click", () => choose(element, picker, video, choice));
    picker.append(button);
  }
  container.replaceChildren(element, picker);
  choose(element, picker, video, choices[0]);
  return element;
}

function choose(element, picker, video, rendition) {
  const at = element.currentTime;
  const playing = !element.paused;
  element.src = sourceFor(video, rendition);
  element.dataset.rendition = rendition.name;
  if (at) element.currentTime = at;
  if (playing) element.play().catch(() => {});
  for (const button of picker.querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(button.dataset.rendition === rendition.name));
  }
}
