// opsexec web console: plain JavaScript, no build step, no dependencies.
//
// The API key lives in sessionStorage (this tab only) and travels in headers: the
// Authorization header for fetch(), a WebSocket subprotocol for live updates, and — since
// EventSource cannot send headers — a single-use stream ticket for Server-Sent Events.
// Live updates try WebSocket, then SSE, then long-poll, and say on screen which one runs.
// Every piece of server data is put on the page with textContent, never as HTML.
"use strict";

(() => {
  const KEY_STORAGE = "opsexec.apiKey";
  const PLAN_STORAGE = "opsexec.plans";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled", "rejected"]);
  const TRANSPORT_NAMES = { ws: "WebSocket", sse: "Server-Sent Events", poll: "long-poll" };
  const $ = (selector, root = document) => root.querySelector(selector);

  // --- small helpers -------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "className") node.className = value;
      else if (name.startsWith("data-") || name.startsWith("aria-") || name === "role") {
        node.setAttribute(name, String(value));
      } else node[name] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function shortId(id) {
    return String(id).slice(0, 8);
  }

  function when(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
  }

  function seconds(value) {
    if (value === null || value === undefined) return "";
    if (value < 1) return "under a second";
    if (value < 90) return `${Math.round(value)} s`;
    return `${Math.round(value / 60)} min`;
  }

  function safeLink(url, text) {
    try {
      const parsed = new URL(url, window.location.href);
      if (parsed.protocol !== "https:" && parsed.protocol !== "http:") return el("span", { text: url });
      return el("a", { href: parsed.href, target: "_blank", rel: "noopener noreferrer", text: text || url });
    } catch {
      return el("span", { text: url });
    }
  }

  function badge(status) {
    return el("span", { className: `badge status-${status}`, "data-status": status, text: status.replace("_", " ") });
  }

  function notify(message, kind = "info") {
    const box = $("#notice");
    box.textContent = message;
    box.className = `notice ${kind}`;
    box.hidden = !message;
  }

  function reportError(what, error) {
    // A rejected key has already signed the tab out with its own message.
    if (error.status !== 401) notify(`${what}: ${error.message}`, "error");
  }

  function b64url(text) {
    const bytes = new TextEncoder().encode(text);
    let binary = "";
    for (const byte of bytes) binary += String.fromCharCode(byte);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // --- the API -------------------------------------------------------------------------

  const apiKey = () => sessionStorage.getItem(KEY_STORAGE);

  class ApiError extends Error {
    constructor(status, problem) {
      super(problem.detail || problem.title || `HTTP ${status}`);
      this.status = status;
      this.code = problem.code || "http_error";
    }
  }

  async function api(method, path, body, { signal, key } = {}) {
    const headers = { Authorization: `Bearer ${key || apiKey()}`, Accept: "application/json" };
    const init = { method, headers, signal };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401 && !key) {
      signOut("Your API key is no longer accepted. Sign in again.");
      throw new ApiError(401, { detail: "unauthenticated" });
    }
    if (!response.ok) {
      let problem = {};
      try { problem = await response.json(); } catch { /* not JSON */ }
      throw new ApiError(response.status, problem);
    }
    return response.status === 204 ? null : response.json();
  }

  // --- plan snapshots seen in this tab, for "what changed since the last approval" ----------

  function rememberPlan(hash, plan) {
    try {
      const store = JSON.parse(sessionStorage.getItem(PLAN_STORAGE) || "{}");
      store[hash] = { plan, seen: Date.now() };
      const hashes = Object.keys(store).sort((a, b) => store[b].seen - store[a].seen);
      for (const old of hashes.slice(50)) delete store[old];
      sessionStorage.setItem(PLAN_STORAGE, JSON.stringify(store));
    } catch { /* storage full or unavailable: diffs just become unavailable */ }
  }

  function recalledPlan(hash) {
    try {
      const entry = JSON.parse(sessionStorage.getItem(PLAN_STORAGE) || "{}")[hash];
      return entry ? entry.plan : null;
    } catch {
      return null;
    }
  }

  function lineDiff(before, after) {
    // Longest-common-subsequence diff on lines; plans are small enough for O(n·m).
    const a = before.split("\n");
    const b = after.split("\n");
    if (a.length * b.length > 4_000_000) return null;
    const lcs = Array.from({ length: a.length + 1 }, () => new Uint32Array(b.length + 1));
    for (let i = a.length - 1; i >= 0; i--) {
      for (let j = b.length - 1; j >= 0; j--) {
        lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
      }
    }
    const out = [];
    let i = 0;
    let j = 0;
    while (i < a.length || j < b.length) {
      if (i < a.length && j < b.length && a[i] === b[j]) { out.push([" ", a[i]]); i++; j++; }
      else if (i < a.length && (j === b.length || lcs[i + 1][j] >= lcs[i][j + 1])) { out.push(["-", a[i]]); i++; }
      else { out.push(["+", b[j]]); j++; }
    }
    return out;
  }

  const pretty = (value) => JSON.stringify(value, null, 2);

  // What changed since the last approval: honest about what this browser can know. The
  // server keeps only the current plan; plan_amended events record the hash of each
  // replaced version, and this tab remembers every plan it has displayed.
  function planChanges(execution, events) {
    const block = el("div", { className: "changes" });
    const approved = (execution.approvals || []).filter((a) => a.state === "approved" && !a.step_number);
    const lastApproved = approved.length ? approved[approved.length - 1] : null;
    const amendments = events.filter((e) => e.kind === "plan_amended");
    const started = events.find((e) => e.kind === "execution_started");
    const baseHash = lastApproved ? lastApproved.plan_hash
      : amendments.length ? amendments[0].payload.old_plan_hash
        : started ? started.payload.plan_hash : execution.plan_hash;
    const baseLabel = lastApproved ? "the last approval" : "the original submission";
    if (!amendments.length && baseHash === execution.plan_hash) {
      block.append(el("p", { text: `No changes since ${baseLabel}: this is exactly the plan that was ${lastApproved ? "approved" : "submitted"} (hash ${shortId(execution.plan_hash)}…).` }));
      return block;
    }
    if (amendments.length) {
      const list = el("ul", { className: "amendments" });
      for (const amendment of amendments) {
        const p = amendment.payload;
        list.append(el("li", { text: `${when(amendment.at)}: plan ${shortId(p.old_plan_hash)}… replaced by ${shortId(p.new_plan_hash)}… (level ${p.approval_level}; ${p.approvals_voided} approval(s) voided)` }));
      }
      block.append(el("p", { text: `The plan was amended ${amendments.length} time(s):` }), list);
    }
    if (baseHash === execution.plan_hash) {
      block.append(el("p", { text: `The current plan is the same as at ${baseLabel}.` }));
      return block;
    }
    const previous = recalledPlan(baseHash);
    if (!previous) {
      block.append(el("p", { className: "muted", text: `The plan as of ${baseLabel} (hash ${shortId(baseHash)}…) is not stored by the server and was not shown in this browser tab, so no line-by-line comparison is possible. Review the full current plan below.` }));
      return block;
    }
    const diff = lineDiff(pretty(previous), pretty(execution.plan));
    if (!diff) {
      block.append(el("p", { className: "muted", text: "The plans are too large to compare here; review the full current plan below." }));
      return block;
    }
    block.append(el("p", { text: `Changes since ${baseLabel} (− removed, + added, with two lines of context):` }));
    const pre = el("pre", { className: "diff", "aria-label": "Plan differences" });
    const CONTEXT = 2;
    const near = diff.map((_, index) => diff.slice(Math.max(0, index - CONTEXT), index + CONTEXT + 1).some(([mark]) => mark !== " "));
    let skipped = false;
    diff.forEach(([mark, line], index) => {
      if (!near[index]) {
        if (!skipped) pre.append(el("span", { className: "context", text: "  ⋯\n" }));
        skipped = true;
        return;
      }
      skipped = false;
      const className = mark === "+" ? "added" : mark === "-" ? "removed" : "context";
      pre.append(el("span", { className, text: `${mark === " " ? " " : mark} ${line}\n` }));
    });
    block.append(pre);
    return block;
  }

  // --- live updates: WebSocket → SSE → long-poll ----------------------------------------------

  class LiveFeed {
    constructor(executionId, { onEvent, onEnd, onTransport }) {
      this.id = executionId;
      this.lastSeq = 0;
      this.stopped = false;
      this.ended = false;
      this.onEvent = onEvent;
      this.onEnd = onEnd;
      this.onTransport = onTransport;
      this.socket = null;
      this.source = null;
      this.poller = null;
    }

    start() {
      if (typeof window.WebSocket === "function") this.viaWebSocket(0);
      else if (typeof window.EventSource === "function") this.viaEventSource(0);
      else this.viaPolling();
    }

    stop() {
      this.stopped = true;
      if (this.socket) this.socket.close();
      if (this.source) this.source.close();
      if (this.poller) this.poller.abort();
    }

    deliver(message) {
      if (typeof message.seq !== "number" || message.seq <= this.lastSeq) return;
      this.lastSeq = message.seq;
      this.onEvent(message);
    }

    finish(summary) {
      this.ended = true;
      this.onEnd(summary);
    }

    fallBack(from) {
      if (this.stopped || this.ended) return;
      if (from === "ws" && typeof window.EventSource === "function") this.viaEventSource(0);
      else this.viaPolling();
    }

    viaWebSocket(failures) {
      const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
      const url = `${scheme}//${window.location.host}/v1/executions/${this.id}/ws?after=${this.lastSeq}`;
      let opened = false;
      let socket;
      try {
        socket = new WebSocket(url, ["opsexec.v1", `opsexec.bearer.${b64url(apiKey())}`]);
      } catch {
        this.fallBack("ws");
        return;
      }
      this.socket = socket;
      socket.onopen = () => { opened = true; this.onTransport("ws"); };
      socket.onmessage = (frame) => {
        const message = JSON.parse(frame.data);
        if (message.type === "event") this.deliver(message);
        else if (message.type === "end") this.finish(message);
      };
      socket.onclose = () => {
        if (this.stopped || this.ended) return;
        if (!opened || failures >= 3) this.fallBack("ws");
        else setTimeout(() => this.viaWebSocket(failures + 1), 1000);
      };
    }

    async viaEventSource(failures) {
      let ticket;
      try {
        ticket = await api("POST", "/v1/stream-tickets", { execution_id: this.id });
      } catch {
        this.fallBack("sse");
        return;
      }
      if (this.stopped) return;
      const source = new EventSource(`${ticket.events_url}&after=${this.lastSeq}`);
      this.source = source;
      let opened = false;
      source.onopen = () => { opened = true; this.onTransport("sse"); };
      source.onmessage = (frame) => this.deliver(JSON.parse(frame.data));
      source.addEventListener("end", (frame) => { source.close(); this.finish(JSON.parse(frame.data)); });
      source.addEventListener("reconnect", () => { source.close(); this.viaEventSource(0); });
      source.onerror = () => {
        // A ticket is single-use, so the browser's own reconnect cannot work: reconnect here.
        source.close();
        if (this.stopped || this.ended) return;
        if (!opened || failures >= 3) this.fallBack("sse");
        else setTimeout(() => this.viaEventSource(failures + 1), 1000);
      };
    }

    async viaPolling() {
      this.onTransport("poll");
      while (!this.stopped && !this.ended) {
        this.poller = new AbortController();
        try {
          const page = await api("GET", `/v1/executions/${this.id}/events?after=${this.lastSeq}&wait=25`, undefined, { signal: this.poller.signal });
          for (const message of page.events) this.deliver(message);
          if (page.done) this.finish(page);
        } catch (error) {
          if (this.stopped) return;
          await sleep(2000);
        }
      }
    }
  }

  // --- views ---------------------------------------------------------------------------------

  const state = { feed: null, timers: [], cursor: null, detail: null, refreshing: false };

  function clearView() {
    if (state.feed) state.feed.stop();
    state.feed = null;
    for (const timer of state.timers) clearInterval(timer);
    state.timers = [];
    for (const view of document.querySelectorAll(".view")) view.hidden = true;
  }

  function show(id, title) {
    $(id).hidden = false;
    document.title = `${title} · opsexec`;
    const section = id === "#view-approvals" ? "approvals" : "executions";
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.dataset.section === section) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    $("#main").focus({ preventScroll: true });
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    notify(message || "", message ? "error" : "info");
    window.location.hash = "#/signin";
    route();
  }

  async function refreshApprovalCount() {
    try {
      const pending = await api("GET", "/v1/approvals");
      $("#approvals-count").textContent = pending.length ? String(pending.length) : "";
    } catch { /* the count is a hint only */ }
  }

  // Sign in -----------------------------------------------------------------------------------

  function showSignIn() {
    $("#nav").hidden = true;
    $("#session").hidden = true;
    show("#view-signin", "Sign in");
    $("#api-key").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const key = $("#api-key").value.trim();
    const error = $("#signin-error");
    error.textContent = "";
    if (!key) {
      error.textContent = "Enter an API key.";
      return;
    }
    try {
      await api("GET", "/v1/executions?limit=1", undefined, { key });
    } catch (failure) {
      error.textContent = failure.status === 401 ? "That API key was not accepted." : `Cannot sign in: ${failure.message}`;
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("#api-key").value = "";
    notify("");
    window.location.hash = "#/executions";
  }

  // Executions list ---------------------------------------------------------------------------

  async function loadExecutions(append = false) {
    const status = $("#status-filter").value;
    const params = new URLSearchParams({ limit: "50" });
    if (status) params.append("status", status);
    if (append && state.cursor) params.set("cursor", state.cursor);
    let page;
    try {
      page = await api("GET", `/v1/executions?${params}`);
    } catch (error) {
      reportError("Could not load executions", error);
      return;
    }
    const body = $("#executions-table tbody");
    if (!append) body.replaceChildren();
    for (const item of page.items) {
      const link = el("a", { href: `#/executions/${item.id}`, text: shortId(item.id), title: item.id });
      const answer = item.result_summary && item.result_summary.answer;
      body.append(el("tr", { "data-execution-id": item.id },
        el("td", {}, link, answer ? el("div", { className: "muted small", text: answer }) : null),
        el("td", {}, badge(item.status)),
        el("td", { text: item.approval_level }),
        el("td", { text: item.execution_mode }),
        el("td", { text: `${item.steps.succeeded + item.steps.failed}/${item.steps.total}` }),
        el("td", { text: when(item.created_at) })));
    }
    state.cursor = page.next_cursor;
    $("#more-button").hidden = !page.next_cursor;
    $("#executions-empty").hidden = body.children.length > 0;
  }

  function showExecutions() {
    show("#view-executions", "Executions");
    loadExecutions();
    refreshApprovalCount();
    state.timers.push(setInterval(() => {
      // Not while someone is tabbing through the rows: a redraw would steal their focus.
      if (!document.hidden && !$("#executions-table").contains(document.activeElement)) loadExecutions();
    }, 5000));
  }

  // Execution detail --------------------------------------------------------------------------

  function fact(list, term, value) {
    list.append(el("dt", { text: term }), el("dd", {}, value === null || value === undefined || value === "" ? "—" : value));
  }

  function renderFacts(execution) {
    const list = $("#detail-facts");
    list.replaceChildren();
    fact(list, "Approval level", String(execution.approval_level));
    fact(list, "Mode / SLA", `${execution.execution_mode} / ${execution.sla_class}`);
    fact(list, "Created", when(execution.created_at));
    fact(list, "Started", when(execution.started_at));
    fact(list, "Ended", when(execution.ended_at));
    fact(list, "Duration", execution.duration_ms === null ? "" : `${(execution.duration_ms / 1000).toFixed(1)} s`);
    fact(list, "Runbook", execution.runbook_url ? safeLink(execution.runbook_url) : "");
    const answer = execution.result_summary && execution.result_summary.answer;
    fact(list, "Result", answer || "");
    if (execution.error_class) fact(list, "Error", `${execution.error_class}: ${execution.error_message || ""}`);
    if (execution.cancelled_at) fact(list, "Cancelled", `${when(execution.cancelled_at)}${execution.cancellation_reason ? ` — ${execution.cancellation_reason}` : ""}`);
  }

  function renderProgress(progress, etaSeconds, status) {
    if (!progress) return;
    const bar = $("#progress");
    bar.value = progress.percent;
    bar.setAttribute("aria-valuetext", `${progress.percent}%`);
    let label = `${progress.done} of ${progress.total} steps · ${progress.percent}%`;
    if (progress.failed) label += ` · ${progress.failed} failed`;
    if (!TERMINAL.has(status) && etaSeconds !== null && etaSeconds !== undefined) {
      label += etaSeconds < 1 ? " · less than a second left" : ` · about ${seconds(etaSeconds)} left`;
    }
    $("#progress-label").textContent = label;
  }

  function renderSteps(steps) {
    const body = $("#steps-table tbody");
    body.replaceChildren();
    for (const step of steps) {
      const output = step.error_message || (step.output_summary && (step.output_summary.answer || step.output_summary.stdout)) || "";
      body.append(el("tr", { "data-step": step.step_number },
        el("td", { text: step.step_number }),
        el("td", { text: step.step_key }),
        el("td", { text: step.action }),
        el("td", { text: step.target_ref || "—" }),
        el("td", {}, badge(step.status)),
        el("td", { className: "small", text: typeof output === "string" ? output.slice(0, 200) : JSON.stringify(output).slice(0, 200) })));
    }
  }

  function describeEvent(message) {
    const p = message.payload || {};
    switch (message.kind) {
      case "status_transition": return `${p.from} → ${p.to}${p.reason ? ` (${p.reason})` : ""}`;
      case "step_started": return `step ${p.step_number} on ${p.target || "—"} started (attempt ${p.attempt})`;
      case "step_completed": return `step ${p.step_number} on ${p.target || "—"} succeeded${p.summary ? `: ${p.summary}` : ""}`;
      case "step_failed": return `step ${p.step_number} on ${p.target || "—"} failed${p.error_class ? ` (${p.error_class})` : ""}`;
      case "step_retrying": return `step ${p.step_number} retrying after ${p.error_class || "an error"}`;
      case "approval_requested": return `level ${p.approval_level} approval requested${p.required_role ? ` from ${p.required_role}` : ""}`;
      case "approval_approved": return `approved by ${p.approver_principal || "policy"}${p.reason ? `: ${p.reason}` : ""}`;
      case "approval_rejected": return `rejected by ${p.approver_principal || "—"}${p.reason ? `: ${p.reason}` : ""}`;
      case "cancellation_requested": return `cancel requested by ${p.by}${p.reason ? `: ${p.reason}` : ""}`;
      case "plan_amended": return `plan ${shortId(p.old_plan_hash)}… replaced by ${shortId(p.new_plan_hash)}…`;
      case "execution_completed":
      case "execution_failed": return p.answer || p.status || "";
      case "lock_acquired":
      case "lock_released": return (p.keys || []).map((k) => k.split(":").slice(-2, -1)[0]).join(", ");
      default: return "";
    }
  }

  function appendTimeline(message) {
    const item = el("li", { "data-seq": message.seq, "data-kind": message.kind, className: `kind-${message.kind}` },
      el("time", { dateTime: message.at, text: new Date(message.at).toLocaleTimeString() }),
      el("span", { className: "kind", text: message.kind.replaceAll("_", " ") }),
      el("span", { className: "what", text: describeEvent(message) }));
    $("#timeline").append(item);
  }

  function setTransport(name) {
    const node = $("#transport");
    node.dataset.transport = name;
    node.textContent = TRANSPORT_NAMES[name] || name;
  }

  async function refreshDetail(id) {
    if (state.refreshing) return;
    state.refreshing = true;
    try {
      const [execution, steps] = await Promise.all([
        api("GET", `/v1/executions/${id}`),
        api("GET", `/v1/executions/${id}/steps`),
      ]);
      if (!state.detail || state.detail.id !== id) return;
      state.detail = execution;
      rememberPlan(execution.plan_hash, execution.plan);
      const status = $("#detail-status");
      status.replaceWith(Object.assign(badge(execution.status), { id: "detail-status" }));
      renderFacts(execution);
      renderSteps(steps);
      $("#plan-hash").textContent = `${shortId(execution.plan_hash)}…`;
      $("#plan-json").textContent = pretty(execution.plan);
      $("#cancel-panel").hidden = TERMINAL.has(execution.status);
      await renderApprovalPanel(execution);
    } catch (error) {
      reportError("Could not refresh", error);
    } finally {
      state.refreshing = false;
    }
  }

  async function executionEvents(id) {
    const page = await api("GET", `/v1/executions/${id}/events?after=0&limit=1000`);
    return page.events;
  }

  async function renderApprovalPanel(execution) {
    const panel = $("#approval-panel");
    const waiting = execution.status === "awaiting_approval";
    panel.hidden = !waiting;
    if (!waiting) return;
    const pending = (execution.approvals || []).filter((a) => a.state === "pending" && !a.invalidated_at);
    const current = pending[pending.length - 1];
    const info = $("#approval-info");
    info.replaceChildren();
    if (current) {
      info.append(el("p", { text: `Level ${current.approval_level}${current.required_role ? `, needs role ${current.required_role}` : ""}${current.step_number ? `, before step ${current.step_number}` : ""}; expires ${when(current.expires_at)}.` }));
      $("#approve-button").dataset.step = current.step_number || "";
    }
    const runbook = execution.runbook_url || (current && current.runbook_url);
    if (runbook) info.append(el("p", {}, "Runbook: ", safeLink(runbook)));
    $("#approval-diff").replaceChildren(planChanges(execution, await executionEvents(execution.id)));
  }

  async function decide(id, approve, reason, stepNumber) {
    const body = { reason: reason || null };
    if (stepNumber) body.step_number = Number(stepNumber);
    if (!approve && !reason) {
      notify("Say why you reject it: a reason is required.", "error");
      return false;
    }
    try {
      const execution = await api("POST", `/v1/executions/${id}/${approve ? "approve" : "reject"}`, body);
      notify(`Execution ${shortId(id)} ${approve ? "approved" : "rejected"}; its status is now “${execution.status.replace("_", " ")}”.`, "success");
      return true;
    } catch (error) {
      reportError(`Could not ${approve ? "approve" : "reject"}`, error);
      return false;
    }
  }

  function showDetail(id) {
    show("#view-detail", `Execution ${shortId(id)}`);
    state.detail = { id };
    $("#detail-id").textContent = id;
    $("#timeline").replaceChildren();
    $("#steps-table tbody").replaceChildren();
    $("#decision-reason").value = "";
    $("#cancel-reason").value = "";
    $("#cancel-force").checked = false;
    renderProgress({ done: 0, total: 0, percent: 0, failed: 0 }, null, "pending");
    setTransport("");
    $("#transport").textContent = "connecting…";
    refreshDetail(id);
    let pendingRefresh = null;
    const refreshSoon = () => {
      if (pendingRefresh) return;
      pendingRefresh = setTimeout(() => { pendingRefresh = null; refreshDetail(id); }, 300);
    };
    state.feed = new LiveFeed(id, {
      onEvent: (message) => {
        appendTimeline(message);
        renderProgress(message.progress, message.eta_s, message.status);
        if (message.kind.startsWith("step_") || message.kind.startsWith("approval_") ||
            message.kind === "status_transition" || message.kind === "plan_amended") refreshSoon();
      },
      onEnd: (summary) => {
        renderProgress(summary.progress, summary.eta_s, summary.status);
        refreshSoon();
      },
      onTransport: setTransport,
    });
    state.feed.start();
  }

  // Pending approvals -------------------------------------------------------------------------

  function decisionForm(execution, approval, after) {
    const reasonId = `reason-${approval.approval_id}`;
    const reason = el("textarea", { id: reasonId, rows: 2, maxLength: 2000 });
    const approveButton = el("button", { type: "button", text: "Approve" });
    const rejectButton = el("button", { type: "button", className: "danger", text: "Reject" });
    approveButton.addEventListener("click", async () => {
      if (await decide(execution.id, true, reason.value.trim(), approval.step_number)) after();
    });
    rejectButton.addEventListener("click", async () => {
      if (await decide(execution.id, false, reason.value.trim(), approval.step_number)) after();
    });
    return el("div", { className: "decision" },
      el("label", { htmlFor: reasonId, text: "Reason (required to reject)" }), reason,
      el("div", { className: "buttons" }, approveButton, rejectButton));
  }

  async function loadApprovals() {
    const list = $("#approvals-list");
    let pending;
    try {
      pending = await api("GET", "/v1/approvals");
    } catch (error) {
      reportError("Could not load approvals", error);
      return;
    }
    $("#approvals-count").textContent = pending.length ? String(pending.length) : "";
    $("#approvals-empty").hidden = pending.length > 0;
    const cards = [];
    for (const approval of pending) {
      let execution;
      let events;
      try {
        [execution, events] = await Promise.all([
          api("GET", `/v1/executions/${approval.execution_id}`),
          executionEvents(approval.execution_id),
        ]);
      } catch (error) {
        reportError(`Could not load execution ${shortId(approval.execution_id)}`, error);
        continue;
      }
      const card = el("article", { className: "panel", "data-execution-id": execution.id, "aria-labelledby": `title-${approval.approval_id}` },
        el("h2", { id: `title-${approval.approval_id}` },
          "Execution ", el("a", { href: `#/executions/${execution.id}`, text: shortId(execution.id) }),
          ` — level ${approval.approval_level}${approval.step_number ? `, step ${approval.step_number}` : ""}`),
        el("p", { className: "muted", text: `Requested ${when(approval.created_at)}; expires ${when(approval.expires_at)}${approval.required_role ? `; needs ${approval.required_role}` : ""}.` }));
      const runbook = execution.runbook_url || approval.runbook_url;
      card.append(el("p", {}, "Runbook: ", runbook ? safeLink(runbook) : "none given"));
      card.append(planChanges(execution, events));
      card.append(el("details", {}, el("summary", { text: `Plan (${execution.plan.steps ? execution.plan.steps.length : 0} steps)` }), el("pre", { text: pretty(execution.plan) })));
      card.append(decisionForm(execution, approval, loadApprovals));
      rememberPlan(execution.plan_hash, execution.plan);
      cards.push(card);
    }
    list.replaceChildren(...cards);
  }

  function showApprovals() {
    show("#view-approvals", "Approvals");
    loadApprovals();
  }

  // --- routing -------------------------------------------------------------------------------

  function route() {
    clearView();
    const signedIn = Boolean(apiKey());
    const hash = window.location.hash || "#/executions";
    if (!signedIn) {
      showSignIn();
      return;
    }
    $("#nav").hidden = false;
    $("#session").hidden = false;
    $("#session-key").textContent = `key ${apiKey().slice(0, 8)}…`;
    const detail = hash.match(/^#\/executions\/([0-9a-f-]{36})$/i);
    if (detail) showDetail(detail[1]);
    else if (hash === "#/approvals") showApprovals();
    else showExecutions();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#signin-form").addEventListener("submit", signIn);
    $("#signout-button").addEventListener("click", () => signOut());
    $("#status-filter").addEventListener("change", () => loadExecutions());
    $("#filter-form").addEventListener("submit", (event) => { event.preventDefault(); loadExecutions(); });
    $("#refresh-button").addEventListener("click", () => loadExecutions());
    $("#more-button").addEventListener("click", () => loadExecutions(true));
    $("#approvals-refresh").addEventListener("click", () => loadApprovals());
    $("#decision-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const id = state.detail && state.detail.id;
      if (id && await decide(id, true, $("#decision-reason").value.trim(), $("#approve-button").dataset.step)) refreshDetail(id);
    });
    $("#reject-button").addEventListener("click", async () => {
      const id = state.detail && state.detail.id;
      if (id && await decide(id, false, $("#decision-reason").value.trim(), $("#approve-button").dataset.step)) refreshDetail(id);
    });
    $("#cancel-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const id = state.detail && state.detail.id;
      if (!id) return;
      try {
        const execution = await api("POST", `/v1/executions/${id}/cancel`, {
          reason: $("#cancel-reason").value.trim() || null,
          force: $("#cancel-force").checked,
        });
        notify(execution.status === "cancelled" ? `Execution ${shortId(id)} is cancelled.`
          : `Cancel requested: execution ${shortId(id)} stops at its next step boundary.`, "success");
        refreshDetail(id);
      } catch (error) {
        reportError("Could not cancel", error);
      }
    });
    window.addEventListener("hashchange", route);
    route();
  });
})();
