// 1.x-Distill jobs panel: every background training job with its state, progress, speed, ETA, loss curves and
// latest preview, with Cancel / Resume. Data: GET /xslim/jobs, then the pack's own "xslim.job" websocket events
// (pushed by nodes/jobs.py). A sidebar tab where the frontend offers one (app.extensionManager.registerSidebarTab),
// else a floating panel with a toggle button.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "xslim.job";
const TAB_ID = "xslim-jobs";
const jobs = new Map(); // run name -> summary (as GET /xslim/jobs returns it)
let root = null; // the element the panel renders into while it is shown
let notice = "";

const STATE_COLOURS = {
  starting: "#b58900", running: "#2a7fff", stopping: "#b58900", done: "#2e9e44",
  stopped: "#888", interrupted: "#d9822b", failed: "#d33", damaged: "#d33",
};

function duration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "style") Object.assign(node.style, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function jobPath(name, tail = "") {
  return `/xslim/jobs/${encodeURIComponent(name)}${tail}`;
}

async function refresh() {
  try {
    const response = await api.fetchApi("/xslim/jobs");
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    jobs.clear();
    for (const job of data.jobs) jobs.set(job.name, job);
    notice = "";
  } catch (err) {
    notice = `Could not list the jobs: ${err.message}`;
  }
  render();
}

async function act(name, action, body = {}) {
  try {
    const response = await api.fetchApi(jobPath(name, `/${action}`), {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    jobs.set(name, data);
    notice = "";
  } catch (err) {
    notice = `${action} ${name}: ${err.message}`;
  }
  render();
}

function card(job) {
  const pct = Math.round((job.progress || 0) * 1000) / 10;
  const colour = STATE_COLOURS[job.state] || "#888";
  const losses = Object.entries(job.losses || {}).map(([k, v]) => `${k.replace("loss_", "")} ${Number(v).toPrecision(3)}`).join(" · ");
  const version = `${job.iteration}-${job.state}`;
  const buttons = el("div", { class: "xslim-job-buttons", style: { display: "flex", gap: "6px", marginTop: "6px" } },
    // a plain cancel repeated is the same request; only "Force stop" (while stopping) ends the worker at once
    job.can_cancel ? el("button", { class: "xslim-job-cancel", onclick: () => act(job.name, "cancel", { force: job.state === "stopping" }),
      title: job.state === "stopping" ? "Stop now without waiting for the save" : "Save a checkpoint and stop" },
      job.state === "stopping" ? "Force stop" : "Cancel") : null,
    job.can_resume ? el("button", { class: "xslim-job-resume", onclick: () => act(job.name, "resume"),
      title: "Continue from the last checkpoint" }, "Resume") : null);
  return el("div", { class: "xslim-job", "data-job": job.name, "data-state": job.state,
      style: { border: "1px solid var(--border-color, #444)", borderRadius: "6px", padding: "8px", margin: "8px 0" } },
    el("div", { style: { display: "flex", justifyContent: "space-between", gap: "8px" } },
      el("strong", {}, job.name),
      el("span", { class: "xslim-job-state", style: { color: colour, fontWeight: "bold" } }, job.state)),
    el("div", { style: { fontSize: "11px", opacity: 0.75 } }, `${job.model || ""}${job.student ? ` → ${job.student}` : ""}`),
    el("div", { class: "xslim-job-bar", role: "progressbar", "aria-valuenow": String(pct), "aria-valuemin": "0", "aria-valuemax": "100",
        style: { height: "8px", background: "var(--comfy-input-bg, #333)", borderRadius: "4px", margin: "6px 0", overflow: "hidden" } },
      el("div", { class: "xslim-job-bar-fill", style: { width: `${pct}%`, height: "100%", background: colour, transition: "width .4s" } })),
    el("div", { class: "xslim-job-stats", style: { fontSize: "12px", display: "flex", flexWrap: "wrap", gap: "10px" } },
      el("span", {}, `iteration ${job.iteration} / ${job.iterations ?? "?"} (${pct}%)`),
      el("span", { class: "xslim-job-speed" }, job.it_per_s != null ? `${job.it_per_s.toFixed(2)} it/s` : ""),
      el("span", { class: "xslim-job-eta" }, job.eta_s != null ? `ETA ${duration(job.eta_s)}` : "")),
    losses ? el("div", { style: { fontSize: "11px", opacity: 0.8 } }, losses) : null,
    el("img", { class: "xslim-job-loss", alt: `loss curves of ${job.name}`, src: api.apiURL(jobPath(job.name, `/loss.png?v=${version}`)),
      style: { width: "100%", marginTop: "6px", background: "white", borderRadius: "4px" } }),
    job.preview != null ? el("img", { class: "xslim-job-preview", alt: `latest preview of ${job.name}`,
      src: api.apiURL(jobPath(job.name, `/preview.png?v=${job.preview}`)),
      style: { width: "100%", marginTop: "6px", imageRendering: "pixelated", borderRadius: "4px" } }) : null,
    job.message ? el("pre", { class: "xslim-job-message",
      style: { whiteSpace: "pre-wrap", fontSize: "11px", maxHeight: "140px", overflow: "auto", margin: "6px 0 0" } }, job.message) : null,
    buttons);
}

function render() {
  if (!root) return;
  const list = [...jobs.values()].sort((a, b) => (b.created || 0) - (a.created || 0));
  root.replaceChildren(...[
    el("div", { style: { display: "flex", justifyContent: "space-between", alignItems: "center" } },
      el("h3", { style: { margin: "4px 0" } }, "1.x-Distill jobs"),
      el("button", { class: "xslim-jobs-refresh", onclick: refresh, title: "Reload the list" }, "↻")),
    notice ? el("div", { class: "xslim-jobs-notice", style: { color: "#d33", fontSize: "12px" } }, notice) : null,
    list.length ? null : el("p", { style: { opacity: 0.7, fontSize: "12px" } },
      "No training jobs yet. Queue a graph with the 1.x-Distill Train node; its job appears here and keeps running while you use the queue."),
    ...list.map(card)].filter((node) => node != null));
}

function mount(element) {
  root = element;
  root.classList.add("xslim-jobs-panel");
  Object.assign(root.style, { padding: "8px", overflowY: "auto", height: "100%", boxSizing: "border-box" });
  refresh();
}

function floatingPanel() {
  // Older frontends without sidebar tabs: a toggle button and a panel over the canvas.
  const panel = el("div", { id: "xslim-jobs-floating", style: { position: "fixed", right: "12px", bottom: "52px", width: "360px",
    maxHeight: "70vh", zIndex: 1000, display: "none", background: "var(--comfy-menu-bg, #222)", color: "var(--fg-color, #ddd)",
    border: "1px solid #555", borderRadius: "8px" } });
  const toggle = el("button", { class: `${TAB_ID}-tab-button`, style: { position: "fixed", right: "12px", bottom: "12px", zIndex: 1000 },
    onclick: () => {
      const show = panel.style.display === "none";
      panel.style.display = show ? "block" : "none";
      if (show) mount(panel); else root = null;
    } }, "1.x-Distill jobs");
  document.body.append(panel, toggle);
}

app.registerExtension({
  name: "comfyui-xslim.distill-jobs",
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      if (detail && detail.name) {
        jobs.set(detail.name, detail);
        render();
      }
    });
    api.addEventListener("reconnected", refresh);
    const manager = app.extensionManager;
    if (manager && typeof manager.registerSidebarTab === "function") {
      manager.registerSidebarTab({
        id: TAB_ID, icon: "pi pi-bolt", title: "1.x-Distill jobs", tooltip: "1.x-Distill training jobs", type: "custom",
        render: mount, destroy: () => { root = null; },
      });
    } else {
      floatingPanel();
    }
  },
});
