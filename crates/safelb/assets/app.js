// safelb's dashboard. Reads the admin API with the session cookie (same origin), draws from the
// live stream (/api/v1/stream: events as recorded, a stats frame a second), and acts only
// through the same API the CLI uses. No framework, no build step.
"use strict";

const KEEP = 900; // frames: 15 minutes at one a second
const frames = [];
const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const init = { credentials: "same-origin", ...options };
  if (init.body !== undefined) {
    init.method = init.method || "POST";
    init.headers = { "content-type": "application/json" };
    init.body = JSON.stringify(init.body);
  }
  const response = await fetch("/api/v1" + path, init);
  if (response.status === 401) {
    location.assign("/login");
    throw new Error("signed out");
  }
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    throw new Error((data && data.error) || String(data) || response.statusText);
  }
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const time = (ms) => new Date(ms).toLocaleTimeString();
const age = (ms) => {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
};

// Status is said in words and a shape, never by colour alone.
function backendState(b) {
  if (b.draining) return ["◐ draining", "state-warn"];
  if (b.state.startsWith("FailedHealthCheck")) return ["✖ failed health check", "state-bad"];
  if (b.state.startsWith("Ejected")) {
    const s = b.ejected_for_ms != null ? ` for ${Math.ceil(b.ejected_for_ms / 1000)} s more` : "";
    return [`▲ ejected${s}`, "state-bad"];
  }
  if (b.slow_start_percent != null) return [`↗ slow start ${b.slow_start_percent}%`, "state-warn"];
  return ["● healthy", "state-ok"];
}

// ---- tabs
for (const button of document.querySelectorAll("nav button")) {
  button.addEventListener("click", () => {
    for (const b of document.querySelectorAll("nav button")) b.removeAttribute("aria-current");
    button.setAttribute("aria-current", "page");
    for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== button.dataset.tab;
  });
}

// ---- overview
async function refreshStatus() {
  const status = await api("/status");
  const v = status.running;
  $("running").textContent = v
    ? `version ${v.id} by ${v.author} — “${v.reason}” (${age(v.created_ms)})`
    : "unknown";
  const r = status.rollout;
  $("rollout").textContent = r
    ? `version ${r.id}: ${r.phase}` +
      (r.steps && r.percent ? `, step ${r.step + 1} of ${r.steps.length} at ${r.percent}%` : "") +
      (r.step_started_ms ? ` (bake ends in ${Math.max(0, Math.ceil((r.step_started_ms + r.step_bake_ms - Date.now()) / 1000))} s)` : "") +
      (r.shadow ? `, shadow: ${r.shadow.compared} copies compared` : "") +
      ` — candidate ${pct(r.candidate.error_rate)} errors, p99 ${ms(r.candidate.p99_ms)} (${r.candidate.requests} requests);` +
      ` stable ${pct(r.stable.error_rate)}, p99 ${ms(r.stable.p99_ms)}` +
      (r.progress && r.progress.length ? `. ${r.progress[r.progress.length - 1]}` : "")
    : "none";
  const alerts = status.alerts || [];
  $("alerts").textContent = alerts.length
    ? alerts.map((a) => `${a.state === "firing" ? "▲ firing" : "◇ pending"}: ${a.name} (${a.severity}, ${age(a.since_ms)})`).join("; ")
    : "none";
  renderBackends(status.pools);
}

const pct = (x) => (x == null ? "–" : `${(x * 100).toFixed(2)}%`);
const ms = (x) => (x == null ? "–" : `${Math.round(x)} ms`);

