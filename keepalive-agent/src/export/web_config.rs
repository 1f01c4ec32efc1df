//! `--web.config.file`: the YAML file Prometheus exporters share (prometheus/exporter-toolkit's
//! `web-config.yml`), so operators reuse the file they give node_exporter: TLS for the metrics
//! port (`tls_server_config`, optionally verifying client certificates) and HTTP basic auth
//! (`basic_auth_users`, bcrypt hashes).
//!
//! Read once at start (a restart applies a change). Fields exporter-toolkit has and this agent
//! does not implement are refused by name rather than ignored, so a file that asks for more
//! protection than it gets never starts the agent.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use serde::Deserialize;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
        server::WebPkiClientVerifier,
    },
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum WebConfigError {
    #[error("--web.config.file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// The file as exporter-toolkit defines it (the subset the agent implements).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    tls_server_config: Option<TlsServerConfig>,
    #[serde(default)]
    basic_auth_users: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerConfig {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: ClientAuthType,
    min_version: Option<TlsVersion>,
    max_version: Option<TlsVersion>,
}

/// Go's `tls.ClientAuthType` names, as exporter-toolkit spells them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
enum ClientAuthType {
    #[default]
    NoClientCert,
    RequestClientCert,
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
enum TlsVersion {
    TLS10,
    TLS11,
    TLS12,
    TLS13,
}

/// What the HTTP server enforces.
#[derive(Clone, Default)]
pub(crate) struct WebConfig {
    pub tls: Option<TlsAcceptor>,
    pub basic_auth: Option<Arc<BasicAuth>>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("basic_auth", &self.basic_auth.is_some())
            .finish()
    }
}

impl WebConfig {
    /// Reads and checks `path`: YAML, certificate and key files, client CAs, password hashes.
    pub(crate) fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let fail = |reason: String| WebConfigError::File {
            path: path.to_owned(),
            reason,
        };
        let text = crate::files::read_string_bounded(path, MAX_CONFIG_BYTES)
            .map_err(|e| fail(crate::files::io_reason(&e)))?;
        let file: WebConfigFile = serde_yaml_ng::from_str(&text)
            .map_err(|e| fail(format!("{e} (see exporter-toolkit's web-configuration.md)")))?;
        // Relative paths are relative to the file, as exporter-toolkit resolves them.
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = file
            .tls_server_config
            .map(|tls| tls_acceptor(&tls, base))
            .transpose()
            .map_err(fail)?;
        let basic_auth = if file.basic_auth_users.is_empty() {
            None
        } else {
            Some(Arc::new(
                BasicAuth::new(file.basic_auth_users).map_err(fail)?,
            ))
        };
        Ok(WebConfig { tls, basic_auth })
    }
}

