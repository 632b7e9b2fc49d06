"""A burst of official OpenAI SDK clients against a small hard budget.

Driven by the Rust test `budget_burst` (crates/cli/tests/binary), which
starts real gateway processes and passes their base URLs and a tenant key.
Each client sends one request and retries exactly as the SDK does by
default. Prints one JSON line: what every client ended with, and every
response the clients saw (retries included).
"""

import asyncio
import json
import os
from collections import Counter

import httpx2 as httpx
import openai


async def main() -> None:
    base_urls = os.environ["BURST_BASE_URLS"].split(",")
    api_key = os.environ["BURST_API_KEY"]
    clients = int(os.environ.get("BURST_CLIENTS", "300"))
    responses: Counter = Counter()

    async def seen(response: httpx.Response) -> None:
        retry = response.headers.get("x-should-retry", "-")
        responses[f"{response.status_code}:{retry}"] += 1

    async def one(i: int) -> str:
        http = httpx.AsyncClient(event_hooks={"response": [seen]})
        client = openai.AsyncOpenAI(
            base_url=base_urls[i % len(base_urls)], api_key=api_key, http_client=http, timeout=60
        )
        try:
            await client.chat.completions.create(
                model="gemini-2.5-pro",
                max_tokens=100,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-fake-latency-ms": "20"},
            )
            return "ok"
        except openai.RateLimitError as e:
            return f"429:{e.code}"
        except openai.APIStatusError as e:
            return f"{e.status_code}:{e.code}"
        except openai.APIConnectionError:
            return "connection_error"
        finally:
            await client.close()

    outcomes = Counter(await asyncio.gather(*(one(i) for i in range(clients))))
    print(json.dumps({"outcomes": outcomes, "responses": responses}))


asyncio.run(main())
