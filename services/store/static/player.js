// The player of the watch page: one <video> and a choice of quality. What it plays is decided in one
// place, `sourceFor`, so another way to play (adaptive streaming) changes that function alone.
"use strict";

// The address the <video> loads for `choice`, one of `video.renditions`.
export function sourceFor(video, choice) {
  return choice.url;
}

// Show `video` (ready, with renditions) in `container`; a later call with the same renditions keeps playing.
export function mountPlayer(container, video) {
  const title = video.title || video.video_id;
  const signature = video.renditions.map((r) => `${r.name}:${r.size_bytes}`).join(",");
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
  for (const rendition of video.renditions) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.rendition = rendition.name;
    button.dataset.testid = `rendition-${rendition.name}`;
    button.textContent = rendition.name;
    button.title = `${rendition.width}×${rendition.height}`;
    button.addEventListener("click", () => choose(element, picker, video, rendition));
    picker.append(button);
  }
  container.replaceChildren(element, picker);
  choose(element, picker, video, video.renditions[0]);
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
