// Drives one page in headless Chromium for tests/browser.rs.
//
//   node drive.mjs URL
//
// Opens URL, prints {"ok":true,"ready":true} on stdout, then runs one JSON command per stdin line and prints one
// JSON reply line for each:
//   {"op":"eval","expression":"window.received.length"}           -> {"ok":true,"value":3}
//   {"op":"wait","expression":"...","timeoutMs":20000}            -> {"ok":true,"value":<first truthy value>}
//   {"op":"click","selector":"#start"}                             -> {"ok":true}
//   {"op":"screenshot","path":"/tmp/page.png"}                     -> {"ok":true}
//   {"op":"close"}                                                  -> {"ok":true}, then the process exits
// A failed command replies {"ok":false,"error":"..."}. Browser console lines and page errors go to stderr.
// Environment: WSGW_CHROMIUM (default /usr/bin/chromium), DRIVE_MAX_SECONDS (default 150): the process exits
// with status 3 after that time, so a stuck test cannot leave a browser running.

import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const url = process.argv[2];
if (!url) {
  console.error("usage: node drive.mjs URL");
  process.exit(2);
}
const executablePath = process.env.WSGW_CHROMIUM ?? "/usr/bin/chromium";
const maxSeconds = Number(process.env.DRIVE_MAX_SECONDS ?? 150);

let browser = null;
const reply = (value) => process.stdout.write(`${JSON.stringify(value)}\n`);

async function shutdown(status) {
  try {
    await browser?.close();
  } finally {
    process.exit(status);
  }
}

setTimeout(() => {
  console.error(`drive.mjs: stopping after DRIVE_MAX_SECONDS=${maxSeconds}`);
  shutdown(3);
}, maxSeconds * 1000).unref();

try {
  // playwright-core adds --headless and a fresh temporary --user-data-dir itself.
  browser = await chromium.launch({
    executablePath,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
} catch (error) {
  reply({ ok: false, error: `cannot launch Chromium at ${executablePath}: ${error.message}` });
  process.exit(1);
}

const page = await browser.newPage();
page.on("console", (message) => console.error(`[page ${message.type()}] ${message.text()}`));
page.on("pageerror", (error) => console.error(`[page error] ${error.stack ?? error.message}`));
page.on("requestfailed", (request) =>
  console.error(`[request failed] ${request.url()}: ${request.failure()?.errorText}`),
);

try {
  await page.goto(url, { waitUntil: "load", timeout: 20_000 });
  reply({ ok: true, ready: true });
} catch (error) {
  reply({ ok: false, error: `cannot open ${url}: ${error.message}` });
  await shutdown(1);
}

async function run(command) {
  switch (command.op) {
    case "eval":
      return { ok: true, value: await page.evaluate(command.expression) };
    case "wait": {
      const handle = await page.waitForFunction(command.expression, undefined, {
        timeout: command.timeoutMs ?? 20_000,
        polling: 50,
      });
      return { ok: true, value: await handle.jsonValue() };
    }
    case "click":
      await page.click(command.selector, { timeout: 10_000 });
      return { ok: true };
    case "screenshot":
      await page.screenshot({ path: command.path, fullPage: true });
      return { ok: true };
    default:
      return { ok: false, error: `unknown op ${JSON.stringify(command.op)}` };
  }
}

for await (const line of createInterface({ input: process.stdin })) {
  if (line.trim() === "") {
    continue;
  }
  let command;
  try {
    command = JSON.parse(line);
  } catch (error) {
    reply({ ok: false, error: `invalid JSON command: ${error.message}` });
    continue;
  }
  if (command.op === "close") {
    reply({ ok: true });
    await shutdown(0);
  }
  try {
    reply(await run(command));
  } catch (error) {
    reply({ ok: false, error: error.message });
  }
}
// Standard input closed: the test is gone.
await shutdown(0);
