//! The controller's certificate authority: an ECDSA P-256 CA that signs agent, operator and
//! controller certificates; plus key/CSR generation and certificate inspection for everyone.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::files::{ensure_private_dir, read_string, write_private, write_public};
use crate::{CONTROLLER_SERVER_NAME, Error, Identity};

/// How far NotBefore is backdated, so a host whose clock runs a little behind accepts its
/// fresh certificate.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub serial: String,
    pub not_after_unix: i64,
}

/// The Drover CA: its certificate and its signing key.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    pub const CERT_FILE: &'static str = "ca.pem";
    pub const KEY_FILE: &'static str = "ca-key.pem";

    /// Makes a new self-signed CA valid for ten years.
    pub fn generate() -> Result<Ca, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A unique name per CA: a certificate from another Drover installation then fails as
        // "unknown CA" rather than as a bad signature under a CA of the same name.
        let id: [u8; 4] = rand::random();
        dn.push(DnType::CommonName, format!("Drover CA {}", hex::encode(id)));
        dn.push(DnType::OrganizationName, "Drover");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Ca { cert_pem, issuer })
    }

    /// Loads the CA from `dir`, or creates it there on first start (key 0600, dir 0700).
    /// Returns the CA and whether it was created.
    pub fn load_or_create(dir: &Path) -> Result<(Ca, bool), Error> {
        let cert_path = dir.join(Self::CERT_FILE);
        let key_path = dir.join(Self::KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            let cert_pem = read_string(&cert_path)?;
            let key = KeyPair::from_pem(&read_string(&key_path)?)?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
            return Ok((Ca { cert_pem, issuer }, false));
        }
        if cert_path.exists() != key_path.exists() {
            return Err(Error::Cert(format!(
                "{} holds only half of the CA ({} or {} is missing); restore it from backup rather than making a new CA, which would orphan every enrolled agent",
                dir.display(),
                Self::CERT_FILE,
                Self::KEY_FILE
            )));
        }
        ensure_private_dir(dir)?;
        let ca = Ca::generate()?;
        write_private(&key_path, ca.issuer.key().serialize_pem().as_bytes())?;
        write_public(&cert_path, ca.cert_pem.as_bytes())?;
        Ok((ca, true))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate, the pin that enrollment tokens carry.
    pub fn fingerprint(&self) -> String {
        fingerprint_pem(&self.cert_pem).unwrap_or_default()
    }

    /// Signs a CSR for `identity`. Only the CSR's public key is used: names, usages and
    /// validity come from the CA, never from the requester.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Issued, Error> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::Cert(format!("invalid CSR: {e}")))?;
        csr.params = leaf_params(identity, ttl)?;
        let cert = csr.signed_by(&self.issuer)?;
        issued(cert.pem())
    }

    /// Signs a CSR for `identity` valid between two instants (tests of expired certificates
    /// that must still belong to a key the test holds).
    pub fn sign_csr_between(
        &self,
        csr_pem: &str,
        identity: &Identity,
        not_before_unix: i64,
        not_after_unix: i64,
    ) -> Result<Issued, Error> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::Cert(format!("invalid CSR: {e}")))?;
        let mut params = leaf_params(identity, Duration::ZERO)?;
        params.not_before = at_unix(not_before_unix)?;
        params.not_after = at_unix(not_after_unix)?;
        csr.params = params;
        issued(csr.signed_by(&self.issuer)?.pem())
    }

    /// Checks that `cert_pem` is a client certificate this CA signed, whatever its validity
    /// says about today: the signature, the chain to this CA and the client-auth usage are
    /// verified at a moment inside the certificate's own validity. Whether an expired
    /// certificate is still good for something is the caller's decision (re-enrollment's grace);
    /// TLS itself refuses expired certificates everywhere else.
    pub fn verify_issued(&self, cert_pem: &str) -> Result<CertInfo, Error> {
        use rustls::server::WebPkiClientVerifier;
        let der = crate::tls::certs_from_pem(cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Cert("no certificate found in PEM".into()))?;
        let info = CertInfo::from_der(&der)?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in crate::tls::certs_from_pem(&self.cert_pem)? {
            roots
                .add(ca)
                .map_err(|e| Error::Cert(format!("bad CA certificate: {e}")))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Cert(e.to_string()))?;
        let within = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            info.not_after_unix.max(0) as u64,
        ));
        verifier
            .verify_client_cert(&der, &[], within)
            .map_err(|e| {
                Error::Cert(format!(
                    "the certificate was not issued by this controller's CA: {e}"
                ))
            })?;
        Ok(info)
    }

    /// Issues a certificate and a fresh key for `identity` (the admin bundle, tests, benches).
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<(Issued, String), Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = leaf_params(identity, ttl)?.signed_by(&key, &self.issuer)?;
        Ok((issued(cert.pem())?, key.serialize_pem()))
    }

    /// Issues a certificate valid between two instants (tests of expired certificates).
    pub fn issue_between(
        &self,
        identity: &Identity,
        not_before_unix: i64,
        not_after_unix: i64,
    ) -> Result<(Issued, String), Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = leaf_params(identity, Duration::ZERO)?;
        params.not_before = at_unix(not_before_unix)?;
        params.not_after = at_unix(not_after_unix)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((issued(cert.pem())?, key.serialize_pem()))
    }

    /// Issues the controller's TLS server certificate: the fixed name plus `extra_names`.
    /// Returns the chain (leaf then CA, so clients can pin the CA) and the key.
    pub fn issue_server(
        &self,
        extra_names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), Error> {
        let mut names = vec![CONTROLLER_SERVER_NAME.to_string()];
        names.extend(extra_names.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CONTROLLER_SERVER_NAME);
        params.distinguished_name = dn;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            format!("{}{}", cert.pem(), self.cert_pem),
            key.serialize_pem(),
        ))
    }
}

