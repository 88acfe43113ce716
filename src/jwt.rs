//! Reading a JWT's parts without verifying it: the proxy only looks at `exp` and `iat` of
//! tokens it was just given; verification is the upstream's job (and the stand-in's).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

/// The header and claims of a compact JWS, decoded.
pub struct Parts {
    pub header: Value,
    pub claims: Value,
}

/// Splits and decodes a compact JWS; `None` if it is not one.
pub fn decode(token: &str) -> Option<Parts> {
    let (signing_input, signature) = token.rsplit_once('.')?;
    let (header, claims) = signing_input.split_once('.')?;
    let json = |part: &str| -> Option<Value> {
        let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
        serde_json::from_slice::<Value>(&bytes)
            .ok()
            .filter(Value::is_object)
    };
    URL_SAFE_NO_PAD.decode(signature).ok()?;
    Some(Parts {
        header: json(header)?,
        claims: json(claims)?,
    })
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
        // {"alg":"RS256","kid":"k"} . {"exp":12} . "sig"
        let token = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJleHAiOjEyfQ.c2ln";
        let parts = decode(token).unwrap();
        assert_eq!(parts.header["kid"], "k");
        assert_eq!(seconds(&parts.claims, "exp"), Some(12.0));
        assert!(decode("a.b").is_none());
        assert!(decode("!!.??.**").is_none());
    }
}
