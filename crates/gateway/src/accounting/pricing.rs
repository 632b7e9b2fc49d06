//! Model prices and the one rounding rule that turns tokens into money.
//!
//! Prices come from a TOML file (`config/pricing.toml` is built in as the
//! default) in USD per million tokens and are held as integer micro-dollars
//! per million tokens, so cost arithmetic never touches a float:
//!
//! ```text
//! cost_micros = round_half_up((uncached·input + cached·cached_input
//!                               + cache_write·cache_write_input + output·output) / 1_000_000)
//!             + per_request_micros
//! ```
//!
//! A price given with more than six decimals (finer than a micro-dollar per
//! million tokens) is rejected rather than silently rounded.

use std::collections::HashMap;

use crate::fast_hash::{FastHash, FastMap};
use std::path::Path;

use serde::Deserialize;
use tollgate_openai::Usage;

/// The built-in price list.
pub const DEFAULT_PRICING: &str = include_str!("../../../../config/pricing.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tier {
    input: i64,
    cached_input: i64,
    /// Prompt tokens written to the provider's cache (Anthropic's cache
    /// writes); the input price unless the file gives one.
    cache_write_input: i64,
    output: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrice {
    base: Tier,
    long_context: Option<(u64, Tier)>,
    per_request: i64,
}

#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    models: FastMap<String, ModelPrice>,
    /// The price of models the table does not name, if the operator set one.
    default: Option<ModelPrice>,
    /// Which models take a thinking budget where (first match wins).
    families: Vec<(crate::auth::models::ModelRules, ThinkingPlace)>,
}

