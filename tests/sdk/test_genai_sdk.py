"""Google's google-genai SDK, unchanged, pointed at the gateway's Gemini API."""

import json
import urllib.error
import urllib.request

import pytest
from google import genai
from google.genai import errors, types

from conftest import RequestCounter

MODEL = "gemini-2.5-flash"


def gemini_client(root: str, key: str, counter: RequestCounter | None = None, **options) -> genai.Client:
    """A client of the gateway's Gemini API whose HTTP requests are counted."""
    client_args = {"event_hooks": {"request": [counter]}} if counter else None
    return genai.Client(
        api_key=key,
        http_options=types.HttpOptions(base_url=root, client_args=client_args, timeout=30_000, **options),
    )


def steer(**headers: str) -> types.GenerateContentConfig:
    """Per-request `x-fake-*` directives for the fake upstream."""
    return types.GenerateContentConfig(
        http_options=types.HttpOptions(headers={f"x-fake-{k.replace('_', '-')}": v for k, v in headers.items()})
    )


@pytest.fixture
def gemini(gateway_root: str, api_key: str, counter: RequestCounter) -> genai.Client:
    return gemini_client(gateway_root, api_key, counter)


def test_generate_content(gemini):
    answer = gemini.models.generate_content(model=MODEL, contents="Say hello")
    assert answer.text == "tok0 tok1 tok2 "
    assert answer.candidates[0].finish_reason == types.FinishReason.STOP
    assert answer.usage_metadata.prompt_token_count > 0
    assert answer.usage_metadata.candidates_token_count == 3
    assert answer.model_version == MODEL


def test_generate_content_on_v1beta(gateway_root, api_key):
    client = gemini_client(gateway_root, api_key, api_version="v1beta")
    assert client.models.generate_content(model=MODEL, contents="Say hello").text == "tok0 tok1 tok2 "


def test_thinking_and_cached_tokens_reach_the_sdk(gemini):
    answer = gemini.models.generate_content(
        model=MODEL, contents="Think first", config=steer(reasoning_tokens="12", cached_tokens="2")
    )
    assert answer.usage_metadata.thoughts_token_count == 12
    assert answer.usage_metadata.cached_content_token_count == 2


def test_streamed_generation(gemini):
    chunks = list(gemini.models.generate_content_stream(model=MODEL, contents="Count", config=steer(chunks="5")))
    assert "".join(c.text for c in chunks) == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert chunks[-1].usage_metadata.candidates_token_count == 5


def test_function_calling(gemini):
    weather = types.FunctionDeclaration(
        name="get_weather",
        description="Weather for a city",
        parameters=types.Schema(type="OBJECT", properties={"location": types.Schema(type="STRING")}),
    )
    answer = gemini.models.generate_content(
        model=MODEL,
        contents="Weather in Paris?",
        config=types.GenerateContentConfig(
            tools=[types.Tool(function_declarations=[weather])],
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        ),
    )
    assert answer.function_calls[0].name == "get_weather"
    assert answer.function_calls[0].args == {"location": "Paris"}


def test_count_tokens(gemini):
    counted = gemini.models.count_tokens(model=MODEL, contents="How many tokens is this?")
    assert counted.total_tokens > 0


def test_embeddings(gemini):
    one = gemini.models.embed_content(model="text-embedding-004", contents="a")
    assert len(one.embeddings) == 1 and len(one.embeddings[0].values) == 8
    many = gemini.models.embed_content(model="text-embedding-004", contents=["a", "b", "c"])
    assert len(many.embeddings) == 3


def test_an_unknown_key_raises_a_client_error_401(gateway_root):
    client = gemini_client(gateway_root, "tg-aaaaaaaaaaaa-" + "b" * 40)
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model=MODEL, contents="x")
    assert caught.value.code == 401
    assert caught.value.status == "UNAUTHENTICATED"


def test_a_revoked_key_says_so(gateway_root, revoked_key):
    client = gemini_client(gateway_root, revoked_key)
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model=MODEL, contents="x")
    assert caught.value.code == 401
    assert "revoked" in caught.value.message


def test_a_model_the_key_may_not_use_is_permission_denied(gateway_root, restricted_key):
    client = gemini_client(gateway_root, restricted_key)
    assert client.models.generate_content(model="gemini-2.5-flash-lite", contents="x").text
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model="gpt-4.1", contents="x")
    assert (caught.value.code, caught.value.status) == (403, "PERMISSION_DENIED")


def test_malformed_requests_are_invalid_argument(gateway_root, api_key):
    request = urllib.request.Request(
        f"{gateway_root}/v1beta/models/{MODEL}:generateContent",
        data=b"{not json",
        headers={"x-goog-api-key": api_key, "content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert json.load(caught.value)["error"]["status"] == "INVALID_ARGUMENT"


def test_an_exhausted_budget_is_resource_exhausted(gateway_root, broke_key, counter):
    client = gemini_client(gateway_root, broke_key, counter)
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model=MODEL, contents="x")
    assert (caught.value.code, caught.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert "budget" in caught.value.message
    assert counter.count == 1


def test_the_sdks_retries_reach_the_gateway_and_each_is_counted(gateway_root, api_key, counter):
    retry = types.HttpRetryOptions(attempts=3, initial_delay=0.01, max_delay=0.05)
    client = gemini_client(gateway_root, api_key, counter, retry_options=retry)
    with pytest.raises(errors.ServerError) as caught:
        client.models.generate_content(model=MODEL, contents="x", config=steer(fault="status:503"))
    assert (caught.value.code, caught.value.status) == (503, "UNAVAILABLE")
    assert counter.count == 3


def test_an_upstream_rate_limit_is_a_client_error_429(gemini):
    with pytest.raises(errors.ClientError) as caught:
        gemini.models.generate_content(model=MODEL, contents="x", config=steer(fault="status:429"))
    assert (caught.value.code, caught.value.status) == (429, "RESOURCE_EXHAUSTED")


def test_an_upstream_timeout_is_a_server_error_504(gemini):
    with pytest.raises(errors.ServerError) as caught:
        gemini.models.generate_content(model=MODEL, contents="x", config=steer(fault="stall"))
    assert caught.value.code == 504


def test_a_stream_failing_midway_raises(gemini):
    with pytest.raises(errors.APIError) as caught:
        for _ in gemini.models.generate_content_stream(
            model=MODEL, contents="x", config=steer(chunks="6", fault="drop-after:2")
        ):
            pass
    assert "upstream" in str(caught.value)
