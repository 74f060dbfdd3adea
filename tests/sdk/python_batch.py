"""The official Python `openai` SDK's batches resource against tokenwarden.

Run by tests/it/batch.rs (org "acme", projects "web" and "lab"):
    python python_batch.py BASE_URL WEB_KEY LAB_KEY LINES
Prints the batch's id last.
"""

import io
import json
import sys
import time

import openai

base_url, web_key, lab_key, lines = sys.argv[1:5]
lines = int(lines)
web = openai.OpenAI(base_url=base_url, api_key=web_key, max_retries=0)
lab = openai.OpenAI(base_url=base_url, api_key=lab_key, max_retries=0)


def upload(rows):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    return web.files.create(file=("input.jsonl", io.BytesIO(text.encode())), purpose="batch")


def request(i, **overrides):
    row = {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": f"hello {i}"}]},
    }
    row.update(overrides)
    return row


# A good file: every line comes back once, in the output file.
good = upload([request(i) for i in range(lines)])
batch = web.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "sdk"})
assert batch.object == "batch" and batch.id.startswith("batch_") and batch.status in ("validating", "in_progress"), batch
assert batch.metadata == {"run": "sdk"}
deadline = time.time() + 120
while batch.status not in ("completed", "failed", "expired", "cancelled"):
    assert time.time() < deadline, batch
    time.sleep(0.2)
    batch = web.batches.retrieve(batch.id)
assert batch.status == "completed", batch
assert batch.request_counts.total == lines and batch.request_counts.completed == lines and batch.request_counts.failed == 0, batch.request_counts
assert batch.completed_at and batch.in_progress_at and batch.expires_at and batch.error_file_id is None
assert batch.usage.output_tokens == 4 * lines, batch.usage
output = [json.loads(l) for l in web.files.content(batch.output_file_id).text.splitlines()]
ids = sorted(o["custom_id"] for o in output)
assert ids == sorted(f"req-{i}" for i in range(lines)), "each line exactly once"
assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in output)
assert all(o["response"]["body"]["usage"]["completion_tokens"] == 4 for o in output)
assert batch.id in [b.id for b in web.batches.list().data]

# Another project: no such batch.
try:
    lab.batches.retrieve(batch.id)
    raise AssertionError("another project read the batch")
except openai.NotFoundError:
    pass
assert lab.batches.list().data == []

# Bad files fail the batch with OpenAI's errors, by line.
bad = web.files.create(
    file=(
        "bad.jsonl",
        io.BytesIO(
            (
                json.dumps(request(1)) + "\n"
                + "not json\n"
                + json.dumps(request(2, url="/v1/embeddings")) + "\n"
                + json.dumps(request(1)) + "\n"
                + json.dumps(request(3, method="GET")) + "\n"
            ).encode()
        ),
    ),
    purpose="batch",
)
failed = web.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
assert failed.status == "failed", failed
found = {(e.line, e.code) for e in failed.errors.data}
assert found == {(2, "invalid_json_line"), (3, "invalid_url"), (4, "duplicate_custom_id"), (5, "invalid_method")}, found

try:
    web.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    raise AssertionError("a batch of no file")
except openai.NotFoundError:
    pass
try:
    web.batches.create(input_file_id=good.id, endpoint="/v1/images/generations", completion_window="24h")
    raise AssertionError("a batch of another endpoint")
except openai.BadRequestError:
    pass

try:
    web.batches.create(input_file_id=batch.output_file_id, endpoint="/v1/chat/completions", completion_window="24h")
    raise AssertionError("a batch of an output file")
except openai.BadRequestError as e:
    assert "purpose batch" in str(e), e

print("python batch sdk ok")
print(batch.id)
