// The official Node `openai` SDK against a running tokenwarden gateway.
// Run by tests/it/sdk.rs, which starts the gateway and a simulated upstream:
//   node sdk.mjs BASE_URL KEY BLOCK_KEY
import assert from "node:assert/strict";
import OpenAI from "openai";

const [baseURL, apiKey, blockKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const messages = [{ role: "user", content: "Hello!" }];

const chat = await client.chat.completions.create({ model: "gpt-4o", messages, max_tokens: 8 });
assert.equal(chat.usage.prompt_tokens, 9);
assert.equal(chat.usage.completion_tokens, 8);
assert.ok(chat.choices[0].message.content.length > 0);

const { data: mini, response } = await client.chat.completions
  .create({ model: "gpt-4o-mini", messages, max_tokens: 4 })
  .withResponse();
assert.equal(mini.usage.completion_tokens, 4);
assert.equal(Number(response.headers.get("x-free-tokens-limit")), 10_000_000);

// Streaming without include_usage: no usage chunk; with it: the last chunk.
let chunks = [];
for await (const chunk of await client.chat.completions.create({ model: "gpt-4o", messages, max_tokens: 5, stream: true })) {
  chunks.push(chunk);
}
assert.ok(chunks.every((c) => c.choices.length > 0 && c.usage == null));
chunks = [];
const withUsage = await client.chat.completions.create({
  model: "gpt-4o", messages, max_tokens: 5, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of withUsage) chunks.push(chunk);
assert.equal(chunks.at(-1).choices.length, 0);
assert.equal(chunks.at(-1).usage.total_tokens, 14);

const resp = await client.responses.create({ model: "gpt-4o", input: "Hello!", max_output_tokens: 6 });
assert.equal(resp.usage.output_tokens, 6);
assert.ok(resp.output_text.length > 0);
const events = [];
for await (const event of await client.responses.create({ model: "gpt-4o", input: "Hello!", stream: true })) {
  events.push(event.type);
}
assert.equal(events[0], "response.created");
assert.equal(events.at(-1), "response.completed");

const emb = await client.embeddings.create({ model: "text-embedding-3-small", input: "hello" });
assert.equal(emb.data[0].embedding.length, 1536);

await assert.rejects(
  new OpenAI({ baseURL, apiKey: "tw-wrong-key-000000000000", maxRetries: 0 }).chat.completions.create({ model: "gpt-4o", messages }),
  (e) => e instanceof OpenAI.AuthenticationError && e.status === 401 && e.code === "invalid_api_key",
);

const blocked = new OpenAI({ baseURL, apiKey: blockKey, maxRetries: 0 });
// The simulator writes as many tokens as asked: 609 of the 1,000 free, then 609 more do not fit.
const long = { headers: { "x-sim-output-tokens": "600" } };
await blocked.chat.completions.create({ model: "gpt-4o", messages, max_tokens: 600 }, long);
await assert.rejects(
  blocked.chat.completions.create({ model: "gpt-4o", messages, max_tokens: 600 }, long),
  (e) => e instanceof OpenAI.RateLimitError && e.code === "free_tokens_exhausted" && e.type === "insufficient_quota",
);
// At the SDK's default retry settings the refusal arrives at once (without
// x-should-retry: false the client sleeps Retry-After, hours, and tries
// again): tests/it/sdk.rs counts one refusal for this call.
await assert.rejects(
  new OpenAI({ baseURL, apiKey: blockKey }).chat.completions.create({ model: "gpt-4o", messages, max_tokens: 600 }, long),
  (e) => e instanceof OpenAI.RateLimitError && e.headers.get("x-should-retry") === "false",
);

console.log(`node openai ${OpenAI.VERSION ?? ""} ok`);
