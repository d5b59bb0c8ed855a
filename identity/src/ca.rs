//! The mesh's certificate authority: a root and an intermediate issuing CA (ECDSA P-256)
//! that signs X509-SVIDs.
//!
//! On disk the CA is a folder of PEM files, the same whether we created it (`--data-dir`) or
//! the operator mounted it from a Kubernetes Secret:
//!
//! | file | what | needed |
//! | --- | --- | --- |
//! | `bundle.crt` | every trusted root (one or more) | yes |
//! | `issuer.crt` | the intermediate that signs SVIDs | yes |
//! | `issuer.key` | its private key, PKCS#8, mode 0600 | yes |
//! | `root.crt`, `root.key` | the current root and its key (to sign new intermediates) | no |
//!
//! Signing certificates carry no name constraints: rustls-webpki refuses chains with URI
//! name constraints.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::cert::{self, CertSummary};
use crate::csr::CheckedKey;
use crate::spiffe::{SpiffeId, TrustDomain};

/// How long a freshly created root is valid.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a freshly created intermediate is valid.
pub const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// SVIDs are valid from this long before they are issued, for clock skew between nodes.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA could not be loaded, created or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error(
        "the CA folder {0} is incomplete: {1} is missing (delete the folder to start over, or restore the file)"
    )]
    Incomplete(PathBuf, &'static str),
    #[error("the issuer certificate does not chain to any root in bundle.crt")]
    IssuerNotInBundle,
    #[error("the issuer expired at {0}")]
    IssuerExpired(OffsetDateTime),
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("{0} has no root.key: a new intermediate needs the current root's key")]
    NoRootKey(PathBuf),
    #[error("no root with serial {0} in the bundle")]
    UnknownRoot(String),
    #[error("root {0} signs the current intermediate: rotate the intermediate first")]
    RootInUse(String),
    #[error("root {0} is the only root left in the bundle")]
    LastRoot(String),
}

/// A certificate chain and its leaf's facts, as issued.
#[derive(Debug, Clone)]
pub struct Svid {
    /// Leaf first, then the intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The loaded CA, ready to sign.
#[derive(Debug)]
pub struct Ca {
    bundle: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, KeyPair>,
    issuer_cert: CertificateDer<'static>,
    issuer_not_after: OffsetDateTime,
    /// Serial (hex) of the root in the bundle that signed the issuer.
    issuer_root: String,
}

impl Ca {
    /// Loads the CA in `dir`, or creates a new root and intermediate there when the folder
    /// holds no CA yet. A partial CA is an error, never silently replaced.
    pub fn load_or_create(dir: &Path, td: &TrustDomain) -> Result<Self, CaError> {
        if !dir.join("issuer.key").exists() && !dir.join("bundle.crt").exists() {
            create(dir, td, OffsetDateTime::now_utc())?;
        }
        Self::load(dir)
    }

    /// Loads the CA from `dir` (see the module docs for the files).
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &'static str| -> Result<(PathBuf, Vec<u8>), CaError> {
            let path = dir.join(name);
            match fs::read(&path) {
                Ok(bytes) => Ok((path, bytes)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Err(CaError::Incomplete(dir.to_owned(), name))
                }
                Err(source) => Err(CaError::Io { path, source }),
            }
        };
        let (bundle_path, bundle_pem) = read("bundle.crt")?;
        let (cert_path, cert_pem) = read("issuer.crt")?;
        let (key_path, key_pem) = read("issuer.key")?;

