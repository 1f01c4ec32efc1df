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
pub(crate) enum TlsVersion {
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
    /// Reads `path`, checks its text ([`parse`]), then reads what it names: certificate and key
    /// files, client CAs.
    pub(crate) fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let fail = |reason: String| WebConfigError::File {
            path: path.to_owned(),
            reason,
        };
        let text = crate::files::read_string_bounded(path, MAX_CONFIG_BYTES)
            .map_err(|e| fail(crate::files::io_reason(&e)))?;
        let spec = parse(&text).map_err(fail)?;
        // Relative paths are relative to the file, as exporter-toolkit resolves them.
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = spec
            .tls
            .map(|tls| tls_acceptor(&tls, base))
            .transpose()
            .map_err(fail)?;
        let basic_auth = spec
            .basic_auth
            .map(BasicAuth::new)
            .transpose()
            .map_err(fail)?
            .map(Arc::new);
        Ok(WebConfig { tls, basic_auth })
    }
}

/// A web config file is a few lines; a bigger one is the wrong file.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A PEM file holds a certificate chain or a key: kilobytes. A CA bundle is the largest
/// (Debian's whole ca-certificates.crt is ~200 KiB).
const MAX_PEM_BYTES: u64 = 16 << 20;

/// A web config file's text, checked: everything that can be known without reading the files
/// it names or running bcrypt.
#[derive(Debug)]
pub(crate) struct WebConfigSpec {
    pub tls: Option<TlsSpec>,
    pub basic_auth: Option<BasicAuthUsers>,
}

/// `tls_server_config`, with its policy checked. Paths as written (relative to the file).
#[derive(Debug)]
pub(crate) struct TlsSpec {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca: Option<ClientCa>,
    /// Never empty, oldest first.
    pub versions: Vec<TlsVersion>,
}

/// Client certificates are verified against the CAs in `file`; without one they are refused
/// (`RequireAndVerifyClientCert`) or allowed (`VerifyClientCertIfGiven`).
#[derive(Debug)]
pub(crate) struct ClientCa {
    pub file: PathBuf,
    pub required: bool,
}

/// `basic_auth_users` with every hash parsed.
#[derive(Debug)]
pub(crate) struct BasicAuthUsers {
    pub users: HashMap<String, String>,
    /// The cost of one of the configured hashes, for the hash an unknown user is checked
    /// against ([`BasicAuth`]).
    pub cost: u32,
}

/// Parses and checks a web config file's text. Reads no file (the paths it names stay as
/// written) and hashes nothing: a bcrypt hash is parsed, never run, so a cost of 31 in the
/// text costs nothing here. The errors name the field and say what to write instead.
pub(crate) fn parse(text: &str) -> Result<WebConfigSpec, String> {
    let file: WebConfigFile = serde_yaml_ng::from_str(text)
        .map_err(|e| format!("{e} (see exporter-toolkit's web-configuration.md)"))?;
    let tls = file.tls_server_config.map(tls_spec).transpose()?;
    let basic_auth = if file.basic_auth_users.is_empty() {
        None
    } else {
        Some(basic_auth_users(file.basic_auth_users)?)
    };
    Ok(WebConfigSpec { tls, basic_auth })
}

