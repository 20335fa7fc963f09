use super::*;

#[test]
fn encodes_exactly_as_go() {
    // Go: json.Marshal(AcquireResponse{}) is this byte string.
    let zero = AcquireResponse::default();
    assert_eq!(
        serde_json::to_string(&zero).unwrap(),
        r#"{"lockHandle":{"uuid":"","lockName":""},"err":""}"#
    );
    assert_eq!(
        serde_json::to_string(&RenewLeaseResponse::default()).unwrap(),
        r#"{"err":""}"#
    );
    let req = AcquireRequest {
        lock_name: "x".into(),
        opts: AcquireOpts::default(),
    };
    // Go v0.1.1's AcquireRequest{LockName: "x"}.
    assert_eq!(
        serde_json::to_string(&req).unwrap(),
        r#"{"lockName":"x","opts":{"shared":false}}"#
    );
}

#[test]
fn decodes_go_and_nulls() {
    // Go v0.2.0 sends acquirerId always; nulls are zero values as in Go.
    let r: AcquireRequest =
        serde_json::from_str(r#"{"lockName":"a","opts":{"shared":true,"acquirerId":"q"}}"#)
            .unwrap();
    assert_eq!(r.opts.mode(), Mode::Shared);
    assert_eq!(r.opts.acquirer_id, "q");
    let r: AcquireRequest = serde_json::from_str(r#"{"lockName":"a","opts":null}"#).unwrap();
    assert_eq!(r.opts, AcquireOpts::default());
    let r: AcquireRequest = serde_json::from_str(
        r#"{"lockName":"a","opts":{"shared":null,"acquirerId":null},"extra":1}"#,
    )
    .unwrap();
    assert_eq!(r.opts, AcquireOpts::default());
    let r: AcquireResponse = serde_json::from_str(r#"{"err":null,"lockHandle":null}"#).unwrap();
    assert_eq!(r.error_code(), None);
    let r: RenewLeaseResponse =
        serde_json::from_str(r#"{"err":"no existing lock lease found"}"#).unwrap();
    assert_eq!(r.error_code(), Some(ErrorCode::NoExistingLockLeaseFound));
    let r: ReleaseResponse =
        serde_json::from_str(r#"{"err":"boom","code":"from_the_future"}"#).unwrap();
    assert_eq!(r.error_code(), Some(ErrorCode::Unknown));
}

#[test]
fn codes_round_trip() {
    for c in [
        ErrorCode::ShouldWait,
        ErrorCode::LockAlreadyLeased,
        ErrorCode::NoExistingLockLeaseFound,
        ErrorCode::BadRequest,
        ErrorCode::InvalidName,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Forbidden,
        ErrorCode::RequestTimeout,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::TooManyRequests,
        ErrorCode::Capacity,
        ErrorCode::ShuttingDown,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::OutcomeUnknown,
    ] {
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(s, format!("\"{}\"", c.as_str()));
        assert_eq!(serde_json::from_str::<ErrorCode>(&s).unwrap(), c);
    }
}

#[test]
fn every_503_is_refused_before_applied_and_a_504_is_in_doubt() {
    for c in [
        ErrorCode::Capacity,
        ErrorCode::ShuttingDown,
        ErrorCode::Unavailable,
    ] {
        assert_eq!(c.status(), 503);
        assert!(c.refused_before_applied(), "{c:?}");
    }
    assert_eq!(ErrorCode::OutcomeUnknown.status(), 504);
    assert!(!ErrorCode::OutcomeUnknown.refused_before_applied());
    assert!(!ErrorCode::Internal.refused_before_applied());
    assert!(!ErrorCode::Unknown.refused_before_applied());
    assert!(ErrorCode::TooManyRequests.refused_before_applied());
}
