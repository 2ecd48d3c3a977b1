// What both pages share: their config, the token, problem texts, the live stream, and a few formats.
"use strict";

export const config = JSON.parse(document.getElementById("cattube-config").textContent);
export const $ = (selector, root = document) => root.querySelector(selector);
const TOKEN_KEY = "cattube.token";

// -- the token (only when CATTUBE_TOKEN is set) ---------------------------------------------------

// The browser may refuse storage (a private window, a policy): the page then keeps the token in memory.
let memoryToken = null;
export function storedToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || memoryToken;
  } catch {
    return memoryToken;
  }
}

export function storeToken(token) {
  memoryToken = token;
  try {
    localStorage.setItem(TOKEN_KEY, token);
  } catch {}
}

// A token that was refused: forget it, so the page stops offering what it cannot do.
export function forgetToken() {
  memoryToken = null;
  try {
    localStorage.removeItem(TOKEN_KEY);
  } catch {}
}

// `cattube up` prints the page's address with the token after `#`: never sent to any server. A link
// cut short or mangled on the way (`#token=%E0%A4%A`) must not stop the page: true means "say so".
export function takeTokenFromAddress() {
  const match = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (!match) return false;
  history.replaceState(null, "", location.pathname + location.search);
  let token = null;
  try {
    token = decodeURIComponent(match[1]).trim();
  } catch {}
  if (token) storeToken(token);
  return !token;
}

// Without the token (when the stack has one), uploading, editing, retrying and deleting would only fail:
// the pages show what a visitor can do (watch) and how to get the rest.
export function canChange() {
  return !config.token_required || Boolean(storedToken());
}

export function authHeaders() {
  const token = storedToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

export async function problemText(response) {
  try {
    const problem = await response.json();
    return problem.detail || problem.title || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// -- live changes ---------------------------------------------------------------------------------

// The store's server-sent events. `onReady` runs once the store listens (and after every reconnect):
// load what to show then, so no change falls in between.
export function follow(url, { onReady, onVideo, onScaled = () => {} }) {
  const connection = $("#connection");
  const events = new EventSource(url);
  events.addEventListener("ready", () => {
    connection.dataset.state = "live";
    connection.textContent = "Live";
    onReady();
  });
  events.addEventListener("video", (event) => onVideo(JSON.parse(event.data)));
  events.addEventListener("scaled", (event) => onScaled(JSON.parse(event.data)));
  events.addEventListener("error", () => {
    // EventSource reconnects by itself; `ready` reloads when it is back.
    connection.dataset.state = "reconnecting";
    connection.textContent = "Reconnecting…";
  });
  return events;
}

// -- formats --------------------------------------------------------------------------------------

export function size(bytes) {
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

export function duration(seconds) {
  if (seconds == null) return "";
  const total = Math.max(1, Math.round(seconds));
  const [h, m, s] = [Math.floor(total / 3600), Math.floor((total % 3600) / 60), total % 60];
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s)}` : `${m}:${pad(s)}`;
}

const RELATIVE = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const STEPS = [["year", 31536000], ["month", 2592000], ["week", 604800], ["day", 86400], ["hour", 3600], ["minute", 60]];

export function ago(iso) {
  if (!iso) return "";
  const seconds = (new Date(iso).getTime() - Date.now()) / 1000;
  for (const [unit, length] of STEPS) {
    if (Math.abs(seconds) >= length) return RELATIVE.format(Math.round(seconds / length), unit);
  }
  return "just now";
}

export function watchPath(videoId) {
  return `/watch/${encodeURIComponent(videoId)}`;
}

export const STATUS_WORDS = {
  uploaded: "Waiting for a worker",
  processing: "Processing",
  failed: "Failed",
  ready: "Ready",
  deleted: "Deleted",
};