function chart(svg, values) {
  svg.replaceChildren();
  if (values.length < 2) return;
  const max = Math.max(...values, 1e-9);
  const step = 900 / (KEEP - 1);
  const start = KEEP - values.length;
  const points = values.map((v, i) => `${((start + i) * step).toFixed(1)},${(118 - (v / max) * 112).toFixed(1)}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
}

function renderCharts() {
  chart($("chart-rps"), frames.map((f) => f.requests));
  chart($("chart-err"), frames.map((f) => (f.requests ? f.errors / f.requests : 0)));
  const last = frames[frames.length - 1];
  if (last) {
    $("rps-now").textContent = `${last.requests} req/s, p99 ${ms(last.p99_ms)}`;
    $("err-now").textContent = pct(last.requests ? last.errors / last.requests : 0);
  }
}

// A small chart of the last minutes, for a table cell.
function sparkline(values, label) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 120 24");
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const recent = values.slice(-120);
  if (recent.length > 1) {
    const max = Math.max(...recent, 1e-9);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", recent.map((v, i) => `${i + 120 - recent.length},${(23 - (v / max) * 22).toFixed(1)}`).join(" "));
    svg.append(line);
  }
  return svg;
}

// ---- pools and backends
let lastFrame = null;
let lastPools = [];
function renderBackends(pools) {
  lastPools = pools;
  const body = $("backends");
  body.replaceChildren();
  for (const pool of pools) {
    for (const b of pool.backends) {
      const live = lastFrame && lastFrame.backends.find((x) => x.pool === pool.name && x.addr === b.addr);
      const [text, cls] = backendState(live || b);
      const action = b.draining ? "undrain" : "drain";
      const button = el("button", { type: "button" }, b.draining ? "Undrain" : "Drain");
      button.addEventListener("click", async () => {
        button.disabled = true;
        try {
          await api(`/backends/${encodeURIComponent(b.addr)}/${action}`, { method: "POST" });
        } catch (e) {
          alert(e.message);
        }
        refreshStatus();
      });
      const series = (key) => frames.map((f) => {
        const x = f.backends.find((y) => y.pool === pool.name && y.addr === b.addr);
        return x ? x[key] : 0;
      });
      const p99 = frames.map((f) => ((f.pools || []).find((x) => x.pool === pool.name) || {}).p99_ms || 0);
      const p99now = lastFrame && (lastFrame.pools || []).find((x) => x.pool === pool.name);
      body.append(
        el("tr", {},
          el("td", {}, pool.name + (pool.in_panic ? " (PANIC)" : ""), el("br"),
            `p99 ${ms(p99now && p99now.p99_ms)} `, sparkline(p99, `p99 of pool ${pool.name}, last 2 minutes`)),
          el("td", {}, b.addr),
          el("td", { class: cls }, text),
          el("td", {}, live ? live.requests : "–", " ", sparkline(series("requests"), `requests per second of ${b.addr}, last 2 minutes`)),
          el("td", {}, live ? live.errors : "–", " ", sparkline(series("errors"), `5xx per second of ${b.addr}, last 2 minutes`)),
          el("td", {}, b.in_flight),
          el("td", {}, button)));
    }
  }
}

function renderRoutes(frame) {
  const body = $("route-rows");
  body.replaceChildren();
  for (const r of frame.routes) {
    const a = r.actions || {};
    body.append(el("tr", {},
      el("td", {}, r.route), el("td", {}, r.requests), el("td", {}, r.errors),
      el("td", {}, a.proxied || 0), el("td", {}, a.redirect || 0),
      el("td", {}, a.respond || 0), el("td", {}, a.rate_limited || 0)));
  }
}

// ---- events
function addEvent(e, live = true) {
  const list = $("events");
  list.prepend(el("li", {}, el("time", {}, time(e.time_ms)), `${e.kind}: ${e.message}`));
  while (list.children.length > 200) list.lastChild.remove();
  if (live && /^Alert/.test(e.kind)) refreshStatus();
  if (live && /^(Rollout|Rollback|Change|Version|Incident)/.test(e.kind)) {
    refreshStatus();
    refreshVersions();
    refreshIncidents();
  }
}

// ---- changes
async function refreshVersions() {
  const versions = await api("/versions?limit=30");
  const body = $("versions");
  body.replaceChildren();
  for (const v of versions) {
    const button = el("button", { type: "button" }, "Roll back to this version");
    button.addEventListener("click", async () => {
      const reason = prompt(`Roll back to version ${v.id}: why?`);
      if (!reason || !confirm(`Serve version ${v.id} for all traffic now?`)) return;
      try {
        const done = await api("/rollback", { body: { to: v.id, reason, author: "dashboard" } });
        $("change-output").textContent = `rolled back: version ${done.target} serves (${done.took_ms} ms)`;
      } catch (e) {
        $("change-output").textContent = e.message;
      }
      refreshStatus();
      refreshVersions();
    });
    body.append(el("tr", {},
      el("td", {}, v.id), el("td", {}, v.fate), el("td", {}, v.author), el("td", {}, v.reason),
      el("td", {}, age(v.created_ms)), el("td", {}, button)));
  }
}

$("diff").addEventListener("click", async () => {
  const from = $("diff-from").value.trim();
  const to = $("diff-to").value.trim();
  try {
    const d = await api(`/diff?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`);
    $("change-output").textContent = (typeof d === "string" ? d : d.diff) || "(no difference)";
  } catch (e) {
    $("change-output").textContent = e.message;
  }
});

$("plan").addEventListener("click", async () => {
  try {
    const plan = await api("/plan", { body: { source: $("config-text").value } });
    $("change-output").textContent = plan.valid
      ? `${plan.diff || "(no difference)"}\n${JSON.stringify(plan.impact, null, 2)}\n${JSON.stringify(plan.preflight, null, 2)}`
      : plan.rendered;
  } catch (e) {
    $("change-output").textContent = e.message;
  }
});

$("apply").addEventListener("click", async () => {
  const reason = $("config-reason").value.trim();
  if (!reason) {
    $("change-output").textContent = "a reason is required to apply";
    return;
  }
  try {
    const accepted = await api("/apply", { body: { source: $("config-text").value, reason, author: "dashboard" } });
    $("change-output").textContent = `version ${accepted.version} submitted; rollout ${accepted.rollout} running`;
  } catch (e) {
    $("change-output").textContent = e.message;
  }
});

// ---- incidents
async function refreshIncidents() {
  const incidents = await api("/incidents?limit=20");
  const list = $("incident-list");
  list.replaceChildren();
  const open = incidents.find((i) => i.resolved_ms == null);
  $("incident").textContent = open ? `▲ #${open.id} open: ${open.title}` : "none open";
  for (const i of incidents) {
    const item = el("li", {}, `#${i.id} ${i.title} — ${i.resolved_ms ? "resolved" : "OPEN"} ${age(i.opened_ms)} `);
    if (i.resolved_ms) {
      const show = el("button", { type: "button" }, "Postmortem");
      show.addEventListener("click", async () => {
        $("postmortem-text").textContent = await api(`/incidents/${i.id}/postmortem`);
        $("postmortem").hidden = false;
      });
      const download = el("button", { type: "button" }, "Download .md");
      download.addEventListener("click", async () => {
        const text = await api(`/incidents/${i.id}/postmortem`);
        const link = el("a", { href: URL.createObjectURL(new Blob([text], { type: "text/markdown" })), download: `incident-${i.id}.md` });
        link.click();
      });
      item.append(show, " ", download);
    }
    list.append(item);
  }
}

// ---- live stream
function connect() {
  const source = new EventSource("/api/v1/stream");
  source.addEventListener("open", () => ($("connection").textContent = "Live"));
  source.addEventListener("error", () => ($("connection").textContent = "Reconnecting…"));
  source.addEventListener("event", (m) => addEvent(JSON.parse(m.data)));
  source.addEventListener("stats", (m) => {
    const frame = JSON.parse(m.data);
    frames.push(frame);
    if (frames.length > KEEP) frames.shift();
    lastFrame = frame;
    renderCharts();
    renderRoutes(frame);
    if (!document.activeElement || !document.activeElement.closest("#backends")) renderBackends(lastPools);
  });
  source.addEventListener("lagged", () => refreshStatus());
}

async function start() {
  const history = await api("/stats");
  frames.push(...history.slice(-KEEP));
  lastFrame = frames[frames.length - 1] || null;
  renderCharts();
  if (lastFrame) renderRoutes(lastFrame);
  const events = await api("/events?limit=1000");
  for (const e of events.slice(-50)) addEvent(e, false);
  await Promise.all([refreshStatus(), refreshVersions(), refreshIncidents()]);
  connect();
  setInterval(() => {
    refreshStatus();
    refreshIncidents();
  }, 5000);
}

start().catch((e) => ($("connection").textContent = `Error: ${e.message}`));
