// The autoscaler's section of the home page: workers and backlog over time, from the store's history
// of `cattube.processing.scaled` and the live stream's `scaled` changes.
"use strict";

import { $ } from "./shared.js";

const CHART_WINDOW_MS = 15 * 60 * 1000;
let scaling = []; // autoscaler changes, oldest first

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

export function addScaling(point) {
  const key = (p) => `${p.at}|${p.from}|${p.to}|${p.backlog}`;
  if (scaling.some((p) => key(p) === key(point))) return;
  scaling.push(point);
  scaling.sort((a, b) => new Date(a.at) - new Date(b.at));
  drawScaling();
}

export function drawScaling() {
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

export async function loadScaling() {
  const response = await fetch("/autoscaler/history?limit=1000");
  if (!response.ok) return;
  const live = scaling;
  scaling = (await response.json()).items;
  for (const point of live) addScaling(point);
  drawScaling();
}
