// Keeps a signed-in dashboard open for OPEN_SECONDS seconds (for bench/dashboard.sh: what a watching
// browser costs the data plane). Env: SAFELB_ADMIN, SAFELB_TOKEN, OPEN_SECONDS.
import { chromium } from "playwright-core";

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage();
  await page.goto(process.env.SAFELB_ADMIN + "/login");
  await page.fill("#token", process.env.SAFELB_TOKEN);
  await Promise.all([page.waitForURL(process.env.SAFELB_ADMIN + "/"), page.click("button[type=submit]")]);
  await page.click("nav button[data-tab=pools]");
  await page.waitForTimeout(Number(process.env.OPEN_SECONDS) * 1000);
} finally {
  await browser.close();
}
