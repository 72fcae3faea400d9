// The dashboard in a real browser (Debian's headless Chromium through playwright-core), against
// a running safelb whose admin address and token come from the environment. Signs in, waits for
// the live stream, visits every section (a screenshot each), drains and undrains a backend and
// sees its state change without a reload, and checks the token is in no page. Prints one JSON
// line with what it measured; exits non-zero on the first failed check.
//
// Env: SAFELB_ADMIN (http://127.0.0.1:PORT), SAFELB_TOKEN, SCREENSHOTS (a directory).
// Protocol with the test that runs it: the script prints `READY` once it watches the overview,
// and waits for a line `FORCED` on its standard input (the test has forced a bad change from the
// CLI by then); it then expects the rollback and the incident to appear without a reload, opens
// the postmortem, and rolls back to version 1 from the Changes page.
import { chromium } from "playwright-core";
import readline from "node:readline";

const input = readline.createInterface({ input: process.stdin });
const lines = input[Symbol.asyncIterator]();
async function expectLine(word) {
  const { value } = await lines.next();
  if (value !== word) throw new Error(`expected ${word} from the test, got ${value}`);
}

const admin = process.env.SAFELB_ADMIN;
const token = process.env.SAFELB_TOKEN;
const shots = process.env.SCREENSHOTS;
const deadline = 15_000;

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
}

// Polls `probe` until it is true, for at most `deadline` ms.
async function until(page, probe, what) {
  const end = Date.now() + deadline;
  while (Date.now() < end) {
    if (await probe().catch(() => false)) return;
    await page.waitForTimeout(100);
  }
  throw new Error(`timed out: ${what}`);
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const result = { screenshots: [] };
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  // Page weight: bytes transferred (headers and bodies) for everything but the stream.
  let bytes = 0;
  const sizes = [];
  page.on("requestfinished", (r) => {
    if (!r.url().includes("/api/v1/stream")) sizes.push(r.sizes().then((s) => (bytes += s.responseBodySize + s.responseHeadersSize)));
  });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  await page.goto(admin + "/");
  check(page.url().endsWith("/login"), "without a session the dashboard sends to the login");
  await page.fill("#token", token);
  bytes = 0;
  await Promise.all([page.waitForURL(admin + "/"), page.click("button[type=submit]")]);
  const text = (sel) => page.textContent(sel);
  await until(page, async () => (await text("#connection")) === "Live", "the stream goes live");
  await until(page, async () => (await text("#rps-now")) !== "–", "a stats frame arrives");
  await page.waitForTimeout(500);
  await Promise.all(sizes);
  result.first_load_bytes = bytes;
  check(!(await page.content()).includes(token), "the token is not in the page");
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "safelb_session");
  check(session && session.httpOnly && session.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");
  check(!(await page.evaluate(() => document.cookie)).includes("safelb_session"), "scripts cannot read the session cookie");

  for (const tab of ["overview", "pools", "routes", "changes", "incidents"]) {
    await page.click(`nav button[data-tab=${tab}]`);
    await page.waitForSelector(`#${tab}:not([hidden])`);
    const path = `${shots}/dashboard-${tab}.png`;
    await page.screenshot({ path, fullPage: true });
    result.screenshots.push(path);
  }

  // On a phone-sized screen.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.click("nav button[data-tab=overview]");
  await page.screenshot({ path: `${shots}/dashboard-phone.png`, fullPage: true });
  result.screenshots.push(`${shots}/dashboard-phone.png`);
  check(await page.evaluate(() => document.documentElement.scrollWidth <= 400), "no sideways scrolling on a phone");
  await page.setViewportSize({ width: 1280, height: 900 });

  // Drain the first backend from the Pools page; its state says so without a reload.
  await page.click("nav button[data-tab=pools]");
  const firstState = "#backends tr:first-child td:nth-child(3)";
  await page.waitForSelector(firstState);
  check((await page.textContent(firstState)).includes("healthy"), "the backend starts healthy");
  await page.click("#backends tr:first-child button");
  await until(page, async () => (await text(firstState)).includes("draining"), "the drained backend says so");
  result.drained = true;
  await page.click("#backends tr:first-child button");
  await until(page, async () => (await text(firstState)).includes("healthy"), "the undrained backend is healthy again");

  // Keyboard: the sections are reachable with Tab and Enter.
  await page.focus("nav button[data-tab=overview]");
  await page.keyboard.press("Tab");
  await page.keyboard.press("Enter");
  check(!(await page.isHidden("#pools")), "Tab then Enter opens the next section");

  // A bad change forced from the CLI: the rollback and the incident appear without a reload.
  await page.click("nav button[data-tab=overview]");
  const reloads = await page.evaluate(() => performance.getEntriesByType("navigation").length);
  console.log("READY");
  await expectLine("FORCED");
  await until(page, async () => (await text("#events")).includes("RolloutRolledBack"), "the rollback appears in the events");
  await until(page, async () => (await text("#events")).includes("IncidentOpened"), "the incident appears");
  check((await text("#events")).includes("CanaryStepStarted"), "the canary appeared");
  await until(page, async () => (await text("#events")).includes("AlertFired: alert RolledBack"), "the alert fires");
  result.saw = { events: (await text("#events")).slice(0, 2000), incident: await text("#incident") };
  await page.screenshot({ path: `${shots}/dashboard-after-rollback.png`, fullPage: true });
  result.screenshots.push(`${shots}/dashboard-after-rollback.png`);

  // The postmortem, once the incident resolves.
  await page.click("nav button[data-tab=incidents]");
  await until(
    page,
    async () => (await page.locator("#incident-list button", { hasText: "Postmortem" }).count()) > 0,
    "a resolved incident offers its postmortem",
  );
  await page.locator("#incident-list button", { hasText: "Postmortem" }).first().click();
  await until(page, async () => (await text("#postmortem-text")).includes("# Postmortem"), "the postmortem shows");
  await page.screenshot({ path: `${shots}/dashboard-postmortem.png`, fullPage: true });
  result.screenshots.push(`${shots}/dashboard-postmortem.png`);

  // Roll back to version 1 from the Changes page, with a reason and a confirmation.
  await page.click("nav button[data-tab=changes]");
  page.on("dialog", (d) => (d.type() === "prompt" ? d.accept("back to the first version") : d.accept()));
  const row = page.locator("#versions tr", { has: page.locator("td:first-child", { hasText: /^1$/ }) });
  await row.locator("button").click();
  await until(page, async () => (await text("#change-output")).includes("rolled back"), "the rollback is confirmed");
  await page.fill("#diff-from", "1");
  await page.fill("#diff-to", "2");
  await page.click("#diff");
  await until(page, async () => (await text("#change-output")).includes("+++ version 2"), "the diff of two versions shows");
  const running = await (async () => {
    await page.click("nav button[data-tab=overview]");
    await until(page, async () => /version [4-9]/.test(await text("#running")), "the running version changes");
    return text("#running");
  })();
  result.running_after_rollback = running;
  result.reloaded = (await page.evaluate(() => performance.getEntriesByType("navigation").length)) !== reloads;
  check(!result.reloaded, "no reload happened");

  check(errors.length === 0, `no script errors (${errors.join("; ")})`);
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
  input.close();
}
