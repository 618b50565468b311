"""The official OpenAI Python client against `tandem serve`: chat, headers, streaming, tool calls
(plain and assembled from streamed deltas by the client's stream helper), upstream errors with
the client's retries, model retrieval. Run by tests/openai_client.rs with the gateway's URL;
prints "ok" when every check passed (the driver then checks what the mocks received)."""
import json
import sys
import time

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="k1", max_retries=0)
easy = [{"role": "user", "content": "easy sum"}]
hard = [{"role": "user", "content": "hard proof"}]

r = client.chat.completions.create(model="t", messages=easy)
assert r.choices[0].message.content == "the answer is 4", r
assert r.choices[0].finish_reason == "stop"
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
assert r.model == "t"

raw = client.chat.completions.with_raw_response.create(model="t", messages=hard)
assert raw.headers["x-tandem-role"] == "large", dict(raw.headers)
assert float(raw.headers["x-tandem-cost-usd"]) > 0
assert raw.parse().choices[0].message.content == "the answer is 4"

stream = client.chat.completions.create(
    model="t", messages=hard, stream=True, stream_options={"include_usage": True}
)
chunks = list(stream)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == "the answer is 4", text
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

try:
    client.chat.completions.create(model="nope", messages=easy)
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "nope" in str(e), e

bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
try:
    bad.chat.completions.create(model="t", messages=easy)
    raise AssertionError("a wrong key must fail")
except openai.AuthenticationError as e:
    assert e.status_code == 401

# Tool calls (route "tools": a fixed route to a mock that answers get_weather(city="Paris")).
weather = [{"role": "user", "content": "What is the weather in Paris?"}]
tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    }
]
choice = {"type": "function", "function": {"name": "get_weather"}}

# Plain: the call comes back in message.tool_calls.
r = client.chat.completions.create(model="tools", messages=weather, tools=tools, tool_choice=choice)
assert r.model == "tools", r
assert r.choices[0].finish_reason == "tool_calls", r
m = r.choices[0].message
assert m.content is None, m
assert m.tool_calls is not None and len(m.tool_calls) == 1, m
tc = m.tool_calls[0]
assert tc.id == "call_w1" and tc.type == "function", tc
assert tc.function.name == "get_weather", tc
assert json.loads(tc.function.arguments) == {"city": "Paris"}, tc

# The parse helper (strict tools): the client parses the arguments itself.
p = client.chat.completions.parse(model="tools", messages=weather, tools=tools, tool_choice=choice)
pc = p.choices[0].message.tool_calls[0]
assert pc.function.name == "get_weather" and pc.function.parsed_arguments == {"city": "Paris"}, pc

# Streamed: tool-call deltas (arguments in fragments) assembled by the client's stream helper.
with client.chat.completions.stream(
    model="tools",
    messages=weather,
    tools=tools,
    tool_choice=choice,
    stream_options={"include_usage": True},
) as s:
    events = list(s)
    final = s.get_final_completion()
kinds = [e.type for e in events]
deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
assert len(deltas) > 1, kinds
done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
assert len(done) == 1, kinds
assert done[0].name == "get_weather" and done[0].index == 0, done[0]
assert done[0].parsed_arguments == {"city": "Paris"}, done[0]
assert final.model == "tools", final
assert final.choices[0].finish_reason == "tool_calls", final
fc = final.choices[0].message.tool_calls
assert fc is not None and len(fc) == 1, final
assert fc[0].id == "call_w1" and fc[0].type == "function", fc
assert fc[0].function.name == "get_weather", fc
assert json.loads(fc[0].function.arguments) == {"city": "Paris"}, fc
assert fc[0].function.parsed_arguments == {"city": "Paris"}, fc
assert not final.choices[0].message.content, final
assert final.usage is not None and final.usage.completion_tokens > 0, final

# An upstream 400 (route "bad"): BadRequestError with the upstream's type/code/param, after one
# upstream call although the client may retry twice (the driver counts the mock's calls).
retrying = openai.OpenAI(base_url=base + "/v1", api_key="k1", max_retries=2)
try:
    retrying.chat.completions.create(model="bad", messages=easy, temperature=7)
    raise AssertionError("an upstream 400 must fail")
except openai.BadRequestError as e:
    assert e.status_code == 400, e
    assert e.type == "invalid_request_error", e.body
    assert e.code == "invalid_value", e.body
    assert e.param == "temperature", e.body
    assert "temperature is too hot" in e.message and "bad-up" in e.message, e.message
    assert e.response.headers.get("x-should-retry") == "false", dict(e.response.headers)

# An upstream 429 with Retry-After (route "limited"): RateLimitError, and the header reaches the
# client. One retry allowed: the client waits the Retry-After second and tries once more.
once = openai.OpenAI(base_url=base + "/v1", api_key="k1", max_retries=1)
t0 = time.monotonic()
try:
    once.chat.completions.create(model="limited", messages=easy)
    raise AssertionError("an upstream 429 must fail")
except openai.RateLimitError as e:
    assert e.status_code == 429, e
    assert e.response.headers.get("retry-after") == "1", dict(e.response.headers)
    assert e.response.headers.get("x-should-retry") == "true", dict(e.response.headers)
    assert e.code == "rate_limit_exceeded", e.body
assert time.monotonic() - t0 >= 0.9, "the client honours Retry-After"

# Models.
m = client.models.retrieve("t")
assert m.id == "t" and m.object == "model" and m.owned_by == "tandem", m
assert isinstance(m.created, int), m
ids = [x.id for x in client.models.list()]
assert "t" in ids and "tools" in ids, ids
try:
    client.models.retrieve("nope")
    raise AssertionError("an unknown model id must fail")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.code == "model_not_found", e.body

print("ok")