        let bundle = CertificateDer::pem_slice_iter(&bundle_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&bundle_path, e))?;
        if bundle.is_empty() {
            return Err(bad(&bundle_path, "no certificates in the file"));
        }
        let issuer_cert =
            CertificateDer::from_pem_slice(&cert_pem).map_err(|e| bad(&cert_path, e))?;
        let key_pem = String::from_utf8(key_pem).map_err(|e| bad(&key_path, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e))?;
        if rcgen::PublicKeyData::subject_public_key_info(&key)
            != spki_of(&issuer_cert).map_err(|e| bad(&cert_path, e))?
        {
            return Err(bad(&key_path, "the key does not match issuer.crt"));
        }
        let issuer_root = bundle
            .iter()
            .find(|root| signed_by(&issuer_cert, root))
            .and_then(|root| cert::summarize(root).ok())
            .map(|root| root.serial)
            .ok_or(CaError::IssuerNotInBundle)?;
        let summary = cert::summarize(&issuer_cert).map_err(|e| bad(&cert_path, e))?;
        let issuer = Issuer::from_ca_cert_der(&issuer_cert, key).map_err(|e| bad(&cert_path, e))?;
        Ok(Self {
            bundle,
            issuer,
            issuer_cert,
            issuer_not_after: summary.not_after,
            issuer_root,
        })
    }

    /// The trusted roots, DER.
    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The trusted roots as one PEM text.
    pub fn trust_bundle_pem(&self) -> String {
        self.bundle.iter().map(|c| pem("CERTIFICATE", c)).collect()
    }

    /// Summaries of the roots, for status output.
    pub fn roots(&self) -> Vec<CertSummary> {
        self.bundle
            .iter()
            .filter_map(|c| cert::summarize(c).ok())
            .collect()
    }

    /// When the issuing intermediate expires.
    pub fn issuer_not_after(&self) -> OffsetDateTime {
        self.issuer_not_after
    }

    /// The issuing intermediate, for status output.
    pub fn issuer(&self) -> Option<CertSummary> {
        cert::summarize(&self.issuer_cert).ok()
    }

    /// The serial of the root that signed the intermediate.
    pub fn issuer_root(&self) -> &str {
        &self.issuer_root
    }

    /// Signs an X509-SVID for `id` over a checked CSR key, valid for `ttl` from `now` but
    /// never past the issuer's own expiry.
    pub fn issue(
        &self,
        id: &SpiffeId,
        key: &CheckedKey,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Svid, CaError> {
        self.sign(id, &key.0, ttl, now)
    }

    /// Issues an SVID for a key made here, in this process (the control plane's own
    /// serving certificate). The private key is returned to the caller and never written.
    pub fn issue_with_new_key(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<(Svid, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let svid = self.sign(id, &key, ttl, now)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((svid, der))
    }

    fn sign(
        &self,
        id: &SpiffeId,
        key: &impl rcgen::PublicKeyData,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Svid, CaError> {
        if now >= self.issuer_not_after {
            return Err(CaError::IssuerExpired(self.issuer_not_after));
        }
        // Certificates carry whole seconds; keep the reported times equal to the certificate's.
        let now = now.replace_nanosecond(0).expect("0 is a valid nanosecond");
        let params = svid_params(id, ttl, now, self.issuer_not_after)?;
        let leaf = params.signed_by(key, &self.issuer)?;
        Ok(Svid {
            serial: params
                .serial_number
                .as_ref()
                .map(|s| cert::hex(s.as_ref()))
                .unwrap_or_default(),
            not_before: params.not_before,
            not_after: params.not_after,
            chain: vec![leaf.der().clone(), self.issuer_cert.clone()],
        })
    }
}

/// The X509-SVID leaf: one URI SAN (critical, as the subject is empty), CA:false, key usage
/// digitalSignature only (critical), EKU serverAuth and clientAuth. Public so that tests can
/// forge leaves that differ from a real one in a single rule.
pub fn svid_params(
    id: &SpiffeId,
    ttl: Duration,
    now: OffsetDateTime,
    issuer_not_after: OffsetDateTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = now - BACKDATE;
    params.not_after = (now + ttl).min(issuer_not_after);
    Ok(params)
}

fn ca_params(
    cn: String,
    path_len: Option<u8>,
    now: OffsetDateTime,
    life: Duration,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshlet");
    if !cn.is_empty() {
        dn.push(DnType::CommonName, cn);
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + life;
    params
}

/// Creates a root and an intermediate in an empty `dir` (folder mode 0700).
fn create(dir: &Path, td: &TrustDomain, now: OffsetDateTime) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
    add_root(dir, td, now)?;
    new_intermediate(dir, td, now)
}

/// Root rotation, step 1: makes a new root, adds it to `bundle.crt` and makes it the root
/// (`root.crt`, `root.key`) that signs the next intermediate. Issuing does not change yet.
pub fn add_root(dir: &Path, td: &TrustDomain, now: OffsetDateTime) -> Result<(), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(String::new(), None, now, ROOT_LIFETIME);
    let tag = params
        .serial_number
        .as_ref()
        .map(|s| cert::hex(&s.as_ref()[..3]))
        .unwrap_or_default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("meshlet root CA {td} {tag}"));
    let root = params.self_signed(&key)?;
    let bundle_path = dir.join("bundle.crt");
    let mut bundle = match fs::read_to_string(&bundle_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(CaError::Io {
                path: bundle_path,
                source,
            });
        }
    };
    bundle.push_str(&root.pem());
    replace(&dir.join("root.key"), key.serialize_pem().as_bytes(), 0o600)?;
    replace(&dir.join("root.crt"), root.pem().as_bytes(), 0o644)?;
    replace(&bundle_path, bundle.as_bytes(), 0o644)
}

