// The esmd admin console (docs/admin.md#console). Plain JavaScript, no framework, nothing
// fetched from elsewhere. Every value from esmd reaches the page through textContent or an
// attribute (el() below): never innerHTML, so data cannot become markup. The token lives in
// sessionStorage and goes out as an Authorization header from fetch(), never as a cookie.
"use strict";

const TOKEN_KEY = "esmd.token";
// Every 5 s; ?refresh=MS (at least 500) changes it (the browser tests use 1000).
const REFRESH_MS = Math.max(500, Number(new URLSearchParams(location.search).get("refresh")) || 5000);
const SVG = "http://www.w3.org/2000/svg";

// ---- DOM helpers --------------------------------------------------------------------------

// el("tag.class", {attr: value, onclick: fn}, child, ...): children are nodes or text.
function el(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split(".");
  const node = document.createElement(tag);
  if (classes.length) node.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function $(id) {
  return document.getElementById(id);
}

function fmtNum(n, digits) {
  if (n === null || n === undefined) return "–";
  if (typeof n !== "number") return String(n);
  return n.toLocaleString("en-US", {maximumFractionDigits: digits === undefined ? 1 : digits});
}

function fmtAge(ms) {
  if (ms === null || ms === undefined) return "–";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function fmtMs(sec) {
  return sec === null || sec === undefined ? "–" : (sec * 1000).toFixed(1) + " ms";
}

// ---- the API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = {"Accept": "application/json"};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, credentials: "omit", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (e) {
    data = null;
  }
  if (r.status === 401 || (r.status === 403 && !token)) {
    signOut((data && data.Message) || "Signed out: the token was refused.");
    throw new ApiError(r.status, "not signed in");
  }
  if (!r.ok) throw new ApiError(r.status, (data && data.Message) || ("HTTP " + r.status));
  return data;
}

function enc(s) {
  return encodeURIComponent(s);
}

// ---- sign-in ------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopRefresh();
  $("view").hidden = true;
  $("nav").hidden = true;
  $("signout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("GET", "/admin/mappings");
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("login-error").textContent = "Sign-in failed: " + e.message;
    }
    return;
  }
  $("login").hidden = true;
  $("nav").hidden = false;
  $("signout").hidden = false;
  $("view").hidden = false;
  route();
}

// ---- confirmation -------------------------------------------------------------------------

function confirmAction(text, okLabel) {
  const d = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel || "Confirm";
  return new Promise((resolve) => {
    const done = (v) => {
      $("confirm-ok").onclick = null;
      $("confirm-cancel").onclick = null;
      d.onclose = null;
      if (d.open) d.close();
      resolve(v);
    };
    $("confirm-ok").onclick = () => done(true);
    $("confirm-cancel").onclick = () => done(false);
    d.onclose = () => done(false);
    d.showModal();
  });
}

function flash(text, isError) {
  const f = el("div.flash" + (isError ? ".error" : ""), {role: "status"}, text);
  document.body.appendChild(f);
  setTimeout(() => f.remove(), 6000);
}

// ---- charts (inline SVG, drawn here) ------------------------------------------------------

