//! The three API shapes the gateway serves, each to the SDK that speaks it.

use serde::{Deserialize, Serialize};

/// An API shape: how requests, answers, usage and errors are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// OpenAI's (`/v1/chat/completions`, …): the openai SDKs.
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    /// Google's Gemini API (`/v1beta/models/{model}:generateContent`, …):
    /// the google-genai SDKs.
    Gemini,
    /// Anthropic's Messages API (`/v1/messages`): the anthropic SDKs and
    /// coding agents.
    Anthropic,
}

impl Api {
    pub const ALL: [Api; 3] = [Api::OpenAi, Api::Gemini, Api::Anthropic];

    /// The name used in configuration, the ledger and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Gemini => "gemini",
            Api::Anthropic => "anthropic",
        }
    }

    pub fn parse(text: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|api| api.as_str() == text)
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