fn leaf_params(identity: &Identity, ttl: Duration) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    match identity {
        Identity::Agent { host } => dn.push(DnType::CommonName, host.as_str()),
        Identity::Operator { name, role } => {
            dn.push(DnType::CommonName, name.as_str());
            dn.push(DnType::OrganizationalUnitName, role.as_str());
        }
    }
    params.distinguished_name = dn;
    let uri = rcgen::string::Ia5String::try_from(identity.uri())
        .map_err(|e| Error::Identity(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW_ALLOWANCE;
    params.not_after = now + ttl;
    params.serial_number = Some(random_serial());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn at_unix(t: i64) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp(t).map_err(|e| Error::Cert(e.to_string()))
}

fn issued(cert_pem: String) -> Result<Issued, Error> {
    let info = CertInfo::from_pem(&cert_pem)?;
    Ok(Issued {
        cert_pem,
        serial: info.serial,
        not_after_unix: info.not_after_unix,
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

/// Makes a new P-256 key and a CSR for it. The key never leaves the caller.
/// Returns `(key_pem, csr_pem)`.
pub fn new_key_and_csr(common_name: &str) -> Result<(String, String), Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Makes a CSR signed with an existing key: re-enrollment proves that the agent still holds
/// the key of its (expired) certificate this way.
pub fn csr_for_key(key_pem: &str, common_name: &str) -> Result<String, Error> {
    let key = KeyPair::from_pem(key_pem)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    Ok(params.serialize_request(&key)?.pem()?)
}

/// The public key (SubjectPublicKeyInfo, DER) a CSR asks to have certified, once the CSR's
/// signature has been checked against it: proof that the requester holds the private key.
pub fn csr_public_key(csr_pem: &str) -> Result<Vec<u8>, Error> {
    use x509_parser::prelude::FromDer;
    let bad = |why: String| Error::Cert(format!("invalid CSR: {why}"));
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| bad(e.to_string()))?;
    csr.verify_signature()
        .map_err(|e| bad(format!("its signature does not verify ({e})")))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The Drover identity in the SAN URI, if the certificate carries one.
    pub identity: Option<Identity>,
    /// Serial number, lower-case hex.
    pub serial: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// The certified public key (SubjectPublicKeyInfo, DER).
    pub public_key: Vec<u8>,
}

impl CertInfo {
    /// Parses the first certificate of a PEM string.
    pub fn from_pem(pem: &str) -> Result<CertInfo, Error> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| Error::Cert(format!("not a PEM certificate: {e}")))?;
        Self::from_der(&pem.contents)
    }

    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, Error> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| Error::Cert(format!("unparsable certificate: {e}")))?;
        let role = cert
            .subject()
            .iter_organizational_unit()
            .next()
            .and_then(|ou| ou.as_str().ok());
        let identity = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .find_map(|name| match name {
                    GeneralName::URI(uri) if uri.starts_with("drover://") => Some(*uri),
                    _ => None,
                })
                .map(|uri| Identity::from_uri(uri, role))
                .transpose()?,
            Ok(None) => None,
            Err(e) => return Err(Error::Cert(format!("bad subjectAltName: {e}"))),
        };
        Ok(CertInfo {
            identity,
            serial: hex::encode(cert.raw_serial()),
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
            public_key: cert.public_key().raw.to_vec(),
        })
    }

    /// When to renew: at 40 % of the lifetime, comfortably before half-life. The lifetime is
    /// counted from issuance, not from the backdated NotBefore, so a short-lived certificate is
    /// not renewed the moment it arrives.
    pub fn renew_at_unix(&self) -> i64 {
        let issued = self.issued_unix();
        issued + (self.not_after_unix - issued) * 2 / 5
    }

    /// When the certificate was issued, for certificates of this CA: NotBefore is backdated by
    /// [`CLOCK_SKEW_ALLOWANCE`].
    pub fn issued_unix(&self) -> i64 {
        (self.not_before_unix + CLOCK_SKEW_ALLOWANCE.as_secs() as i64).min(self.not_after_unix)
    }
}

