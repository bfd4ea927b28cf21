//! TLS for an upstream: rustls with the ring provider (no OpenSSL, no
//! cmake: it cross-builds for the Pi), the CA file or the system's roots,
//! an optional client certificate (mutual TLS, as AWS IoT and Azure
//! require), and ALPN (AWS IoT on port 443 wants `x-amzn-mqtt-ca`).
//!
//! Built once when the config is read, so `fieldmq check` refuses a
//! missing, unreadable or malformed file before anything runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// The TLS files of an upstream.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA certificates (PEM) the server's certificate must chain to; the
    /// system's roots when absent.
    pub ca_file: Option<PathBuf>,
    /// The client certificate chain (PEM), for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// ALPN protocol names to offer.
    pub alpn: Vec<String>,
}

/// What is wrong with the TLS files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or holds nothing usable.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// rustls refused the combination (e.g. a key that does not match).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate without its key, or a key without its certificate.
    #[error("cert_file and key_file go together: give both or neither")]
    HalfPair,
}

pub(crate) fn file_error(path: &Path, why: impl ToString) -> TlsError {
    TlsError::File { path: path.to_owned(), why: why.to_string() }
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    std::fs::metadata(path).map_err(|e| file_error(path, e))?;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// Which of the files is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// `ca_file`.
    Ca,
    /// `cert_file`.
    Cert,
    /// `key_file`.
    Key,
}

/// Reads every file on its own, so each problem is reported, not only the
/// first.
pub fn check_files(files: &TlsFiles) -> Vec<(TlsFile, TlsError)> {
    let mut problems = Vec::new();
    if let Some(path) = &files.ca_file {
        if let Err(e) = read_certs(path) {
            problems.push((TlsFile::Ca, e));
        }
    }
    if let Some(path) = &files.cert_file {
        if let Err(e) = read_certs(path) {
            problems.push((TlsFile::Cert, e));
        }
    }
    if let Some(path) = &files.key_file {
        let key = std::fs::metadata(path)
            .map_err(|e| file_error(path, e))
            .and_then(|_| PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e)));
        if let Err(e) = key {
            problems.push((TlsFile::Key, e));
        }
    }
    problems
}

/// Builds the client configuration from the files.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match &files.ca_file {
        Some(path) => {
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| file_error(path, e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // One odd certificate in the system store is no reason to
                // refuse all the others.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError::File {
                    path: PathBuf::from("/etc/ssl/certs"),
                    why: "no system CA certificates found (install ca-certificates or set ca_file)".into(),
                });
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            std::fs::metadata(key).map_err(|e| file_error(key, e))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
            builder.with_client_auth_cert(chain, key_der)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(TlsError::HalfPair),
    };
    config.alpn_protocols = files.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}
