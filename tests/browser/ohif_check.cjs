// Open a study in a real OHIF viewer (headless Chromium, driven by playwright-core) and report
// what the page shows, as one JSON line on stdout. Used by tests/test_ohif.py.
//
//   node ohif_check.cjs URL SCREENSHOT SR_TEXT FINDING_TEXT [TIMEOUT_MS]
//
// URL: the viewer page of the study; SR_TEXT: text of the SR's series in the study browser;
// FINDING_TEXT: the finding the SR carries. The script waits for the series list, records
// its text, dismisses OHIF's notice and tour, double-clicks the SR's entry to open it, waits
// for the finding (answering OHIF's "continue tracking measurements" prompt with Yes, which
// hydrates the SR), and keeps a screenshot; console messages, failed requests and the text of
// the drawn annotations go into the JSON for diagnosis. It never decides pass or fail itself:
// the test reads the JSON.
const { report } = require('./report.cjs');

async function openOnce(page, url, srText, findingText, timeout, out) {
  await page.goto(url, { timeout });
  await page.getByText(srText, { exact: false }).first().waitFor({ timeout });
  out.seriesText = await page.evaluate(() => document.body.innerText);
  // OHIF's own "investigational use only" notice covers the page until it is confirmed
  const notice = page.getByText('Confirm and hide', { exact: false });
  // (it slides in: under load playwright may not see it "stable" in time, so force the click)
  if (await notice.count()) await notice.first().click({ timeout: 10000, force: true });
  await page.waitForTimeout(2000);
  // ... and its first-visit tour
  const tour = page.getByText('Skip all', { exact: true });
  if (await tour.count()) await tour.first().click({ timeout: 10000 }).catch(() => {});
  // the SR's entry in the study browser (a row without an image): double-click opens it
  const label = page.getByText(srText, { exact: false }).first();
  const entry = label.locator('xpath=ancestor::*[@data-cy][1]');
  const target = (await entry.count()) ? entry.first() : label;
  out.entry = await target.evaluate(e => e.getAttribute('data-cy') || e.tagName);
  // the entry is draggable and playwright may never see it "stable": force the clicks
  await target.dblclick({ timeout: 30000, force: true });
  out.opened = true;
  // OHIF shows the SR in its SR viewport and asks "Do you want to continue tracking
  // measurements for this study?": its finding is drawn, and listed, once the SR is
  // hydrated, which "Yes" does (without an answer it is drawn only in some runs)
  const finding = page.getByText(findingText, { exact: false }).first();
  const prompt = page.getByText('continue tracking measurements', { exact: false });
  const deadline = Date.now() + 60000;
  out.answeredPrompt = false;
  let nudges = 0;
  while (Date.now() < deadline && !out.findingShown) {
    if (await finding.isVisible().catch(() => false)) {
      out.findingShown = true;
      break;
    }
    if (!out.answeredPrompt && await prompt.first().isVisible().catch(() => false)) {
      const yes = page.getByRole('button', { name: 'Yes', exact: true });
      const button = (await yes.count()) ? yes.first() : page.getByText('Yes', { exact: true }).first();
      await button.click({ timeout: 10000, force: true }).catch(e => out.errors.push(`Yes: ${String(e).slice(0, 150)}`));
      out.answeredPrompt = true;
    }
    // a viewport that has not drawn the SR's annotations yet draws them when it is resized:
    // nudge the window by a pixel every few seconds
    nudges += 1;
    if (nudges % 6 === 0) {
      const size = page.viewportSize();
      await page.setViewportSize({ width: size.width + (nudges % 12 === 0 ? -1 : 1), height: size.height });
      out.resized = (out.resized || 0) + 1;
    }
    await page.waitForTimeout(500);
  }
  if (!out.findingShown) out.errors.push(`finding not shown within 60 s (prompt answered: ${out.answeredPrompt})`);
}

async function main() {
  const [url, screenshot, srText, findingText, timeoutArg] = process.argv.slice(2);
  const timeout = Number(timeoutArg || 120000);
  const out = { url, errors: [], seriesText: '', opened: false, findingShown: false };
  const gl = ['--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--disable-dev-shm-usage'];
  await report(out, gl, async browser => {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.on('pageerror', e => out.errors.push(String(e).slice(0, 300)));
    out.console = [];
    out.http = [];
    page.on('response', r => { if (r.status() >= 400) out.http.push(`${r.status()} ${r.url().slice(0, 200)}`); });
    page.on('requestfailed', r => out.http.push(`failed ${r.url().slice(0, 200)}`));
    page.on('console', m => {
      out.console.push(`${m.type()}: ${m.text().slice(0, 300)}`);
    });
    // OHIF does not always draw an SR's finding on first opening (its SR hydration races the
    // image's loading: seen with Orthanc's DICOMweb and the node's alike): one fresh reload
    out.attempts = 0;
    for (let attempt = 1; attempt <= 2 && !out.findingShown; attempt++) {
      out.attempts = attempt;
      if (attempt > 1) out.errors.push('retrying with a fresh page load');
      await openOnce(page, url, srText, findingText, timeout, out);
    }
    await page.waitForTimeout(3000);  // let the viewport draw before the screenshot
    out.svgText = await page.evaluate(() =>
      Array.from(document.querySelectorAll('svg text')).map(t => t.textContent).join(' | '));
    out.viewports = await page.evaluate(() =>
      Array.from(document.querySelectorAll('[data-viewportid]')).map(v =>
        `${v.getAttribute('data-viewportid')}: ${v.innerText.slice(0, 200)}`));
    out.pageText = (await page.evaluate(() => document.body.innerText)).slice(0, 4000);
    await page.screenshot({ path: screenshot, fullPage: false });
  });
}

main();