/// SHA-256 fingerprint (lower-case hex) of the first certificate in a PEM string.
pub fn fingerprint_pem(pem: &str) -> Result<String, Error> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| Error::Cert(format!("not a PEM certificate: {e}")))?;
    Ok(fingerprint_der(&pem.contents))
}

/// SHA-256 fingerprint (lower-case hex) of a DER certificate.
pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    #[test]
    fn ca_signs_csr_with_its_own_names_and_backdated_not_before() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca, created) = Ca::load_or_create(tmp.path()).unwrap();
        assert!(created);
        let (ca2, created) = Ca::load_or_create(tmp.path()).unwrap();
        assert!(!created);
        assert_eq!(ca.fingerprint(), ca2.fingerprint());

        let (_key, csr) = new_key_and_csr("whatever-the-requester-says").unwrap();
        let id = Identity::Agent {
            host: "web-1".into(),
        };
        let issued = ca.sign_csr(&csr, &id, Duration::from_secs(3600)).unwrap();
        let info = CertInfo::from_pem(&issued.cert_pem).unwrap();
        assert_eq!(info.identity, Some(id));
        let now = unix_now();
        assert!(info.not_before_unix <= now - 240, "NotBefore is backdated");
        assert!((info.not_after_unix - (now + 3600)).abs() < 5);
        let renew_in = info.renew_at_unix() - now;
        assert!(
            (1430..=1450).contains(&renew_in),
            "renews at 40% of 3600s, not {renew_in}s"
        );
    }

    #[test]
    fn operator_role_travels_in_the_certificate() {
        let ca = Ca::generate().unwrap();
        let id = Identity::Operator {
            name: "bob".into(),
            role: Role::Viewer,
        };
        let (issued, key) = ca.issue(&id, Duration::from_secs(60)).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        assert_eq!(
            CertInfo::from_pem(&issued.cert_pem).unwrap().identity,
            Some(id)
        );
    }

    #[test]
    fn an_expired_certificate_is_recognised_as_ours_and_a_foreign_one_is_not() {
        let ca = Ca::generate().unwrap();
        let id = Identity::Agent {
            host: "web-1".into(),
        };
        let now = unix_now();
        let (expired, key) = ca.issue_between(&id, now - 7200, now - 3600).unwrap();
        let info = ca.verify_issued(&expired.cert_pem).unwrap();
        assert_eq!(info.identity, Some(id.clone()));
        assert_eq!(info.serial, expired.serial);

        let foreign = Ca::generate().unwrap();
        let (theirs, _) = foreign.issue(&id, Duration::from_secs(60)).unwrap();
        let err = ca.verify_issued(&theirs.cert_pem).unwrap_err().to_string();
        assert!(err.contains("not issued by this controller's CA"), "{err}");
        // A server certificate of this CA is no client certificate.
        let (server_chain, _) = ca.issue_server(&[], Duration::from_secs(60)).unwrap();
        assert!(ca.verify_issued(&server_chain).is_err());

        // A CSR made with the certificate's own key carries that key; one with another key
        // does not; a CSR whose signature was tampered with is refused.
        let same = csr_for_key(&key, "web-1").unwrap();
        assert_eq!(csr_public_key(&same).unwrap(), info.public_key);
        let (_, other) = new_key_and_csr("web-1").unwrap();
        assert_ne!(csr_public_key(&other).unwrap(), info.public_key);
        let (_, pem) = x509_parser::pem::parse_x509_pem(same.as_bytes()).unwrap();
        let mut der = pem.contents.clone();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
        );
        let err = csr_public_key(&tampered).unwrap_err().to_string();
        assert!(err.contains("invalid CSR"), "{err}");
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = Ca::generate().unwrap();
        let id = Identity::Agent { host: "h".into() };
        let err = ca
            .sign_csr("not a csr", &id, Duration::from_secs(60))
            .unwrap_err();
        assert!(err.to_string().contains("invalid CSR"), "{err}");
    }

    #[test]
    fn half_a_ca_on_disk_is_an_error_not_a_new_ca() {
        let tmp = tempfile::tempdir().unwrap();
        Ca::load_or_create(tmp.path()).unwrap();
        std::fs::remove_file(tmp.path().join(Ca::KEY_FILE)).unwrap();
        let err = Ca::load_or_create(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("half of the CA"), "{err}");
    }
}
