//! Token counts in `o200k_base`, with the vocabulary held compactly.
//!
//! tiktoken-rs's tokenizer keeps the vocabulary three times over (bytes to
//! rank, rank to bytes, sorted bytes), each token in its own allocation, and
//! 256 copies of its regexes: about 45 MB resident once built, more than
//! the rest of a gateway holding 5,000 open streams (`bench`, scenario d).
//! Estimates only count tokens, so the gateway builds tiktoken's tokenizer
//! once, reads its vocabulary out into one byte arena indexed by rank and
//! an open-addressed table from bytes to rank (about 4 MB), and drops it.
//! Counting splits the text with the encoding's own pattern and merges
//! byte pairs by rank exactly as tiktoken does; a test compares the two on
//! a generated corpus.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::sync::OnceLock;

use crate::fast_hash::FastHash;

/// The special tokens `encode_with_special_tokens` accepts in text, each
/// one token.
const SPECIAL: [&str; 2] = [tiktoken_rs::ENDOFTEXT, tiktoken_rs::ENDOFPROMPT];
/// Ranks above every ordinary and special token of `o200k_base`.
const RANK_LIMIT: u32 = 200_019;

/// The tokens `text` is in `o200k_base`, special tokens allowed. Builds the
/// vocabulary on first use (a fraction of a second): not on a request
/// worker.
pub fn count(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    match counter() {
        Some(counter) => counter.count(text),
        None => rough(text),
    }
}

/// Builds the vocabulary now (start-up, off the request workers).
pub fn warm_up() {
    let _ = counter();
}

fn counter() -> Option<&'static Counter> {
    static COUNTER: OnceLock<Option<Counter>> = OnceLock::new();
    COUNTER
        .get_or_init(|| match Counter::build() {
            Ok(counter) => Some(counter),
            Err(e) => {
                tracing::error!(error = %e, "cannot build the o200k_base tokenizer; estimates count four bytes a token");
                None
            }
        })
        .as_ref()
}

/// About four bytes a token: what estimates fall back to should the
/// tokenizer be missing, or its pattern give up on a pathological text.
fn rough(text: &str) -> u64 {
    text.len().div_ceil(4) as u64
}

struct Counter {
    pattern: fancy_regex::Regex,
    vocabulary: Vocabulary,
}

impl Counter {
    fn build() -> Result<Self, String> {
        let pattern = fancy_regex::Regex::new(tiktoken_rs::O200K_BASE_PAT_STR).map_err(|e| e.to_string())?;
        // tiktoken's own tokenizer, read and dropped here.
        let bpe = tiktoken_rs::o200k_base().map_err(|e| e.to_string())?;
        let vocabulary = Vocabulary::from_ranks((0..RANK_LIMIT).filter_map(|rank| {
            let bytes = bpe.decode_bytes(&[rank]).ok()?;
            let special = SPECIAL.iter().any(|s| s.as_bytes() == bytes.as_slice());
            (!special).then_some((rank, bytes))
        }));
        Ok(Self { pattern, vocabulary })
    }

    fn count(&self, text: &str) -> u64 {
        let mut total = 0;
        let mut rest = text;
        loop {
            let (ordinary, special) = match next_special(rest) {
                Some((at, len)) => (&rest[..at], Some(at + len)),
                None => (rest, None),
            };
            total += self.count_ordinary(ordinary);
            match special {
                Some(end) => {
                    total += 1;
                    rest = &rest[end..];
                }
                None => return total,
            }
        }
    }

    fn count_ordinary(&self, text: &str) -> u64 {
        let mut total = 0;
        let mut counted_to = 0;
        for found in self.pattern.find_iter(text) {
            match found {
                Ok(piece) => {
                    total += self.vocabulary.piece_tokens(piece.as_str().as_bytes()) as u64;
                    counted_to = piece.end();
                }
                // The pattern's backtracking limit: the rest is counted
                // roughly rather than not at all.
                Err(_) => return total + rough(&text[counted_to..]),
            }
        }
        total
    }
}