// A line of values (null: a gap) over w x h; returns the <svg>.
function sparkline(values, w, h, cls, label) {
  const s = svg("svg", {width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "spark " + cls,
                        role: "img", "aria-label": label});
  const nums = values.filter((v) => typeof v === "number");
  const max = Math.max(1, ...nums);
  const n = values.length;
  let d = "";
  values.forEach((v, i) => {
    if (typeof v !== "number") return;
    const x = n > 1 ? (i / (n - 1)) * (w - 2) + 1 : w / 2;
    const y = h - 1 - (v / max) * (h - 2);
    d += (d && typeof values[i - 1] === "number" ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
  });
  if (d) s.appendChild(svg("path", {d, fill: "none"}));
  return s;
}

// A chart with a title, the maximum and a time axis, for the mapping view.
function chart(title, samples, key, unit, cls) {
  const w = 420, h = 140;
  const values = samples.map((x) => x[key]);
  const nums = values.filter((v) => typeof v === "number");
  const last = nums.length ? nums[nums.length - 1] : null;
  const max = nums.length ? Math.max(...nums) : 0;
  const span = samples.length > 1 ? samples[samples.length - 1].time - samples[0].time : 0;
  const box = el("figure.chart", {"data-chart": key},
    el("figcaption", {}, title, unit ? ` (${unit})` : "", " ",
       el("span.muted", {}, "now ", fmtNum(last), " · max ", fmtNum(max))));
  const s = sparkline(values, w, h, cls, title);
  s.insertBefore(svg("line", {x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5, class: "axis"}),
                 s.firstChild);
  box.appendChild(s);
  box.appendChild(el("div.axis-labels", {}, el("span", {}, "−" + fmtAge(span)), el("span", {}, "now")));
  return box;
}

// ---- records: pretty-printed, base64 decoded where it is text ------------------------------

const B64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
const B64_KEYS = new Set(["value", "key", "data", "body"]);

// The text a base64 string holds, or null when it is not base64 of UTF-8 text.
function b64text(s) {
  if (typeof s !== "string" || s.length < 4 || !B64.test(s)) return null;
  let bytes;
  try {
    bytes = Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
  } catch (e) {
    return null;
  }
  let text;
  try {
    text = new TextDecoder("utf-8", {fatal: true}).decode(bytes);
  } catch (e) {
    return null;
  }
  // eslint-disable-next-line no-control-regex
  return /[\u0000-\u0008\u000e-\u001f]/.test(text) ? null : text;
}

function parseMaybe(text) {
  try {
    return JSON.parse(text);
  } catch (e) {
    return text;
  }
}

// A copy of v where base64 text under the usual keys (value, key, data) is decoded (and parsed
// when it is JSON); such keys get " (base64 decoded)" appended.
function decodeRecord(v) {
  if (Array.isArray(v)) return v.map(decodeRecord);
  if (v && typeof v === "object") {
    const out = {};
    for (const [k, x] of Object.entries(v)) {
      const t = B64_KEYS.has(k) ? b64text(x) : null;
      if (t !== null) out[k + " (base64 decoded)"] = parseMaybe(t);
      else out[k] = decodeRecord(x);
    }
    return out;
  }
  return v;
}

function pretty(v) {
  return el("pre.json", {}, typeof v === "string" ? v : JSON.stringify(v, null, 2));
}

function prettyText(text) {
  const v = parseMaybe(text);
  return pretty(typeof v === "string" ? v : v);
}

// ---- views --------------------------------------------------------------------------------

let refreshTimer = null;
let current = null; // {render: async () => void}

function stopRefresh() {
  if (refreshTimer) clearInterval(refreshTimer);
  refreshTimer = null;
}

function setView(title, ...children) {
  const v = $("view");
  v.replaceChildren(el("h1", {}, title), ...children);
  return v;
}

function stamp() {
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function badge(text, kind) {
  return el("span.badge." + kind, {}, text);
}

function stateBadge(m) {
  if (!m.running) return badge("not running here", "off");
  return m.enabled ? badge("Enabled", "ok") : badge("Disabled", "off");
}

function resultBadge(text) {
  if (!text) return "–";
  if (text.startsWith("PROBLEM")) return badge(text, "bad");
  return badge(text, text === "OK" ? "ok" : "off");
}

function sourceOf(m) {
  return m.source;
}

async function setEnabled(m, enabled) {
  await api("PUT", "/2015-03-31/event-source-mappings/" + enc(m.uuid), {Enabled: enabled});
  flash((enabled ? "Resumed " : "Paused ") + m.name);
}

async function resetOverrides(m) {
  const ok = await confirmAction(
    `Forget every run-time change of mapping ${m.name}? The configuration file's values apply again, on every instance.`,
    "Reset overrides");
  if (!ok) return false;
  await api("DELETE", "/admin/mappings/" + enc(m.name) + "/overrides");
  flash("Overrides of " + m.name + " reset");
  return true;
}

function mappingActions(m, after) {
  const act = (fn) => async (ev) => {
    ev.target.disabled = true;
    try {
      await fn();
      await after();
    } catch (e) {
      flash(e.message, true);
    } finally {
      ev.target.disabled = false;
    }
  };
  return el("span.actions", {},
    m.enabled
      ? el("button", {type: "button", "data-action": "pause", onclick: act(() => setEnabled(m, false))}, "Pause")
      : el("button", {type: "button", "data-action": "resume", onclick: act(() => setEnabled(m, true))}, "Resume"),
    el("button", {type: "button", "data-action": "reset", disabled: m.overrides ? null : true,
                  title: m.overrides ? "Forget the run-time changes" : "No run-time changes",
                  onclick: act(() => resetOverrides(m))}, "Reset overrides"));
}

async function viewMappings() {
  const table = el("table.grid", {id: "mappings"},
    el("thead", {}, el("tr", {}, ["Mapping", "State", "Source", "Function", "Batch", "Lag", "Lag trend",
                                  "Records/s", "Last result", "In flight", "Retrying", ""]
      .map((t) => el("th", {}, t)))),
    el("tbody"));
  setView("Mappings", table);
  current = {
    async render() {
      const data = await api("GET", "/admin/mappings");
      const hist = await Promise.all(data.mappings.map((m) =>
        api("GET", "/admin/mappings/" + enc(m.name) + "/history").catch(() => ({samples: []}))));
      const rows = data.mappings.map((m, i) => {
        const st = m.status || {};
        const samples = hist[i].samples || [];
        return el("tr", {"data-mapping": m.name},
          el("td.name", {}, el("a", {href: "#/mapping/" + enc(m.name)}, m.name)),
          el("td", {}, stateBadge(m)),
          el("td", {}, sourceOf(m)),
          el("td", {}, m.function),
          el("td.nowrap", {}, `${m.batch_size} / ${m.maximum_batching_window_ms} ms`),
          el("td.num", {"data-field": "lag"}, st.lag === undefined || st.lag < 0 ? "–" : fmtNum(st.lag, 0)),
          el("td", {}, sparkline(samples.map((x) => x.lag), 120, 28, "lag", "lag, last 15 minutes")),
          el("td.num", {"data-field": "rate"}, fmtNum(st.records_per_second)),
          el("td", {}, resultBadge(m.last_processing_result)),
          el("td.num", {}, fmtNum(st.inflight_batches, 0)),
          el("td.num", {}, fmtNum(st.retries_under_way, 0)),
          el("td", {}, mappingActions(m, () => current.render())));
      });
      table.tBodies[0].replaceChildren(...rows);
      if (!rows.length) table.tBodies[0].appendChild(el("tr", {}, el("td", {colspan: 12}, "No mappings configured.")));
      stamp();
    },
  };
}

function failureCard(f) {
  const rec = f.record;
  const payload = rec && rec.payload !== undefined ? rec.payload : null;
  return el("article.failure", {},
    el("header", {},
      badge(f.condition || "?", "bad"), " ",
      el("time", {}, f.time), " ",
      el("span.muted", {}, `attempts ${f.attempts}, invocations ${f.invocations}`,
         f.status_code !== null ? `, status ${f.status_code}` : "",
         f.function_error ? `, ${f.function_error}` : ""), " ",
      el("span.muted", {}, f.destination ? "stored for " + f.destination : "discarded")),
    el("h3", {}, "The function's error"),
    f.error === null ? el("p.muted", {}, "–") : prettyText(f.error),
    el("h3", {}, "The record"),
    payload !== null ? pretty(decodeRecord(payload))
      : el("p.muted", {}, rec ? "not carried (over the payload cap)" : `not kept (${f.record_bytes} bytes)`),
    rec ? el("details", {}, el("summary", {}, "The whole on-failure record, as stored"), pretty(rec)) : null);
}

async function viewMapping(name) {
  const summary = el("div.summary");
  const charts = el("div.charts");
  const failures = el("div", {id: "failures"});
  setView("Mapping " + name, summary, charts, el("h2", {}, "Records given up (latest first)"), failures);
  let lastFailureKey = null;
  current = {
    async render() {
      const [m, h, f] = await Promise.all([
        api("GET", "/admin/mappings/" + enc(name)),
        api("GET", "/admin/mappings/" + enc(name) + "/history"),
        api("GET", "/admin/mappings/" + enc(name) + "/failures")]);
      const st = m.status || {};
      summary.replaceChildren(
        el("dl", {},
          el("dt", {}, "State"), el("dd", {}, stateBadge(m), " ", mappingActions(m, () => current.render())),
          el("dt", {}, "Source"), el("dd", {}, m.source),
          el("dt", {}, "Function"), el("dd", {}, m.function),
          el("dt", {}, "Batch"), el("dd", {}, `size ${m.batch_size}, window ${m.maximum_batching_window_ms} ms`),
          el("dt", {}, "Lag"), el("dd", {"data-field": "lag"}, st.lag === undefined || st.lag < 0 ? "–" : fmtNum(st.lag, 0)),
          el("dt", {}, "Records/s"), el("dd", {}, fmtNum(st.records_per_second)),
          el("dt", {}, "In flight / retrying"), el("dd", {}, `${fmtNum(st.inflight_batches, 0)} / ${fmtNum(st.retries_under_way, 0)}`),
          el("dt", {}, "Last result"), el("dd", {}, resultBadge(m.last_processing_result)),
          el("dt", {}, "Overrides"), el("dd", {}, m.overrides ? JSON.stringify(m.overrides) : "none")));
      charts.replaceChildren(
        chart("Lag", h.samples, "lag", "records", "lag"),
        chart("Read", h.samples, "records_per_second", "records/s", "rate"),
        chart("Sent to the function", h.samples, "invoked_per_second", "records/s", "rate"));
      const key = JSON.stringify(f.failures.map((x) => [x.time, x.request_id]));
      if (key !== lastFailureKey) { // keep what the reader opened while nothing changed
        lastFailureKey = key;
        failures.replaceChildren(...(f.failures.length ? f.failures.map(failureCard)
          : [el("p.muted", {}, "None since esmd started.")]));
      }
      stamp();
    },
  };
}

// A queue message: its function and condition, from its attributes or its body.
function describeMessage(m) {
  let body = null;
  try {
    body = JSON.parse(m.body);
  } catch (e) {
    body = null;
  }
  const ctx = body && typeof body === "object" ? body.requestContext : null;
  let fn = m.function;
  if (!fn && ctx && typeof ctx.functionArn === "string") fn = ctx.functionArn.split(":function:")[1] || null;
  let condition = ctx && ctx.condition ? ctx.condition : null;
  if (!condition && m.errorMessage !== null && m.errorMessage !== undefined) condition = "Dead letter";
  // what a redrive can make an event of again: a dead letter (the event itself) or an async
  // invocation record (its requestPayload); a mapping's on-failure record is shown only
  const deadLetter = !!(m.attributes && m.attributes.RequestID && !ctx);
  const redrivable = deadLetter || !!(ctx && body.requestPayload !== undefined);
  return {fn: fn ? fn.split(":")[0] : null, condition: condition || "–", deadLetter, redrivable, body};
}

async function viewQueues() {
  const table = el("table.grid", {id: "queues"},
    el("thead", {}, el("tr", {}, ["Queue", "Messages", "Oldest", "Written by"].map((t) => el("th", {}, t)))),
    el("tbody"));
  setView("Dead letters and on-failure records", el("p.muted", {},
    "The pgqueue:// queues esmd's configuration writes to. Other queues: ",
    el("a", {href: "#/queue/"}, "open by name"), "."), table);
  current = {
    async render() {
      const data = await api("GET", "/admin/dead-letters");
      table.tBodies[0].replaceChildren(...data.queues.map((q) => el("tr", {"data-queue": q.queue},
        el("td", {}, el("a", {href: "#/queue/" + enc(q.queue)}, q.queue)),
        el("td.num", {}, fmtNum(q.messages, 0)),
        el("td", {}, q.oldestSentTime || "–"),
        el("td", {}, q.uses.map((u) => `${u.function ? "function " + u.function : "mapping " + u.mapping} (${u.role})`).join(", ")))));
      if (!data.queues.length) table.tBodies[0].appendChild(el("tr", {}, el("td", {colspan: 4}, "No pgqueue:// destinations configured.")));
      stamp();
    },
  };
}

async function redrive(queue, fn, ids, count) {
  const what = ids ? (count === 1 ? "this message" : `these ${count} messages`) : "every message";
  const ok = await confirmAction(
    `Redrive ${what} of queue ${queue} into function ${fn}? Each becomes a new async event of ${fn} and leaves the queue.`,
    "Redrive");
  if (!ok) return null;
  const body = {function: fn};
  if (ids) body.messageIds = ids;
  const r = await api("POST", "/admin/dead-letters/" + enc(queue) + "/redrive", body);
  flash(`Redriven ${r.redriven} message(s) into ${fn}`);
  return r;
}

async function viewQueue(queue) {
  if (!queue) {
    const input = el("input", {type: "text", placeholder: "queue name", "aria-label": "queue name"});
    setView("Open a queue", el("form.inline", {onsubmit: (ev) => {
      ev.preventDefault();
      location.hash = "#/queue/" + enc(input.value.trim());
    }}, input, el("button", {type: "submit"}, "Open")));
    current = null;
    return;
  }
  const fnFilter = el("select", {"aria-label": "function", id: "filter-function"});
  const condFilter = el("select", {"aria-label": "condition", id: "filter-condition"});
  const table = el("table.grid", {id: "messages"},
    el("thead", {}, el("tr", {}, ["Sent", "Function", "Condition", "Error", "Request id", "Receives", ""].map((t) => el("th", {}, t)))),
    el("tbody"));
  const inspect = el("div", {id: "inspect"});
  const redriveAll = el("button.danger", {type: "button", id: "redrive-all"}, "Redrive all shown");
  const refresh = el("button", {type: "button"}, "Refresh");
  setView("Queue " + queue,
    el("div.toolbar", {}, el("label", {}, "Function ", fnFilter), el("label", {}, "Condition ", condFilter),
       refresh, redriveAll),
    table, inspect);
  let messages = [];
  const shown = () => messages.filter((x) =>
    (!fnFilter.value || x.d.fn === fnFilter.value) && (!condFilter.value || x.d.condition === condFilter.value));
  const options = (select, values) => {
    const keep = select.value;
    select.replaceChildren(el("option", {value: ""}, "all"), ...[...new Set(values)].sort().map((v) => el("option", {value: v}, v)));
    select.value = values.includes(keep) ? keep : "";
  };
  const show = (x) => {
    inspect.replaceChildren(el("h2", {}, "Message " + x.m.messageId),
      el("dl", {},
        el("dt", {}, "Function"), el("dd", {}, x.d.fn || "–"),
        el("dt", {}, "Condition"), el("dd", {}, x.d.condition),
        el("dt", {}, "Error"), el("dd", {}, x.m.errorMessage || "–"),
        el("dt", {}, "Sent"), el("dd", {}, x.m.sentTime)),
      el("h3", {}, "Body"), x.d.body !== null ? pretty(decodeRecord(x.d.body)) : pretty(x.m.body),
      el("details", {}, el("summary", {}, "Attributes"), pretty(x.m.attributes)));
    inspect.scrollIntoView({block: "nearest"});
  };
  const draw = () => {
    const list = shown();
    table.tBodies[0].replaceChildren(...list.map((x) => el("tr", {"data-message": x.m.messageId},
      el("td", {}, x.m.sentTime),
      el("td", {}, x.d.fn || "–"),
      el("td", {}, x.d.condition),
      el("td.clip", {title: x.m.errorMessage || ""}, x.m.errorMessage || "–"),
      el("td.mono", {}, x.m.requestId || "–"),
      el("td.num", {}, fmtNum(x.m.receiveCount, 0)),
      el("td", {}, el("span.actions", {},
        el("button", {type: "button", "data-action": "inspect", onclick: () => show(x)}, "Inspect"),
        x.d.redrivable && x.d.fn
          ? el("button", {type: "button", "data-action": "redrive", onclick: async () => {
              try {
                if (await redrive(queue, x.d.fn, [x.m.messageId], 1)) await current.render();
              } catch (e) {
                flash(e.message, true);
              }
            }}, "Redrive")
          : null)))));
    if (!list.length) table.tBodies[0].appendChild(el("tr", {}, el("td", {colspan: 7}, "No messages.")));
    const fns = new Set(list.filter((x) => x.d.redrivable).map((x) => x.d.fn));
    redriveAll.disabled = !(fns.size === 1 && !fns.has(null));
    redriveAll.title = redriveAll.disabled ? "Filter the messages of one function to redrive them" : "";
  };
  fnFilter.addEventListener("change", draw);
  condFilter.addEventListener("change", draw);
  refresh.addEventListener("click", () => current.render().catch((e) => flash(e.message, true)));
  redriveAll.addEventListener("click", async () => {
    const list = shown().filter((x) => x.d.redrivable);
    if (!list.length) return;
    try {
      if (await redrive(queue, list[0].d.fn, list.slice(0, 1000).map((x) => x.m.messageId), Math.min(list.length, 1000)))
        await current.render();
    } catch (e) {
      flash(e.message, true);
    }
  });
  current = {
    manual: true, // not refreshed on a timer: it would move the rows being read
    async render() {
      const data = await api("GET", "/admin/dead-letters/" + enc(queue) + "?limit=1000");
      messages = data.messages.map((m) => ({m, d: describeMessage(m)}));
      options(fnFilter, messages.map((x) => x.d.fn).filter(Boolean));
      options(condFilter, messages.map((x) => x.d.condition));
      draw();
      stamp();
    },
  };
}

function tile(label, value, id) {
  return el("div.tile", {id}, el("div.value", {}, value), el("div.label", {}, label));
}

async function viewAsync() {
  const tiles = el("div.tiles");
  const table = el("table.grid", {id: "async-functions"},
    el("thead", {}, el("tr", {}, ["Function", "Depth", "Due", "In progress", "Retries scheduled", "Oldest event"].map((t) => el("th", {}, t)))),
    el("tbody"));
  setView("Async queue", tiles, table);
  current = {
    async render() {
      const a = await api("GET", "/admin/async");
      tiles.replaceChildren(tile("events", fmtNum(a.depth, 0), "async-depth"), tile("due", fmtNum(a.due, 0)),
        tile("in progress", fmtNum(a.in_progress, 0)), tile("retries scheduled", fmtNum(a.retries_scheduled, 0)),
        tile("oldest event", fmtAge(a.oldest_age_ms)));
      table.tBodies[0].replaceChildren(...a.functions.map((f) => el("tr", {},
        el("td", {}, f.function), el("td.num", {}, fmtNum(f.depth, 0)), el("td.num", {}, fmtNum(f.due, 0)),
        el("td.num", {}, fmtNum(f.in_progress, 0)), el("td.num", {}, fmtNum(f.retries_scheduled, 0)),
        el("td", {}, fmtAge(f.oldest_age_ms)))));
      if (!a.functions.length) table.tBodies[0].appendChild(el("tr", {}, el("td", {colspan: 6}, "The queue is empty.")));
      stamp();
    },
  };
}

async function viewFunctions() {
  const table = el("table.grid", {id: "functions"},
    el("thead", {}, el("tr", {}, ["Function", "Invocations", "Errors", "Function errors", "Timeouts", "Throttles",
                                  "p50", "p99", "Concurrency in use", "Waiting"].map((t) => el("th", {}, t)))),
    el("tbody"));
  setView("Functions", el("p.muted", {}, "Since this instance started; latencies estimated from the duration histogram."), table);
  current = {
    async render() {
      const data = await api("GET", "/admin/functions");
      table.tBodies[0].replaceChildren(...data.functions.map((f) => el("tr", {"data-function": f.name},
        el("td", {title: f.url}, f.name), el("td.num", {}, fmtNum(f.invocations, 0)),
        el("td.num", {}, fmtNum(f.errors, 0)), el("td.num", {}, fmtNum(f.function_errors, 0)),
        el("td.num", {}, fmtNum(f.timeouts, 0)), el("td.num", {}, fmtNum(f.throttles, 0)),
        el("td.num", {}, fmtMs(f.p50_seconds)), el("td.num", {}, fmtMs(f.p99_seconds)),
        el("td.num", {}, `${f.concurrency_in_use} / ${f.max_concurrency}`), el("td.num", {}, fmtNum(f.queued, 0)))));
      stamp();
    },
  };
}

// ---- routing ------------------------------------------------------------------------------

async function route() {
  stopRefresh();
  const hash = location.hash || "#/mappings";
  const [, view, arg] = hash.match(/^#\/([a-z]*)\/?(.*)$/) || [null, "mappings", ""];
  const name = decodeURIComponent(arg || "");
  for (const a of document.querySelectorAll("#nav a")) {
    const v = a.getAttribute("data-view");
    a.classList.toggle("active", v === view || (v === "mappings" && view === "mapping") || (v === "queues" && view === "queue"));
  }
  current = null;
  if (view === "mapping" && name) await viewMapping(name);
  else if (view === "queues") await viewQueues();
  else if (view === "queue") await viewQueue(name);
  else if (view === "async") await viewAsync();
  else if (view === "functions") await viewFunctions();
  else await viewMappings();
  if (!current) return;
  const tick = () => current && current.render().catch((e) => {
    if (!(e instanceof ApiError && e.status === 401)) flash(e.message, true);
  });
  await tick();
  if (!current.manual) refreshTimer = setInterval(tick, REFRESH_MS);
}

function start() {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("token").value);
  });
  $("signout").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", () => {
    if (!$("view").hidden) route();
  });
  if (sessionStorage.getItem(TOKEN_KEY) !== null) signIn(sessionStorage.getItem(TOKEN_KEY));
  else signOut("");
}

document.addEventListener("DOMContentLoaded", start);
