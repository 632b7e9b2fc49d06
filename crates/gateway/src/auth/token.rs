//! The shape of issued secrets: `tg-<id>-<secret>` for tenant keys and
//! `tga-<id>-<secret>` for admin tokens.
//!
//! The id is public (it names the key in the admin API, logs and usage
//! records); the secret is 40 random alphanumerics (~238 bits) and is stored
//! only as a keyed hash. Parsing is strict: anything else is not a key.

use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::SecretString;

pub const TENANT_KEY_PREFIX: &str = "tg";
pub const ADMIN_TOKEN_PREFIX: &str = "tga";
const ID_LEN: usize = 12;
const SECRET_LEN: usize = 40;

#[derive(Debug, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

pub fn parse<'a>(prefix: &str, token: &'a str) -> Option<ParsedToken<'a>> {
    let rest = token.strip_prefix(prefix)?.strip_prefix('-')?;
    let (id, secret) = rest.split_once('-')?;
    let id_ok = id.len() == ID_LEN && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let secret_ok = secret.len() == SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    (id_ok && secret_ok).then_some(ParsedToken { id, secret })
}

/// A freshly issued secret. `full` is shown to the admin once.
pub struct IssuedToken {
    pub id: String,
    pub secret: SecretString,
    pub full: SecretString,
}

pub fn issue(prefix: &str) -> IssuedToken {
    let mut rng = rand::rng();
    let id: String = (0..ID_LEN)
        .map(|_| {
            const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
            CHARS[rng.random_range(0..CHARS.len())] as char
        })
        .collect();
    let secret: String = (0..SECRET_LEN).map(|_| rng.sample(Alphanumeric) as char).collect();
    let full = format!("{prefix}-{id}-{secret}");
    IssuedToken { id, secret: SecretString::from(secret), full: SecretString::from(full) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn issued_tokens_parse_back() {
        let t = issue(TENANT_KEY_PREFIX);
        let full = t.full.expose_secret().to_owned();
        let parsed = parse(TENANT_KEY_PREFIX, &full).unwrap();
        assert_eq!(parsed.id, t.id);
        assert_eq!(parsed.secret, t.secret.expose_secret());
        assert!(parse(ADMIN_TOKEN_PREFIX, &full).is_none(), "a tenant key is not an admin token");
    }

    #[test]
    fn issued_tokens_differ() {
        assert_ne!(issue("tg").full.expose_secret(), issue("tg").full.expose_secret());
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let good_secret = "a".repeat(SECRET_LEN);
        for bad in [
            String::new(),
            "tg-".to_owned(),
            format!("tg-ABCDEFGHIJKL-{good_secret}"),
            format!("tg-abc-{good_secret}"),
            format!("tg-abcdefghijkl-{}", "a".repeat(SECRET_LEN - 1)),
            format!("tg-abcdefghijkl-{}!", "a".repeat(SECRET_LEN - 1)),
            format!("sk-abcdefghijkl-{good_secret}"),
            format!("tg-abcdefghijkl-{good_secret}-x"),
            format!(" tg-abcdefghijkl-{good_secret}"),
        ] {
            assert!(parse(TENANT_KEY_PREFIX, &bad).is_none(), "{bad:?} accepted");
        }
        assert!(parse(TENANT_KEY_PREFIX, &format!("tg-abcdefghijk1-{good_secret}")).is_some());
    }
}
