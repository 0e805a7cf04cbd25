// Drives the admin console (/ui/) in headless Chromium (Debian's /usr/bin/chromium) with
// playwright-core, for tests/integration/test_console.py, which starts esmd with real sources
// and answers this script's requests on stdin:
//   node console.mjs CONFIG_JSON   (url, token, mapping, queue, shots: a directory)
// Lines on stdout: "STEP <what>" (progress), "ASK <what>" (the test does it, then answers a line
// on stdin), "OK" at the end. Any failure throws: exit status 1 with the reason on stderr.
import {chromium} from "playwright-core";
import {createInterface} from "node:readline";
import path from "node:path";

const cfg = JSON.parse(process.argv[2]);
const lines = createInterface({input: process.stdin})[Symbol.asyncIterator]();

function step(what) {
  console.log("STEP " + what);
}

async function ask(what) {
  console.log("ASK " + what);
  const r = await lines.next();
  if (r.done || r.value.trim() !== "done") throw new Error("the test did not do: " + what);
}

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
}

async function until(fn, what, timeoutMs = 30000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error("timed out waiting for " + what + " (last: " + JSON.stringify(last) + ")");
}

const browser = await chromium.launch({
  executablePath: cfg.chromium || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const problems = [];
try {
  const context = await browser.newContext({viewport: {width: 1400, height: 900}});
  const page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error" && !/status of 401/.test(m.text())) problems.push("console: " + m.text());
  });
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  await page.exposeFunction("__esmdXss", (v) => problems.push("script from data ran: " + v));
  const shot = async (name) => {
    await page.screenshot({path: path.join(cfg.shots, name + ".png"), fullPage: true});
  };
  const base = cfg.url + "/ui/?refresh=1000";

  // ---- log in: a wrong token is refused, the right one opens the mappings -------------------
  step("login");
  await page.goto(base);
  await page.waitForSelector("#login:not([hidden])");
  await shot("login");
  await page.fill("#token", "not-the-token");
  await page.click("#login-form button[type=submit]");
  await until(async () => (await page.textContent("#login-error")).includes("token"), "the refusal");
  check(await page.isVisible("#login"), "still on the login form after a wrong token");
  await page.fill("#token", cfg.token);
  await page.click("#login-form button[type=submit]");
  await page.waitForSelector(`#mappings tr[data-mapping="${cfg.mapping}"]`);
  const stored = await page.evaluate(() => [sessionStorage.getItem("esmd.token"), document.cookie,
                                             localStorage.length]);
  check(stored[0] === cfg.token && stored[1] === "" && stored[2] === 0,
        "the token is in sessionStorage only: " + JSON.stringify(stored));

  const row = `#mappings tr[data-mapping="${cfg.mapping}"]`;
  const lagText = async () => (await page.textContent(`${row} td[data-field=lag]`)).trim();
  const lagNum = async () => {
    const t = await lagText();
    return t === "–" ? null : Number(t.replace(/,/g, ""));
  };

  // ---- pause: records produced meanwhile wait, the lag grows ---------------------------------
  step("pause");
  await until(async () => (await lagNum()) === 0, "lag 0 before the load");
  await page.click(`${row} button[data-action=pause]`);
  await page.waitForSelector(`${row} button[data-action=resume]`);
  check((await page.textContent(`${row} .badge`)).includes("Disabled"), "the mapping shows Disabled");
  await ask("produce");
  const high = await until(async () => {
    const n = await lagNum();
    return n !== null && n >= cfg.produced ? n : null;
  }, "the lag to show the records produced while paused");
  await shot("mappings-paused");

  // ---- resume: the lag falls while the records are consumed ----------------------------------
  step("resume");
  await page.click(`${row} button[data-action=resume]`);
  await page.waitForSelector(`${row} button[data-action=pause]`);
  const seen = [high];
  await until(async () => {
    const n = await lagNum();
    if (n !== null && n !== seen[seen.length - 1]) seen.push(n);
    return n === 0;
  }, "the lag to fall to 0", 90000);
  console.log("STEP lag seen " + JSON.stringify(seen));
  check(seen.length >= 3, "the lag was seen falling in steps, not only before and after: " + seen);
  for (let i = 1; i < seen.length; i++) check(seen[i] <= seen[i - 1], "the lag never rose: " + seen);
  check(await page.$(`${row} svg.spark path`), "the lag trend is drawn");
  await shot("mappings");

  // ---- a mapping's given-up record: shown as text, never run ---------------------------------
  step("failures");
  await page.click(`${row} a`);
  await page.waitForSelector("#failures article.failure");
  await page.waitForSelector("figure.chart[data-chart=lag] svg path");
  const failure = await page.textContent("#failures article.failure");
  check(failure.includes("RetryAttemptsExhausted"), "the condition is shown");
  check(failure.includes(cfg.poison), "the record is shown decoded, as text: " + failure.slice(0, 2000));
  check(failure.includes("cannot take <b>it</b>"), "the function's error is shown as text");
  const scripts = await page.evaluate(() => [...document.scripts].map((s) => s.src));
  check(scripts.length === 1 && scripts[0].endsWith("/ui/console.js"), "no script element from data: " + scripts);
  check((await page.$$("#failures b, #failures img, #failures script")).length === 0, "no markup from data");
  await shot("mapping");
  await page.screenshot({path: path.join(cfg.shots, "readme.png")}); // the viewport only

  // ---- dead letters: inspect, redrive with a confirmation, gone from the queue -----------------
  step("dead letters");
  await page.click('#nav a[data-view="queues"]');
  await page.waitForSelector(`#queues tr[data-queue="${cfg.queue}"]`);
  await shot("queues");
  await page.click(`#queues tr[data-queue="${cfg.queue}"] a`);
  await page.waitForSelector("#messages tr[data-message]");
  const msgs = await page.$$("#messages tr[data-message]");
  check(msgs.length === 1, "one dead letter listed, got " + msgs.length);
  check((await page.$$eval("#filter-function option", (o) => o.map((x) => x.value))).includes("fn"),
        "the function filter offers fn");
  await page.selectOption("#filter-function", "fn");
  await page.click("#messages button[data-action=inspect]");
  await page.waitForSelector("#inspect pre.json");
  check((await page.textContent("#inspect")).includes(cfg.deadLetterMark), "the dead letter's body is shown");
  await shot("queue");
  await page.click("#messages button[data-action=redrive]");
  await page.waitForSelector("#confirm[open]");
  check((await page.textContent("#confirm-text")).includes("into function fn"), "the confirmation names the function");
  await page.click("#confirm-cancel"); // cancelling changes nothing
  check((await page.$$("#messages tr[data-message]")).length === 1, "still there after cancel");
  await page.click("#messages button[data-action=redrive]");
  await page.waitForSelector("#confirm[open]");
  await shot("redrive-confirm");
  await page.click("#confirm-ok");
  await until(async () => (await page.textContent("#messages")).includes("No messages."), "the queue emptied");
  await ask("delivered"); // the test sees the redriven event reach the function

  // ---- the async queue and the functions ---------------------------------------------------
  step("async");
  await page.click('#nav a[data-view="async"]');
  await page.waitForSelector("#async-depth");
  await shot("async");
  step("functions");
  await page.click('#nav a[data-view="functions"]');
  await page.waitForSelector('#functions tr[data-function="fn"]');
  const fnRow = await page.textContent('#functions tr[data-function="fn"]');
  check(/\d/.test(fnRow) && fnRow.includes("ms"), "the function's numbers: " + fnRow);
  await shot("functions");

  // ---- sign out: the token is gone --------------------------------------------------------
  await page.click('#nav a[data-view="mappings"]');
  await page.waitForSelector(row);
  await shot("console");
  await page.click("#signout");
  await page.waitForSelector("#login:not([hidden])");
  check(await page.evaluate(() => sessionStorage.getItem("esmd.token")) === null, "signed out");

  const csp = problems.filter((p) => /Content Security Policy/i.test(p));
  check(problems.length === 0, "no errors in the page: " + JSON.stringify(problems) + JSON.stringify(csp));
  console.log("OK");
} finally {
  await browser.close();
}
process.exit(0);
