"""The official openai and anthropic clients making metered calls through keyward, and what they saw.

Usage: usage_clients.py CASE KEYWARD_URL AGENT_KEY
CASE is one of: chat, chat-stream, chat-stream-usage, responses-stream, anthropic, anthropic-stream.
Prints one JSON line: the text, and what the client saw of usage and of the stream's chunks.
"""

import json
import sys

case, base, key = sys.argv[1], sys.argv[2], sys.argv[3]
messages = [{"role": "user", "content": "hello"}]


def openai_client():
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/openai/v1", api_key=key, max_retries=0)


def anthropic_client():
    from anthropic import Anthropic

    return Anthropic(base_url=f"{base}/anthropic", api_key=key, max_retries=0)


if case == "chat":
    answer = openai_client().chat.completions.create(model="gpt-fake", messages=messages, max_tokens=20)
    out = {"text": answer.choices[0].message.content, "usage": answer.usage.model_dump()}
elif case in ("chat-stream", "chat-stream-usage"):
    extra = {"stream_options": {"include_usage": True}} if case == "chat-stream-usage" else {}
    chunks = list(
        openai_client().chat.completions.create(model="gpt-fake", messages=messages, max_tokens=20, stream=True, **extra)
    )
    out = {
        "text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "chunks": len(chunks),
        # What the client saw: usage on any chunk, and chunks without choices (the usage chunk).
        "usage": [c.usage.model_dump() for c in chunks if c.usage is not None],
        "without_choices": sum(1 for c in chunks if not c.choices),
        # The raw fields of each chunk as the SDK parsed them: `usage` is absent unless sent.
        "fields": sorted({f for c in chunks for f in c.model_fields_set}),
    }
elif case == "responses-stream":
    text, usage = "", None
    for event in openai_client().responses.create(model="gpt-fake", input="hello", max_output_tokens=20, stream=True):
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.completed":
            usage = event.response.usage.model_dump()
    out = {"text": text, "usage": usage}
elif case == "anthropic":
    answer = anthropic_client().messages.create(model="claude-fake", max_tokens=16, messages=messages)
    out = {"text": answer.content[0].text, "usage": answer.usage.model_dump()}
elif case == "anthropic-stream":
    with anthropic_client().messages.stream(model="claude-fake", max_tokens=16, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    out = {"text": text, "usage": final.usage.model_dump()}
else:
    sys.exit(f"unknown case {case}")
print(json.dumps(out))
