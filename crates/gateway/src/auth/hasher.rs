//! Keyed hashing of key secrets (HMAC-SHA256 with a server-side secret), so a
//! copy of the database alone does not let anyone check guesses offline.
//! Comparison is constant-time.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub type Digest = [u8; 32];

#[derive(Clone)]
pub struct SecretHasher {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for SecretHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHasher(..)")
    }
}

impl SecretHasher {
    pub fn new(key: &SecretString) -> Self {
        // HMAC accepts keys of any length; this cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(key.expose_secret().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        Self { mac }
    }

    pub fn digest(&self, secret: &str) -> Digest {
        let mut mac = self.mac.clone();
        mac.update(secret.as_bytes());
        mac.finalize().into_bytes().into()
    }

    pub fn hash_hex(&self, secret: &str) -> String {
        hex::encode(self.digest(secret))
    }

    pub fn verify(&self, secret: &str, expected: &Digest) -> bool {
        self.digest(secret).ct_eq(expected).into()
    }
}

pub fn digest_from_hex(hex_digest: &str) -> Option<Digest> {
    let bytes = hex::decode(hex_digest).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_the_right_secret_under_the_right_key() {
        let a = SecretHasher::new(&SecretString::from("server-secret-a"));
        let b = SecretHasher::new(&SecretString::from("server-secret-b"));
        let stored = digest_from_hex(&a.hash_hex("s3cret")).unwrap();
        assert!(a.verify("s3cret", &stored));
        assert!(!a.verify("s3creT", &stored));
        assert!(!b.verify("s3cret", &stored), "the hash is keyed");
    }
}
