//! The hasher of the gateway's own lookup maps on the request path: prices,
//! limit counters, the key cache, budgets and metric series.
//!
//! std's SipHash cost about 1,600 instructions per request across them
//! (callgrind). foldhash costs a fraction of that. It is seeded per process,
//! so clients cannot predict collisions; their input reaches these maps only
//! as lookups of checked identifiers, and the keys inserted are ids the
//! admins created.

/// foldhash's seeded builder.
pub type FastHash = foldhash::fast::RandomState;

/// A `HashMap` hashed with [`FastHash`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastHash>;
