"""openai-python's own API tests (tests/api_resources), written against a
mock server, run against tokenwarden in front of its simulator.

Run by tests/it/peer.rs, which starts the gateway (one project alone on its
upstream, so stored objects are reachable):
    python api_resources.py SDIST_DIR WORK_DIR BASE_URL KEY

SDIST_DIR is the unpacked sdist of the pinned openai package (scripts/test
downloads it). The tests are copied to WORK_DIR and changed only where no
real server could accept them, each change listed below; the tests that
stay out are listed with their reason. Prints pytest's summary; exits with
pytest's status.

Changes (what no real server accepts):
- the API key: conftest's "My API Key" becomes the gateway's client key;
- made-up model names ("gpt-6-astra", "model") become "gpt-4o";
- calls with nothing to answer (responses.create(), input_tokens.count(),
  with or without stream=True) get model="gpt-4o" and input="Hello";
- placeholder ids ("resp_677efb5139a88190b512bc3fef8e535d", "resp_123",
  "response_id", "previous_response_id", "completion_id") become the id of
  a response (made in the background for cancel) or stored chat
  completion made for that test;
- zero where the API's minimum is one (max_tokens, max_completion_tokens,
  max_output_tokens, best_of, limit, max_tool_calls) becomes 16 (limits: 1);
- the all-params calls' references to objects that no server has (a
  conversation "string", a prompt "id", a file "file-123") are dropped.
"""

import pathlib
import re
import shutil
import subprocess
import sys

sdist, work, base_url, key = sys.argv[1:5]
sdist, work = pathlib.Path(sdist), pathlib.Path(work)

FILES = [
    "tests/api_resources/chat/test_completions.py",
    "tests/api_resources/test_completions.py",
    "tests/api_resources/test_embeddings.py",
    "tests/api_resources/test_responses.py",
    "tests/api_resources/responses/test_input_items.py",
    "tests/api_resources/responses/test_input_tokens.py",
    "tests/api_resources/test_models.py",
]

# Left out, and why (pytest -k expressions).
LEFT_OUT = {
    "aiohttp": "the aiohttp variants need the SDK's aiohttp extra, which the pinned install leaves out",
    "compact": "a compacted response's output holds the user messages, as the API documents, and the SDK's output item type admits assistant messages only: the tests' type check fails against a real server (the gateway meters compact: tests/it/stored.rs)",
    "TestEmbeddings and strict": "the SDK asks for base64 embeddings and checks the base64 string against the float schema before decoding it: no real server passes strict mode here",
    "TestAsyncEmbeddings and strict": "the same, async",
}

if work.exists():
    shutil.rmtree(work)
shutil.copytree(sdist / "tests", work / "tests")
shutil.copy(sdist / "pyproject.toml", work / "pyproject.toml")

conftest = work / "tests" / "conftest.py"
text = conftest.read_text()
text = text.replace('api_key = "My API Key"', f'api_key = "{key}"')
conftest.write_text(text)

(work / "tests" / "fresh.py").write_text(
    f'''"""Objects the placeholder ids stand for, made for each use."""
import openai

_client = openai.OpenAI(base_url={base_url!r}, api_key={key!r}, max_retries=0)


def fresh_response(background: bool = False) -> str:
    return _client.responses.create(
        model="gpt-4o", input="Hello", max_output_tokens=16, background=background
    ).id


def fresh_completion() -> str:
    return _client.chat.completions.create(
        model="gpt-4o", messages=[{{"role": "user", "content": "Hello"}}], max_tokens=16, store=True
    ).id
'''
)

SUBSTITUTIONS = [
    (r'"gpt-6-astra"', '"gpt-4o"'),
    (r'model="model"', 'model="gpt-4o"'),
    (r'(responses(?:\.with_raw_response|\.with_streaming_response)?\.create\()\)', r'\1model="gpt-4o", input="Hello")'),
    (r'(responses(?:\.with_raw_response|\.with_streaming_response)?\.create\(\n(\s+))stream=True,\n(\s+)\)', r'\1model="gpt-4o",\n\2input="Hello",\n\2stream=True,\n\3)'),
    (r'(\.count\()\)', r'\1model="gpt-4o", input="Hello")'),
    (r'(\.cancel\(\s*)"resp_677efb5139a88190b512bc3fef8e535d"', r"\1fresh_response(background=True)"),
    (r'"resp_677efb5139a88190b512bc3fef8e535d"', "fresh_response()"),
    (r'"resp_123"', "fresh_response()"),
    (r'"response_id"', "fresh_response()"),
    (r'previous_response_id="previous_response_id"', "previous_response_id=fresh_response()"),
    (r'"completion_id"', "fresh_completion()"),
    (r'\b(max_tokens|max_completion_tokens|max_output_tokens)=0\b', r"\1=16"),
    (r'\b(best_of|limit|max_tool_calls)=0\b', r"\1=1"),
    (r'\n\s+conversation="string",', ""),
    (r'\n\s+prompt=\{\n(?:\s+.*\n)*?\s+\},', ""),
]

for name in FILES:
    path = work / name
    source = path.read_text()
    for pattern, replacement in SUBSTITUTIONS:
        source = re.sub(pattern, replacement, source)
    # After `from __future__ import annotations`, which must come first.
    source = source.replace(
        "from __future__ import annotations\n",
        "from __future__ import annotations\n\nfrom tests.fresh import fresh_completion, fresh_response  # noqa: F401\n",
        1,
    )
    path.write_text(source)

deselect = " and ".join(f"not ({k})" for k in LEFT_OUT)
for k, why in LEFT_OUT.items():
    print(f"left out: {k}: {why}")
result = subprocess.run(
    [
        sys.executable,
        "-m",
        "pytest",
        *FILES,
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=--tb=short",
        "-k",
        deselect,
    ],
    cwd=work,
    env={"TEST_API_BASE_URL": base_url, "PATH": "/usr/bin:/bin"},
    capture_output=True,
    text=True,
)
print(result.stdout[-20000:])
print(result.stderr[-5000:], file=sys.stderr)
sys.exit(result.returncode)
