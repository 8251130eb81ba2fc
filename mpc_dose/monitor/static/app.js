// mpc-dose web monitor: the server pushes its view ("state" events, mpc_dose/monitor/state.py)
// twice a second with only the points this page has not had; charts are drawn with uPlot.
"use strict";

const loops = new Map();      // loop name -> {el, out, rate, measured, delivered, ...}
let lastEvent = 0;
let canAcknowledge = false;

const $ = (sel, root = document) => root.querySelector(sel);
const fmt = (v, digits = 4) => (v === null || v === undefined) ? "–"
  : (Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0)) ? v.toExponential(2)
  : Number(v.toPrecision(digits)).toString();
const age = (s) => s < 60 ? `${s.toFixed(1)} s ago` : `${(s / 60).toFixed(1)} min ago`;

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

// ---------------------------------------------------------------- series kept by the page
function merge(store, series, windowS) {
  // store: array of [t, v]; series: {reset, points}
  if (!series) return store;
  if (series.reset) store = [];
  for (const p of series.points) store.push(p);
  if (store.length) {
    const tMax = store[store.length - 1][0];
    let k = 0;
    while (k < store.length && store[k][0] < tMax - windowS) k++;
    if (k) store = store.slice(k);
  }
  return store;
}

// ---------------------------------------------------------------- charts
function chartSize(div) {
  return {width: Math.max(320, div.clientWidth || 600), height: 250};
}

function timeAxis(utc) {
  return utc ? {time: true} : {time: false};
}

function makeOutputChart(div, utc, unit) {
  const opts = {
    ...chartSize(div),
    scales: {x: timeAxis(utc)},
    axes: [{label: utc ? "time" : "t [s]"}, {label: unit || ""}],
    series: [
      {label: "t"},
      {label: "measured", stroke: "#1f5fbf", width: 1.5, spanGaps: false,
       points: {show: false}},
      {label: "predicted", stroke: "#d26a00", width: 2, dash: [6, 4],
       points: {show: true, size: 3}},
      {label: "target", stroke: "#2a8a2a", width: 1, dash: [2, 3]},
      {label: "band low", stroke: "rgba(42,138,42,0.5)", width: 1},
      {label: "band high", stroke: "rgba(42,138,42,0.5)", width: 1},
    ],
    bands: [{series: [5, 4], fill: "rgba(42,138,42,0.10)"}],
  };
  return new uPlot(opts, [[], [], [], [], [], []], div);
}

const COLOURS = ["#6a3d9a", "#1f78b4", "#b15928", "#33a02c"];

function makeRateChart(div, utc, names) {
  const series = [{label: "t"}];
  names.forEach((n, k) => {
    const c = COLOURS[k % COLOURS.length];
    series.push({label: `${n.label} delivered`, stroke: c, width: 2,
                 paths: uPlot.paths.stepped({align: 1})});
    series.push({label: `${n.label} planned`, stroke: c, width: 1.5, dash: [6, 4],
                 paths: uPlot.paths.stepped({align: 1})});
  });
  const opts = {...chartSize(div), scales: {x: timeAxis(utc)},
                axes: [{label: utc ? "time" : "t [s]"},
                       {label: "rate [" + [...new Set(names.map((n) => n.unit))].join(", ") + "]"}],
                series};
  return new uPlot(opts, [[], ...names.flatMap(() => [[], []])], div);
}

function drawOutput(L, view) {
  const plan = view.plan;
  const m = L.measured;
  const utc = (view.t_last || 0) > 1e8;
  const unit = plan && plan.unit ? plan.unit : (view.readings.find((r) => r.var === view.var) || {}).unit;
  if (!L.out || L.outUtc !== utc) {
    if (L.out) L.out.destroy();
    L.outDiv.innerHTML = "";
    L.out = makeOutputChart(L.outDiv, utc, unit === "1" ? "" : unit);
    L.outUtc = utc;
  }
  const measured = [m.map((p) => p[0]), m.map((p) => p[1])];
  let predicted = [[], []];
  let band = [[], [], [], []];
  if (plan) {
    predicted = [plan.predicted.length ? plan.times_s.slice(1) : [], plan.predicted];
    const t0 = m.length ? m[0][0] : plan.times_s[0];
    const t1 = plan.times_s[plan.times_s.length - 1];
    if (plan.target !== null || plan.band_low !== null) {
      band = [[t0, t1], [plan.target, plan.target], [plan.band_low, plan.band_low],
              [plan.band_high, plan.band_high]];
    }
  }
  // uPlot.join aligns the tables on one x column: a value missing at an x is undefined
  // (the line runs on), a null (a reading flagged invalid) is a gap
  L.out.setData(uPlot.join([measured, predicted, band]));
  L.outDiv.dataset.points = String(m.length);
  L.outDiv.dataset.planPoints = String(predicted[0].length);
  $(".output-caption", L.el).textContent =
    `measured ${view.var || "output"}` + (plan && plan.predicted.length ? " and predicted " + plan.output : "")
    + (plan && plan.band_low !== null ? `, target band [${fmt(plan.band_low)}, ${fmt(plan.band_high)}]` : "");
}

