// The fusenode dashboard: reads the daemon's JSON API (same origin, bearer token) and draws
// it. Everything that comes from the API (model names, peer IDs, errors: anything a peer or a
// user could have chosen) goes into the page as text (textContent), never as markup.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "fusenode.token";
const REFRESH_MS = 3000;
const MAX_GRIDS = 20; // models whose fragment grid is fetched each refresh

let timer = null;

function $(id) { return document.getElementById(id); }

// el("td", {className: "mono", title: "..."}, "text", child...): attributes are set as
// properties from a fixed list, children are nodes or text.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "className" || key === "title") node[key] = String(value);
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function size(n) {
  if (n === null || n === undefined) return "?";
  const units = [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [unit, scale] of units) if (n >= scale) return (n / scale).toFixed(1) + " " + unit;
  return n + " B";
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
  const m = Math.floor(s % 3600 / 60), r = s % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + r + "s";
}

function short(peer) { return peer ? "…" + String(peer).slice(-6) : "none"; }

// A colour per holder (this node first, then its peers in order), so a grid shows at a
// glance which node answered for what. Red is kept for copies that do not count.
const PALETTE = ["#3565c9", "#2e9b5f", "#8a55c2", "#c27a1e", "#1f8f9c", "#b0479a", "#5d7a1f",
  "#6b7385", "#2d4f8f", "#7a4a2a"];
let colours = new Map();

function colour(peer) {
  if (!colours.has(peer)) colours.set(peer, PALETTE[colours.size % PALETTE.length]);
  return colours.get(peer);
}

class Unauthorized extends Error {}

