//! The Tollgate gateway as a library: `Application::build(config)` gives a
//! server bound to its listener; the `tollgate` binary and the tests both
//! start it this way.

pub mod accounting;
pub mod admin;
pub mod alerts;
pub mod app;
pub mod auth;
pub mod background;
pub mod budget;
pub mod clock;
pub mod config;
pub mod console;
pub mod error;
pub mod fast_hash;
pub mod file_watch;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod native;
pub mod policy;
pub mod proxy;
pub mod request_id;
pub mod router;
pub mod routing;
pub mod server;
pub mod shared;
pub mod shutdown;
pub mod telemetry;
pub mod tenant_usage;
pub mod upstream;
pub mod upstream_keys;

pub use app::Application;
pub use clock::{Clock, ClockControl};
pub use config::Config;
