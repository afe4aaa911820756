// The model side of the page: onnxruntime-web on WebAssembly, files served from the bundle.
import * as ort from "onnxruntime-web/wasm";
import wasmUrl from "onnxruntime-web/ort-wasm-simd-threaded.wasm?url";

// No network: the wasm binary is one of this bundle's own files. One thread, because
// threads need a cross-origin-isolated page (special headers) that a plain static server lacks.
ort.env.wasm.wasmPaths = { wasm: wasmUrl };
ort.env.wasm.numThreads = 1;
ort.env.wasm.proxy = false;

export const ortVersion = ort.env.versions?.web ?? "";

/** Parse a little-endian float32 C-order .npy file (version 1-3) into {shape, data}. */
export function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.slice(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not a .npy file");
  const major = bytes[6];
  const view = new DataView(buffer);
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const headerStart = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.slice(headerStart, headerStart + headerLen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1] ?? "";
  if (descr !== "<f4" || fortran !== "False") {
    throw new Error(`expected little-endian float32 C-order .npy, got ${descr} fortran=${fortran}`);
  }
  const shape = shapeText.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const offset = headerStart + headerLen;
  const count = shape.reduce((a, b) => a * b, 1);
  const data = new Float32Array(buffer.slice(offset, offset + count * 4));
  return { shape, data };
}

/** A loaded model: `run(rows)` takes raw feature rows and returns logits rows. */
export async function loadModel(url) {
  const session = await ort.InferenceSession.create(url, { executionProviders: ["wasm"] });
  const inputName = session.inputNames[0];
  const outputName = session.outputNames[0];
  async function run(rows) {
    const n = rows.length;
    const width = n ? rows[0].length : 0;
    const flat = new Float32Array(n * width);
    rows.forEach((row, i) => {
      if (row.length !== width) throw new Error(`row ${i} has ${row.length} values, not ${width}`);
      flat.set(row, i * width);
    });
    const feeds = { [inputName]: new ort.Tensor("float32", flat, [n, width]) };
    const out = (await session.run(feeds))[outputName];
    const k = out.dims[1];
    const result = [];
    for (let i = 0; i < n; i++) result.push(Array.from(out.data.subarray(i * k, (i + 1) * k)));
    return result;
  }
  return { session, inputName, outputName, run };
}

/** Softmax of one logits row, computed stably. */
export function softmax(logits) {
  const m = Math.max(...logits);
  const e = logits.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}
