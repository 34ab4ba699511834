//! The interception CA: loaded from its two PEM files, or generated into them on first start
//! (the key file mode 0600, never logged), and the leaf certificates it signs for intercepted
//! hosts, cached per host until a quarter of their validity is left.
//!
//! Both follow RFC 5280 so strict verifiers accept them (OpenSSL 3's `-x509_strict`, Python's
//! `VERIFY_X509_STRICT`): the CA has basicConstraints CA:true (critical, pathlen 0), keyUsage
//! keyCertSign and cRLSign, and a Subject Key Identifier; a leaf has the host as its SAN, the
//! CA's key id as its Authority Key Identifier, its own SKI, basicConstraints CA:false,
//! keyUsage digitalSignature, extendedKeyUsage serverAuth, and a short validity.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SerialNumber,
};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// How long a generated CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are dated this far back, for clients whose clock is a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// The most hosts with a cached leaf; only hosts a route names are intercepted, so this bounds
/// the cache against a config with very many hosts, not against agents.
const MAX_CACHED_LEAVES: usize = 4096;

/// The CA: its signing key (in memory only), its certificate, and the leaf cache.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    leaf_validity: Duration,
    leaves: Mutex<HashMap<String, Leaf>>,
}

struct Leaf {
    config: Arc<ServerConfig>,
    renew_after: SystemTime,
}

/// A leaf certificate and its key, for tests and tools.
pub struct IssuedLeaf {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl CertAuthority {
    /// Loads the CA from `cert` and `key`, or, when neither file exists, generates one and writes
    /// both (the key 0600, created only if absent). One file without the other is an error.
    pub fn load_or_create(cert: &Path, key: &Path, leaf_validity: Duration) -> anyhow::Result<CertAuthority> {
        match (cert.exists(), key.exists()) {
            (true, true) => CertAuthority::load(cert, key, leaf_validity),
            (false, false) => CertAuthority::create(cert, key, leaf_validity),
            (true, false) => anyhow::bail!(
                "the forward-proxy CA certificate {} exists but its key {} does not (forward_proxy.ca_key_file)",
                cert.display(),
                key.display()
            ),
            (false, true) => anyhow::bail!(
                "the forward-proxy CA key {} exists but its certificate {} does not (forward_proxy.ca_cert_file)",
                key.display(),
                cert.display()
            ),
        }
    }

    fn load(cert: &Path, key: &Path, leaf_validity: Duration) -> anyhow::Result<CertAuthority> {
        use std::os::unix::fs::PermissionsExt;
        let cert_pem = std::fs::read_to_string(cert)
            .with_context(|| format!("cannot read the CA certificate {}", cert.display()))?;
        let key_text = zeroize::Zeroizing::new(
            std::fs::read_to_string(key).with_context(|| format!("cannot read the CA key {}", key.display()))?,
        );
        if std::fs::metadata(key).map(|m| m.permissions().mode() & 0o077 != 0).unwrap_or(false) {
            tracing::warn!(key = %key.display(), "the forward-proxy CA key is readable by group or others; chmod 600 it");
        }
        // The error says which file, never what is in it.
        let signing_key = KeyPair::from_pem(&key_text)
            .map_err(|_| anyhow::anyhow!("{} is not a PEM private key keyward can sign with", key.display()))?;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map(|c: CertificateDer<'static>| c)
            .map_err(|_| anyhow::anyhow!("{} holds no PEM certificate", cert.display()))?;
        // The certificate embeds its public key verbatim: a key of another certificate would sign
        // leaves no client can verify.
        let spki = signing_key.subject_public_key_info();
        if !der.windows(spki.len()).any(|w| w == spki.as_slice()) {
            anyhow::bail!("the CA key {} does not belong to the certificate {}", key.display(), cert.display());
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, signing_key)
            .map_err(|e| anyhow::anyhow!("{} is not a usable CA certificate: {e}", cert.display()))?;
        Ok(CertAuthority { issuer, cert_pem, leaf_validity, leaves: Mutex::new(HashMap::new()) })
    }

    fn create(cert: &Path, key: &Path, leaf_validity: Duration) -> anyhow::Result<CertAuthority> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let signing_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("cannot generate the CA key")?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "keyward");
        name.push(DnType::CommonName, "keyward forward-proxy CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + CA_VALIDITY).into();
        params.serial_number = Some(serial());
        params.use_authority_key_identifier_extension = true;
        let certificate = params.self_signed(&signing_key).context("cannot sign the CA certificate")?;
        let cert_pem = certificate.pem();
        // The key's directory is keyward's alone; agents read the certificate's.
        for (path, mode) in [(cert, 0o755), (key, 0o700)] {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(mode)
                    .create(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
        }
        let mut key_file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(key)
            .with_context(|| format!("cannot create the CA key {}", key.display()))?;
        key_file
            .write_all(zeroize::Zeroizing::new(signing_key.serialize_pem()).as_bytes())
            .with_context(|| format!("cannot write the CA key {}", key.display()))?;
        key_file.sync_all()?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(cert)
            .and_then(|mut f| f.write_all(cert_pem.as_bytes()))
            .with_context(|| format!("cannot write the CA certificate {}", cert.display()))?;
        tracing::info!(cert = %cert.display(), key = %key.display(), "generated the forward-proxy CA");
        let issuer = Issuer::new(params, signing_key);
        Ok(CertAuthority { issuer, cert_pem, leaf_validity, leaves: Mutex::new(HashMap::new()) })
    }

    /// The CA certificate, PEM: what agents add to their trust store.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A fresh leaf for `host` (a DNS name or an IP address), signed by the CA.
    pub fn issue(&self, host: &str) -> Result<IssuedLeaf, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        let mut name = DistinguishedName::new();
        // RFC 5280 caps a CN at 64 characters; clients check the SAN, which names the host
        // either way, and the subject stays non-empty.
        name.push(DnType::CommonName, if host.len() <= 64 { host } else { "keyward intercepted host" });
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + self.leaf_validity).into();
        params.serial_number = Some(serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(IssuedLeaf { cert: cert.der().clone(), key })
    }

