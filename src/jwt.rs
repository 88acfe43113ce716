//! Reading a JWT's parts without verifying it: the proxy only looks at `exp` and `iat` of
//! tokens it was just given; verification is the upstream's job (and the stand-in's).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

/// The three parts of a compact JWS, the header and claims decoded.
pub struct Parts<'a> {
    pub header: Value,
    pub claims: Value,
    /// `header.payload`, the bytes the signature covers.
    pub signing_input: &'a str,
    pub signature: Vec<u8>,
}

/// Splits and decodes a compact JWS; `None` if it is not one.
pub fn decode(token: &str) -> Option<Parts<'_>> {
    let (signing_input, signature) = token.rsplit_once('.')?;
    let (header, claims) = signing_input.split_once('.')?;
    let json = |part: &str| -> Option<Value> {
        let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
        serde_json::from_slice::<Value>(&bytes)
            .ok()
            .filter(Value::is_object)
    };
    Some(Parts {
        header: json(header)?,
        claims: json(claims)?,
        signing_input,
        signature: URL_SAFE_NO_PAD.decode(signature).ok()?,
    })
}

/// Encodes bytes as unpadded base64url, the JWT alphabet.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Returns a numeric claim in seconds since the epoch.
pub fn seconds(claims: &Value, name: &str) -> Option<f64> {
    claims.get(name)?.as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compact_jws_decodes_and_garbage_does_not() {
        let token = format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","kid":"k"}"#),
            b64(br#"{"exp":12}"#),
            b64(b"sig")
        );
        let parts = decode(&token).unwrap();
        assert_eq!(parts.header["kid"], "k");
        assert_eq!(seconds(&parts.claims, "exp"), Some(12.0));
        assert_eq!(parts.signature, b"sig");
        assert!(decode("a.b").is_none());
        assert!(decode("!!.??.**").is_none());
    }
}