/// Root rotation, step 2 (and intermediate rotation): a new intermediate signed by the
/// current root, which issues from now on. Needs `root.key`.
pub fn new_intermediate(dir: &Path, td: &TrustDomain, now: OffsetDateTime) -> Result<(), CaError> {
    let root_key_path = dir.join("root.key");
    let root_key = match fs::read_to_string(&root_key_path) {
        Ok(pem) => KeyPair::from_pem(&pem).map_err(|e| bad(&root_key_path, e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CaError::NoRootKey(dir.to_owned()));
        }
        Err(source) => {
            return Err(CaError::Io {
                path: root_key_path,
                source,
            });
        }
    };
    let root_path = dir.join("root.crt");
    let root_pem = fs::read_to_string(&root_path).map_err(|source| CaError::Io {
        path: root_path.clone(),
        source,
    })?;
    let root_not_after = CertificateDer::from_pem_slice(root_pem.as_bytes())
        .ok()
        .and_then(|der| cert::summarize(&der).ok())
        .map(|s| s.not_after)
        .ok_or_else(|| bad(&root_path, "not a certificate"))?;
    let root = Issuer::from_ca_cert_pem(&root_pem, root_key).map_err(|e| bad(&root_path, e))?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(String::new(), Some(0), now, INTERMEDIATE_LIFETIME);
    params.not_after = params.not_after.min(root_not_after);
    let tag = params
        .serial_number
        .as_ref()
        .map(|s| cert::hex(&s.as_ref()[..3]))
        .unwrap_or_default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("meshlet issuing CA {td} {tag}"));
    params.use_authority_key_identifier_extension = true;
    let issuer = params.signed_by(&key, &root)?;
    replace(
        &dir.join("issuer.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    replace(&dir.join("issuer.crt"), issuer.pem().as_bytes(), 0o644)
}

/// Root rotation, step 3: removes the root with `serial` (hex) from `bundle.crt`. Refused
/// for the root that signed the current intermediate, and for the last root.
pub fn retire_root(dir: &Path, serial: &str) -> Result<(), CaError> {
    let current = Ca::load(dir)?;
    let serial = serial.to_ascii_lowercase();
    if current.issuer_root == serial {
        return Err(CaError::RootInUse(serial));
    }
    let (gone, kept): (Vec<_>, Vec<_>) = current.bundle.iter().partition(|root| {
        cert::summarize(root)
            .map(|s| s.serial == serial)
            .unwrap_or(false)
    });
    if gone.is_empty() {
        return Err(CaError::UnknownRoot(serial));
    }
    if kept.is_empty() {
        return Err(CaError::LastRoot(serial));
    }
    let pem_text: String = kept.iter().map(|c| pem("CERTIFICATE", c)).collect();
    replace(&dir.join("bundle.crt"), pem_text.as_bytes(), 0o644)
}

/// Replaces `path` whole: writes `path.new` (mode set at creation), then renames it over.
fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file that must not exist yet, with `mode` set at creation (no window in which
/// a key file is readable by others).
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let io_err = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err)?;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // aws-lc-rs's RNG fails only if the OS has no entropy source; then no CA can work.
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the OS random number generator is available");
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x40; // and exactly 16 bytes long
    SerialNumber::from_slice(&bytes)
}

fn spki_of(der: &CertificateDer<'_>) -> Result<Vec<u8>, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    Ok(cert.public_key().raw.to_vec())
}

fn signed_by(cert: &CertificateDer<'_>, root: &CertificateDer<'_>) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (Ok((_, cert)), Ok((_, root))) = (
        X509Certificate::from_der(cert),
        X509Certificate::from_der(root),
    ) else {
        return false;
    };
    cert.verify_signature(Some(root.public_key())).is_ok()
}

fn bad(path: &Path, reason: impl ToString) -> CaError {
    CaError::BadFile {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// PEM-encodes one DER object.
pub fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}
