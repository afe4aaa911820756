// Builds the static page. The model and sample inputs come from models/digits unless
// BN_ONNX_MODEL_DIR names another folder holding model.folded.onnx and sample_input.npy (and,
// if it has one, model.int8.onnx, which the page offers too).
import { fileURLToPath } from "node:url";
import path from "node:path";
import { defineConfig } from "vite";

const here = path.dirname(fileURLToPath(import.meta.url));
const modelDir = path.resolve(here, process.env.BN_ONNX_MODEL_DIR || "../models/digits");

export default defineConfig({
  base: "./",
  resolve: { alias: { "@model": modelDir } },
  build: {
    target: "es2022",
    // Keep the model, samples and wasm as files: the page must work with no network.
    assetsInlineLimit: 0,
    chunkSizeWarningLimit: 2000,
  },
  server: { host: "127.0.0.1", fs: { allow: [here, modelDir] } },
  preview: { host: "127.0.0.1" },
  optimizeDeps: { exclude: ["onnxruntime-web"] },
});
