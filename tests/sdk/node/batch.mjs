// The official Node `openai` SDK's files and batches resources against tokenwarden.
// Run by tests/it/batch.rs (org "acme", projects "web" and "lab"):
//   node batch.mjs BASE_URL WEB_KEY LAB_KEY LINES
import assert from "node:assert/strict";
import OpenAI, { toFile } from "openai";

const [baseURL, webKey, labKey, count] = process.argv.slice(2);
const lines = Number(count);
const web = new OpenAI({ baseURL, apiKey: webKey, maxRetries: 0 });
const lab = new OpenAI({ baseURL, apiKey: labKey, maxRetries: 0 });

const request = (i) => ({
  custom_id: `node-${i}`,
  method: "POST",
  url: "/v1/embeddings",
  body: { model: "text-embedding-3-small", input: `line ${i}` },
});
const text = Array.from({ length: lines }, (_, i) => JSON.stringify(request(i)) + "\n").join("");
const file = await web.files.create({ file: await toFile(Buffer.from(text), "input.jsonl"), purpose: "batch" });
assert.equal(file.object, "file");
assert.equal(file.bytes, Buffer.byteLength(text));
assert.equal(file.purpose, "batch");
assert.equal((await web.files.retrieve(file.id)).filename, "input.jsonl");
assert.ok((await web.files.list()).data.some((f) => f.id === file.id));
assert.equal(await (await web.files.content(file.id)).text(), text);
await assert.rejects(lab.files.retrieve(file.id), OpenAI.NotFoundError);

let batch = await web.batches.create({ input_file_id: file.id, endpoint: "/v1/embeddings", completion_window: "24h" });
assert.equal(batch.object, "batch");
const deadline = Date.now() + 120_000;
while (!["completed", "failed", "expired", "cancelled"].includes(batch.status)) {
  assert.ok(Date.now() < deadline, JSON.stringify(batch));
  await new Promise((r) => setTimeout(r, 200));
  batch = await web.batches.retrieve(batch.id);
}
assert.equal(batch.status, "completed", JSON.stringify(batch));
assert.deepEqual(batch.request_counts, { total: lines, completed: lines, failed: 0 });
const output = (await (await web.files.content(batch.output_file_id)).text())
  .trim()
  .split("\n")
  .map((l) => JSON.parse(l));
assert.deepEqual(
  output.map((o) => o.custom_id).sort(),
  Array.from({ length: lines }, (_, i) => `node-${i}`).sort(),
);
assert.ok(output.every((o) => o.response.status_code === 200 && o.response.body.data[0].embedding.length > 0));

// Listed with a page's cursor; another project's key finds nothing.
const page = await web.batches.list({ limit: 1 });
assert.equal(page.data.length, 1);
assert.equal((await lab.batches.list()).data.length, 0);
await assert.rejects(lab.batches.retrieve(batch.id), OpenAI.NotFoundError);

// A batch cancelled before it ran: cancelling, then cancelled.
const second = await web.files.create({ file: await toFile(Buffer.from(text), "second.jsonl"), purpose: "batch" });
let cancelled = await web.batches.create({ input_file_id: second.id, endpoint: "/v1/embeddings", completion_window: "24h" });
cancelled = await web.batches.cancel(cancelled.id);
assert.ok(["cancelling", "cancelled", "completed"].includes(cancelled.status), cancelled.status);
while (!["cancelled", "completed"].includes(cancelled.status)) {
  assert.ok(Date.now() < deadline);
  await new Promise((r) => setTimeout(r, 100));
  cancelled = await web.batches.retrieve(cancelled.id);
}

const deleted = await web.files.delete(file.id);
assert.deepEqual([deleted.id, deleted.deleted], [file.id, true]);
console.log("node batch sdk ok");
