// Debian's Chromium, headless, as the browser tests start it (playwright-core):
// the flags keep it off the network this machine closes.
import { chromium } from "playwright-core";

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
}

export function check(cond, message) {
  if (!cond) throw new Error(message);
}

export const report = (o) => console.log(JSON.stringify(o));
