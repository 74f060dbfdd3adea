"""The official Python `openai` SDK's files resource against tokenwarden.

Run by tests/it/batch.rs, which starts the gateway (org "acme", projects
"web" and "lab"):
    python python_files.py BASE_URL WEB_KEY LAB_KEY
"""

import io
import sys

import openai

base_url, web_key, lab_key = sys.argv[1:4]
web = openai.OpenAI(base_url=base_url, api_key=web_key, max_retries=0)
lab = openai.OpenAI(base_url=base_url, api_key=lab_key, max_retries=0)

# Three and a half parts' worth of lines, byte-exact on the way back.
line = b'{"custom_id": "r-%06d", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}}\n'
content = b"".join(line % i for i in range(25_000))
assert len(content) > 3 * 1024 * 1024
made = web.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")
assert made.object == "file" and made.id.startswith("file-") and made.purpose == "batch", made
assert made.bytes == len(content) and made.filename == "input.jsonl" and made.status == "processed"

assert web.files.retrieve(made.id).bytes == len(content)
assert web.files.content(made.id).read() == content
assert [f.id for f in web.files.list(purpose="batch").data] == [made.id]

# Another project's key: no such file.
try:
    lab.files.retrieve(made.id)
    raise AssertionError("another project read the file")
except openai.NotFoundError:
    pass
assert lab.files.list().data == []

# Only batch files are kept here.
try:
    web.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    raise AssertionError("a fine-tune file was kept")
except openai.BadRequestError as e:
    assert "purpose" in str(e)
assert [f.id for f in web.files.list().data] == [made.id]

second = web.files.create(file=("b.jsonl", io.BytesIO(line % 1)), purpose="batch")
assert [f.id for f in web.files.list().data] == [second.id, made.id], "newest first"
assert [f.id for f in web.files.list(order="asc").data] == [made.id, second.id]
deleted = web.files.delete(made.id)
assert deleted.deleted and deleted.id == made.id
try:
    web.files.content(made.id)
    raise AssertionError("a deleted file was read")
except openai.NotFoundError:
    pass
print("python files sdk ok")
