// Open the node's dashboard in headless Chromium (playwright-core), press one Retry button and
// report what the page shows, as one JSON line on stdout. Used by tests/test_web.py.
//
//   node dashboard_check.cjs URL SCREENSHOT RETRY_ID [TIMEOUT_MS]
//
// RETRY_ID: the data-retry attribute of the button to press ("delivery-3"). With
// DASHBOARD_PASSWORD in the environment the browser answers the node's HTTP Basic challenge
// with it (web.token). The script never decides pass or fail itself: the test reads the JSON.
const { report } = require('./report.cjs');

async function main() {
  const [url, screenshot, retryId, timeoutArg] = process.argv.slice(2);
  const timeout = Number(timeoutArg || 60000);
  const out = { url, errors: [], text: '', images: [], outcome: '' };
  await report(out, [], async browser => {
    const password = process.env.DASHBOARD_PASSWORD;
    const page = await browser.newPage({
      viewport: { width: 1400, height: 1000 },
      ...(password ? { httpCredentials: { username: 'operator', password } } : {}),
    });
    page.on('pageerror', e => out.errors.push(String(e).slice(0, 300)));
    page.on('response', r => { if (r.status() >= 400) out.errors.push(`${r.status()} ${r.url().slice(0, 200)}`); });
    await page.goto(url, { timeout });
    out.text = await page.evaluate(() => document.body.innerText);
    out.images = await page.evaluate(() =>
      Array.from(document.querySelectorAll('img.thumb')).map(i => [i.complete, i.naturalWidth]));
    const button = page.locator(`button[data-retry="${retryId}"]`);
    out.buttons = await page.locator('button[data-retry]').count();
    if (await button.count()) {
      await button.click({ timeout });
      const outcome = button.locator('xpath=..').locator('.outcome');
      await page.waitForFunction(e => e.textContent.length > 0, await outcome.elementHandle(), { timeout });
      out.outcome = await outcome.textContent();
    }
    await page.screenshot({ path: screenshot, fullPage: true });
  });
}

main();
