// The official OpenAI Node SDK sends a request body over the gateway's limit.
// Node's fetch keeps writing the body while the answer arrives, so a gateway
// that answers early and closes resets the socket before the SDK reads the
// 413. Every attempt must raise the SDK's 413 error, none a connection error,
// and the SDK must not retry it.
//
// Started by crates/gateway/tests/connections/sdk.rs, which passes the gateway
// in TOLLGATE_BASE_URL and the body size and attempt count.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import OpenAI, { APIConnectionError, APIError } from 'openai';

function required(name) {
  const value = process.env[name];
  assert.ok(value, `${name} is not set: run this through cargo test (crates/gateway/tests/connections)`);
  return value;
}

const baseURL = required('TOLLGATE_BASE_URL');
const apiKey = required('SDK_TEST_API_KEY');
const bodyBytes = Number(required('SDK_TEST_OVERSIZED_BYTES'));
const attempts = Number(required('SDK_TEST_ATTEMPTS'));

test('a body over the limit raises the 413 error on every attempt, without retries', async () => {
  let sent = 0;
  const client = new OpenAI({
    baseURL,
    apiKey,
    // The default: the SDK retries connection errors twice, so a reset
    // connection would show up as extra requests.
    maxRetries: 2,
    timeout: 60_000,
    fetch: (url, init) => {
      sent += 1;
      return fetch(url, init);
    },
  });
  const content = 'x'.repeat(bodyBytes);
  const outcome = { attempts, status413: 0, connectionErrors: 0, other: [], requestsSent: 0 };
  for (let i = 0; i < attempts; i += 1) {
    try {
      await client.chat.completions.create({ model: 'gpt-4.1-mini', messages: [{ role: 'user', content }] });
      outcome.other.push('accepted');
    } catch (error) {
      if (error instanceof APIConnectionError) {
        outcome.connectionErrors += 1;
      } else if (error instanceof APIError && error.status === 413) {
        assert.equal(error.code, 'request_too_large');
        outcome.status413 += 1;
      } else {
        outcome.other.push(String(error));
      }
    }
  }
  outcome.requestsSent = sent;
  // Read by the Rust driver for its report.
  console.log(`OUTCOME ${JSON.stringify(outcome)}`);
  assert.deepEqual(
    { status413: outcome.status413, connectionErrors: outcome.connectionErrors, other: outcome.other },
    { status413: attempts, connectionErrors: 0, other: [] },
  );
  assert.equal(sent, attempts, 'the SDK retried a 413');
});
