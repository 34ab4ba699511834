"""An agent using boto3's stock bedrock-runtime client against keyward, changed only in its
endpoint_url and its keys: the access key id is the agent key, the secret key is a dummy.

    python3 bedrock_agent.py MODE ENDPOINT_URL AGENT_KEY [FAKE_URL]

MODE is `all` (invoke_model, converse, invoke_model_with_response_stream, converse_stream),
`invoke` (invoke_model once) or `echo` (invoke_model of the fake's "echo-keys" model). For the
streaming calls FAKE_URL is the fake Bedrock itself: after the first event arrives the agent
tells the fake to send the rest (POST /__release), so a stream that keyward held back would
never release. Prints one line of JSON with what the calls returned.
"""

import json
import sys
import urllib.request

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

MODE, ENDPOINT, AGENT_KEY = sys.argv[1], sys.argv[2], sys.argv[3]
FAKE = sys.argv[4] if len(sys.argv) > 4 else None
MODEL = "anthropic.claude-3-haiku-20240307-v1:0"

client = boto3.client(
    "bedrock-runtime",
    region_name="us-east-1",
    endpoint_url=ENDPOINT,
    aws_access_key_id=AGENT_KEY,
    aws_secret_access_key="dummy-agent-secret-not-used",
    config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=30, connect_timeout=5),
)


def release():
    urllib.request.urlopen(urllib.request.Request(FAKE + "/__release", data=b"", method="POST"), timeout=5).read()


def invoke(model=MODEL):
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello bedrock"}]}
    answer = client.invoke_model(modelId=model, body=json.dumps(body), contentType="application/json",
                                 accept="application/json")
    return json.loads(answer["body"].read())["content"][0]["text"]


def converse():
    answer = client.converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hello converse"}]}])
    return answer["output"]["message"]["content"][0]["text"]


def invoke_stream():
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
            "messages": [{"role": "user", "content": "stream please"}]}
    answer = client.invoke_model_with_response_stream(modelId=MODEL, body=json.dumps(body),
                                                      contentType="application/json")
    texts, early = [], None
    for i, event in enumerate(answer["body"]):
        data = json.loads(event["chunk"]["bytes"])
        if i == 0:
            release()
        if data["type"] == "content_block_delta":
            texts.append(data["delta"]["text"])
        elif data["type"] == "message_stop":
            early = data["released_early"]
    return {"text": "".join(texts), "released_early": early, "content_type": answer["contentType"]}


def converse_stream():
    answer = client.converse_stream(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    texts, kinds, early = [], [], None
    for i, event in enumerate(answer["stream"]):
        if i == 0:
            release()
        kind = next(iter(event))
        kinds.append(kind)
        if kind == "contentBlockDelta":
            texts.append(event[kind]["delta"]["text"])
        if kind == "metadata":
            early = event[kind]["metrics"]["latencyMs"] == 1
    return {"text": "".join(texts), "events": kinds, "released_early": early}


if MODE == "all":
    out = {"invoke": invoke(), "converse": converse(), "invoke_stream": invoke_stream(),
           "converse_stream": converse_stream()}
elif MODE == "invoke":
    out = {"invoke": invoke()}
elif MODE == "echo":
    out = {"echo": invoke("echo-keys")}
elif MODE == "refused":
    # A call keyward refuses: boto3 raises with the status and keyward's JSON error.
    try:
        invoke()
        out = {"status": 200}
    except ClientError as error:
        out = {"status": error.response["ResponseMetadata"]["HTTPStatusCode"],
               "body": str(error.response.get("Error"))}
else:
    raise SystemExit("unknown mode " + MODE)
print(json.dumps(out))
