//! RS256 signing and verification with `kid`, and the JWKS form of a key.

use ring::rand::SystemRandom;
use ring::signature::{self, RsaKeyPair, RsaPublicKeyComponents};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Value};

/// The stand-in's bundled key: public knowledge, for local use only, never trusted by Mosaic.
const BUNDLED_KEY: &[u8] = include_bytes!("signing-key.pem");
/// A second key for rotation drills.
const BUNDLED_NEXT_KEY: &[u8] = include_bytes!("signing-key-2.pem");

/// Why a signing key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the key is not a PKCS#8 PEM private key")]
    Pem(#[source] rustls_pki_types::pem::Error),
    #[error("the key is not an RSA key of 2048 to 8192 bits")]
    Rejected(ring::error::KeyRejected),
}

/// An RSA private key that signs RS256 tokens.
pub struct SigningKey {
    kid: String,
    pair: RsaKeyPair,
    n: Vec<u8>,
    e: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish()
    }
}

impl SigningKey {
    /// Reads a PKCS#8 PEM RSA key (`openssl genpkey -algorithm RSA`).
    pub fn from_pem(pem: &[u8]) -> Result<SigningKey, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(KeyError::Pem)?;
        let pair = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(KeyError::Rejected)?;
        let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
        let kid = crate::secret::sha256_hex(&public.n, 12);
        Ok(SigningKey {
            kid,
            pair,
            n: public.n,
            e: public.e,
        })
    }

    /// Returns the bundled key of the stand-in.
    pub fn bundled() -> SigningKey {
        SigningKey::from_pem(BUNDLED_KEY).expect("the bundled key is a valid RSA key")
    }

    /// Returns the stand-in's second bundled key, the one a rotation drill turns to.
    pub fn bundled_next() -> SigningKey {
        SigningKey::from_pem(BUNDLED_NEXT_KEY).expect("the bundled key is a valid RSA key")
    }

    /// Returns the key id put in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Returns the public key as a JWK.
    pub fn jwk(&self) -> Value {
        json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid, "n": b64(&self.n), "e": b64(&self.e)})
    }

    /// Signs `claims` as an RS256 JWT with this key's `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let mut token = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut sig = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                token.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing with a valid key does not fail");
        token.push('.');
        token.push_str(&b64(&sig));
        token
    }
}

/// A public key from a JWKS.
#[derive(Clone, Debug)]
pub struct VerifyingKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

impl VerifyingKey {
    /// Reads an RSA JWK; `None` if it is not one.
    pub fn from_jwk(jwk: &Value) -> Option<VerifyingKey> {
        use base64::Engine;
        let field = |name: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(jwk.get(name)?.as_str()?)
                .ok()
        };
        (jwk.get("kty")?.as_str()? == "RSA").then_some(())?;
        Some(VerifyingKey {
            n: field("n")?,
            e: field("e")?,
        })
    }

    /// Checks the RS256 signature of a compact JWS.
    pub fn verifies(&self, token: &str) -> bool {
        use base64::Engine;
        let Some((signing_input, signature)) = token.rsplit_once('.') else {
            return false;
        };
        let Ok(signature) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(signature)
        else {
            return false;
        };
        RsaPublicKeyComponents {
            n: &self.n,
            e: &self.e,
        }
        .verify(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            signing_input.as_bytes(),
            &signature,
        )
        .is_ok()
    }
}

/// Encodes bytes as unpadded base64url, the JWT alphabet.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt;

    #[test]
    fn a_signed_token_verifies_with_its_jwk_and_not_when_altered() {
        let key = SigningKey::bundled();
        let token = key.sign(&json!({"sub": "x", "exp": 1}));
        let parts = jwt::decode(&token).unwrap();
        assert_eq!(parts.header["kid"], key.kid());
        assert_eq!(parts.header["alg"], "RS256");
        let public = VerifyingKey::from_jwk(&key.jwk()).unwrap();
        assert!(public.verifies(&token));
        let forged = token.replacen(".", &format!(".{}", b64(b"{}")), 1);
        assert!(!public.verifies(&forged));
    }
}
