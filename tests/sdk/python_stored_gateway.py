"""Stored responses and chat completions through tokenwarden, for a project
alone on its upstream: the Python SDK's routes reach the upstream's kept
objects, and a continued response is metered with what the upstream billed.

Run by tests/it/stored.rs:
    python python_stored_gateway.py BASE_URL KEY
"""

import sys

import openai

base_url, key = sys.argv[1:3]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)

first = client.responses.create(model="gpt-4o-mini", input="Hello there", max_output_tokens=8)
assert client.responses.retrieve(first.id).id == first.id
assert [i.type for i in client.responses.input_items.list(first.id).data] == ["message"]
second = client.responses.create(model="gpt-4o-mini", input="And then?", previous_response_id=first.id, max_output_tokens=8)
assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
assert client.responses.input_tokens.count(model="gpt-4o-mini", input="Hello there").input_tokens == first.usage.input_tokens
client.responses.delete(first.id)
try:
    client.responses.retrieve(first.id)
    raise AssertionError("a deleted response")
except openai.NotFoundError:
    pass

kept = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "keep me"}], store=True, max_tokens=4
)
assert [c.id for c in client.chat.completions.list().data] == [kept.id]
assert client.chat.completions.retrieve(kept.id).id == kept.id
assert [m.content for m in client.chat.completions.messages.list(kept.id).data] == ["keep me"]
assert client.chat.completions.delete(kept.id).deleted
# Compaction is billed: metered as a Responses call.
compacted = client.responses.compact(model="gpt-4o-mini", input=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}])
assert compacted.object == "response.compaction" and compacted.usage.input_tokens > 0
print(second.usage.input_tokens)
print(compacted.usage.input_tokens + compacted.usage.output_tokens)
print("python stored gateway ok")