async function api(path) {
  const response = await fetch(API + path, {
    headers: { Authorization: "Bearer " + localStorage.getItem(TOKEN_KEY) },
    cache: "no-store",
  });
  if (response.status === 401) throw new Unauthorized("wrong or missing token");
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

function replaceRows(table, rows) {
  table.tBodies[0].replaceChildren(...rows);
}

function bar(id, used, total) {
  const pct = total > 0 ? Math.min(100, 100 * used / total) : 0;
  $("bar-" + id).style.width = pct.toFixed(1) + "%";
  $("bar-" + id + "-text").textContent = size(used) + " of " + size(total);
}

function drawNode(st) {
  $("peer-id").textContent = st.peer_id;
  const facts = [
    ["peer ID", st.peer_id],
    ["addresses", st.addresses.join("  ")],
    ["recipient", st.recipient],
    ["version", st.version],
    ["uptime", duration(st.uptime_seconds)],
    ["capacity", st.storage.capacity === "auto" ? "auto (free disk less a reserve)" : size(st.storage.capacity)],
    ["blockstore", size(st.storage.blockstore_bytes) + " (pinned " + size(st.storage.pinned_bytes) + ")"],
    ["disk free", size(st.storage.disk_free_bytes) + " of " + size(st.storage.disk_total_bytes)],
  ];
  $("node-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { className: "mono" }, v)]));
  bar("held", st.storage.held_bytes, st.storage.capacity_bytes);
  bar("pinned", st.storage.pinned_bytes, st.storage.blockstore_bytes);
  const disk = st.storage;
  bar("disk", disk.disk_total_bytes - disk.disk_free_bytes, disk.disk_total_bytes);
}

function drawPeers(st) {
  const held = new Map(st.held.map((h) => [h.peer, h]));
  const p = st.peers;
  $("peers-summary").textContent = p.live + " live, " + p.connected + " connected, " + p.known + " known";
  replaceRows($("peers"), p.list.map((peer) => {
    const state = peer.live ? "live" : peer.connected ? "connected" : "down";
    const score = peer.audit_score;
    const h = held.get(peer.peer_id);
    return el("tr", { "data-peer": peer.peer_id },
      el("td", { className: "mono" }, peer.peer_id),
      el("td", {}, el("span", { className: "pill " + state }, state)),
      el("td", {}, peer.last_seen || "never"),
      el("td", {}, score ? score.score.toFixed(3) + " (" + score.passed + " passed, " + score.failed + " failed)" : "-"),
      el("td", {}, h ? h.fragments + " CIDs, " + size(h.bytes) : "-"),
      el("td", { className: "error" }, peer.last_error || ""));
  }));
}

function drawActivity(st) {
  replaceRows($("activity"), Object.entries(st.activity).map(([name, a]) => {
    const last = a.last;
    let result = "";
    if (last && last.error) result = "error: " + last.error;
    else if (last && last.summary) result = JSON.stringify(last.summary);
    return el("tr", { "data-activity": name },
      el("td", {}, name),
      el("td", {}, a.runs),
      el("td", {}, a.errors),
      el("td", {}, last ? last.time + " (" + last.seconds + " s)" : name === "gc" ? "not run yet" : "-"),
      el("td", { className: "mono" }, result.length > 300 ? result.slice(0, 300) + "…" : result));
  }));
}

function drawJobs(jobs) {
  $("jobs-summary").textContent = jobs.length + " job(s)";
  replaceRows($("jobs"), jobs.slice(-50).reverse().map((j) => el("tr", {},
    el("td", {}, j.id),
    el("td", {}, j.state),
    el("td", { className: "mono" }, j.source),
    el("td", { className: j.error ? "error" : "mono" }, j.result || j.error || ""),
    el("td", {}, j.seconds === null ? "-" : j.seconds))));
}

// One row per segment, one cell per fragment: the holder that answered for it (its colour
// and the end of its peer ID), or why it does not count.
function grid(status) {
  const n = status.n;
  const box = el("div", { className: "grid" });
  box.style.gridTemplateColumns = "max-content repeat(" + n + ", auto)";
  for (const seg of status.segments) {
    const ok = seg.fragments.filter((f) => f.answered && !f.lost).length;
    const row = el("div", { className: "segment" + (ok < n ? " degraded" : ""), "data-segment": seg.index, "data-counted": ok });
    row.append(el("span", { className: "label" }, "segment " + seg.index + " " + ok + "/" + n));
    for (const f of seg.fragments) {
      const state = f.lost ? "lost" : f.answered ? "ok" : f.peer ? "silent" : "unknown";
      const audit = f.audit ? "\naudit: " + f.audit.result + " " + f.audit.time : "";
      const why = f.lost ? "\nlost: " + f.lost : state === "silent" ? "\nholder did not answer" : "";
      const cell = el("div", {
        className: "frag", "data-state": state, "data-peer": f.peer || "",
        title: "fragment " + f.index + "\nholder: " + (f.peer || "none") + audit + why + "\n" + f.cid,
      }, short(f.peer));
      if (f.peer) cell.style.background = colour(f.peer);
      row.append(cell);
    }
    box.append(row);
  }
  return box;
}

function legend(st) {
  const ids = [st.peer_id, ...st.peers.list.map((p) => p.peer_id)];
  return el("div", { className: "legend" }, "holders: ", ...ids.map((id) => {
    const chip = el("span", { className: "chip", title: id }, short(id) + (id === st.peer_id ? " (this node)" : ""));
    chip.style.background = colour(id);
    return chip;
  }));
}

function drawModels(st, listing, statuses) {
  colours = new Map();
  colour(st.peer_id);
  for (const p of st.peers.list) colour(p.peer_id);
  const models = listing.models;
  // The grid's answers are fresher than the state's liveness: a holder that stops answering
  // shows at once.
  const health = models.map((m, i) => {
    const status = statuses[i];
    return status && !(status instanceof Error) && !status.healthy && m.health === "healthy" ? "degraded" : m.health;
  });
  const unhealthy = health.filter((h) => h !== "healthy").length;
  $("models-summary").textContent = models.length + " placed by this node, " + unhealthy + " not healthy";
  $("models").replaceChildren(legend(st), ...models.map((m, i) => {
    const status = statuses[i];
    return el("div", { className: "model", "data-cid": m.cid, "data-health": health[i] },
      el("div", { className: "model-head" },
        el("strong", {}, m.name === null ? "(name not recorded)" : m.name),
        el("span", { className: "pill " + health[i] }, health[i]),
        el("span", { className: "mono" }, m.cid),
        el("span", { className: "muted" }, size(m.size) + ", k=" + m.k + " n=" + m.n + ", " + m.segments + " segment(s), " + m.placement + ", " + m.created)),
      status instanceof Error ? el("p", { className: "error" }, status.message) : status ? grid(status) : null);
  }));
  if (!models.length) $("models").append(el("p", { className: "muted" }, "No model placed by this node yet."));
}

async function refresh() {
  try {
    const [st, listing, jobs] = await Promise.all([api("/status"), api("/ls"), api("/jobs")]);
    const statuses = await Promise.all(listing.models.slice(0, MAX_GRIDS).map(
      (m) => api("/status/" + encodeURIComponent(m.cid)).catch((e) => e)));
    drawNode(st);
    drawModels(st, listing, statuses);
    drawPeers(st);
    drawActivity(st);
    drawJobs(jobs);
    $("error").hidden = true;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  } catch (e) {
    if (e instanceof Unauthorized) return login("That token was refused: paste REPO/api.token again.");
    $("error").textContent = "Cannot read the daemon: " + e.message;
    $("error").hidden = false;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function login(message) {
  clearTimeout(timer);
  localStorage.removeItem(TOKEN_KEY);
  $("main").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = false;
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("forget").addEventListener("click", () => login(""));
  if (localStorage.getItem(TOKEN_KEY)) start(); else login("");
});
