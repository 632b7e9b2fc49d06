//! The wire formats the gateway speaks, as far as it needs to understand
//! them: OpenAI's, and the Gemini and Anthropic APIs in their own shapes
//! ([`gemini`], [`anthropic`]).
//!
//! Everything here is pure data and parsing: no I/O, no async, no allocation
//! beyond what the caller hands in. The gateway reads as little of a request or
//! response as it must and forwards the original bytes otherwise.

pub mod anthropic;
pub mod api;
pub mod error;
pub mod gemini;
pub mod request;
pub mod rewrite;
pub mod sse;
pub mod stream_end;
pub mod stream_options;
pub mod usage;

pub use api::Api;
pub use error::{ErrorBody, ErrorEnvelope};
pub use request::{RequestPeek, RequestPeekError};
pub use sse::{SseEvent, SseScanner, SseScannerError};
pub use stream_end::EndMarker;
pub use usage::{Usage, UsageField, find_model, find_usage};