/// A web config file is a few lines; a bigger one is the wrong file.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn tls_acceptor(tls: &TlsServerConfig, base: &Path) -> Result<TlsAcceptor, String> {
    // The policy first: a contradiction in the file is reported before any file it names.
    match (tls.client_auth_type, &tls.client_ca_file) {
        (ClientAuthType::NoClientCert, Some(_)) => {
            return Err(
                "tls_server_config.client_ca_file is set but client_auth_type is not: \
                 set client_auth_type to RequireAndVerifyClientCert or VerifyClientCertIfGiven"
                    .to_owned(),
            );
        }
        (ClientAuthType::RequestClientCert | ClientAuthType::RequireAnyClientCert, _) => {
            return Err(format!(
                "tls_server_config.client_auth_type {:?} (a client certificate that is not \
                 verified) is not supported: use RequireAndVerifyClientCert with a \
                 client_ca_file",
                tls.client_auth_type
            ));
        }
        (
            ClientAuthType::VerifyClientCertIfGiven | ClientAuthType::RequireAndVerifyClientCert,
            None,
        ) => {
            return Err(format!(
                "tls_server_config.client_auth_type {:?} needs client_ca_file, the CAs client \
                 certificates are verified against",
                tls.client_auth_type
            ));
        }
        _ => {}
    }
    let resolve = |p: &Path| base.join(p);
    let cert_file = resolve(&tls.cert_file);
    let certs = CertificateDer::pem_file_iter(&cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "tls_server_config.cert_file {}: {}",
                cert_file.display(),
                pem_reason(&e)
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "tls_server_config.cert_file {}: no PEM certificate in it",
            cert_file.display()
        ));
    }
    let key_file = resolve(&tls.key_file);
    let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| {
        format!(
            "tls_server_config.key_file {}: {} (a PEM private key: PKCS#8, PKCS#1 or SEC1)",
            key_file.display(),
            pem_reason(&e)
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (TlsVersion::TLS12, &rustls::version::TLS12),
        (TlsVersion::TLS13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| tls.min_version.is_none_or(|min| *v >= min))
    .filter(|(v, _)| tls.max_version.is_none_or(|max| *v <= max))
    .map(|(_, version)| version)
    .collect();
    if versions.is_empty() {
        return Err(
            "tls_server_config: min_version/max_version leave no TLS version this agent speaks \
             (TLS12, TLS13)"
                .to_owned(),
        );
    }
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls_server_config: {e}"))?;
    let builder = match (tls.client_auth_type, &tls.client_ca_file) {
        (_, None) => builder.with_no_client_auth(),
        (auth, Some(ca_file)) => {
            let ca_file = resolve(ca_file);
            let mut roots = RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(&ca_file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    format!(
                        "tls_server_config.client_ca_file {}: {}",
                        ca_file.display(),
                        pem_reason(&e)
                    )
                })?;
            let (added, _) = roots.add_parsable_certificates(cas);
            if added == 0 {
                return Err(format!(
                    "tls_server_config.client_ca_file {}: no usable CA certificate in it",
                    ca_file.display()
                ));
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            let verifier = if auth == ClientAuthType::VerifyClientCertIfGiven {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("tls_server_config.client_ca_file: {e}"))?,
            )
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "tls_server_config: {} and {} do not make a usable pair: {e}",
            cert_file.display(),
            key_file.display()
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A PEM file's error as the operator needs it: the errno's meaning for I/O.
fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => crate::files::io_reason(io),
        other => other.to_string(),
    }
}

/// `basic_auth_users`: user → bcrypt hash.
pub(crate) struct BasicAuth {
    users: HashMap<String, String>,
    /// Credentials that verified, so a scraper pays bcrypt's cost (tens of milliseconds by
    /// design) once, not per scrape. Bounded: cleared when full.
    verified: Mutex<std::collections::HashSet<(String, String)>>,
    /// A hash (of the configured users' cost) to verify against when the user is unknown, so
    /// that a wrong user name takes as long as a wrong password and timing does not tell which
    /// users exist.
    unknown_user_hash: String,
}

const MAX_VERIFIED: usize = 64;

impl BasicAuth {
    fn new(users: HashMap<String, String>) -> Result<BasicAuth, String> {
        for (user, hash) in &users {
            // bcrypt's own parser: a hash it cannot read would refuse every password.
            bcrypt::verify("", hash).map_err(|e| {
                format!("basic_auth_users.{user}: not a bcrypt hash ({e}); make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`")
            })?;
        }
        let cost = users
            .values()
            .find_map(|hash| hash.parse::<bcrypt::HashParts>().ok())
            .map_or(bcrypt::DEFAULT_COST, |parts| parts.get_cost());
        let unknown_user_hash = bcrypt::hash("no such user", cost)
            .map_err(|e| format!("basic_auth_users: hashing with cost {cost}: {e}"))?;
        Ok(BasicAuth {
            users,
            verified: Mutex::default(),
            unknown_user_hash,
        })
    }

    /// Whether `authorization` (the header's value) carries a configured user's password.
    /// Runs bcrypt: call it off the async workers.
    pub(crate) fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return false;
        };
        let key = (user, password);
        if self.verified.lock().is_ok_and(|v| v.contains(&key)) {
            return true;
        }
        let (user, password) = &key;
        let (hash, known) = match self.users.get(user) {
            Some(hash) => (hash.as_str(), true),
            None => (self.unknown_user_hash.as_str(), false),
        };
        let ok = bcrypt::verify(password, hash).unwrap_or(false) && known;
        if ok && let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(key);
        }
        ok
    }
}

/// `Basic base64(user:password)` → (user, password).
fn parse_basic(header: &[u8]) -> Option<(String, String)> {
    let header = std::str::from_utf8(header).ok()?.trim();
    let (scheme, encoded) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_decoded_from_the_header() {
        // "scraper:s3cret:with colon" — the password may contain ':'.
        assert_eq!(
            parse_basic(b"Basic c2NyYXBlcjpzM2NyZXQ6d2l0aCBjb2xvbg=="),
            Some(("scraper".to_owned(), "s3cret:with colon".to_owned()))
        );
        assert_eq!(parse_basic(b"Basic !!!"), None);
        assert_eq!(parse_basic(b"Bearer YWJj"), None);
    }

    #[test]
    fn only_the_configured_password_of_a_configured_user_is_allowed() {
        let hash = bcrypt::hash("right", 4).unwrap();
        let auth = BasicAuth::new(HashMap::from([("scraper".to_owned(), hash)])).unwrap();
        let header = |user: &str, password: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )
        };
        assert!(auth.allows(Some(header("scraper", "right").as_bytes())));
        // Again, from the cache.
        assert!(auth.allows(Some(header("scraper", "right").as_bytes())));
        assert!(!auth.allows(Some(header("scraper", "wrong").as_bytes())));
        assert!(!auth.allows(Some(header("other", "right").as_bytes())));
        assert!(!auth.allows(None));
        assert!(BasicAuth::new(HashMap::from([("u".to_owned(), "plain".to_owned())])).is_err());
    }

    #[test]
    fn files_that_ask_for_what_is_not_implemented_are_refused_by_name() {
        let refused = |yaml: &str| serde_yaml_ng::from_str::<WebConfigFile>(yaml).unwrap_err();
        assert!(
            refused("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n")
                .to_string()
                .contains("cipher_suites")
        );
        assert!(
            refused("http_server_config:\n  http2: false\n")
                .to_string()
                .contains("http_server_config")
        );
        let ok: WebConfigFile = serde_yaml_ng::from_str(
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: c\nbasic_auth_users:\n  u: h\n",
        )
        .unwrap();
        assert_eq!(
            ok.tls_server_config.unwrap().client_auth_type,
            ClientAuthType::RequireAndVerifyClientCert
        );
    }
}
