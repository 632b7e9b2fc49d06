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
    url = os.environ.get("TOLLGATE_BASE_URL")
    if not url:
        pytest.fail("TOLLGATE_BASE_URL is not set: run these tests through scripts/test")
    return url


class RequestCounter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, request) -> None:
        self.count += 1


@pytest.fixture
def counter() -> RequestCounter:
    return RequestCounter()


@pytest.fixture
def client(base_url: str, counter: RequestCounter) -> openai.OpenAI:
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [counter]}, timeout=30)
    return openai.OpenAI(
        base_url=base_url, api_key="tg-sdk-test-key", http_client=http_client, max_retries=0
    )
