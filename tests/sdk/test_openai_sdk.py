"""The official OpenAI Python SDK, unchanged, pointed at the gateway."""

import json
import struct

import openai
import pytest

from conftest import counted_client

MODEL = "gemini-2.5-flash"
MESSAGES = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}


def test_chat_completion(client):
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == "tok0 tok1 tok2 "
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens == 3


def test_chat_completion_with_raw_response_has_request_id(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_headers={"x-request-id": "sdk-req-7"}
    )
    assert raw.headers["x-request-id"] == "sdk-req-7"
    assert raw.parse().choices[0].finish_reason == "stop"


def test_streaming_chat(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "tok0 tok1 tok2 "


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


def test_tool_calls(client):
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL])
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris"}


def test_streamed_tool_call_deltas(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], stream=True)
    names, arguments = [], ""
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            if call.function.name:
                names.append(call.function.name)
            arguments += call.function.arguments or ""
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"location": "Paris"}


def test_structured_output(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"answer": {"type": "string"}}}},
        },
    )
    assert json.loads(completion.choices[0].message.content) == {"answer": "fake"}


def test_multimodal_and_provider_specific_fields(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4096}},
                ],
            }
        ],
        reasoning_effort="low",
        extra_body={"google": {"thinking_config": {"thinking_budget": 1024}}},
        n=2,
    )
    assert len(completion.choices) == 2


def test_embeddings_with_the_default_base64_encoding(client):
    result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [d.index for d in result.data] == [0, 1]
    # The fake's vectors are ((i * dims + d) + 1) / 100 with 8 dims.
    assert result.data[1].embedding == pytest.approx([struct.unpack("<f", struct.pack("<f", (8 + d + 1) / 100))[0] for d in range(8)])


def test_embeddings_as_floats(client):
    result = client.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="float", dimensions=4)
    assert result.data[0].embedding == pytest.approx([0.01, 0.02, 0.03, 0.04])


def test_legacy_completions(client):
    completion = client.completions.create(model="gpt-4.1", prompt="Say hello")
    assert completion.choices[0].text == "tok0 tok1 tok2 "


def test_responses_api(client):
    response = client.responses.create(model="gpt-4.1", input="Say hello")
    assert response.output_text == "tok0 tok1 tok2 "


def test_responses_api_streaming(client):
    stream = client.responses.create(model="gpt-4.1", input="Say hello", stream=True)
    deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "tok0 tok1 tok2 "


def test_model_listing_and_retrieval(client):
    ids = [m.id for m in client.models.list()]
    assert "gemini-2.5-flash-lite" in ids
    assert client.models.retrieve("gemini-2.5-pro").id == "gemini-2.5-pro"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def fault(name):
    return {"x-fake-fault": name}


def test_upstream_rate_limit_raises_rate_limit_error(client):
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=fault("status:429:comet"))
    assert caught.value.status_code == 429


def test_upstream_refusing_the_gateways_key_is_a_502_not_the_tenants_auth_error(base_url, api_key, counter):
    # The upstream's 401 is about the gateway's own key: the tenant's key is
    # fine, so the SDK must not raise AuthenticationError, and a retry
    # cannot help a configuration fault.
    retrying = counted_client(base_url, api_key, counter, max_retries=2)
    for status in ("401", "403"):
        counter.count = 0
        with pytest.raises(openai.InternalServerError) as caught:
            retrying.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=fault(f"status:{status}"))
        assert caught.value.status_code == 502
        assert caught.value.code == "upstream_auth_failed"
        assert counter.count == 1, "x-should-retry: false"


def test_upstream_html_redirect_raises_a_502_api_status_error(client):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=fault("html301"))
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_bad_response"


def test_upstream_timeout_raises_a_504(client):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers=fault("stall"))
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"


def test_unknown_route_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.get("/no/such/route", cast_to=object)
    assert caught.value.code == "unknown_url"


def test_wrong_method_raises_a_405(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.get("/chat/completions", cast_to=object)
    assert caught.value.status_code == 405
    assert caught.value.code == "method_not_allowed"


def test_oversized_body_raises_a_413_without_retries(base_url, api_key, counter):
    client = counted_client(base_url, api_key, counter, max_retries=2)
    # The gateway under test has a 64 KiB limit.
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 100_000}])
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"
    assert counter.count == 1


def test_mid_stream_failure_raises_api_error(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers=fault("drop-after:2")
    )
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert "upstream" in str(caught.value)


def test_sdk_retries_upstream_5xx(base_url, api_key, counter):
    client = counted_client(base_url, api_key, counter, max_retries=2)
    with pytest.raises(openai.InternalServerError):
        client.with_options(timeout=10).chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers=fault("status:503")
        )
    assert counter.count == 3


def test_an_unknown_key_raises_authentication_error(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="tg-aaaaaaaaaaaa-" + "b" * 40, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.code == "invalid_api_key"


def test_a_revoked_key_raises_authentication_error_saying_so(base_url, revoked_key):
    client = openai.OpenAI(base_url=base_url, api_key=revoked_key, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.code == "api_key_revoked"
    assert "revoked" in caught.value.message


def test_a_model_the_key_may_not_use_raises_permission_denied(base_url, restricted_key):
    client = openai.OpenAI(base_url=base_url, api_key=restricted_key, max_retries=0)
    assert client.chat.completions.create(model="gemini-2.5-flash-lite", messages=MESSAGES).choices
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert caught.value.code == "model_not_allowed"
    ids = [m.id for m in client.models.list()]
    assert ids and all(i.startswith("gemini-") for i in ids)


def test_an_exhausted_budget_raises_rate_limit_error_without_retries(base_url, broke_key, counter):
    client = counted_client(base_url, broke_key, counter, max_retries=2)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.code == "insufficient_quota"
    assert counter.count == 1, "x-should-retry: false stops the SDK from retrying"


def test_throttling_raises_rate_limit_error_after_the_sdk_retries(base_url, throttled_key, counter):
    holder = openai.OpenAI(base_url=base_url, api_key=throttled_key, max_retries=0)
    stream = holder.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-chunks": "30", "x-fake-chunk-interval-ms": "200"},
    )
    next(iter(stream))  # the tenant's one in-flight slot is now taken
    client = counted_client(base_url, throttled_key, counter, max_retries=2)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.code == "rate_limit_exceeded"
    assert counter.count == 3, "throttling is worth retrying: the SDK tried three times"
    stream.close()


def test_a_route_falls_back_when_its_primary_fails(client):
    raw = client.chat.completions.with_raw_response.create(model="chat-fallback", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.model == "gemini-2.5-pro"
    assert raw.headers["x-tollgate-upstream"] == "default"
    assert raw.headers["x-tollgate-attempts"] == "2"


def test_a_routed_stream_falls_back_before_its_first_event(client):
    stream = client.chat.completions.create(model="chat-fallback", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text


def test_a_route_never_retries_a_bad_request(base_url, api_key, counter):
    retrying = counted_client(base_url, api_key, counter, max_retries=2)
    with pytest.raises(openai.BadRequestError) as caught:
        retrying.chat.completions.create(model="chat-strict", messages=MESSAGES)
    assert counter.count == 1, "a 400 is final for the SDK"
    assert caught.value.response.headers["x-tollgate-attempts"] == "1", "and for the route: no fallback"
