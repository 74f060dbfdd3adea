// The dashboard's settings panel in headless Chromium (Debian's, driven by
// playwright-core): an org admin changes its data sharing and a project's
// policy with the real forms, and sees the history. Run by
// tests/it/admin.rs, which checks the gateway's side of each change.
//
// usage: node settings.mjs GATEWAY_ROOT ORG_ADMIN_KEY
import { launch, check, report } from "./browser.mjs";

const [root, adminKey] = process.argv.slice(2);

const browser = await launch();
try {
  const page = await (await browser.newContext()).newPage();
  await page.goto(`${root}/dashboard`);
  await page.fill("#token", adminKey);
  await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);

  // Only its own org's settings.
  const orgs = await page.locator("[data-settings]").evaluateAll((els) => els.map((e) => e.getAttribute("data-settings")));
  check(JSON.stringify(orgs) === '["acme"]', `settings of ${orgs}`);
  const panel = page.locator('[data-settings="acme"]');
  check((await panel.locator("table.history").getAttribute("data-value")) === "0", "a history before any change");
  report({ phase: "signed_in", orgs });

  // Data sharing: selected projects, web only.
  await panel.locator('form.sharing input[name=sharing][value=selected]').check();
  await panel.locator('form.sharing input[name=project][value=web]').check();
  await Promise.all([page.waitForNavigation(), panel.locator("form.sharing button[type=submit]").click()]);
  check((await page.locator(".error").count()) === 0, `an error: ${await page.locator(".error").allTextContents()}`);
  const after = page.locator('[data-settings="acme"]');
  check(await after.locator('form.sharing input[name=sharing][value=selected]').isChecked(), "selected is not checked after saving");
  check(await after.locator('form.sharing input[name=project][value=web]').isChecked(), "web is not checked after saving");
  report({ phase: "sharing_saved" });

  // A project's policy: block.
  const web = after.locator('form.project[data-project="web"]');
  await web.locator("select[name=on_exhausted]").selectOption("block");
  await Promise.all([page.waitForNavigation(), web.locator("button[type=submit]").click()]);
  const saved = page.locator('[data-settings="acme"] form.project[data-project="web"] select[name=on_exhausted]');
  check((await saved.inputValue()) === "block", "on_exhausted is not block after saving");

  // The history: both changes, newest first, with who made them.
  const rows = await page.locator('[data-settings="acme"] table.history tbody tr').allTextContents();
  check(rows.length === 2, `history rows: ${JSON.stringify(rows)}`);
  check(rows[0].includes("project web: on_exhausted block") && rows[0].includes("(dashboard)"), `newest: ${rows[0]}`);
  check(rows[1].includes("data sharing: selected projects (web)"), `oldest: ${rows[1]}`);
  check(!(await page.content()).includes(adminKey), "the admin key is in the page");
  report({ phase: "history", rows });

  // A bad value posted by hand is refused with a message, and changes nothing.
  const status = await page.evaluate(async () => {
    const body = new URLSearchParams({ org: "acme", project: "web", on_exhausted: "pray" });
    return (await fetch("/dashboard/settings/project", { method: "POST", body })).status;
  });
  check(status === 400, `a bad value: ${status}`);
  report({ phase: "done" });
} finally {
  await browser.close();
}
