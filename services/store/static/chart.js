// The autoscaler's section of the home page: the processing fleet's running workers (the sum over
// instances) and the queue's backlog over time, from the store's history of `cattube.processing.scaled`
// and the live stream's `scaled` changes. A checkbox per instance adds that instance's own line.
//
// Each instance reports only its own workers, so the fleet is walked here as the store walks it
// (services/store/fleet.py): in time order, an instance counts the `to` of its latest change, before
// its first change in view the `from` of that change, and with no change in view what it last reported.
"use strict";

import { $ } from "./shared.js";

const CHART_WINDOW_MS = 15 * 60 * 1000;
const KEEP_POINTS = 2000;
const COLOURS = 6; // .c0 ... .c5 in style.css
let scaling = []; // every instance's changes, oldest first
let lastHeard = new Map(); // instance -> {workers, t}: counts an instance with no change in view
const shown = new Set(); // instances whose own line a person asked for
const colours = new Map(); // instance -> colour index, kept while the page lives

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// null names the one unnamed instance: events from before instances had names.
const nameOf = (point) => point.instance ?? "";
const labelOf = (name) => name || "unnamed instance";

function colourOf(name) {
  if (!colours.has(name)) colours.set(name, colours.size % COLOURS);
  return `c${colours.get(name)}`;
}

export function addScaling(point) {
  const key = (p) => `${p.at}|${nameOf(p)}|${p.from}|${p.to}|${p.backlog}`;
  if (scaling.some((p) => key(p) === key(point))) return;
  scaling.push(point);
  scaling.sort((a, b) => new Date(a.at) - new Date(b.at));
  // A page open for days: fold the oldest changes into what each instance last reported.
  for (const p of scaling.splice(0, Math.max(0, scaling.length - KEEP_POINTS))) heard(nameOf(p), p.to, p.at);
  drawScaling();
}

function heard(name, workers, at) {
  const t = new Date(at).getTime();
  if (!lastHeard.has(name) || lastHeard.get(name).t <= t) lastHeard.set(name, { workers, t });
}

// The counts of every instance before the first change, then after each: [{t, backlog, counts, fleet}].
function walk(points) {
  const inView = new Set(points.map(nameOf));
  const counts = new Map();
  for (const [name, { workers }] of lastHeard) if (!inView.has(name) && workers > 0) counts.set(name, workers);
  for (const p of points) if (!counts.has(nameOf(p))) counts.set(nameOf(p), p.from);
  const sum = () => [...counts.values()].reduce((a, b) => a + b, 0);
  const initial = { t: -Infinity, backlog: 0, counts: new Map(counts), fleet: sum() };
  const steps = points.map((p) => {
    counts.set(nameOf(p), p.to);
    return { t: new Date(p.at).getTime(), backlog: p.backlog, counts: new Map(counts), fleet: sum(), point: p };
  });
  return [initial, ...steps];
}

