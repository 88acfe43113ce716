//! TLS by rustls with the ring provider: the client configuration for upstreams and the
//! identity service, and the listener's server configuration with client certificates.

use rustls::crypto::ring;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

/// Why the TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the TLS protocol versions cannot be set")]
    Versions(#[source] rustls::Error),
    #[error("tls.native_roots is set, but the system has no usable root certificates")]
    NoNativeRoots,
    #[error("CA file {path}: {problem}")]
    CaFile { path: String, problem: String },
    #[error("client certificate {path}: {problem}")]
    ClientCert { path: String, problem: String },
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

/// TLS towards one upstream (or the identity service), on top of the global `[tls]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// A further CA bundle to trust for this upstream.
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate chain and key, for upstreams that demand mutual TLS.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The name to send as SNI and to verify the certificate against, instead of the host.
    pub server_name: Option<String>,
}

/// Adds every certificate of a PEM bundle to `roots`, and to `digest`.
fn add_ca_file(
    roots: &mut RootCertStore,
    path: &Path,
    digest: &mut impl Hasher,
) -> Result<(), String> {
    for cert in read_ca_file(path)? {
        cert.as_ref().hash(digest);
        roots
            .add(cert)
            .map_err(|e| format!("holds a certificate rustls refuses: {e}"))?;
    }
    Ok(())
}

/// Builds a client configuration trusting the bundled web PKI roots, the certificates of
/// `ca_file` and, if `native_roots`, the operating system's roots.
pub fn client_config(native_roots: bool, ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    client_config_for(native_roots, ca_file, &UpstreamTls::default())
}

/// Like [`client_config`], with one upstream's further CA and client certificate.
pub fn client_config_for(
    native_roots: bool,
    ca_file: Option<&Path>,
    upstream: &UpstreamTls,
) -> Result<ClientConfig, TlsError> {
    client_tls(native_roots, ca_file, upstream).map(|(config, _)| config)
}

/// Like [`client_config_for`], with a digest of every certificate and key it read (the CA
/// files, the system's roots, the client certificate and its key): configurations made
/// from the same files with the same contents have the same digest.
pub fn client_tls(
    native_roots: bool,
    ca_file: Option<&Path>,
    upstream: &UpstreamTls,
) -> Result<(ClientConfig, u64), TlsError> {
    let mut digest = std::hash::DefaultHasher::new();
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in ca_file.into_iter().chain(upstream.ca_file.as_deref()) {
        add_ca_file(&mut roots, path, &mut digest).map_err(|problem| TlsError::CaFile {
            path: path.display().to_string(),
            problem,
        })?;
    }
    if native_roots {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "a system root certificate could not be loaded");
        }
        // In an order of their own: the system's store need not list them alike each time.
        let mut system: Vec<&[u8]> = found.certs.iter().map(|cert| cert.as_ref()).collect();
        system.sort_unstable();
        system.hash(&mut digest);
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(TlsError::NoNativeRoots);
        }
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?
        .with_root_certificates(roots);
    let config = match &upstream.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let problem = |problem: String| TlsError::ClientCert {
                path: cert_file.display().to_string(),
                problem,
            };
            let certs = CertificateDer::pem_file_iter(cert_file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| problem(e.to_string()))?;
            if certs.is_empty() {
                return Err(problem("holds no PEM certificate".into()));
            }
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                TlsError::ClientCert {
                    path: key_file.display().to_string(),
                    problem: format!("no PEM private key: {e}"),
                }
            })?;
            for cert in &certs {
                cert.as_ref().hash(&mut digest);
            }
            key.secret_der().hash(&mut digest);
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| problem(format!("does not match its key: {e}")))?
        }
    };
    Ok((config, digest.finish()))
}

/// The listener's TLS: certificate chain and key, and optionally the CA that client
/// certificates must chain to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    pub client_ca_file: Option<std::path::PathBuf>,
    /// With a client CA: refuse the handshake without a client certificate (otherwise a
    /// route's `access.client_cert` decides).
    pub client_auth_required: bool,
}

