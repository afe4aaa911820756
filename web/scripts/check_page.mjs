// Drive the built page in headless Chromium: wait for the model, run window.predict on rows,
// print {"logits", "samples", "rows_logits", "shown_class", "drawn_class", "model", "status",
// "models", "picked", "foreign_requests", "console_errors"} as JSON on stdout (logits: of the
// page's samples; rows_logits: of --rows; model: the one the page runs; models: the picker's
// keys; picked: {model, logits, status} after choosing --pick KEY in the picker).
//
// usage: node scripts/check_page.mjs URL [--rows ROWS.json] [--screenshot OUT.png]
//        [--draw] [--pick KEY] [--chromium /usr/bin/chromium]
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const url = args[0];
const opt = (name, fallback) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : fallback;
};
if (!url || url.startsWith("--")) {
  console.error("usage: node scripts/check_page.mjs URL [--rows ROWS.json] [--screenshot OUT.png]");
  process.exit(2);
}
const origin = new URL(url).origin;

const browser = await chromium.launch({
  executablePath: opt("--chromium", process.env.CHROMIUM || "/usr/bin/chromium"),
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 760 } });
  const foreign = [];
  const consoleErrors = [];
  // The page must need nothing but its own origin; anything else is recorded and refused.
  await page.route("**/*", (route) => {
    const u = route.request().url();
    if (u.startsWith(origin) || u.startsWith("data:") || u.startsWith("blob:")) return route.continue();
    foreign.push(u);
    return route.abort();
  });
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => window.bnOnnx && (window.bnOnnx.ready || window.bnOnnx.error), null, {
    timeout: 60000,
  });
  const error = await page.evaluate(() => window.bnOnnx.error);
  if (error) throw new Error(`page failed to load the model: ${error}`);
  // The page shows sample 0 and its prediction once the model is loaded.
  await page.waitForFunction(() => window.bnOnnx.shown > 0);
  const shownClass = await page.evaluate(() => document.querySelector("#top").dataset.cls ?? null);
  const samples = await page.evaluate(() => window.bnOnnx.samples);
  const logits = await page.evaluate((r) => window.predict(r), samples);
  const rowsFile = opt("--rows", null);
  const rowsLogits = rowsFile
    ? await page.evaluate((r) => window.predict(r), JSON.parse(readFileSync(rowsFile, "utf8")))
    : null;
  let drawn = null;
  if (args.includes("--draw")) {
    // Draw a "7" as a person would with the mouse: the top bar, then the diagonal down.
    const before = await page.evaluate(() => window.bnOnnx.shown);
    const box = await page.locator("#draw").boundingBox();
    const at = (fx, fy) => [box.x + box.width * fx, box.y + box.height * fy];
    const path = [[0.25, 0.2], [0.75, 0.2], [0.6, 0.5], [0.45, 0.85]];
    await page.mouse.move(...at(...path[0]));
    await page.mouse.down();
    for (let k = 1; k < path.length; k++) {
      const [a, b] = [path[k - 1], path[k]];
      for (let s = 1; s <= 8; s++) {
        await page.mouse.move(...at(a[0] + ((b[0] - a[0]) * s) / 8, a[1] + ((b[1] - a[1]) * s) / 8));
      }
    }
    await page.mouse.up();
    await page.waitForFunction((n) => window.bnOnnx.shown > n, before);
    drawn = await page.evaluate(() => document.querySelector("#top").dataset.cls);
  }
  const model = await page.evaluate(() => window.bnOnnx.model);
  const status = await page.locator("#status").textContent();
  const models = await page.evaluate(() => [...document.querySelectorAll("#model option")].map((o) => o.value));
  let picked = null;
  const pick = opt("--pick", null);
  if (pick) {
    // Choose another model as a person would, in the picker; the shown sample is predicted again.
    const before = await page.evaluate(() => window.bnOnnx.shown);
    await page.locator("#model").selectOption(pick);
    await page.waitForFunction((n) => window.bnOnnx.shown > n || window.bnOnnx.error, before);
    const err = await page.evaluate(() => window.bnOnnx.error);
    if (err) throw new Error(`page failed to load --pick ${pick}: ${err}`);
    picked = {
      model: await page.evaluate(() => window.bnOnnx.model),
      logits: await page.evaluate((r) => window.predict(r), samples),
      status: await page.locator("#status").textContent(),
      kind_shown: await page.locator("#model-kind").textContent(),
    };
  }
  const shot = opt("--screenshot", null);
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  process.stdout.write(
    JSON.stringify({ logits, samples, rows_logits: rowsLogits, shown_class: shownClass, drawn_class: drawn,
      model, status, models, picked, foreign_requests: foreign, console_errors: consoleErrors }),
  );
} finally {
  await browser.close();
}
