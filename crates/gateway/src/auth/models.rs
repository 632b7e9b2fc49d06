//! Which models a key may use: exact names or glob patterns (`*`, `?`).

use wildmatch::WildMatch;

#[derive(Debug, Clone, Default)]
pub struct ModelRules {
    exact: Vec<String>,
    globs: Vec<WildMatch>,
}

impl ModelRules {
    pub fn new(patterns: &[String]) -> Self {
        let mut rules = Self::default();
        for p in patterns {
            if p.contains(['*', '?']) {
                rules.globs.push(WildMatch::new(p));
            } else {
                rules.exact.push(p.clone());
            }
        }
        rules
    }

    /// No rules: every model is allowed.
    pub fn is_unrestricted(&self) -> bool {
        self.exact.is_empty() && self.globs.is_empty()
    }

    pub fn allows(&self, model: &str) -> bool {
        self.is_unrestricted() || self.exact.iter().any(|m| m == model) || self.globs.iter().any(|g| g.matches(model))
    }
}

/// Checks a pattern list from the admin API: non-empty, printable, bounded.
pub fn validate_patterns(patterns: &[String]) -> Result<(), String> {
    if patterns.len() > 256 {
        return Err("at most 256 model patterns".to_owned());
    }
    for p in patterns {
        if p.is_empty() || p.len() > 200 || p.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!("{p:?} is not a model name or pattern"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_and_globs() {
        let rules = ModelRules::new(&["gpt-4.1".to_owned(), "gemini-2.5-*".to_owned()]);
        assert!(rules.allows("gpt-4.1"));
        assert!(!rules.allows("gpt-4.1-mini"));
        assert!(rules.allows("gemini-2.5-flash-lite"));
        assert!(!rules.allows("gemini-3-pro"));
        assert!(ModelRules::new(&[]).allows("anything"));
    }

    #[test]
    fn pattern_validation() {
        assert!(validate_patterns(&["gemini-*".to_owned()]).is_ok());
        assert!(validate_patterns(&[String::new()]).is_err());
        assert!(validate_patterns(&["a b".to_owned()]).is_err());
    }
}