fn tls_spec(tls: TlsServerConfig) -> Result<TlsSpec, String> {
    // The policy first: a contradiction in the file is reported before any file it names.
    let client_ca = match (tls.client_auth_type, tls.client_ca_file) {
        (ClientAuthType::NoClientCert, None) => None,
        (ClientAuthType::NoClientCert, Some(_)) => {
            return Err(
                "tls_server_config.client_ca_file is set but client_auth_type is not: \
                 set client_auth_type to RequireAndVerifyClientCert or VerifyClientCertIfGiven"
                    .to_owned(),
            );
        }
        (auth @ (ClientAuthType::RequestClientCert | ClientAuthType::RequireAnyClientCert), _) => {
            return Err(format!(
                "tls_server_config.client_auth_type {auth:?} (a client certificate that is not \
                 verified) is not supported: use RequireAndVerifyClientCert with a \
                 client_ca_file"
            ));
        }
        (
            auth @ (ClientAuthType::VerifyClientCertIfGiven
            | ClientAuthType::RequireAndVerifyClientCert),
            None,
        ) => {
            return Err(format!(
                "tls_server_config.client_auth_type {auth:?} needs client_ca_file, the CAs client \
                 certificates are verified against"
            ));
        }
        (auth, Some(file)) => Some(ClientCa {
            file,
            required: auth == ClientAuthType::RequireAndVerifyClientCert,
        }),
    };
    for (field, path) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)]
        .into_iter()
        .chain(client_ca.as_ref().map(|ca| ("client_ca_file", &ca.file)))
    {
        // An empty path would resolve to the file's own directory.
        if path.as_os_str().is_empty() {
            return Err(format!(
                "tls_server_config.{field} is empty: give the path of a PEM file"
            ));
        }
    }
    let versions: Vec<TlsVersion> = [TlsVersion::TLS12, TlsVersion::TLS13]
        .into_iter()
        .filter(|v| tls.min_version.is_none_or(|min| *v >= min))
        .filter(|v| tls.max_version.is_none_or(|max| *v <= max))
        .collect();
    if versions.is_empty() {
        return Err(
            "tls_server_config: min_version/max_version leave no TLS version this agent speaks \
             (TLS12, TLS13)"
                .to_owned(),
        );
    }
    Ok(TlsSpec {
        cert_file: tls.cert_file,
        key_file: tls.key_file,
        client_ca,
        versions,
    })
}

/// bcrypt's own parser on every hash (a hash it cannot read would refuse every password), and
/// the cost range bcrypt runs; nothing is hashed.
fn basic_auth_users(users: HashMap<String, String>) -> Result<BasicAuthUsers, String> {
    let mut cost = None;
    // Sorted, so the error for a file with several bad entries is always the same one.
    let mut names: Vec<&String> = users.keys().collect();
    names.sort();
    for user in names {
        let hash = &users[user];
        let make_one = "make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`";
        if user.contains(':') {
            // RFC 7617: the user name ends at the first ':' of the credentials.
            return Err(format!(
                "basic_auth_users.{user}: a user name with ':' can never log in (basic auth \
                 splits user and password at the first ':'); rename the user"
            ));
        }
        let parts = hash
            .parse::<bcrypt::HashParts>()
            .map_err(|e| format!("basic_auth_users.{user}: not a bcrypt hash ({e}); {make_one}"))?;
        let user_cost = parts.get_cost();
        if !BCRYPT_COSTS.contains(&user_cost) {
            return Err(format!(
                "basic_auth_users.{user}: bcrypt cost {user_cost} is outside {}..={}; {make_one}",
                BCRYPT_COSTS.start(),
                BCRYPT_COSTS.end()
            ));
        }
        if user_cost > MAX_BCRYPT_COST {
            // The agent runs bcrypt at this cost at start-up (the unknown-user hash) and for
            // each new set of credentials a scraper sends; every step doubles it.
            return Err(format!(
                "basic_auth_users.{user}: bcrypt cost {user_cost} is above {MAX_BCRYPT_COST}: \
                 every step doubles the time of each check, which start-up and every new \
                 scraper's credentials wait for (cost 10 takes tens of milliseconds); {make_one}"
            ));
        }
        cost.get_or_insert(user_cost);
    }
    Ok(BasicAuthUsers {
        cost: cost.unwrap_or(bcrypt::DEFAULT_COST),
        users,
    })
}

/// The costs the bcrypt crate hashes with (Go's bcrypt: the same); a hash outside them
/// parses but can never verify.
const BCRYPT_COSTS: std::ops::RangeInclusive<u32> = 4..=31;

/// The highest cost accepted: 64 times cost 10, seconds per check, already near a scrape's
/// timeout.
const MAX_BCRYPT_COST: u32 = 16;

/// Reads `path` (at most [`MAX_PEM_BYTES`]), naming `field` in the error.
fn read_pem(field: &str, path: &Path) -> Result<Vec<u8>, String> {
    crate::files::read_bounded(path, MAX_PEM_BYTES).map_err(|e| {
        format!(
            "tls_server_config.{field} {}: {}",
            path.display(),
            crate::files::io_reason(&e)
        )
    })
}

