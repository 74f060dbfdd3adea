"""The official Python `openai` SDK's structured outputs, tools, choices and
log probabilities against tokenwarden in front of its simulator: what agent
and structured-output frameworks call first.

Run by tests/it/sdk.rs:
    python python_fidelity.py BASE_URL KEY
"""

import json
import sys
from typing import List, Optional

import openai
from pydantic import BaseModel

base_url, key = sys.argv[1:3]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)


class Address(BaseModel):
    city: str
    postcode: Optional[str]


class Person(BaseModel):
    name: str
    age: int
    tags: List[str]
    home: Address


weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
clock = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}

# Structured outputs: the SDK parses the answer into the model.
parsed = client.chat.completions.parse(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Who lives here?"}],
    response_format=Person,
)
person = parsed.choices[0].message.parsed
assert isinstance(person, Person) and isinstance(person.home, Address), parsed
assert parsed.choices[0].finish_reason == "stop"
json_object = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Answer in JSON."}],
    response_format={"type": "json_object"},
)
assert isinstance(json.loads(json_object.choices[0].message.content), dict)

# A tool loop: the model calls the function, then answers its result in text.
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
first = client.chat.completions.create(model="gpt-4o", messages=messages, tools=[weather, clock])
call = first.choices[0].message.tool_calls[0]
assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
assert call.function.name == "get_weather", call
args = json.loads(call.function.arguments)
assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f"), args
assert first.usage.completion_tokens > 0
messages += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "18C, sunny"}]
second = client.chat.completions.create(model="gpt-4o", messages=messages, tools=[weather, clock])
assert second.choices[0].message.tool_calls is None and second.choices[0].message.content, second

# Parallel calls when both are asked for; one when parallel_tool_calls is off; a named one.
both = client.chat.completions.create(
    model="gpt-4o", messages=[{"role": "user", "content": "get_weather and get_time for Oslo"}], tools=[weather, clock]
)
assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather", "get_time"]
single = client.chat.completions.create(
    model="gpt-4o",
    messages=[{"role": "user", "content": "get_weather and get_time for Oslo"}],
    tools=[weather, clock],
    parallel_tool_calls=False,
)
assert len(single.choices[0].message.tool_calls) == 1
named = client.chat.completions.create(
    model="gpt-4o",
    messages=[{"role": "user", "content": "Hello"}],
    tools=[weather, clock],
    tool_choice={"type": "function", "function": {"name": "get_time"}},
)
assert named.choices[0].message.tool_calls[0].function.name == "get_time"
none = client.chat.completions.create(
    model="gpt-4o", messages=[{"role": "user", "content": "get_weather"}], tools=[weather], tool_choice="none"
)
assert none.choices[0].message.tool_calls is None

# Streamed tool calls: the SDK's stream helper puts the deltas together.
with client.chat.completions.stream(
    model="gpt-4o", messages=[{"role": "user", "content": "get_weather in Rome"}], tools=[weather]
) as stream:
    for _ in stream:
        pass
    final = stream.get_final_completion()
streamed = final.choices[0].message.tool_calls[0]
assert streamed.function.name == "get_weather" and set(json.loads(streamed.function.arguments)) == {"city", "unit"}

# n choices, log probabilities.
three = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=4, logprobs=True, top_logprobs=2
)
assert [c.index for c in three.choices] == [0, 1, 2]
assert three.usage.completion_tokens == 12
lp = three.choices[0].logprobs.content
assert len(lp) == 4 and all(len(t.top_logprobs) == 2 and t.logprob < 0 for t in lp)
legacy = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say", max_tokens=3, logprobs=2)
assert len(legacy.choices[0].logprobs.tokens) == 3 and len(legacy.choices[0].logprobs.top_logprobs[0]) == 2

# The Responses API: parse, function calls and their results.
r = client.responses.parse(model="gpt-4o-mini", input="Who lives here?", text_format=Person)
assert isinstance(r.output_parsed, Person), r
fc = client.responses.create(
    model="gpt-4o",
    input="What is the weather in Lima?",
    tools=[{"type": "function", "name": "get_weather", "parameters": weather["function"]["parameters"], "strict": True}],
)
item = fc.output[0]
assert item.type == "function_call" and item.name == "get_weather" and set(json.loads(item.arguments)) == {"city", "unit"}
follow = client.responses.create(
    model="gpt-4o",
    input=[
        {"role": "user", "content": "What is the weather in Lima?"},
        {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
        {"type": "function_call_output", "call_id": item.call_id, "output": "21C"},
    ],
    tools=[{"type": "function", "name": "get_weather", "parameters": weather["function"]["parameters"]}],
)
assert follow.output[0].type == "message" and follow.output_text, follow
events = [e.type for e in client.responses.create(
    model="gpt-4o", input="get_weather for Quito", stream=True,
    tools=[{"type": "function", "name": "get_weather", "parameters": weather["function"]["parameters"]}],
)]
assert "response.function_call_arguments.delta" in events and events[-1] == "response.completed", events

# One model, as the catalog has it; OpenAI's 404 for one it does not.
assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("a model that is nowhere")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e

print("python fidelity ok")
