// The monitor page: follows /api/events and redraws. No dependencies; the charts are
// SVG drawn here.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 1000;

const state = {
  offset: 0, steps: new Map(), total: null, startStep: 0, name: null, config: null,
  status: "waiting", sample: null, sampleStep: null, startedAt: null, endedAt: null,
};

function resetState() {
  Object.assign(state, {
    offset: 0, steps: new Map(), total: null, startStep: 0, name: null, config: null,
    status: "waiting", sample: null, sampleStep: null, startedAt: null, endedAt: null,
  });
}

function apply(event) {
  switch (event.event) {
    case "train_start":
      state.total = event.total_steps;
      state.startStep = event.start_step || 0;
      state.name = event.name || state.name;
      state.config = event.config || state.config;
      state.status = "running";
      state.startedAt = event.time;
      state.endedAt = null;
      for (const step of [...state.steps.keys()]) {  // a resume rewinds to its checkpoint
        if (step > state.startStep) state.steps.delete(step);
      }
      // a new run of the name (start_step 0) or a resume: what came after is not its
      if (!(state.sampleStep && state.sampleStep <= state.startStep)) {
        state.sample = null;
        state.sampleStep = null;
      }
      break;
    case "step": {
      const old = state.steps.get(event.step) || {};
      state.steps.set(event.step, Object.assign(old, event));
      if (state.status === "waiting") state.status = "running";
      break;
    }
    case "save":
      if (event.kind === "samples" && /\.png$/i.test(event.path)) {
        state.sample = event.path;
        const m = /step_(\d+)\.png$/i.exec(event.path);
        state.sampleStep = m ? Number(m[1]) : null;
      }
      break;
    case "train_end":
      state.status = event.error ? "failed" : "finished";
      state.endedAt = event.time;
      break;
  }
}

