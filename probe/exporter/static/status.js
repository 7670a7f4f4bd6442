// probe status page: reads /api/results and /api/routes, redraws the grid in place, never reloads.
"use strict";
(() => {
  const params = new URLSearchParams(location.search);
  const REFRESH_MS = Math.max(1, Number(params.get("refresh")) || 5) * 1000;
  // DESIGN.md's interference classes (probe.models.BLOCKED_OUTCOMES): how the strip tells blocked from failing.
  const BLOCKED = new Set(["dns_injection", "dns_mismatch", "tcp_timeout", "tcp_reset", "tls_reset", "tls_timeout",
    "tls_cert_invalid", "http_reset", "http_unexpected", "throttled"]);
  const WORD = { ok: "OK", failing: "FAIL", blocked: "BLOCKED", pending: "WAIT" };
  const PHASES = ["resolve", "connect", "tls", "processing", "transfer"];
  const SEP = " "; // target and route names are [a-z0-9_.-]+: a space joins them unambiguously
  const $ = (id) => document.getElementById(id);

  const state = { results: new Map(), ranks: new Map(), targets: [], columns: [], groups: {}, dns: new Map(),
    skew: 0, selected: null, focus: null, downSince: null, updated: null };
  let timer = null;
  let running = null;

  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  const kind = (o) => (!o ? "pending" : o === "ok" ? "ok" : BLOCKED.has(o) ? "blocked" : "failing");
  const badge = (k) => `<span class="badge">${WORD[k]}</span>`;
  const ms = (s) => (s == null ? "?" : s < 1 ? `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms` : `${s.toFixed(2)} s`);
  const clock = (t) => new Date(t * 1000).toLocaleTimeString();
  const now = () => Date.now() / 1000 + state.skew;

  function ago(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  async function getJSON(url) {
    const resp = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
    const date = Date.parse(resp.headers.get("Date") || "");
    if (!Number.isNaN(date)) state.skew = (date - Date.now()) / 1000; // the monitor's clock says "since when"
    return resp.json();
  }

  function refreshSoon(delay) {
    clearTimeout(timer);
    timer = setTimeout(refresh, delay);
  }

  async function refresh() {
    if (running) return running;
    running = (async () => {
      try {
        const t0 = performance.now();
        const [results, routes] = await Promise.all([getJSON("api/results"), getJSON("api/routes")]);
        const t1 = performance.now();
        apply(results, routes);
        state.timings = { fetch_ms: t1 - t0, draw_ms: performance.now() - t1 };
        state.downSince = null;
        state.updated = Date.now();
        const status = $("status");
        status.className = "";
        status.textContent = `updated ${new Date().toLocaleTimeString()}, every ${REFRESH_MS / 1000} s`;
      } catch (err) {
        state.downSince = state.downSince || Date.now();
        const status = $("status");
        status.className = "down";
        status.textContent = `monitor unreachable since ${new Date(state.downSince).toLocaleTimeString()} ` +
          `(${err.message}); showing the last results, retrying every ${REFRESH_MS / 1000} s`;
      } finally {
        running = null;
        refreshSoon(REFRESH_MS);
      }
    })();
    return running;
  }

  function apply(doc, routes) {
    $("vantage").textContent = `vantage ${doc.vantage}`;
    document.title = `probe ${doc.vantage}`;
    state.results = new Map(doc.results.map((r) => [r.target + SEP + r.route, r]));
    state.dns = new Map();
    for (const r of doc.results) if (!state.dns.has(r.target)) state.dns.set(r.target, r.dns || []);
    state.ranks = new Map();
    const columns = [];
    const seen = new Set();
    const add = (route) => { if (!seen.has(route)) { seen.add(route); columns.push(route); } };
    for (const r of doc.results) add(r.route);
    state.targets = Object.entries(routes.routes).map(([target, ranked]) => {
      for (const x of ranked) { add(x.route); state.ranks.set(target + SEP + x.route, { ...x, of: ranked.length }); }
      return { name: target, routes: new Set(ranked.map((x) => x.route)), best: ranked.find((x) => x.recommended) };
    });
    state.columns = columns;
    state.groups = routes.groups || {};
    drawGrid();
    drawGroups();
    if (state.selected) drawDetail();
  }

  // ---- the grid ----

  function cellHTML(target, route) {
    const key = target + SEP + route;
    const r = state.results.get(key);
    const rank = state.ranks.get(key);
    const k = kind(r && r.outcome);
    const rankText = rank ? `rank ${rank.rank} of ${rank.of}${rank.recommended ? ", use this" : ""}` : "";
    if (!r) return [k, `${badge(k)}<span class="o">not probed yet</span><span class="m">${esc(rankText)}</span>`];
    const since = r.outcome_since != null ? ` · for ${ago(now() - r.outcome_since)}` : "";
    return [k, `${badge(k)}<span class="o">${esc(r.outcome)}</span>` +
      `<span class="m">${ms(r.duration_seconds)} · ${esc(rankText)}${since}</span>`];
  }

  function rowHeader(t) {
    const dns = (state.dns.get(t.name) || []).map((d) =>
      `${esc(d.resolver)} ${esc(d.outcome)}${d.outcome === "ok" ? "" : ` (${WORD[kind(d.outcome)]})`}`).join(", ");
    const extra = [];
    if (t.best) extra.push(`use route ${esc(t.best.route)}`);
    for (const route of t.routes) {
      const r = state.results.get(t.name + SEP + route);
      if (r && r.path) extra.push(`${esc(route)} path: ${pathText(r.path)}`);
      if (r && r.locate) extra.push(`${esc(route)} censor: ${locateText(r.locate)}`);
    }
    if (dns) extra.push(`DNS: ${dns}`);
    return `<th scope="row">${esc(t.name)}<span class="sub">${extra.join("<br>")}</span></th>`;
  }

  function pathText(p) {
    const loss = p.sent ? `${p.lost}/${p.sent} lost (${((100 * p.lost) / p.sent).toFixed(0)}%)` : "no samples";
    const p50 = p.rtt_seconds && p.rtt_seconds.p50 != null ? `, p50 ${ms(p.rtt_seconds.p50)}` : "";
    return esc(loss + p50);
  }

  function locateText(l) {
    if (l.deferred) return esc(`deferred: ${l.deferred}`);
    return esc(l.hop != null ? `hop ${l.hop}` : "not found");
  }

  function drawGrid() {
    // Rebuilt whole on every refresh: one innerHTML of 1,000 cells costs less than updating them one by one
    // (measured in tests/test_status_page.py), and the tab stop, focus and selection are put back.
    const table = $("grid");
    const head = `<thead><tr><th scope="col">target</th>${state.columns.map((c) =>
      `<th scope="col">${esc(c)}</th>`).join("")}</tr></thead>`;
    const rows = state.targets.map((t) => `<tr>${rowHeader(t)}${state.columns.map((c) => {
      if (!t.routes.has(c)) return `<td class="none"><span aria-hidden="true">–</span><span class="sr">not configured</span></td>`;
      const [k, html] = cellHTML(t.name, c);
      return `<td role="gridcell" class="cell ${k}" tabindex="-1" data-key="${esc(t.name + SEP + c)}">${html}</td>`;
    }).join("")}</tr>`).join("");
    const active = document.activeElement;
    const focused = Boolean(active && active.closest && active.closest("td.cell"));
    table.innerHTML = head + `<tbody>${rows}</tbody>`;
    setRoving(state.focus, focused);
    for (const cell of table.querySelectorAll("td.cell")) cell.classList.toggle("selected", cell.dataset.key === state.selected);
    const counts = { ok: 0, failing: 0, blocked: 0, pending: 0 };
    for (const t of state.targets) for (const route of t.routes) {
      const r = state.results.get(t.name + SEP + route);
      counts[kind(r && r.outcome)] += 1;
    }
    const total = counts.ok + counts.failing + counts.blocked + counts.pending;
    $("counts").textContent = `${state.targets.length} targets, ${total} pairs: ${counts.ok} ok, ` +
      `${counts.failing} failing, ${counts.blocked} blocked, ${counts.pending} not probed yet`;
  }

  function cells() { return [...$("grid").querySelectorAll("td.cell")]; }

  function setRoving(key, focus) {
    const all = cells();
    let target = all.find((c) => c.dataset.key === key) || all[0];
    for (const c of all) c.tabIndex = c === target ? 0 : -1;
    if (target) { state.focus = target.dataset.key; if (focus) target.focus(); }
  }

  function move(cell, dr, dc) {
    const row = cell.parentElement;
    const rows = [...row.parentElement.rows];
    let r = rows.indexOf(row);
    let c = [...row.cells].indexOf(cell);
    for (;;) {
      r += dr; c += dc;
      if (r < 0 || r >= rows.length || c < 1 || c >= rows[r].cells.length) return null;
      const next = rows[r].cells[c];
      if (next.classList.contains("cell")) return next;
    }
  }

  function onKey(ev) {
    const cell = ev.target.closest && ev.target.closest("td.cell");
    if (!cell) return;
    let next = null;
    const row = [...cell.parentElement.querySelectorAll("td.cell")];
    switch (ev.key) {
      case "ArrowRight": next = move(cell, 0, 1); break;
      case "ArrowLeft": next = move(cell, 0, -1); break;
      case "ArrowDown": next = move(cell, 1, 0); break;
      case "ArrowUp": next = move(cell, -1, 0); break;
      case "Home": next = row[0]; break;
      case "End": next = row[row.length - 1]; break;
      case "Enter": case " ": ev.preventDefault(); open(cell.dataset.key); return;
      default: return;
    }
    ev.preventDefault();
    if (next) setRoving(next.dataset.key, true);
  }

  // ---- the detail of one cell ----

  function open(key) {
    state.selected = key;
    state.focus = key;
    for (const c of cells()) c.classList.toggle("selected", c.dataset.key === key);
    $("probe-status").textContent = "";
    $("detail").hidden = false;
    drawDetail();
    $("detail-title").focus();
  }

  function close() {
    const key = state.selected;
    state.selected = null;
    $("detail").hidden = true;
    for (const c of cells()) c.classList.remove("selected");
    setRoving(key, true);
  }

  function drawDetail() {
    const [target, route] = state.selected.split(SEP);
    const r = state.results.get(state.selected);
    const rank = state.ranks.get(state.selected);
    const k = kind(r && r.outcome);
    $("detail-title").textContent = `${target} over ${route}: ${r ? r.outcome : "not probed yet"}`;
    $("debug-link").href = `probe?target=${encodeURIComponent(target)}&debug=true`;
    const rows = [];
    const row = (name, value) => { if (value != null && value !== "") rows.push(`<dt>${esc(name)}</dt><dd>${value}</dd>`); };
    if (r) {
      row("outcome", `<span class="${k}">${badge(k)}${esc(r.outcome)}</span>${r.blocked ? " (interference)" : ""}`);
      if (r.outcome_since != null) row("in this state", `for ${ago(now() - r.outcome_since)}, since ${clock(r.outcome_since)}`);
      row("last run", `${clock(r.started_at)}, took ${ms(r.duration_seconds)}`);
      row("address", esc(r.address));
      row("HTTP status", r.http_status != null ? esc(r.http_status) : null);
      row("TLS", r.tls_version ? esc(r.tls_version) +
        (r.ssl_earliest_cert_expiry ? `, chain expires ${esc(new Date(r.ssl_earliest_cert_expiry * 1000).toISOString().slice(0, 10))}` : "") : null);
      row("throughput", r.throughput_bytes_per_second != null ? `${Math.round(r.throughput_bytes_per_second).toLocaleString()} B/s` : null);
      if (r.path) row("path", pathText(r.path));
      if (r.locate) row("censor", locateText(r.locate) + (r.locate.evidence ? ` (${esc(r.locate.evidence.join("; "))})` : ""));
    }
    if (rank) row("route rank", `${rank.rank} of ${rank.of} (${esc(rank.tier)}, score ${esc(rank.score)})${rank.recommended ? ", the route to use" : ""}`);
    let html = `<dl>${rows.join("")}</dl>`;
    if (r) {
      html += `<h3>Phases</h3>${phasesHTML(r.phases || {})}`;
      html += `<h3>Last ${(r.recent_outcomes || []).length} outcomes, oldest first</h3>${stripHTML(r.recent_outcomes || [])}`;
      html += `<h3>Evidence</h3>${r.evidence.length ? `<ul class="evidence">${r.evidence.map((e) => `<li>${esc(e)}</li>`).join("")}</ul>` : "<p>none</p>"}`;
      if (r.error) html += `<h3>Error</h3><p class="evidence"><code>${esc(r.error)}</code></p>`;
    }
    const dns = state.dns.get(target) || [];
    if (dns.length) {
      html += `<h3>DNS of ${esc(target)}, per resolver</h3><ul>${dns.map((d) => `<li>${esc(d.resolver)}: ` +
        `${badge(kind(d.outcome))}${esc(d.outcome)}, answers ${esc(d.answers.join(", ") || "none")}, ` +
        `${esc(d.replies)} replies, consistent ${esc(d.consistent)}` +
        `${d.evidence.length ? `<ul class="evidence">${d.evidence.map((e) => `<li>${esc(e)}</li>`).join("")}</ul>` : ""}</li>`).join("")}</ul>`;
    }
    $("detail-body").innerHTML = html;
  }

  function phasesHTML(phases) {
    const total = PHASES.reduce((s, p) => s + (phases[p] || 0), 0);
    if (!total) return "<p>no phase completed</p>";
    const bar = PHASES.filter((p) => phases[p] != null).map((p) =>
      `<span class="${p}" style="width:${((100 * phases[p]) / total).toFixed(2)}%" title="${p} ${ms(phases[p])}"></span>`).join("");
    const list = PHASES.filter((p) => phases[p] != null).map((p) =>
      `<li><i class="${p}" aria-hidden="true"></i>${p} ${ms(phases[p])}</li>`).join("");
    return `<div class="phases" aria-hidden="true">${bar}</div><ul class="phase-list phases-legend">${list}</ul>`;
  }

  function stripHTML(outcomes) {
    const boxes = outcomes.map((o) => `<span class="${kind(o)}" title="${esc(o)}"></span>`).join("");
    const tally = new Map();
    for (const o of outcomes) tally.set(o, (tally.get(o) || 0) + 1);
    const words = [...tally].map(([o, n]) => `${n} ${o}`).join(", ");
    return `<div class="strip" aria-hidden="true">${boxes}</div><p class="strip-text">${esc(words || "none yet")}` +
      `${outcomes.length ? `; latest last: ${esc(outcomes.slice(-5).join(", "))}` : ""}</p>`;
  }

  async function probeNow() {
    const [target] = state.selected.split(SEP);
    const button = $("probe-now");
    const status = $("probe-status");
    button.disabled = true;
    status.textContent = `probing ${target} over all its routes…`;
    try {
      const resp = await fetch(`probe?target=${encodeURIComponent(target)}`, { cache: "no-store", credentials: "same-origin" });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}: ${(await resp.text()).slice(0, 200)}`);
      await resp.text();
      await refresh();
      const r = state.selected && state.results.get(state.selected);
      status.textContent = `probed at ${new Date().toLocaleTimeString()}` + (r ? `: ${r.outcome}` : "");
    } catch (err) {
      status.textContent = `probe failed: ${err.message}`;
    } finally {
      button.disabled = false;
    }
  }

  // ---- groups ----

  function drawGroups() {
    const names = Object.keys(state.groups);
    $("groups-section").hidden = !names.length;
    $("groups").innerHTML = names.map((g) => `<div class="group"><strong>${esc(g)}</strong><ol>${state.groups[g].map((x) =>
      `<li>${esc(x.target)} over ${esc(x.route)}: ${esc(x.tier)}${x.recommended ? " <strong>(use this)</strong>" : ""}` +
      `${x.last_outcome ? `, last ${esc(x.last_outcome)}` : ""}</li>`).join("")}</ol></div>`).join("");
  }

  // ---- wiring ----

  const grid = $("grid");
  grid.addEventListener("keydown", onKey);
  grid.addEventListener("click", (ev) => { const c = ev.target.closest("td.cell"); if (c) open(c.dataset.key); });
  grid.addEventListener("focusin", (ev) => { const c = ev.target.closest("td.cell"); if (c) setRoving(c.dataset.key, false); });
  $("close-detail").addEventListener("click", close);
  $("probe-now").addEventListener("click", probeNow);
  $("detail").addEventListener("keydown", (ev) => { if (ev.key === "Escape") { ev.preventDefault(); close(); } });
  window.probeStatus = { refresh, state }; // for tests and the curious: the page's own data, nothing more
  refresh();
})();
