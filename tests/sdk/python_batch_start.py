"""Upload a batch input file of N chat lines and start a batch of it; print its id.

    python python_batch_start.py BASE_URL KEY N
"""

import io
import json
import sys

import openai

base_url, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
rows = (
    json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}})
    for i in range(n)
)
text = "".join(r + "\n" for r in rows)
f = client.files.create(file=("input.jsonl", io.BytesIO(text.encode())), purpose="batch")
batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
assert batch.status == "in_progress", batch
print(batch.id)