export function drawScaling() {
  const chart = $("#scaling-chart");
  for (const child of [...chart.children]) if (!["title", "desc"].includes(child.tagName)) child.remove();
  const [width, height, left, right, top, bottom] = [640, 220, 34, 12, 10, 26];
  const now = Date.now();
  const states = walk(scaling);
  const steps = states.slice(1);

  const fleets = states.map((s) => s.fleet);
  const story = fleets.filter((count, i) => i === 0 || count !== fleets[i - 1]).slice(-12);
  $("#scaling-story").textContent = story.join(" → ");

  const start = steps.length ? Math.max(steps[0].t - 2000, now - CHART_WINDOW_MS) : now - 60000;
  const end = Math.max(now, start + 10000);
  const atStart = states.filter((s) => s.t <= start).at(-1);
  const visible = steps.filter((s) => s.t > start);
  const current = states.at(-1);
  const instances = [...current.counts.keys()]
    .filter((name) => current.counts.get(name) > 0 || visible.some((s) => nameOf(s.point) === name))
    .sort();
  for (const name of [...shown]) if (!instances.includes(name)) shown.delete(name);
  showInstances(instances, current.counts);

  const lines = [
    { value: (s) => s.fleet, attributes: { class: "workers", "data-testid": "workers-line" } },
    { value: (s) => s.backlog, attributes: { class: "backlog", "data-testid": "backlog-line" } },
    ...[...shown].sort().map((name) => ({
      value: (s) => s.counts.get(name) ?? 0,
      attributes: { class: `instance ${colourOf(name)}`, "data-testid": "instance-line", "data-instance": name },
    })),
  ];
  const max = Math.max(1, ...[atStart, ...visible].flatMap((s) => lines.map((line) => line.value(s))));
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

  // Instances under the fleet, backlog on top, dashed: with one job per worker the lines often coincide.
  for (const line of [...lines.slice(2), lines[0], lines[1]]) {
    const values = [atStart, ...visible].map(line.value);
    let d = `M ${x(start)} ${y(values[0])}`;
    visible.forEach((s, i) => (d += ` H ${x(s.t)} V ${y(values[i + 1])}`));
    d += ` H ${x(end)}`;
    // data-values: the line's value at the left edge, then after each change in view.
    chart.append(svg("path", { ...line.attributes, d, "data-values": values.join(" ") }));
  }
  const running = instances.filter((name) => current.counts.get(name) > 0).length;
  $("#scaling-desc").textContent = steps.length
    ? `The fleet's workers went ${story.join(", then ")}; now ${current.fleet} running on ` +
      `${running} instance${running === 1 ? "" : "s"} with a backlog of ${current.backlog}.`
    : "No scaling yet: no workers are running.";

  const rows = steps.slice(-20).reverse().map((s) => {
    const p = s.point;
    const row = document.createElement("tr");
    for (const text of [clock(s.t), labelOf(nameOf(p)), `${p.from} → ${p.to}`, s.fleet, p.backlog, p.reason]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  });
  $("#scaling-table tbody").replaceChildren(...rows);
}

// One checkbox per instance in view, kept across redraws (so focus and choices stay), in name order.
function showInstances(instances, counts) {
  const box = $("#scaling-instances");
  box.hidden = instances.length === 0;
  const list = $("#scaling-instance-list");
  const items = new Map([...list.children].map((item) => [item.dataset.instance, item]));
  const ordered = instances.map((name) => {
    let item = items.get(name);
    if (!item) {
      item = document.createElement("li");
      item.dataset.instance = name;
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox";
      input.dataset.testid = "instance-toggle";
      input.addEventListener("change", () => {
        if (input.checked) shown.add(name);
        else shown.delete(name);
        drawScaling();
      });
      const swatch = document.createElement("span");
      swatch.className = `swatch instance ${colourOf(name)}`;
      swatch.setAttribute("aria-hidden", "true");
      const text = document.createElement("span");
      label.append(input, swatch, text);
      item.append(label);
    }
    const workers = counts.get(name) ?? 0;
    item.querySelector("span:last-child").textContent =
      `${labelOf(name)}: ${workers} worker${workers === 1 ? "" : "s"}`;
    item.querySelector("input").checked = shown.has(name);
    return item;
  });
  // Moved only when out of place: a checkbox taken out of the page would lose the keyboard's focus.
  for (const [name, item] of items) if (!instances.includes(name)) item.remove();
  ordered.forEach((item, i) => {
    if (list.children[i] !== item) list.insertBefore(item, list.children[i] ?? null);
  });
}

export async function loadScaling() {
  const response = await fetch("/autoscaler/history?limit=1000");
  if (!response.ok) return;
  const body = await response.json();
  const live = scaling;
  scaling = body.items;
  lastHeard = new Map();
  for (const instance of body.instances ?? []) heard(nameOf(instance), instance.workers, instance.at);
  for (const point of live) addScaling(point);
  drawScaling();
}
