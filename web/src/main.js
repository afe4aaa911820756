// The page: a drawing pad that turns strokes into the 8x8 digits features, sample picker, bars.
import "./style.css";
import floatUrl from "@model/model.folded.onnx?url";
import samplesUrl from "@model/sample_input.npy?url";
import { loadModel, ortVersion, parseNpy, softmax } from "./model.js";

// The models the page offers: the folded float model, the INT8 one where the model folder has
// it, and the one `bn-onnx serve-web --model PATH` serves (served-model.json says which).
const int8Urls = import.meta.glob("@model/model.int8.onnx", { query: "?url", import: "default", eager: true });
const MODELS = [{ key: "float", file: "model.folded.onnx", kind: "float32", url: floatUrl }];
for (const url of Object.values(int8Urls)) {
  MODELS.push({ key: "int8", file: "model.int8.onnx", kind: "INT8 (QDQ)", url });
}

const SIDE = 8; // the model's grid: 8x8 cells
const FINE = 32; // digits were 32x32 bitmaps, each cell counts the set pixels of a 4x4 block

const draw = document.getElementById("draw");
const grid = document.getElementById("grid");
const bars = document.getElementById("bars");
const top = document.getElementById("top");
const status = document.getElementById("status");
const samplesBox = document.getElementById("samples");
const dctx = draw.getContext("2d");
const gctx = grid.getContext("2d");

let model = null;
let current = null; // the entry of MODELS that `model` runs
const picker = document.getElementById("model");
const kindBox = document.getElementById("model-kind");
let features = new Array(SIDE * SIDE).fill(0);
let drawing = false;
let dirty = false; // the pad shows a sample, not strokes: the next stroke starts afresh
let last = null;
let strokes = []; // the person's strokes, in pad pixels

function clearPad() {
  dctx.fillStyle = "#fff";
  dctx.fillRect(0, 0, draw.width, draw.height);
  drawPadGrid();
}

function drawPadGrid() {
  const step = draw.width / SIDE;
  dctx.strokeStyle = "rgba(0,0,0,0.08)";
  dctx.lineWidth = 1;
  for (let i = 1; i < SIDE; i++) {
    dctx.beginPath();
    dctx.moveTo(i * step + 0.5, 0);
    dctx.lineTo(i * step + 0.5, draw.height);
    dctx.moveTo(0, i * step + 0.5);
    dctx.lineTo(draw.width, i * step + 0.5);
    dctx.stroke();
  }
}

function paintCells(ctx, values, size) {
  const step = size / SIDE;
  for (let r = 0; r < SIDE; r++) {
    for (let c = 0; c < SIDE; c++) {
      const v = Math.max(0, Math.min(16, values[r * SIDE + c]));
      const shade = Math.round(255 - (v / 16) * 255);
      ctx.fillStyle = `rgb(${shade},${shade},${shade})`;
      ctx.fillRect(c * step, r * step, step, step);
    }
  }
}

function drawGrid() {
  paintCells(gctx, features, grid.width);
  gctx.strokeStyle = "rgba(0,0,0,0.15)";
  gctx.strokeRect(0.5, 0.5, grid.width - 1, grid.height - 1);
}

// Strokes -> features the way the digits data set looks: its digits fill the 32x32 box's
// height and are narrower (about 5.7 of 8 cells wide on average) with thick strokes. So the
// strokes are scaled to the box's height (aspect kept, but squeezed to at most MAX_W pixels
// wide), centred, drawn with a PEN-pixel pen, and each cell of the 8x8 grid counts the set
// pixels of its 4x4 block (0..16).
const PEN = 6;
const MAX_W = 22;

function featuresFromStrokes() {
  const out = new Array(SIDE * SIDE).fill(0);
  const pts = strokes.flat();
  if (!pts.length) return out;
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs);
  const y0 = Math.min(...ys);
  const w = Math.max(...xs) - x0;
  const h = Math.max(...ys) - y0;
  // A dot or a tiny scribble is not blown up to the whole box.
  const sy = (FINE - PEN) / Math.max(h, w, draw.width / 4);
  const sx = Math.min(sy, (MAX_W - PEN) / Math.max(w, 1));
  const ox = (FINE - w * sx) / 2;
  const oy = (FINE - h * sy) / 2;
  const small = document.createElement("canvas");
  small.width = FINE;
  small.height = FINE;
  const sctx = small.getContext("2d", { willReadFrequently: true });
  sctx.fillStyle = "#fff";
  sctx.fillRect(0, 0, FINE, FINE);
  sctx.strokeStyle = "#000";
  sctx.fillStyle = "#000";
  sctx.lineCap = "round";
  sctx.lineJoin = "round";
  sctx.lineWidth = PEN;
  for (const s of strokes) {
    const t = s.map(([x, y]) => [ox + (x - x0) * sx, oy + (y - y0) * sy]);
    sctx.beginPath();
    sctx.moveTo(t[0][0], t[0][1]);
    if (t.length === 1) sctx.arc(t[0][0], t[0][1], PEN / 2, 0, 2 * Math.PI);
    for (const [x, y] of t.slice(1)) sctx.lineTo(x, y);
    if (t.length === 1) sctx.fill();
    else sctx.stroke();
  }
  const px = sctx.getImageData(0, 0, FINE, FINE).data;
  const block = FINE / SIDE;
  for (let y = 0; y < FINE; y++) {
    for (let x = 0; x < FINE; x++) {
      if (px[(y * FINE + x) * 4] < 128) out[Math.floor(y / block) * SIDE + Math.floor(x / block)]++;
    }
  }
  return out;
}

