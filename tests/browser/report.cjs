// What the browser checks share: Debian's Chromium, headless, launched by playwright-core; the
// check's steps run against it, any error goes into the report, and the report is printed as
// one JSON line on stdout whatever happened (the test reads it and decides).
const { chromium } = require('playwright-core');

const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'];

async function report(out, extraArgs, steps) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [...ARGS, ...extraArgs],
  });
  try {
    await steps(browser);
  } catch (e) {
    out.errors.push(String(e).slice(0, 500));
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

module.exports = { report };
