"""The official Python clients, unchanged but for their base URL and key, against keyward.

Usage: clients.py CLIENT KEYWARD_URL AGENT_KEY
CLIENT is one of: openai-chat, openai-stream, openai-responses, azure-openai, anthropic, anthropic-stream,
anthropic-x-api-key, anthropic-x-api-key-stream, github.
Prints one JSON line with what the client got back; any error exits non-zero.
"""

import json
import sys

client, base, key = sys.argv[1], sys.argv[2], sys.argv[3]
messages = [{"role": "user", "content": "hello"}]


def openai_client():
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/openai/v1", api_key=key, max_retries=0)


def anthropic_client(header: bool):
    from anthropic import Anthropic

    # The 2.x SDK sends api_key as `Authorization: Bearer`; `default_headers` adds `x-api-key`
    # as well, the workaround users reach for, so the key arrives in two accepted places.
    extra = {"x-api-key": key} if header else None
    return Anthropic(base_url=f"{base}/anthropic", api_key=key, default_headers=extra, max_retries=0)


def anthropic_text(anthropic, stream: bool) -> str:
    if stream:
        with anthropic.messages.stream(model="claude-fake", max_tokens=16, messages=messages) as events:
            return "".join(events.text_stream)
    answer = anthropic.messages.create(model="claude-fake", max_tokens=16, messages=messages)
    return answer.content[0].text


if client == "openai-chat":
    answer = openai_client().chat.completions.create(model="gpt-fake", messages=messages)
    out = {"text": answer.choices[0].message.content, "tokens": answer.usage.total_tokens}
elif client == "openai-stream":
    chunks = openai_client().chat.completions.create(model="gpt-fake", messages=messages, stream=True)
    out = {"text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)}
elif client == "openai-responses":
    answer = openai_client().responses.create(model="gpt-fake", input="hello")
    out = {"text": answer.output_text}
elif client == "azure-openai":
    from openai import AzureOpenAI

    # Sends the key as `api-key`, to /openai/deployments/{model}/chat/completions.
    azure = AzureOpenAI(azure_endpoint=f"{base}/azure-openai", api_key=key, api_version="2024-10-21", max_retries=0)
    answer = azure.chat.completions.create(model="gpt", messages=messages)
    out = {"text": answer.choices[0].message.content}
elif client in ("anthropic", "anthropic-stream", "anthropic-x-api-key", "anthropic-x-api-key-stream"):
    out = {"text": anthropic_text(anthropic_client("x-api-key" in client), client.endswith("stream"))}
elif client == "github":
    from github import Auth, Github

    gh = Github(base_url=f"{base}/github", auth=Auth.Token(key), retry=None)
    out = {"login": gh.get_user().login}
else:
    sys.exit(f"unknown client {client}")
print(json.dumps(out))
