//! Header names of upstream answers, made once per worker thread and
//! shared after that.
//!
//! `HeaderName::from_bytes` allocates and lowercases a copy of every name
//! outside the standard set, and an upstream's answer is mostly such names
//! (`openai-processing-ms`, `x-ratelimit-*`, `x-request-id`, `cf-ray`, …):
//! under callgrind about 190 instructions a name, a fifth of what reading a
//! response head costs, and a free when the answer is dropped. An upstream
//! sends the same few dozen names on every answer, so each is made once
//! here and handed out as a clone (a reference count); the lookup costs
//! about half of what it saves (with the benchmark upstream's ten headers,
//! about 500 instructions fewer per answer).
//!
//! Per thread, so a lookup takes no lock; bounded, so an upstream sending
//! made-up names cannot grow it: once full, further names are made as
//! before and not kept.

use std::cell::RefCell;

use http::HeaderName;
use http::header::InvalidHeaderName;

use crate::fast_hash::FastMap;

/// Names kept per thread at most: several upstreams' worth.
const MAX_KEPT: usize = 512;

thread_local! {
    /// Names as they came on the wire (before lowercasing) and what they
    /// parsed to.
    static KEPT: RefCell<FastMap<Box<[u8]>, HeaderName>> = RefCell::new(FastMap::default());
}

/// The header name `raw` is, as `HeaderName::from_bytes` reads it.
pub fn header_name(raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    KEPT.with_borrow_mut(|kept| {
        if let Some(name) = kept.get(raw) {
            return Ok(name.clone());
        }
        let name = HeaderName::from_bytes(raw)?;
        if kept.len() < MAX_KEPT {
            kept.insert(raw.into(), name.clone());
        }
        Ok(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_seen_again_shares_the_first_ones_bytes() {
        let first = header_name(b"openai-processing-ms").unwrap();
        let again = header_name(b"openai-processing-ms").unwrap();
        assert_eq!(first, again);
        assert_eq!(first.as_str().as_ptr(), again.as_str().as_ptr(), "made once, then shared");
        // Made fresh, the same name lives elsewhere.
        let fresh = HeaderName::from_bytes(b"openai-processing-ms").unwrap();
        assert_ne!(fresh.as_str().as_ptr(), first.as_str().as_ptr());
    }

    #[test]
    fn names_read_as_from_bytes_reads_them() {
        for raw in [&b"Content-Type"[..], b"content-type", b"X-Request-ID", b"x-request-id", b"Date"] {
            assert_eq!(header_name(raw).unwrap(), HeaderName::from_bytes(raw).unwrap());
            assert_eq!(header_name(raw).unwrap(), HeaderName::from_bytes(raw).unwrap(), "kept");
        }
        assert_eq!(header_name(b"X-Request-ID").unwrap().as_str(), "x-request-id");
        assert!(header_name(b"bad name").is_err());
        assert!(header_name(b"").is_err());
        assert!(header_name(b"bad name").is_err(), "an invalid name is not kept");
    }

    #[test]
    fn past_the_bound_names_are_still_read_but_not_kept() {
        // A thread of its own: the bound is per thread.
        std::thread::spawn(|| {
            for n in 0..MAX_KEPT + 10 {
                let raw = format!("x-made-up-{n}");
                assert_eq!(header_name(raw.as_bytes()).unwrap().as_str(), raw);
            }
            assert_eq!(KEPT.with_borrow(|kept| kept.len()), MAX_KEPT);
            let late = header_name(b"x-made-up-late").unwrap();
            let again = header_name(b"x-made-up-late").unwrap();
            assert_eq!(late, again);
            assert_ne!(late.as_str().as_ptr(), again.as_str().as_ptr(), "not kept past the bound");
            let early = header_name(b"x-made-up-0").unwrap();
            assert_eq!(early.as_str().as_ptr(), header_name(b"x-made-up-0").unwrap().as_str().as_ptr());
        })
        .join()
        .unwrap();
    }
}
