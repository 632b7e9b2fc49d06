//! Tenant authentication on `/v1`: who is calling, decided from memory.
//!
//! `AuthLayer` reads the presented key, finds it in the [`KeyCache`] by its
//! public id, checks the secret's keyed hash in constant time (once per cache
//! entry; then against the remembered secret, also in constant time), checks expiry,
//! revocation and the tenant's status, and inserts a [`Principal`] for the
//! handlers. No database round trip: the cache is kept current by
//! [`sync`] (change notifications plus periodic refresh).

pub mod cache;
pub mod credentials;
pub mod hasher;
pub mod models;
pub mod sync;
pub mod throttle;
pub mod token;
pub mod touches;

use std::future::{Ready, ready};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use http::Request;
use tollgate_store::TenantStatus;
use tower::{Layer, Service};

pub use cache::{CachedKey, CachedTenant, KeyCache};
pub use hasher::SecretHasher;

use crate::clock::Clock;
use crate::error::{AuthFailure, GatewayError};
use crate::metrics::Metrics;
use throttle::FailedAttempts;
use touches::Touches;

/// The authenticated caller, inserted by `AuthLayer` for the handlers.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: Arc<CachedKey>,
    pub tenant: Arc<CachedTenant>,
}

impl Principal {
    pub fn tenant_id(&self) -> &str {
        &self.key.tenant_id
    }
}

#[derive(Debug)]
pub struct Authenticator {
    pub cache: Arc<KeyCache>,
    hasher: SecretHasher,
    failures: FailedAttempts,
    pub touches: Arc<Touches>,
    metrics: Arc<Metrics>,
    /// Decides expiry (and so the end of a rotation's grace period).
    clock: Clock,
}

impl Authenticator {
    pub fn new(
        cache: Arc<KeyCache>,
        hasher: SecretHasher,
        failed_attempts_per_minute: u32,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        Self {
            cache,
            hasher,
            failures: FailedAttempts::new(failed_attempts_per_minute),
            touches: Arc::new(Touches::default()),
            metrics,
            clock,
        }
    }

    pub fn hasher(&self) -> &SecretHasher {
        &self.hasher
    }

    /// Checks the key presented (`None`: none was).
    pub fn authenticate(&self, presented: Option<&str>, now_ms: i64) -> Result<Principal, GatewayError> {
        let presented = presented.ok_or(GatewayError::Unauthenticated(AuthFailure::Missing))?;
        let parsed = token::parse(token::TENANT_KEY_PREFIX, presented)
            .ok_or(GatewayError::Unauthenticated(AuthFailure::Invalid))?;
        let key = self.cache.key(parsed.id).ok_or(GatewayError::Unauthenticated(AuthFailure::Invalid))?;
        if !key.verify_secret(&self.hasher, parsed.secret) {
            return Err(GatewayError::Unauthenticated(AuthFailure::Invalid));
        }
        // Only a caller holding the right secret learns a key's state.
        if key.revoked {
            return Err(GatewayError::Unauthenticated(AuthFailure::Revoked));
        }
        if key.expires_at_ms.is_some_and(|t| t <= now_ms) {
            return Err(GatewayError::Unauthenticated(AuthFailure::Expired));
        }
        let tenant = self.cache.tenant(&key.tenant_id).ok_or(GatewayError::Unauthenticated(AuthFailure::Revoked))?;
        match tenant.status {
            TenantStatus::Active => {}
            TenantStatus::Suspended => return Err(GatewayError::TenantSuspended),
            TenantStatus::Deleted => return Err(GatewayError::Unauthenticated(AuthFailure::Revoked)),
        }
        if key.should_touch(now_ms / 1000) {
            self.touches.push(key.id.clone());
        }
        Ok(Principal { key, tenant })
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
    query_key: bool,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth, query_key: false }
    }

    /// Also takes the key from the `key` query parameter (Google's API
    /// does), and removes the parameter from the request before anything
    /// below sees its URI.
    pub fn with_query_key(auth: Arc<Authenticator>) -> Self {
        Self { auth, query_key: true }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, auth: self.auth.clone(), query_key: self.query_key }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
    query_key: bool,
}

/// The inner service's future, or a refusal ready at once. Not boxed
/// again here: the fast path's handler boxes its own future, and the
/// router's route futures are small, so a box here would only add an
/// allocation per request.
type AuthFuture<F, E> = Either<F, Ready<Result<Response, E>>>;

impl<S, B> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = AuthFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let now_ms = self.auth.clock.now_ms();
        let ip = peer_ip(request.extensions());
        if let Some(retry_after) = self.auth.failures.refused(ip, now_ms) {
            self.auth.metrics.auth_failures.with_label_values(&["throttled"]).inc();
            return Either::Right(ready(Ok(GatewayError::AuthThrottled { retry_after }.into_response())));
        }
        let mut presented = credentials::presented_key(request.headers());
        if presented.is_none() && self.query_key {
            presented = credentials::query_key(request.uri());
        }
        let authenticated = self.auth.authenticate(presented, now_ms);
        if self.query_key
            && let Some(uri) = credentials::without_query_key(request.uri())
        {
            *request.uri_mut() = uri;
        }
        match authenticated {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
                Either::Left(self.inner.call(request))
            }
            Err(error) => {
                self.auth.metrics.auth_failures.with_label_values(&[error.code()]).inc();
                if let GatewayError::Unauthenticated(_) = error {
                    self.auth.failures.record(ip, now_ms);
                }
                Either::Right(ready(Ok(error.into_response())))
            }
        }
    }
}

/// The caller's address (unspecified when the listener did not record it).
pub fn peer_ip(extensions: &http::Extensions) -> IpAddr {
    extensions.get::<ConnectInfo<SocketAddr>>().map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}
