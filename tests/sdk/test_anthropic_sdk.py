"""Anthropic's SDK, unchanged, pointed at the gateway's Messages API."""

import anthropic
import pytest

from conftest import RequestCounter

MODEL = "claude-sonnet-4"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def claude_client(root: str, key: str, counter: RequestCounter | None = None, max_retries: int = 0):
    hooks = {"request": [counter]} if counter else {}
    http_client = anthropic.DefaultHttpxClient(event_hooks=hooks, timeout=30)
    return anthropic.Anthropic(base_url=root, api_key=key, http_client=http_client, max_retries=max_retries)


def fault(name: str) -> dict:
    return {"x-fake-fault": name}


@pytest.fixture
def claude(gateway_root: str, api_key: str, counter: RequestCounter):
    return claude_client(gateway_root, api_key, counter)


def test_create_a_message(claude):
    message = claude.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert message.content[0].text == "tok0 tok1 tok2 "
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 3


def test_cache_reads_writes_and_thinking_reach_the_sdk(claude):
    message = claude.messages.create(
        model=MODEL,
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=MESSAGES,
        extra_headers={"x-fake-cached-tokens": "3", "x-fake-cache-write-tokens": "4", "x-fake-reasoning-tokens": "9"},
    )
    assert message.content[0].type == "thinking"
    assert message.usage.cache_read_input_tokens == 3
    assert message.usage.cache_creation_input_tokens == 4
    assert message.usage.output_tokens == 12


def test_streamed_message(claude):
    with claude.messages.stream(
        model=MODEL, max_tokens=100, messages=MESSAGES, extra_headers={"x-fake-chunks": "5"}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert final.usage.output_tokens == 5
    assert final.stop_reason == "end_turn"


def test_tool_use(claude):
    tool = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}
    message = claude.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES, tools=[tool])
    assert message.stop_reason == "tool_use"
    assert message.content[0].name == "get_weather"
    assert message.content[0].input == {"location": "Paris"}


def test_count_tokens(claude):
    assert claude.messages.count_tokens(model=MODEL, messages=MESSAGES).input_tokens > 0


def test_an_unknown_key_raises_authentication_error(gateway_root):
    with pytest.raises(anthropic.AuthenticationError):
        claude_client(gateway_root, "tg-aaaaaaaaaaaa-" + "b" * 40).messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES
        )


def test_a_revoked_key_raises_authentication_error_saying_so(gateway_root, revoked_key):
    with pytest.raises(anthropic.AuthenticationError) as caught:
        claude_client(gateway_root, revoked_key).messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert "revoked" in caught.value.message


def test_a_model_the_key_may_not_use_raises_permission_denied(gateway_root, restricted_key):
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        claude_client(gateway_root, restricted_key).messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert caught.value.body["error"]["type"] == "permission_error"


def test_a_bad_request_raises_bad_request_error(claude):
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="", max_tokens=10, messages=MESSAGES)


def test_an_exhausted_budget_raises_rate_limit_error_without_retries(gateway_root, broke_key, counter):
    client = claude_client(gateway_root, broke_key, counter, max_retries=2)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert "budget" in caught.value.message
    assert counter.count == 1, "x-should-retry: false stops the SDK from retrying"


def test_throttling_raises_rate_limit_error_after_the_sdk_retries(gateway_root, throttled_key, counter):
    holder = claude_client(gateway_root, throttled_key)
    with holder.messages.stream(
        model=MODEL,
        max_tokens=100,
        messages=MESSAGES,
        extra_headers={"x-fake-chunks": "30", "x-fake-chunk-interval-ms": "200"},
    ) as stream:
        next(iter(stream))  # the tenant's one in-flight slot is now taken
        client = claude_client(gateway_root, throttled_key, counter, max_retries=2)
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
        assert caught.value.response.headers.get("retry-after")
        assert counter.count == 3, "throttling is worth retrying: the SDK tried three times"


def test_upstream_errors_keep_their_type_and_the_sdk_retries_server_errors(gateway_root, api_key, counter):
    client = claude_client(gateway_root, api_key, counter, max_retries=2)
    with pytest.raises(anthropic.OverloadedError):
        client.with_options(timeout=10).messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers=fault("status:529")
        )
    assert counter.count == 3
    with pytest.raises(anthropic.RateLimitError):
        claude_client(gateway_root, api_key).messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers=fault("status:429")
        )


def test_an_upstream_timeout_raises_internal_server_error_504(claude):
    with pytest.raises(anthropic.InternalServerError) as caught:
        claude.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers=fault("stall"))
    assert caught.value.status_code == 504


def test_a_stream_failing_midway_raises(claude):
    with pytest.raises(anthropic.APIError) as caught:
        with claude.messages.stream(
            model=MODEL, max_tokens=100, messages=MESSAGES, extra_headers={"x-fake-chunks": "6", **fault("drop-after:3")}
        ) as stream:
            for _ in stream:
                pass
    assert "upstream" in str(caught.value)
