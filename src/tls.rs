//! The one TLS client configuration (rustls with the ring provider) for upstreams and the
//! identity service.

use rustls::crypto::ring;
use rustls::{ClientConfig, RootCertStore};
use std::sync::Arc;

/// Why the TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the TLS protocol versions cannot be set")]
    Versions(#[source] rustls::Error),
    #[error("tls.native_roots is set, but the system has no usable root certificates")]
    NoNativeRoots,
}

/// Builds a client configuration trusting the bundled web PKI roots and, if `native_roots`,
/// the operating system's roots too.
pub fn client_config(native_roots: bool) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if native_roots {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "a system root certificate could not be loaded");
        }
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(TlsError::NoNativeRoots);
        }
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Versions)?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}
