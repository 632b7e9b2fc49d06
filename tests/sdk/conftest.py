"""Fixtures for running the official OpenAI SDK against a running gateway.

The gateway and the fake upstream are started by the Rust test
`sdk::the_official_python_sdk_works_through_the_gateway`, which passes the
gateway's base URL in TOLLGATE_BASE_URL.
"""

import os

import openai
import pytest


@pytest.fixture(scope="session")
def base_url() -> str:
    return _env("TOLLGATE_BASE_URL")


class RequestCounter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, request) -> None:
        self.count += 1


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these tests through scripts/test")
    return value


@pytest.fixture(scope="session")
def gateway_root(base_url: str) -> str:
    """The gateway's root, where the Gemini and Anthropic SDKs are pointed."""
    return base_url.removesuffix("/v1")


@pytest.fixture(scope="session")
def api_key() -> str:
    return _env("SDK_TEST_API_KEY")


@pytest.fixture(scope="session")
def revoked_key() -> str:
    return _env("SDK_TEST_REVOKED_KEY")


@pytest.fixture(scope="session")
def restricted_key() -> str:
    """A key allowed only `gemini-*` models."""
    return _env("SDK_TEST_RESTRICTED_KEY")


@pytest.fixture(scope="session")
def broke_key() -> str:
    """A key whose tenant's hard budget is spent."""
    return _env("SDK_TEST_BROKE_KEY")


@pytest.fixture(scope="session")
def throttled_key() -> str:
    """A key whose tenant may have one request in flight."""
    return _env("SDK_TEST_THROTTLED_KEY")


@pytest.fixture
def counter() -> RequestCounter:
    return RequestCounter()


def counted_client(base_url: str, api_key: str, counter: RequestCounter, max_retries: int = 0) -> openai.OpenAI:
    """An SDK client whose HTTP requests (retries included) are counted."""
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [counter]}, timeout=30)
    return openai.OpenAI(base_url=base_url, api_key=api_key, http_client=http_client, max_retries=max_retries)


@pytest.fixture
def client(base_url: str, api_key: str, counter: RequestCounter) -> openai.OpenAI:
    return counted_client(base_url, api_key, counter)
