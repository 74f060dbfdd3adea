"""The official Python `openai` SDK against a running tokenwarden gateway.

Run by tests/it/sdk.rs, which starts the gateway and a simulated upstream:
    python python_sdk.py BASE_URL KEY BLOCK_KEY
Exits non-zero (with the failing assertion) if the SDK sees anything it
would not see from the OpenAI API.
"""

import sys

import openai

base_url, key, block_key = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
messages = [{"role": "user", "content": "Hello!"}]

# Chat, whole answer.
chat = client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=8)
assert isinstance(chat.choices[0].message.content, str) and chat.choices[0].message.content
assert chat.usage.prompt_tokens == 9 and chat.usage.completion_tokens == 8, chat.usage
assert chat.model == "gpt-4o-2024-08-06", chat.model

# With the raw response: the free-token headers are there.
raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, max_tokens=4)
assert int(raw.headers["x-free-tokens-limit"]) == 10_000_000, raw.headers
assert int(raw.headers["x-free-tokens-remaining"]) < 10_000_000
assert 0 < int(raw.headers["x-free-tokens-reset"]) <= 86_400

# Streaming without include_usage: no usage chunk reaches the client.
chunks = list(client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=5, stream=True))
assert all(c.usage is None for c in chunks)
assert all(c.choices for c in chunks)
text = "".join(c.choices[0].delta.content or "" for c in chunks)
assert len(text.split()) == 5, text

# Streaming with include_usage: the last chunk carries it.
chunks = list(
    client.chat.completions.create(
        model="gpt-4o", messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
)
assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 14, chunks[-1]

# Responses, whole and streamed.
response = client.responses.create(model="gpt-4o", input="Hello!", max_output_tokens=6)
assert response.output_text and response.usage.output_tokens == 6, response.usage
events = list(client.responses.create(model="gpt-4o", input="Hello!", max_output_tokens=20, stream=True))
assert events[0].type == "response.created", events[0].type
assert events[-1].type == "response.completed", events[-1].type
assert events[-1].response.usage.output_tokens == 16

# Embeddings (the SDK asks for base64 and decodes it).
embeddings = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
assert len(embeddings.data) == 2 and len(embeddings.data[0].embedding) == 1536
assert embeddings.usage.prompt_tokens == 2

# Legacy completions.
completion = client.completions.create(model="gpt-3.5-turbo", prompt="Say hi", max_tokens=3)
assert completion.usage.completion_tokens == 3

# Errors arrive as the SDK's typed exceptions.
try:
    openai.OpenAI(base_url=base_url, api_key="tw-wrong-key-000000000000", max_retries=0).chat.completions.create(
        model="gpt-4o", messages=messages
    )
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e

try:
    client.chat.completions.create(model="gpt-5o", messages=messages)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e

blocked = openai.OpenAI(base_url=base_url, api_key=block_key, max_retries=0)
# The simulator writes as many tokens as asked: 609 of the 1,000 free, then 609 more do not fit.
long = {"x-sim-output-tokens": "600"}
blocked.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=600, extra_headers=long)
try:
    blocked.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=600, extra_headers=long)
    raise AssertionError("a call past the allowance was not blocked")
except openai.RateLimitError as e:
    assert e.code == "free_tokens_exhausted", e.code
    assert e.type == "insufficient_quota", e.type
    assert int(e.response.headers["retry-after"]) > 0
    assert e.response.headers["x-should-retry"] == "false"

# At the SDK's default retry settings the refusal arrives at once: the SDK
# does not retry it (tests/it/sdk.rs counts one refusal for this call).
default_retries = openai.OpenAI(base_url=base_url, api_key=block_key)
try:
    default_retries.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=600, extra_headers=long)
    raise AssertionError("a call past the allowance was not blocked")
except openai.RateLimitError as e:
    assert e.code == "free_tokens_exhausted", e.code

print("python openai", openai.__version__, "ok")
