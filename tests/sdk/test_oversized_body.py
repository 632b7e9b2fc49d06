"""A request body over the gateway's limit, sent by the official Python SDK.

Run by `connections::sdk::the_python_sdk_reads_the_413_for_a_body_over_the_limit`
against a gateway with the default body limit (the main SDK suite ignores this
file: its gateway has a small limit). Every attempt must raise the SDK's 413
error, none a connection error, and the SDK must not retry it.
"""

import json
import os

import openai
import pytest

from conftest import counted_client


@pytest.fixture(scope="module")
def oversized() -> tuple[int, int]:
    size = os.environ.get("SDK_TEST_OVERSIZED_BYTES")
    attempts = os.environ.get("SDK_TEST_ATTEMPTS")
    if not size or not attempts:
        pytest.fail("SDK_TEST_OVERSIZED_BYTES and SDK_TEST_ATTEMPTS are not set: run this through cargo test")
    return int(size), int(attempts)


def test_a_body_over_the_limit_is_a_413_on_every_attempt(base_url, api_key, counter, oversized):
    size, attempts = oversized
    # The default retry count: a reset connection would be retried and counted.
    client = counted_client(base_url, api_key, counter, max_retries=2)
    content = "x" * size
    outcome = {"attempts": attempts, "status413": 0, "connection_errors": 0, "other": []}
    for _ in range(attempts):
        try:
            client.chat.completions.create(model="gpt-4.1-mini", messages=[{"role": "user", "content": content}])
            outcome["other"].append("accepted")
        except openai.APIConnectionError:
            outcome["connection_errors"] += 1
        except openai.APIStatusError as e:
            if e.status_code == 413:
                assert e.code == "request_too_large"
                outcome["status413"] += 1
            else:
                outcome["other"].append(f"{e.status_code}")
    outcome["requests_sent"] = counter.count
    # Read by the Rust driver for its report.
    print(f"OUTCOME {json.dumps(outcome)}")
    assert (outcome["status413"], outcome["connection_errors"], outcome["other"]) == (attempts, 0, [])
    assert counter.count == attempts, "the SDK retried a 413"