/// The first special token in `text`: where it starts and its length.
fn next_special(text: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(at) = text[from..].find("<|endof") {
        let at = from + at;
        if let Some(special) = SPECIAL.iter().find(|s| text[at..].starts_with(*s)) {
            return Some((at, special.len()));
        }
        from = at + 1;
    }
    None
}

/// Every token's bytes in one arena, by rank, and a table from bytes to
/// rank.
struct Vocabulary {
    bytes: Vec<u8>,
    /// Rank r's bytes are `bytes[starts[r]..starts[r + 1]]` (empty for a
    /// rank the encoding does not use).
    starts: Vec<u32>,
    /// Open addressing, linear probing: rank + 1, or 0 for an empty slot.
    slots: Vec<u32>,
    hasher: FastHash,
}

impl Vocabulary {
    /// From `(rank, bytes)` pairs in increasing rank.
    fn from_ranks(tokens: impl Iterator<Item = (u32, Vec<u8>)>) -> Self {
        let mut bytes = Vec::new();
        let mut starts = vec![0u32];
        for (rank, token) in tokens {
            while starts.len() <= rank as usize {
                starts.push(bytes.len() as u32);
            }
            bytes.extend_from_slice(&token);
            starts.push(bytes.len() as u32);
        }
        bytes.shrink_to_fit();
        starts.shrink_to_fit();
        let ranks = starts.len() - 1;
        // At most half full: probes stay short.
        let mut vocabulary =
            Self { bytes, starts, slots: vec![0; (ranks * 2).next_power_of_two()], hasher: FastHash::default() };
        for rank in 0..ranks as u32 {
            let token = vocabulary.token(rank);
            if token.is_empty() {
                continue;
            }
            let mut slot = vocabulary.home(token);
            while vocabulary.slots[slot] != 0 {
                slot = (slot + 1) & (vocabulary.slots.len() - 1);
            }
            vocabulary.slots[slot] = rank + 1;
        }
        vocabulary
    }

    fn token(&self, rank: u32) -> &[u8] {
        let r = rank as usize;
        &self.bytes[self.starts[r] as usize..self.starts[r + 1] as usize]
    }

    fn home(&self, token: &[u8]) -> usize {
        self.hasher.hash_one(token) as usize & (self.slots.len() - 1)
    }

    fn rank(&self, token: &[u8]) -> Option<u32> {
        let mut slot = self.home(token);
        loop {
            let entry = self.slots[slot];
            if entry == 0 {
                return None;
            }
            if self.token(entry - 1) == token {
                return Some(entry - 1);
            }
            slot = (slot + 1) & (self.slots.len() - 1);
        }
    }