// -- charts -------------------------------------------------------------------------

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(f => f * mag).find(s => s >= raw) || raw;
  // the range widened to whole ticks, so that the top and bottom lines are labelled
  const first = Math.floor(lo / step + 1e-9), last = Math.ceil(hi / step - 1e-9);
  const ticks = [];
  for (let i = first; i <= last; i++) ticks.push(Number((i * step).toPrecision(12)));
  return { lo: first * step, hi: last * step, ticks };
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
  return Number(v.toPrecision(3)).toString();
}

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// series: [{name, cls, color, width, points: [[x, y]...], dots}]
function drawChart(svg, series, xMax) {
  const box = svg.getBoundingClientRect();
  const W = Math.max(200, box.width), H = Math.max(120, box.height);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const pad = { l: 56, r: 12, t: 24, b: 26 };
  const all = series.flatMap(s => s.points);
  if (!all.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg)
      .textContent = "no data yet";
    svg.dataset.points = "0";
    return;
  }
  const xs = niceTicks(1, Math.max(xMax || 1, ...all.map(p => p[0]), 2), 6);
  const ys = niceTicks(Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1])), 5);
  const X = x => pad.l + (x - xs.lo) / (xs.hi - xs.lo) * (W - pad.l - pad.r);
  const Y = y => H - pad.b - (y - ys.lo) / (ys.hi - ys.lo) * (H - pad.t - pad.b);
  for (const t of ys.ticks) {
    el("line", { x1: pad.l, x2: W - pad.r, y1: Y(t), y2: Y(t), class: "grid" }, svg);
    el("text", { x: pad.l - 6, y: Y(t) + 4, "text-anchor": "end" }, svg).textContent = fmt(t);
  }
  for (const t of xs.ticks) {
    if (t < xs.lo || t > xs.hi) continue;
    el("text", { x: X(t), y: H - 8, "text-anchor": "middle" }, svg).textContent = fmt(t);
  }
  el("line", { x1: pad.l, x2: pad.l, y1: pad.t, y2: H - pad.b, class: "axis" }, svg);
  el("line", { x1: pad.l, x2: W - pad.r, y1: H - pad.b, y2: H - pad.b, class: "axis" }, svg);
  let legendX = pad.l + 8;
  for (const s of series) {
    if (!s.points.length) continue;
    const pts = s.points.map(p => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    const line = el("polyline", { points: pts, fill: "none", stroke: s.color,
                                  "stroke-width": s.width || 1.5, class: `series ${s.cls}` }, svg);
    line.dataset.count = String(s.points.length);
    if (s.dots) {
      for (const p of s.points) el("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: s.color }, svg);
    }
    el("rect", { x: legendX, y: 6, width: 10, height: 3, fill: s.color }, svg);
    const label = el("text", { x: legendX + 14, y: 12 }, svg);
    label.textContent = s.name;
    legendX += 24 + 7 * s.name.length;
  }
  svg.dataset.points = String(series[0].points.length);
}

function movingAverage(points, window) {
  const out = [];
  let acc = 0;
  for (let i = 0; i < points.length; i++) {
    acc += points[i][1];
    if (i >= window) acc -= points[i - window][1];
    out.push([points[i][0], acc / Math.min(i + 1, window)]);
  }
  return out;
}

// -- the page -----------------------------------------------------------------------

function duration(s) {
  if (s == null || !isFinite(s)) return "-";
  if (s < 60) return `${s.toFixed(0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(Math.round(s - 60 * m)).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

function render() {
  const steps = [...state.steps.values()].sort((a, b) => a.step - b.step);
  const finite = (s, k) => typeof s[k] === "number" && isFinite(s[k]);
  const loss = steps.filter(s => finite(s, "loss")).map(s => [s.step, s.loss]);
  const val = steps.filter(s => finite(s, "val_loss")).map(s => [s.step, s.val_loss]);
  const lr = steps.filter(s => finite(s, "lr")).map(s => [s.step, s.lr]);
  const series = [{ name: "loss per step", cls: "loss", color: "#9bb7d4", width: 1, points: loss }];
  if (loss.length >= 5) {
    const w = Math.max(2, Math.floor(loss.length / 20));
    series.push({ name: `moving average (${w})`, cls: "average", color: "#1f4e79", width: 2,
                  points: movingAverage(loss, w) });
  }
  series.push({ name: "validation loss", cls: "val", color: "#c0392b", width: 1.5, points: val,
                dots: true });
  drawChart(document.getElementById("loss-chart"), series, state.total);
  drawChart(document.getElementById("lr-chart"),
            [{ name: "lr", cls: "lr", color: "#2e7d32", width: 1.5, points: lr }], state.total);

  const last = steps.length ? steps[steps.length - 1] : null;
  document.getElementById("name").textContent = state.name || "waiting for the run";
  const status = document.getElementById("status");
  status.textContent = state.status;
  status.className = `status ${state.status}`;
  const done = last ? last.step : state.startStep;
  document.getElementById("progress").textContent = `step ${done} / ${state.total ?? "-"}`;
  document.getElementById("bar-fill").style.width =
    state.total ? `${Math.min(100, 100 * done / state.total)}%` : "0";
  // rate over the newest steps of this session (a resume starts a new one)
  const recent = steps.filter(s => s.step > state.startStep && typeof s.time === "number")
                      .slice(-20);
  let rate = null;
  if (recent.length >= 2) {
    const dt = recent[recent.length - 1].time - recent[0].time;
    if (dt > 0) rate = (recent[recent.length - 1].step - recent[0].step) / dt;
  }
  document.getElementById("rate").textContent = rate ? `${rate.toFixed(2)} it/s` : "";
  const running = state.status === "running";
  document.getElementById("eta").textContent =
    running && rate && state.total ? `ETA ${duration((state.total - done) / rate)}` : "";
  const end = state.endedAt ?? (last && last.time);
  document.getElementById("elapsed").textContent =
    state.startedAt && end ? `elapsed ${duration(end - state.startedAt)}` : "";
  document.getElementById("loss-last").textContent =
    loss.length ? `last ${fmt(loss[loss.length - 1][1])}` +
    (val.length ? `, validation ${fmt(val[val.length - 1][1])}` : "") : "";
  document.getElementById("lr-last").textContent = lr.length ? `last ${fmt(lr[lr.length - 1][1])}` : "";
  const img = document.getElementById("sample");
  if (!state.sample) {
    img.hidden = true;
    img.removeAttribute("src");
    delete img.dataset.path;
    document.getElementById("sample-caption").textContent = "none yet";
  } else {
    const url = `/api/file?path=${encodeURIComponent(state.sample)}&v=${state.offset}`;
    if (img.dataset.path !== state.sample) { img.src = url; img.dataset.path = state.sample; }
    img.hidden = false;
    const what = state.sampleStep ? `step ${state.sampleStep}` : state.sample.split(/[\\/]/).pop();
    document.getElementById("sample-caption").textContent = what;
  }
  const config = document.getElementById("config");
  const text = state.config ? JSON.stringify(state.config, null, 2) : "-";
  if (config.textContent !== text) config.textContent = text;
}

async function poll() {
  try {
    const res = await fetch(`/api/events?since=${state.offset}`, { cache: "no-store" });
    if (res.ok) {
      const body = await res.json();
      if (body.reset) resetState();
      for (const event of body.events) apply(event);
      const changed = body.events.length > 0 || body.reset || !document.body.dataset.ready;
      state.offset = body.next;
      document.getElementById("file").textContent = body.file + (body.exists ? "" : " (not written yet)");
      if (changed) render();
      document.body.dataset.ready = "1";
      document.body.dataset.offset = String(state.offset);
    }
  } catch (err) {
    document.getElementById("status").textContent = "server unreachable";
  }
  setTimeout(poll, POLL_MS);
}

window.addEventListener("resize", render);
poll();