    /// The TLS server config that presents `host`'s leaf (ALPN h2 and http/1.1): cached, and
    /// renewed once three quarters of its validity have passed.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, rcgen::Error> {
        let now = SystemTime::now();
        if let Some(leaf) = self.leaves.lock().expect("leaf cache").get(host).filter(|l| now < l.renew_after) {
            return Ok(leaf.config.clone());
        }
        // Signed outside the lock: two tunnels racing for a new host both sign, one is kept.
        let leaf = self.issue(host)?;
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("the aws-lc-rs provider supports the default protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![leaf.cert], leaf.key)
            .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut leaves = self.leaves.lock().expect("leaf cache");
        if leaves.len() >= MAX_CACHED_LEAVES {
            leaves.retain(|_, l| now < l.renew_after);
            if leaves.len() >= MAX_CACHED_LEAVES {
                leaves.clear();
            }
        }
        leaves.insert(host.to_string(), Leaf { config: config.clone(), renew_after: now + self.leaf_validity * 3 / 4 });
        Ok(config)
    }

    /// How many hosts have a cached leaf (for tests and the load test).
    pub fn cached_leaves(&self) -> usize {
        self.leaves.lock().expect("leaf cache").len()
    }
}

/// A random positive 16-byte serial number (RFC 5280 §4.1.2.2: at most 20 bytes, unique per CA).
fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_ca_is_written_once_and_loads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("state/ca.pem"), dir.path().join("state/ca.key"));
        let ca = CertAuthority::load_or_create(&cert, &key, Duration::from_secs(3600)).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let again = CertAuthority::load_or_create(&cert, &key, Duration::from_secs(3600)).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem(), "the second start loads the same CA");
        // A leaf signed by the loaded CA carries the CA's key id as its AKI.
        assert!(again.issue("api.github.com").is_ok());
        let first = again.server_config("api.github.com").unwrap();
        assert!(Arc::ptr_eq(&first, &again.server_config("api.github.com").unwrap()), "cached per host");
        assert_eq!(again.cached_leaves(), 1);

        std::fs::remove_file(&key).unwrap();
        let error = CertAuthority::load_or_create(&cert, &key, Duration::from_secs(3600)).err().unwrap().to_string();
        assert!(error.contains("exists but its key"), "{error}");
        // A key of another CA is refused, naming the files only.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = (other.path().join("c.pem"), other.path().join("c.key"));
        CertAuthority::load_or_create(&other.path().join("c.pem"), &other_key, Duration::from_secs(60)).unwrap();
        std::fs::copy(&other_key, &key).unwrap();
        let error = CertAuthority::load_or_create(&cert, &key, Duration::from_secs(3600)).err().unwrap().to_string();
        assert!(error.contains("does not belong to the certificate"), "{error}");
        assert!(!error.contains("PRIVATE KEY"), "{error}");
    }
}
