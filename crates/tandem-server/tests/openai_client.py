"""The official OpenAI Python client against `tandem serve`: chat, headers, streaming, an error.
Run by tests/openai_client.rs with the gateway's URL; prints "ok" when every check passed."""
import sys

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

print("ok")
