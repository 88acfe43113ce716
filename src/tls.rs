//! The one TLS client configuration (rustls with the ring provider) for upstreams and the
//! identity service.

use rustls::crypto::ring;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::path::Path;
use std::sync::Arc;

/// Why the TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the TLS protocol versions cannot be set")]
    Versions(#[source] rustls::Error),
    #[error("tls.native_roots is set, but the system has no usable root certificates")]
    NoNativeRoots,
    #[error("tls.ca_file {path}: {problem}")]
    CaFile { path: String, problem: String },
}

/// Reads every certificate of a PEM file.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot be read: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// Builds a client configuration trusting the bundled web PKI roots, the certificates of
/// `ca_file` and, if `native_roots`, the operating system's roots.
pub fn client_config(native_roots: bool, ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let problem = |problem: String| TlsError::CaFile {
            path: path.display().to_string(),
            problem,
        };
        for cert in read_ca_file(path).map_err(problem)? {
            roots
                .add(cert)
                .map_err(|e| problem(format!("holds a certificate rustls refuses: {e}")))?;
        }
    }
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