function renderBars(probs) {
  bars.replaceChildren();
  const best = probs.indexOf(Math.max(...probs));
  probs.forEach((p, k) => {
    const row = document.createElement("div");
    row.className = k === best ? "bar best" : "bar";
    row.dataset.cls = String(k);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = String(k);
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(p * 100).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(p * 100).toFixed(1)}%`;
    row.append(label, track, value);
    bars.append(row);
  });
  top.textContent = `${best} (${(probs[best] * 100).toFixed(1)}%)`;
  top.dataset.cls = String(best);
}

async function predictShown() {
  drawGrid();
  if (!model) return;
  const t0 = performance.now();
  const [logits] = await model.run([features]);
  const ms = performance.now() - t0;
  renderBars(softmax(logits));
  window.bnOnnx.shown += 1; // predictions shown so far, for tests waiting on the page
  status.textContent = `onnxruntime-web ${ortVersion} (WebAssembly) \u00b7 ${current.file}, ${current.kind} \u00b7 last inference ${ms.toFixed(2)} ms`;
}

function pos(ev) {
  const r = draw.getBoundingClientRect();
  return [((ev.clientX - r.left) * draw.width) / r.width, ((ev.clientY - r.top) * draw.height) / r.height];
}

draw.addEventListener("pointerdown", (ev) => {
  if (dirty) {
    clearPad();
    strokes = [];
    dirty = false;
  }
  drawing = true;
  draw.setPointerCapture(ev.pointerId);
  last = pos(ev);
  strokes.push([last]);
  stroke(last, last);
});
draw.addEventListener("pointermove", (ev) => {
  if (!drawing) return;
  const p = pos(ev);
  stroke(last, p);
  strokes[strokes.length - 1].push(p);
  last = p;
});
for (const name of ["pointerup", "pointercancel"]) {
  draw.addEventListener(name, () => {
    if (!drawing) return;
    drawing = false;
    features = featuresFromStrokes();
    predictShown();
  });
}

function stroke(a, b) {
  dctx.strokeStyle = "#111";
  dctx.lineCap = "round";
  dctx.lineJoin = "round";
  dctx.lineWidth = draw.width / 11;
  dctx.beginPath();
  dctx.moveTo(a[0], a[1]);
  dctx.lineTo(b[0], b[1]);
  dctx.stroke();
}

document.getElementById("clear").addEventListener("click", () => {
  clearPad();
  strokes = [];
  dirty = false;
  features = new Array(SIDE * SIDE).fill(0);
  predictShown();
});

function showSample(row) {
  features = Array.from(row);
  strokes = [];
  paintCells(dctx, features, draw.width);
  drawPadGrid();
  dirty = true;
  predictShown();
}

async function loadSamples() {
  const npy = parseNpy(await (await fetch(samplesUrl)).arrayBuffer());
  const [n, width] = npy.shape;
  const rows = [];
  for (let i = 0; i < n; i++) rows.push(npy.data.subarray(i * width, (i + 1) * width));
  rows.forEach((row, i) => {
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "sample";
    btn.title = `sample ${i}`;
    const c = document.createElement("canvas");
    c.width = 40;
    c.height = 40;
    paintCells(c.getContext("2d"), row, 40);
    btn.append(c);
    btn.addEventListener("click", () => showSample(row));
    samplesBox.append(btn);
  });
  return rows;
}

// Hooks for tests and for people at the console: raw feature rows in, logits rows out.
window.bnOnnx = { ready: false, error: null, shown: 0 };
window.predict = async (rows) => model.run(rows);

// The model serve-web --model serves, if any: {"file", "kind", "url"}; a static build says null.
async function servedModel() {
  const res = await fetch("./served-model.json");
  if (!res.ok) return null;
  const info = await res.json();
  return info ? { key: "served", ...info } : null;
}

async function useModel(entry) {
  status.textContent = `Loading ${entry.file}\u2026`;
  model = await loadModel(entry.url);
  current = entry;
  picker.value = entry.key;
  kindBox.textContent = entry.kind;
  window.bnOnnx.model = { key: entry.key, file: entry.file, kind: entry.kind };
}

function fail(err) {
  window.bnOnnx.error = String(err?.message ?? err);
  status.textContent = `Could not load the model: ${window.bnOnnx.error}`;
  status.className = "error";
}

async function start() {
  clearPad();
  drawGrid();
  try {
    const served = await servedModel();
    if (served) MODELS.unshift(served);
    for (const m of MODELS) {
      const where = m.key === "served" ? "served: " : "";
      picker.append(new Option(`${where}${m.file} \u00b7 ${m.kind}`, m.key));
    }
    // ?model=float|int8|served picks one; otherwise the served model, else the float one.
    const asked = new URLSearchParams(location.search).get("model");
    const entry = asked ? MODELS.find((m) => m.key === asked) : MODELS[0];
    if (!entry) throw new Error(`no model "${asked}" here (have: ${MODELS.map((m) => m.key).join(", ")})`);
    const [, rows] = await Promise.all([useModel(entry), loadSamples()]);
    window.bnOnnx.samples = rows.map((r) => Array.from(r));
    window.bnOnnx.ready = true;
    if (rows.length) showSample(rows[0]);
    else predictShown();
  } catch (err) {
    fail(err);
  }
}

picker.addEventListener("change", async () => {
  const entry = MODELS.find((m) => m.key === picker.value);
  try {
    await useModel(entry);
    await predictShown();
  } catch (err) {
    fail(err);
  }
});

start();