/// Where a model family reads its thinking budget in an OpenAI-shaped
/// request, so a tenant's default budget can be set there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThinkingPlace {
    /// `google.thinking_config.thinking_budget` (Gemini through an
    /// OpenAI-compatible layer).
    Google,
    /// The family has no thinking budget to default.
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFamily {
    /// Model names or globs (`gemini-*`).
    models: Vec<String>,
    thinking: ThinkingPlace,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTier {
    input: f64,
    cached_input: Option<f64>,
    cache_write_input: Option<f64>,
    output: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    input: f64,
    cached_input: Option<f64>,
    cache_write_input: Option<f64>,
    output: f64,
    #[serde(default)]
    per_request: f64,
    long_context: Option<FileLongContext>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLongContext {
    threshold_tokens: u64,
    #[serde(flatten)]
    tier: FileTier,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PricingFile {
    #[serde(default)]
    models: HashMap<String, FileModel>,
    /// Applies to every model not listed (see `config/pricing.toml`).
    default: Option<FileModel>,
    #[serde(default)]
    families: Vec<FileFamily>,
}

#[derive(Debug, thiserror::Error)]
#[error("pricing: {0}")]
pub struct PricingError(String);

/// USD (as written in the file) to integer micro-dollars, exactly.
fn to_micros(model: &str, field: &str, usd: f64) -> Result<i64, PricingError> {
    if !usd.is_finite() || usd < 0.0 {
        return Err(PricingError(format!("models.\"{model}\".{field} must be a non-negative number")));
    }
    let micros = (usd * 1_000_000.0).round();
    if (micros - usd * 1_000_000.0).abs() > 1e-6 * micros.max(1.0) {
        return Err(PricingError(format!("models.\"{model}\".{field} has more than six decimals")));
    }
    if micros > i64::MAX as f64 / 1e9 {
        return Err(PricingError(format!("models.\"{model}\".{field} is too large")));
    }
    Ok(micros as i64)
}

/// A tier's prices as the file gives them (USD per million tokens).
struct TierPrices {
    input: f64,
    cached: Option<f64>,
    cache_write: Option<f64>,
    output: f64,
}

fn tier(model: &str, prefix: &str, prices: TierPrices) -> Result<Tier, PricingError> {
    let input = to_micros(model, &format!("{prefix}input"), prices.input)?;
    let optional = |field: &str, usd: Option<f64>| -> Result<i64, PricingError> {
        Ok(usd.map(|c| to_micros(model, &format!("{prefix}{field}"), c)).transpose()?.unwrap_or(input))
    };
    Ok(Tier {
        input,
        cached_input: optional("cached_input", prices.cached)?,
        cache_write_input: optional("cache_write_input", prices.cache_write)?,
        output: to_micros(model, &format!("{prefix}output"), prices.output)?,
    })
}

fn model_price(name: &str, m: FileModel) -> Result<ModelPrice, PricingError> {
    let base = tier(
        name,
        "",
        TierPrices { input: m.input, cached: m.cached_input, cache_write: m.cache_write_input, output: m.output },
    )?;
    let long_context = match m.long_context {
        None => None,
        Some(lc) => Some((
            lc.threshold_tokens,
            tier(
                name,
                "long_context.",
                TierPrices {
                    input: lc.tier.input,
                    cached: lc.tier.cached_input,
                    cache_write: lc.tier.cache_write_input,
                    output: lc.tier.output,
                },
            )?,
        )),
    };
    let per_request = to_micros(name, "per_request", m.per_request)?;
    Ok(ModelPrice { base, long_context, per_request })
}

impl PriceTable {
    pub fn parse(text: &str) -> Result<Self, PricingError> {
        let file: PricingFile = toml::from_str(text).map_err(|e| PricingError(e.to_string()))?;
        let mut models = FastMap::with_capacity_and_hasher(file.models.len(), FastHash::default());
        for (name, m) in file.models {
            let price = model_price(&name, m)?;
            models.insert(name, price);
        }
        let default = file.default.map(|m| model_price("(default)", m)).transpose()?;
        let families =
            file.families.into_iter().map(|f| (crate::auth::models::ModelRules::new(&f.models), f.thinking)).collect();
        Ok(Self { models, default, families })
    }

    pub fn load(path: Option<&Path>) -> Result<Self, PricingError> {
        match path {
            None => Self::parse(DEFAULT_PRICING),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| PricingError(format!("{}: {e}", p.display())))?;
                Self::parse(&text)
            }
        }
    }

    /// The price of `model`: an exact match, else the name after a
    /// provider prefix (`google/gemini-2.5-pro` → `gemini-2.5-pro`).
    pub fn price(&self, model: &str) -> Option<&ModelPrice> {
        self.models.get(model).or_else(|| model.rsplit_once('/').and_then(|(_, bare)| self.models.get(bare)))
    }

    pub fn contains(&self, model: &str) -> bool {
        self.price(model).is_some()
    }

    /// Where `model` takes its thinking budget, from the first family whose
    /// names match; `None` when no family names it.
    pub fn thinking_place(&self, model: &str) -> Option<ThinkingPlace> {
        self.families.iter().find(|(rules, _)| !rules.is_unrestricted() && rules.allows(model)).map(|(_, t)| *t)
    }

    /// The price of models the table does not name, if one is configured.
    pub fn default_price(&self) -> Option<&ModelPrice> {
        self.default.as_ref()
    }

    /// The price `model` is billed at: its own, else the default.
    pub fn price_or_default(&self, model: &str) -> Option<&ModelPrice> {
        self.price(model).or(self.default.as_ref())
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

impl ModelPrice {
    /// The cost of `usage` in micro-dollars, by the rule in the module docs.
    pub fn cost_micros(&self, usage: &Usage) -> i64 {
        let tier = match self.long_context {
            Some((threshold, tier)) if usage.prompt > threshold => tier,
            _ => self.base,
        };
        let cached = usage.cached.min(usage.prompt);
        let written = usage.cache_write.min(usage.prompt - cached);
        let uncached = usage.prompt - cached - written;
        let scaled = i128::from(uncached) * i128::from(tier.input)
            + i128::from(cached) * i128::from(tier.cached_input)
            + i128::from(written) * i128::from(tier.cache_write_input)
            + i128::from(usage.billed_output()) * i128::from(tier.output);
        let micros = (scaled + 500_000) / 1_000_000;
        i64::try_from(micros).unwrap_or(i64::MAX).saturating_add(self.per_request)
    }

    /// The most a request can cost with `prompt` tokens in and at most
    /// `max_output` out (for budget reservations).
    /// (Every prompt token at the dearer of the input and cache-write prices.)
    pub fn worst_case_micros(&self, prompt: u64, max_output: u64) -> i64 {
        let total = prompt.saturating_add(max_output);
        let all_input = Usage { prompt, completion: max_output, total, ..Usage::default() };
        let all_written = Usage { cache_write: prompt, ..all_input };
        self.cost_micros(&all_input).max(self.cost_micros(&all_written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, completion: u64, cached: u64) -> Usage {
        Usage { prompt, completion, total: prompt + completion, reasoning: 0, cached, cache_write: 0 }
    }

    #[test]
    fn a_default_price_covers_models_the_table_does_not_name() {
        let table = PriceTable::parse("[models.a]\ninput = 1.0\noutput = 2.0\n[default]\ninput = 5.0\noutput = 20.0\n")
            .unwrap();
        let one_of_each = usage(1_000_000, 1_000_000, 0);
        assert_eq!(table.price_or_default("a").unwrap().cost_micros(&one_of_each), 3_000_000);
        assert_eq!(table.price_or_default("unknown").unwrap().cost_micros(&one_of_each), 25_000_000);
        assert!(!table.contains("unknown"), "the default does not make a model known");
        assert!(PriceTable::parse("[models.a]\ninput = 1.0\noutput = 2.0\n").unwrap().price_or_default("b").is_none());
    }

    #[test]
    fn families_say_where_a_model_takes_its_thinking_budget() {
        let table = PriceTable::parse(DEFAULT_PRICING).unwrap();
        assert_eq!(table.thinking_place("gemini-2.5-flash"), Some(ThinkingPlace::Google));
        assert_eq!(table.thinking_place("google/gemini-3-pro"), Some(ThinkingPlace::Google));
        assert_eq!(table.thinking_place("gpt-4.1"), None);
        let custom =
            PriceTable::parse("[[families]]\nmodels = [\"my-gemini-alias\"]\nthinking = \"google\"\n").unwrap();
        assert_eq!(custom.thinking_place("my-gemini-alias"), Some(ThinkingPlace::Google));
        assert_eq!(custom.thinking_place("gemini-2.5-pro"), None, "the catalogue, not the name, decides");
    }

    #[test]
    fn the_built_in_prices_parse() {
        let table = PriceTable::parse(DEFAULT_PRICING).unwrap();
        assert!(table.contains("gemini-2.5-flash-lite"));
        assert!(table.contains("google/gemini-2.5-pro"));
        assert!(!table.contains("no-such-model"));
    }

    #[test]
    fn costs_are_exact_micro_dollars() {
        let table = PriceTable::parse(DEFAULT_PRICING).unwrap();
        let lite = table.price("gemini-2.5-flash-lite").unwrap();
        // 1M in at $0.10 + 1M out at $0.40 = $0.50.
        assert_eq!(lite.cost_micros(&usage(1_000_000, 1_000_000, 0)), 500_000);
        // 15 in, 3 out: 15*0.1 + 3*0.4 = 2.7 micro-dollars → 3 (half up).
        assert_eq!(lite.cost_micros(&usage(15, 3, 0)), 3);
        // 1 in, 1 out = 0.5 µ$ → rounds up to 1; 1 in alone = 0.1 → 0.
        assert_eq!(lite.cost_micros(&usage(1, 1, 0)), 1);
        assert_eq!(lite.cost_micros(&usage(1, 0, 0)), 0);
        // Cached tokens at the cached price: 1M cached = $0.025.
        assert_eq!(lite.cost_micros(&usage(1_000_000, 0, 1_000_000)), 25_000);
    }

    #[test]
    fn cache_writes_have_their_own_price_and_bound_the_worst_case() {
        let table = PriceTable::parse(
            "[models.claude]\ninput = 3.0\ncached_input = 0.3\ncache_write_input = 3.75\noutput = 15.0\n\
             [models.plain]\ninput = 3.0\noutput = 15.0\n",
        )
        .unwrap();
        let claude = table.price("claude").unwrap();
        // 1M prompt: 500k read at $0.30, 250k written at $3.75, 250k plain at $3.00.
        let mixed = Usage { prompt: 1_000_000, cached: 500_000, cache_write: 250_000, ..Usage::default() };
        assert_eq!(claude.cost_micros(&mixed), 150_000 + 937_500 + 750_000);
        // Without a cache-write price, writes cost the input price.
        assert_eq!(
            table.price("plain").unwrap().cost_micros(&Usage {
                prompt: 1_000_000,
                cache_write: 1_000_000,
                ..Usage::default()
            }),
            3_000_000
        );
        // The worst case prices every prompt token as a write.
        assert_eq!(claude.worst_case_micros(1_000_000, 0), 3_750_000);
    }

    #[test]
    fn long_context_prices_apply_above_the_threshold() {
        let table = PriceTable::parse(DEFAULT_PRICING).unwrap();
        let pro = table.price("gemini-2.5-pro").unwrap();
        assert_eq!(pro.cost_micros(&usage(200_000, 0, 0)), 250_000, "at the threshold: base price");
        assert_eq!(pro.cost_micros(&usage(200_001, 0, 0)), 500_003, "above: $2.50/M for the whole prompt");
    }

    #[test]
    fn thinking_tokens_hidden_in_the_total_are_billed() {
        let table = PriceTable::parse(DEFAULT_PRICING).unwrap();
        let flash = table.price("gemini-2.5-flash").unwrap();
        let hidden = Usage { prompt: 0, completion: 100, total: 1_100, reasoning: 0, cached: 0, cache_write: 0 };
        assert_eq!(flash.cost_micros(&hidden), 2_750, "1,100 output tokens at $2.50/M");
    }

    #[test]
    fn absurd_output_limits_saturate_instead_of_wrapping() {
        let table = PriceTable::parse(DEFAULT_PRICING).unwrap();
        let lite = table.price("gemini-2.5-flash-lite").unwrap();
        assert_eq!(lite.worst_case_micros(u64::MAX, u64::MAX), i64::MAX);
        assert!(lite.worst_case_micros(10, u64::MAX / 2) > 1_000_000_000);
    }

    #[test]
    fn per_request_fees_and_bad_files() {
        let t = PriceTable::parse("[models.m]\ninput = 1.0\noutput = 2.0\nper_request = 0.001\n").unwrap();
        assert_eq!(t.price("m").unwrap().cost_micros(&usage(0, 0, 0)), 1_000);
        assert!(PriceTable::parse("[models.m]\ninput = -1.0\noutput = 0.0\n").is_err());
        assert!(PriceTable::parse("[models.m]\ninput = 0.0000001\noutput = 0.0\n").is_err());
        assert!(PriceTable::parse("[models.m]\ninput = 1.0\n").is_err(), "output is required");
        assert!(PriceTable::parse("[models.m]\ninput = 1.0\noutput = 1.0\ncolour = 1\n").is_err());
    }
}
