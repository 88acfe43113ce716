//! The identity reply parser and the rejection detector take arbitrary input without panicking.

use http::StatusCode;
use mosaic_auth_proxy::identity::client::parse_reply;
use mosaic_auth_proxy::mosaic::token_rejection;
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[a-zA-Z0-9_.]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        let keys = prop_oneof![
            Just("data".to_owned()),
            Just("errors".to_owned()),
            Just("authenticateServiceAccount".to_owned()),
            Just("accessToken".to_owned()),
            Just("expiresInSeconds".to_owned()),
            Just("code".to_owned()),
            Just("extensions".to_owned()),
            Just("exception".to_owned()),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(keys, inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(status in 100u16..600, body in prop::collection::vec(any::<u8>(), 0..512)) {
        let status = StatusCode::from_u16(status).unwrap();
        let _ = parse_reply(status, &body);
        let _ = token_rejection(&body);
    }

    #[test]
    fn arbitrary_json_never_panics_and_errors_are_never_a_token(value in json_value()) {
        let body = value.to_string();
        let parsed = parse_reply(StatusCode::OK, body.as_bytes());
        if let Ok((_, lifetime)) = parsed {
            prop_assert!(!lifetime.is_zero());
            prop_assert!(value.get("errors").and_then(|e| e.as_array()).is_none_or(|e| e.is_empty()));
        }
        let _ = token_rejection(body.as_bytes());
    }
}
