"""The official Python `openai` SDK's stored responses and stored chat
completions against the simulated upstream itself (every route of the
`responses` resource, and `chat.completions` list/retrieve/update/delete/
messages).

Run by tests/it/sdk.rs:
    python python_stored.py BASE_URL
"""

import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="sk-sim-stored-one", max_retries=0)
other = openai.OpenAI(base_url=base_url, api_key="sk-sim-stored-two", max_retries=0)


def missing(call):
    try:
        call()
    except openai.NotFoundError:
        return True
    return False


# Responses are kept (store defaults to true) and read back.
first = client.responses.create(model="gpt-4o-mini", input="Hello there", max_output_tokens=8)
assert client.responses.retrieve(first.id).output_text == first.output_text
items = client.responses.input_items.list(first.id)
assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "Hello there"
assert missing(lambda: other.responses.retrieve(first.id)), "another key's response"

# previous_response_id: the earlier input and output are billed again as input.
alone = client.responses.create(model="gpt-4o-mini", input="And then?", max_output_tokens=8, store=False)
second = client.responses.create(
    model="gpt-4o-mini", input="And then?", previous_response_id=first.id, max_output_tokens=8
)
assert second.previous_response_id == first.id
assert second.usage.input_tokens == alone.usage.input_tokens + first.usage.input_tokens + first.usage.output_tokens
assert missing(lambda: client.responses.retrieve(alone.id)), "store=false keeps nothing"
try:
    client.responses.create(model="gpt-4o-mini", input="x", previous_response_id="resp_nowhere")
    raise AssertionError("continued a response that is nowhere")
except openai.BadRequestError as e:
    assert e.code == "previous_response_not_found", e

counted = client.responses.input_tokens.count(model="gpt-4o-mini", input="Hello there")
assert counted.input_tokens == first.usage.input_tokens, counted

try:
    client.responses.cancel(first.id)
    raise AssertionError("cancelled a response not made in the background")
except openai.BadRequestError:
    pass
background = client.responses.create(model="gpt-4o-mini", input="later", background=True)
assert client.responses.cancel(background.id).id == background.id

compacted = client.responses.compact(
    model="gpt-4o-mini",
    input=[{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}],
)
assert compacted.object == "response.compaction"
assert [o.type for o in compacted.output] == ["message", "message", "compaction"], compacted.output

client.responses.delete(first.id)
assert missing(lambda: client.responses.retrieve(first.id))

# Chat completions made with store=true.
kept = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "keep me"}], store=True, metadata={"run": "a"}, max_tokens=4
)
client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "not kept"}], max_tokens=4)
listed = client.chat.completions.list(model=kept.model)
assert [c.id for c in listed.data] == [kept.id], listed
assert client.chat.completions.retrieve(kept.id).choices[0].message.content == kept.choices[0].message.content
assert client.chat.completions.update(kept.id, metadata={"run": "b"}).metadata == {"run": "b"}
assert [c.id for c in client.chat.completions.list(metadata={"run": "b"}).data] == [kept.id]
messages = client.chat.completions.messages.list(kept.id)
assert [m.content for m in messages.data] == ["keep me"]
assert other.chat.completions.list().data == []
assert client.chat.completions.delete(kept.id).deleted
assert missing(lambda: client.chat.completions.retrieve(kept.id))

print("python stored ok")