    /// The tokens one piece of the pattern's split becomes: one if it is a
    /// token, else what merging its adjacent parts leaves, lowest rank
    /// first and leftmost among equal ranks, as tiktoken merges.
    fn piece_tokens(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        if n <= 1 || self.rank(piece).is_some() {
            return n.min(1);
        }
        // Parts as a list over byte positions: `next[i]` is where the part
        // starting at i ends; `prev[i]` where the part before it starts.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut live = vec![true; n];
        // (rank, start, end) of adjacent pairs; stale ones are skipped.
        let mut pairs = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some(rank) = self.rank(&piece[i..i + 2]) {
                pairs.push(Reverse((rank, i, i + 2)));
            }
        }
        let mut parts = n;
        while let Some(Reverse((_, start, end))) = pairs.pop() {
            // Still a pair of two parts, start..mid and mid..end?
            if !live[start] || next[start] >= n || next[next[start]] != end {
                continue;
            }
            let mid = next[start];
            live[mid] = false;
            next[start] = end;
            if end < n {
                prev[end] = start;
            }
            parts -= 1;
            let before = prev[start];
            if before != usize::MAX
                && let Some(rank) = self.rank(&piece[before..end])
            {
                pairs.push(Reverse((rank, before, end)));
            }
            if end < n {
                let after = next[end];
                if let Some(rank) = self.rank(&piece[start..after]) {
                    pairs.push(Reverse((rank, start, after)));
                }
            }
        }
        parts
    }

    /// Bytes held on the heap.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.bytes.capacity() + self.starts.capacity() * 4 + self.slots.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiktoken(text: &str) -> u64 {
        tiktoken_rs::o200k_base_singleton().encode_with_special_tokens(text).len() as u64
    }

    /// A small deterministic generator, so a failure names its case.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, below: usize) -> usize {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % below
        }
    }

    const PIECES: &[&str] = &[
        "the",
        " the",
        "The",
        " THE",
        "tokenizer",
        " gateway",
        "don't",
        " I'M",
        " we'll",
        "'s",
        "'Ve",
        " you're",
        "0",
        "7",
        "42",
        "2026",
        "3.14159",
        "1,000,000",
        " ",
        "  ",
        "    ",
        "\t",
        "\n",
        "\n\n",
        "\r\n",
        " \n ",
        "!",
        "?!",
        "...",
        " --",
        "==",
        "->",
        "::",
        "{",
        "}\n",
        "\"",
        "'",
        "`",
        "#",
        "@",
        "$",
        "%",
        "^&*",
        "()",
        "é",
        "naïve",
        " café",
        "Straße",
        "ÜBER",
        "привет",
        " Мир",
        "γειά",
        "你好",
        "世界",
        "こんにちは",
        "カタカナ",
        "안녕하세요",
        "مرحبا",
        "नमस्ते",
        "ñ",
        "e\u{301}",
        "👋",
        "👩‍💻",
        "🇫🇷",
        "\u{200b}",
        "\u{feff}",
        "ℕ",
        "Ⅻ",
        "<|endoftext|>",
        "<|endofprompt|>",
        "<|endof",
        "<|start|>",
        "fn main() {",
        "    let x = 1;",
        "\"key\": [1, 2]",
    ];

    fn generated(rng: &mut Lcg) -> String {
        let mut text = String::new();
        for _ in 0..rng.next(40) + 1 {
            match rng.next(12) {
                // Long runs: pieces over 100 bytes take the merge's long path.
                0 => text.push_str(&["=", " ", "!", "9", "a", "\n", "é", "ab"][rng.next(8)].repeat(rng.next(400) + 1)),
                _ => text.push_str(PIECES[rng.next(PIECES.len())]),
            }
        }
        text
    }

    #[test]
    fn counts_as_tiktoken_does() {
        let fixed = [
            "",
            "Hello, world!",
            "Tell me a story about a gateway that counted every token twice.",
            "a<|endoftext|>b<|endofprompt|><|endoftext|>",
            &"x".repeat(5000),
            &" ".repeat(1001),
            &"12345678901234567890".repeat(20),
            &"🙂".repeat(300),
            &"abcabcabd".repeat(100),
        ];
        for text in fixed {
            assert_eq!(count(text), tiktoken(text), "{text:?}");
        }
        let mut rng = Lcg(7);
        for case in 0..3000 {
            let text = generated(&mut rng);
            assert_eq!(count(&text), tiktoken(&text), "case {case}: {text:?}");
        }
    }

    #[test]
    fn every_token_is_found_by_its_bytes_and_the_vocabulary_is_small() {
        let counter = counter().expect("the tokenizer builds");
        let bpe = tiktoken_rs::o200k_base_singleton();
        let mut found = 0;
        for rank in 0..RANK_LIMIT {
            if let Ok(bytes) = bpe.decode_bytes(&[rank])
                && !SPECIAL.iter().any(|s| s.as_bytes() == bytes.as_slice())
            {
                assert_eq!(counter.vocabulary.rank(&bytes), Some(rank));
                found += 1;
            }
        }
        assert!(found > 199_000, "{found} tokens");
        assert_eq!(counter.vocabulary.rank(b"not a single token, surely"), None);
        let held = counter.vocabulary.heap_bytes();
        assert!(held < 6 * 1024 * 1024, "{held} bytes");
    }

    #[test]
    fn special_tokens_are_found_wherever_they_are() {
        assert_eq!(next_special("abc"), None);
        assert_eq!(next_special("<|endof<|endoftext|>"), Some((7, 13)));
        assert_eq!(next_special("x<|endofprompt|>"), Some((1, 15)));
        assert_eq!(next_special("<|endoftex"), None);
    }
}