function drawRates(L, view) {
  const plan = view.plan;
  const names = [];
  const byPump = new Map(view.pumps.map((p) => [p.pump, p]));
  if (plan) {
    for (const i of plan.inputs) names.push({key: i.pump, label: i.input, unit: i.unit, input: i});
  }
  for (const p of view.pumps) {
    if (!names.find((n) => n.key === p.pump)) names.push({key: p.pump, label: p.pump, unit: p.series.unit});
  }
  const signature = names.map((n) => `${n.label} ${n.unit}`).join("|") + (view.t_last > 1e8);
  if (!L.rate || L.rateSignature !== signature) {
    if (L.rate) L.rate.destroy();
    L.rateDiv.innerHTML = "";
    if (!names.length) return;
    L.rate = makeRateChart(L.rateDiv, view.t_last > 1e8, names);
    L.rateSignature = signature;
  }
  const tables = [];
  let planned = 0, delivered = 0;
  for (const n of names) {
    const d = L.delivered.get(n.key) || [];
    const pump = byPump.get(n.key);
    const factor = pump ? pump.series.factor : 1;
    delivered += d.length;
    const xs = d.map((p) => p[0]);
    const ys = d.map((p) => p[1] === null ? null : p[1] * factor);
    if (d.length && view.t_last > xs[xs.length - 1]) {
      // a pump reports changes: its last rate holds until now
      xs.push(view.t_last);
      ys.push(ys[ys.length - 1]);
    }
    tables.push([xs, ys]);
    if (n.input) {
      const r = n.input.rates;
      planned += r.length;
      tables.push([plan.times_s, r.concat(r.length ? [r[r.length - 1]] : [])]);
    } else {
      tables.push([[], []]);
    }
  }
  L.rate.setData(uPlot.join(tables));
  L.rateDiv.dataset.points = String(delivered);
  L.rateDiv.dataset.planPoints = String(planned);
}

// ---------------------------------------------------------------- one loop's panel
function panel(name) {
  let L = loops.get(name);
  if (L) return L;
  const el = $("#loop-template").content.firstElementChild.cloneNode(true);
  el.dataset.loop = name;
  $(".loop-name", el).textContent = name;
  $("#loops").appendChild(el);
  $("#no-loops").hidden = true;
  L = {el, outDiv: $(".output-chart", el), rateDiv: $(".rate-chart", el), out: null,
       rate: null, measured: [], measuredKey: null, delivered: new Map()};
  loops.set(name, L);
  return L;
}

function renderLoop(view) {
  const L = panel(view.name);
  if (view.measured) {
    if (L.measuredKey !== view.measured.key) L.measured = [];
    L.measuredKey = view.measured.key;
    L.measured = merge(L.measured, view.measured, view.window_s);
  }
  for (const p of view.pumps) {
    L.delivered.set(p.pump, merge(L.delivered.get(p.pump) || [], p.series, view.window_s));
  }
  const reading = view.readings.find((r) => r.var === view.var) || view.readings[0];
  if (reading) {
    $(".var", L.el).textContent = reading.var;
    $(".value", L.el).textContent = fmt(reading.value, 3);
    $(".unit", L.el).textContent = reading.unit === "1" ? "" : reading.unit;
    const q = $(".quality", L.el);
    q.textContent = `${reading.quality}, ${age(reading.age_s)}`;
    q.className = "quality" + (reading.quality === "valid" ? "" : " bad");
  }
  const mode = $(".mode", L.el);
  mode.textContent = view.mode || "no mode";
  mode.className = `badge mode ${view.mode}`;
  const plan = view.plan;
  const facts = [];
  if (plan) {
    facts.push(`plan ${plan.status || "?"} ${age(plan.age_s)}`);
    if (plan.solve_s !== null) facts.push(`solve ${(plan.solve_s * 1000).toFixed(1)} ms`);
    facts.push(`deadline misses ${plan.deadline_misses === null ? "–" : plan.deadline_misses}`);
    $(".reason", L.el).textContent = plan.reason;
  } else {
    facts.push("no plan heard (serve controller --publish)");
  }
  const facts_el = $(".facts", L.el);
  facts_el.textContent = facts.join(" · ");
  facts_el.dataset.deadlineMisses = plan && plan.deadline_misses !== null ? plan.deadline_misses : "";
  const tbody = $(".pumps tbody", L.el);
  tbody.replaceChildren();
  for (const p of view.pumps) {
    const tr = document.createElement("tr");
    cell(tr, p.pump);
    cell(tr, p.state);
    cell(tr, `${fmt(p.rate)} ${p.rate_unit}` + (p.series.unit !== "mL/h" ? ` = ${fmt(p.rate * p.series.factor)} ${p.series.unit}` : ""));
    cell(tr, p.mode);
    cell(tr, p.lease_remaining_s === null ? "–" : `${fmt(p.lease_remaining_s, 3)} s`);
    cell(tr, `${fmt(p.delivered)} ${p.vol_unit}`);
    cell(tr, age(p.age_s));
    tbody.appendChild(tr);
  }
  drawOutput(L, view);
  drawRates(L, view);
}