fn tls_acceptor(tls: &TlsSpec, base: &Path) -> Result<TlsAcceptor, String> {
    let cert_file = base.join(&tls.cert_file);
    let certs = CertificateDer::pem_slice_iter(&read_pem("cert_file", &cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls_server_config.cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_server_config.cert_file {}: no PEM certificate in it",
            cert_file.display()
        ));
    }
    let key_file = base.join(&tls.key_file);
    let key = PrivateKeyDer::from_pem_slice(&read_pem("key_file", &key_file)?).map_err(|e| {
        format!(
            "tls_server_config.key_file {}: {e} (a PEM private key: PKCS#8, PKCS#1 or SEC1)",
            key_file.display(),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = tls
        .versions
        .iter()
        .filter_map(|v| match v {
            TlsVersion::TLS12 => Some(&rustls::version::TLS12),
            TlsVersion::TLS13 => Some(&rustls::version::TLS13),
            TlsVersion::TLS10 | TlsVersion::TLS11 => None,
        })
        .collect();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls_server_config: {e}"))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let ca_file = base.join(&ca.file);
            let mut roots = RootCertStore::empty();
            let cas = CertificateDer::pem_slice_iter(&read_pem("client_ca_file", &ca_file)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    format!(
                        "tls_server_config.client_ca_file {}: {e}",
                        ca_file.display()
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
            let verifier = if ca.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
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
    /// Runs bcrypt once at `users.cost` (tens of milliseconds at the usual 10).
    fn new(users: BasicAuthUsers) -> Result<BasicAuth, String> {
        let BasicAuthUsers { users, cost } = users;
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
        let users = parse(&format!("basic_auth_users:\n  scraper: '{hash}'\n"))
            .unwrap()
            .basic_auth
            .unwrap();
        assert_eq!(users.cost, 4);
        let auth = BasicAuth::new(users).unwrap();
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
    }

    #[test]
    fn hashes_are_parsed_not_run_and_unusable_ones_are_refused_by_user() {
        let refused = |yaml: &str| parse(yaml).unwrap_err();
        assert!(
            refused("basic_auth_users:\n  u: plain\n")
                .contains("basic_auth_users.u: not a bcrypt hash")
        );
        // Cost 31 is refused in no time (nothing is hashed); 16 is the most accepted.
        let slow = "$2y$31$abcdefghijklmnopqrstuu5Rbx6p0xJ2vSR6HMJHFCQi0hy6tpmWm";
        assert!(
            refused(&format!("basic_auth_users:\n  u: '{slow}'\n")).contains("cost 31 is above 16")
        );
        let slowest = "$2y$16$abcdefghijklmnopqrstuu5Rbx6p0xJ2vSR6HMJHFCQi0hy6tpmWm";
        assert_eq!(
            parse(&format!("basic_auth_users:\n  u: '{slowest}'\n"))
                .unwrap()
                .basic_auth
                .unwrap()
                .cost,
            16
        );
        let too_cheap = "$2y$03$abcdefghijklmnopqrstuu5Rbx6p0xJ2vSR6HMJHFCQi0hy6tpmWm";
        assert!(refused(&format!("basic_auth_users:\n  u: '{too_cheap}'\n")).contains("cost 3"));
        assert!(
            refused("basic_auth_users:\n  'a:b': '$2y$10$abcdefghijklmnopqrstuu5Rbx6p0xJ2vSR6HMJHFCQi0hy6tpmWm'\n")
                .contains("basic_auth_users.a:b")
        );
    }

    #[test]
    fn the_tls_policy_is_checked_before_any_file_is_read() {
        let refused = |yaml: &str| parse(yaml).unwrap_err();
        assert!(
            refused("tls_server_config:\n  cert_file: c\n  key_file: k\n  client_ca_file: ca\n")
                .contains("client_auth_type")
        );
        assert!(refused("tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: RequireAndVerifyClientCert\n").contains("needs client_ca_file"));
        assert!(refused("tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: RequestClientCert\n").contains("not supported"));
        assert!(
            refused("tls_server_config:\n  cert_file: ''\n  key_file: k\n")
                .contains("cert_file is empty")
        );
        assert!(
            refused("tls_server_config:\n  cert_file: c\n  key_file: k\n  max_version: TLS11\n")
                .contains("no TLS version")
        );
        let tls =
            parse("tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS13\n")
                .unwrap()
                .tls
                .unwrap();
        assert_eq!(tls.versions, [TlsVersion::TLS13]);
        assert!(tls.client_ca.is_none());
        assert!(parse("{}").unwrap().tls.is_none());
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
