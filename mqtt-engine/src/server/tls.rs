//! TLS for the broker's listeners: the server certificate and key from
//! the config, and optionally client certificates signed by a CA, whose
//! subject CN becomes the user name (mosquitto's
//! `use_identity_as_username`).
//!
//! A client certificate is asked for, not required: a client without one
//! still logs in with a password or anonymously, as the broker's settings
//! allow. To accept certificates only, set `allow_anonymous = false` and
//! give no password file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::bridge::tls::{file_error, read_certs, TlsError};

/// The TLS files of the listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA certificates client certificates must chain to.
    pub client_ca: Option<PathBuf>,
}

/// Reads every file on its own, so each problem is reported.
pub fn check_server_files(files: &ServerTlsFiles) -> Vec<(PathBuf, TlsError)> {
    let mut problems = Vec::new();
    if let Err(e) = read_certs(&files.cert) {
        problems.push((files.cert.clone(), e));
    }
    if let Err(e) = read_key(&files.key) {
        problems.push((files.key.clone(), e));
    }
    if let Some(ca) = &files.client_ca {
        if let Err(e) = read_certs(ca) {
            problems.push((ca.clone(), e));
        }
    }
    problems
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    std::fs::metadata(path).map_err(|e| file_error(path, e))?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

/// Builds the listeners' TLS configuration.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let config = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| file_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier).with_single_cert(chain, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
    };
    Ok(Arc::new(config))
}

/// The subject's first common name (OID 2.5.4.3) of a DER certificate.
///
/// Hand-written rather than a dependency on an X.509 parser: only this
/// one field is needed, and the certificate has already been verified by
/// webpki, so the walk only has to be safe, never trusting.
pub fn common_name(der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    let (tag, certificate, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut tbs, _) = tlv(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    // version [0] (optional), serial, signature, issuer, validity, subject.
    if tbs.first() == Some(&0xA0) {
        tbs = tlv(tbs)?.2;
    }
    for _ in 0..4 {
        tbs = tlv(tbs)?.2;
    }
    let (tag, mut subject, _) = tlv(tbs)?;
    if tag != SEQUENCE {
        return None;
    }
    while !subject.is_empty() {
        let (_, mut set, rest) = tlv(subject)?;
        subject = rest;
        while !set.is_empty() {
            let (_, attribute, rest) = tlv(set)?;
            set = rest;
            let (tag, oid, value) = tlv(attribute)?;
            if tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (tag, text, _) = tlv(value)?;
                return match tag {
                    // UTF8String, PrintableString, IA5String.
                    0x0C | 0x13 | 0x16 => std::str::from_utf8(text).ok().map(str::to_owned),
                    // BMPString: UTF-16, big-endian.
                    0x1E if text.len() % 2 == 0 => {
                        let units = text.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                        char::decode_utf16(units).collect::<Result<String, _>>().ok()
                    }
                    _ => None,
                };
            }
        }
    }
    None
}

/// One DER element: its tag, its contents, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let bytes = input.get(2..2 + count)?;
        (bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), 2 + count)
    };
    let end = header.checked_add(len)?;
    let contents = input.get(header..end)?;
    Some((tag, contents, input.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_or_garbage_certificates_have_no_name_and_do_not_panic() {
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x30]), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        for n in 0..64u8 {
            let garbage: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            let _ = common_name(&garbage);
        }
    }

    #[test]
    fn the_first_common_name_of_the_subject_is_read() {
        // SEQUENCE { SEQUENCE { [0]{INTEGER 2}, INTEGER 1, SEQ{}, issuer SEQ{SET{SEQ{CN "ca"}}}, SEQ{}, subject SEQ{SET{SEQ{OID O, "org"}}, SET{SEQ{CN "sensor-7"}}} } }
        let cn = |value: &[u8], tag: u8| {
            let mut attribute = vec![0x06, 0x03, 0x55, 0x04, 0x03, tag, value.len() as u8];
            attribute.extend_from_slice(value);
            let mut seq = vec![0x30, attribute.len() as u8];
            seq.extend(attribute);
            let mut set = vec![0x31, seq.len() as u8];
            set.extend(seq);
            set
        };
        let org = [0x31, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x03, b'o', b'r', b'g'];
        let issuer_set = cn(b"ca", 0x0c);
        let mut issuer = vec![0x30, issuer_set.len() as u8];
        issuer.extend(issuer_set);
        let subject_set = cn(b"sensor-7", 0x13);
        let mut subject = vec![0x30, (org.len() + subject_set.len()) as u8];
        subject.extend(org);
        subject.extend(subject_set);
        let mut tbs_body = vec![0xA0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x01, 0x01, 0x30, 0x00];
        tbs_body.extend(issuer);
        tbs_body.extend([0x30, 0x00]);
        tbs_body.extend(subject);
        let mut tbs = vec![0x30, tbs_body.len() as u8];
        tbs.extend(tbs_body);
        let mut cert = vec![0x30, 0x81, tbs.len() as u8];
        cert.extend(tbs);
        assert_eq!(common_name(&cert).as_deref(), Some("sensor-7"));
    }
}