// ---------------------------------------------------------------- alarms and links
async function acknowledge(id, button) {
  const operator = $("#operator").value.trim();
  const error = $("#ack-error");
  if (!operator) {
    error.textContent = "Enter your name as operator before acknowledging.";
    error.hidden = false;
    $("#operator").focus();
    return;
  }
  localStorage.setItem("mpc-dose-operator", operator);
  button.disabled = true;
  const answer = await fetch("/api/ack", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({id, operator})});
  if (!answer.ok) {
    const body = await answer.json().catch(() => ({error: answer.statusText}));
    error.textContent = `Acknowledgement refused: ${body.error}`;
    error.hidden = false;
    button.disabled = false;
  } else {
    error.hidden = true;
    button.textContent = "acknowledged";
  }
}

function renderAlarms(alarms) {
  const tbody = $("#alarm-rows");
  tbody.replaceChildren();
  if (!alarms.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    cell(tr, "no alarms").colSpan = 9;
    tbody.appendChild(tr);
    return;
  }
  for (const a of alarms) {
    const tr = document.createElement("tr");
    tr.className = `alarm ${a.priority}` + (a.ack ? " acked" : "") + (a.active ? "" : " inactive");
    tr.dataset.alarmId = a.id;
    tr.dataset.code = a.code;
    cell(tr, a.priority, "priority");
    cell(tr, a.loop);
    cell(tr, a.src);
    cell(tr, a.code, "code");
    cell(tr, a.text);
    cell(tr, fmt(a.t, 6));
    cell(tr, String(a.count));
    cell(tr, (a.active ? "active" : "ended") + (a.ack ? `, acknowledged by ${a.ack.operator}` : ""), "state");
    const td = cell(tr, "");
    if (!a.ack && canAcknowledge) {
      const b = document.createElement("button");
      b.className = "ack";
      b.textContent = "Acknowledge";
      b.addEventListener("click", () => acknowledge(a.id, b));
      td.appendChild(b);
    }
    tbody.appendChild(tr);
  }
}

function renderLinks(links, rejected) {
  const tbody = $("#link-rows");
  tbody.replaceChildren();
  for (const l of links) {
    const tr = document.createElement("tr");
    tr.dataset.src = l.src;
    cell(tr, l.loop);
    cell(tr, l.address);
    cell(tr, l.src);
    cell(tr, l.role || "–");
    cell(tr, l.state || "–");
    cell(tr, age(l.age_s));
    cell(tr, l.period_s === null ? "none heard" : `every ${fmt(l.period_s, 3)} s`);
    const st = cell(tr, "");
    const b = document.createElement("span");
    b.className = `badge ${l.status}`;
    b.textContent = l.status;
    st.appendChild(b);
    cell(tr, String(l.messages));
    cell(tr, String(l.lost));
    cell(tr, String(l.restarts));
    tbody.appendChild(tr);
  }
  const bad = Object.entries(rejected).filter(([, n]) => n > 0);
  $("#rejected").textContent = bad.length
    ? "Frames refused by the codec: " + bad.map(([a, n]) => `${a}: ${n}`).join(", ") : "";
}

// ---------------------------------------------------------------- the event stream
function onState(event) {
  lastEvent = performance.now();
  const view = JSON.parse(event.data);
  canAcknowledge = view.can_acknowledge;
  $("#ack-note").hidden = canAcknowledge;
  const c = $("#connection");
  c.textContent = "live";
  c.className = "badge live";
  for (const loop of view.loops) renderLoop(loop);
  renderAlarms(view.alarms);
  renderLinks(view.links, view.rejected);
}

function connect() {
  const source = new EventSource("/events");
  source.addEventListener("state", onState);
  source.onerror = () => {
    const c = $("#connection");
    c.textContent = "disconnected, retrying";
    c.className = "badge lost";
  };
}

setInterval(() => {
  if (lastEvent && performance.now() - lastEvent > 3000) {
    const c = $("#connection");
    c.textContent = "no update for " + ((performance.now() - lastEvent) / 1000).toFixed(0) + " s";
    c.className = "badge stale";
  }
}, 1000);

window.addEventListener("resize", () => {
  for (const L of loops.values()) {
    if (L.out) L.out.setSize(chartSize(L.outDiv));
    if (L.rate) L.rate.setSize(chartSize(L.rateDiv));
  }
});

$("#operator").value = localStorage.getItem("mpc-dose-operator") || "";
connect();
