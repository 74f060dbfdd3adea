// The dashboard in headless Chromium (Debian's, driven by playwright-core),
// with calls made by the official Node openai SDK. Run by tests/it/dashboard.rs,
// which compares what this prints (one JSON object per line) with the ledger.
//
// usage: node dashboard.mjs GATEWAY_ROOT CLIENT_KEY ADMIN_TOKEN SCREENSHOT_DIR
import { launch, check, report } from "./browser.mjs";
import OpenAI from "openai";

const [root, key, admin, shots] = process.argv.slice(2);

const browser = await launch();
try {
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  const page = await context.newPage();
  const sel = (metric, org, group) =>
    `[data-metric="${metric}"][data-org="${org}"][data-group="${group}"]`;
  const value = async (p, metric, org, group) =>
    Number(await p.locator(sel(metric, org, group)).first().getAttribute("data-value"));

  // Signed out: a form, no numbers; the live events refuse too.
  let response = await page.goto(`${root}/dashboard`);
  check(response.status() === 200, `GET /dashboard: ${response.status()}`);
  check((await page.locator("#token").count()) === 1, "no sign-in form");
  check((await page.locator("[data-metric]").count()) === 0, "numbers shown before sign-in");

  // A wrong token gets no data and no session.
  await page.fill("#token", "not-the-admin-token-0000");
  await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
  check((await page.locator(".error").count()) === 1, "no error for a wrong token");
  check((await page.locator("[data-metric]").count()) === 0, "numbers shown after a wrong token");
  check(!(await context.cookies()).some((c) => c.name === "tw_session"), "a session for a wrong token");
  const eventsStatus = await page.evaluate(async () => (await fetch("/dashboard/events")).status);
  check(eventsStatus === 401, `events without a session: ${eventsStatus}`);
  report({ phase: "wrong_token", refused: true, events_status: eventsStatus });

  // Sign in: an HttpOnly, SameSite cookie; the token is in no URL.
  await page.fill("#token", admin);
  await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
  check(!page.url().includes(admin), "the token is in the URL");
  const cookie = (await context.cookies()).find((c) => c.name === "tw_session");
  check(cookie && cookie.httpOnly && cookie.sameSite === "Strict", `cookie: ${JSON.stringify(cookie)}`);
  check(!(await page.evaluate(() => document.cookie)).includes("tw_session"), "the cookie is readable by scripts");
  check((await page.content()).indexOf(admin) === -1, "the token is in the page");

  // Calls with the SDK: mini free; flagship past its small cap, billed.
  const client = new OpenAI({ baseURL: `${root}/v1`, apiKey: key });
  for (let i = 0; i < 3; i++) {
    await client.chat.completions.create({
      model: "gpt-4o-mini",
      messages: [{ role: "user", content: `Hello number ${i}!` }],
    });
  }
  const stream = await client.chat.completions.create({
    model: "gpt-4o",
    stream: true,
    messages: [{ role: "user", content: "Stream to me." }],
  });
  for await (const _ of stream) { /* drain */ }
  for (let i = 0; i < 2; i++) {
    // The second one no longer fits in the cap of 1000: billed, whole.
    await client.chat.completions.create(
      { model: "gpt-4o", max_tokens: 800, messages: [{ role: "user", content: "A long one." }] },
      { headers: { "x-sim-output-tokens": "700" } },
    );
  }

  // The numbers are in the served HTML: read them with scripts off.
  const noScript = await browser.newContext({ javaScriptEnabled: false });
  await noScript.addCookies(await context.cookies());
  const plain = await noScript.newPage();
  await plain.goto(`${root}/dashboard`);
  const served = {
    phase: "served",
    free_used_mini: await value(plain, "free-used", "acme", "mini"),
    free_used_flagship: await value(plain, "free-used", "acme", "flagship"),
    free_left_mini: await value(plain, "free-left", "acme", "mini"),
    billed_flagship: await value(plain, "billed-tokens", "acme", "flagship"),
    cost_flagship: await value(plain, "cost", "acme", "flagship"),
    shared: await value(plain, "shared-tokens", "acme", ""),
    private: await value(plain, "private-tokens", "acme", ""),
    alerts: Number(await plain.locator('[data-metric="alerts"]').getAttribute("data-value")),
    recent_rows: await plain.locator("table.recent tbody tr[data-id]").count(),
    charts: await plain.locator("svg.chart").count(),
  };
  report(served);
  await noScript.close();

  // Live: one more call changes the number without a reload.
  await page.reload();
  await page.waitForSelector("#live-status.live");
  await page.evaluate(() => { window.__noReload = true; });
  const before = await value(page, "free-used", "acme", "mini");
  const t0 = Date.now();
  await client.chat.completions.create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "One more, please." }],
  });
  await page.waitForFunction(
    ([s, v]) => {
      const el = document.querySelector(s);
      return el && el.getAttribute("data-value") !== v;
    },
    [sel("free-used", "acme", "mini"), String(before)],
    { timeout: 15000 },
  );
  const after = await value(page, "free-used", "acme", "mini");
  check(await page.evaluate(() => window.__noReload === true), "the page reloaded");
  report({ phase: "live", before, after, ms_after_call: Date.now() - t0 });
  await page.screenshot({ path: `${shots}/dashboard-laptop.png`, fullPage: true });

  // A phone: no sideways scrolling of the page (wide tables scroll in their box).
  await page.setViewportSize({ width: 390, height: 844 });
  const layout = await page.evaluate(() => {
    const cards = [...document.querySelectorAll("article.group")];
    return {
      page_width: document.documentElement.scrollWidth,
      viewport: window.innerWidth,
      widest_card: Math.max(...cards.map((c) => c.getBoundingClientRect().right)),
      cards: cards.length,
    };
  });
  check(layout.page_width <= layout.viewport, `page wider than the phone: ${JSON.stringify(layout)}`);
  check(layout.widest_card <= layout.viewport, `a card overflows: ${JSON.stringify(layout)}`);
  await page.screenshot({ path: `${shots}/dashboard-phone.png`, fullPage: true });
  report({ phase: "phone", ...layout });
  report({ phase: "done", ok: true });
} finally {
  await browser.close();
}