/// The client certificate a connection presented, as access rules read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject, as `CN=app1, O=Example`.
    pub subject: String,
    /// The DNS and URI subject alternative names (a SPIFFE id is a URI).
    pub names: Vec<String>,
}

impl ClientCert {
    /// Reads the end-entity certificate a client presented.
    pub fn from_der(der: &[u8]) -> Option<ClientCert> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => names.push(dns.to_string()),
                    GeneralName::URI(uri) => names.push(uri.to_string()),
                    _ => {}
                }
            }
        }
        Some(ClientCert {
            subject: cert.subject().to_string(),
            names,
        })
    }

    /// Tells whether the subject or a name equals `wanted`.
    pub fn matches(&self, wanted: &str) -> bool {
        self.subject == wanted || self.names.iter().any(|n| n == wanted)
    }
}

/// Builds the listener's TLS configuration (ALPN: h2, then http/1.1); the error names the
/// file at fault. Also returns warnings about certificates out of their validity period.
pub fn server_config(tls: &ListenerTls) -> Result<(rustls::ServerConfig, Vec<String>), String> {
    use rustls_pki_types::PrivateKeyDer;
    let certs = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", tls.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: holds no PEM certificate",
            tls.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| format!("{}: no PEM private key: {e}", tls.key_file.display()))?;
    let warnings = validity_warnings(&certs[0], &tls.cert_file);
    let provider = Arc::new(ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_ca_file(path).map_err(|e| format!("{}: {e}", path.display()))? {
                roots.add(cert).map_err(|e| {
                    format!("{}: a certificate rustls refuses: {e}", path.display())
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if tls.client_auth_required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            )
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "{} and {}: {e}",
            tls.cert_file.display(),
            tls.key_file.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, warnings))
}

fn validity_warnings(cert: &CertificateDer<'_>, path: &Path) -> Vec<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let now = x509_parser::time::ASN1Time::now();
    let validity = cert.validity();
    let mut warnings = Vec::new();
    if validity.not_after < now {
        warnings.push(format!(
            "{}: the server certificate expired on {}",
            path.display(),
            validity.not_after
        ));
    }
    if validity.not_before > now {
        warnings.push(format!(
            "{}: the server certificate is not valid before {}",
            path.display(),
            validity.not_before
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_changes_with_the_contents_of_any_file_read_and_only_with_them() {
        let dir = std::env::temp_dir().join(format!("map-tls-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = || {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (ca, _) = pem();
        let (cert, key) = pem();
        let files = ["ca.pem", "cert.pem", "key.pem"].map(|name| dir.join(name));
        let write = |contents: [&str; 3]| {
            for (file, text) in files.iter().zip(contents) {
                std::fs::write(file, text).unwrap();
            }
        };
        let upstream = UpstreamTls {
            ca_file: None,
            client_cert: Some((files[1].clone(), files[2].clone())),
            server_name: None,
        };
        let digest = || client_tls(false, Some(&files[0]), &upstream).unwrap().1;

        write([&ca, &cert, &key]);
        let first = digest();
        assert_eq!(digest(), first, "read twice, unchanged");
        let (other_ca, _) = pem();
        write([&format!("{ca}{other_ca}"), &cert, &key]);
        let second = digest();
        assert_ne!(second, first, "a CA added");
        let (other_cert, other_key) = pem();
        write([&format!("{ca}{other_ca}"), &other_cert, &other_key]);
        assert_ne!(digest(), second, "a client certificate and key renewed");
        write([&ca, &cert, &key]);
        assert_eq!(digest(), first, "back as they were");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_client_certificate_matches_by_subject_dns_name_or_uri() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["app1.internal".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "app1");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/app1".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        let seen = ClientCert::from_der(cert.der()).unwrap();
        for wanted in ["CN=app1", "app1.internal", "spiffe://example.org/app1"] {
            assert!(seen.matches(wanted), "{wanted}: {seen:?}");
        }
        for other in ["CN=app2", "app1", "spiffe://example.org/app2"] {
            assert!(!seen.matches(other), "{other}");
        }
    }
}
