//! Properties that the fuzz targets check, one function per target.
//!
//! Each function takes the raw fuzzer input and panics when a property fails. The fuzz targets in
//! `fuzz_targets/` call them, and `tests/fuzz_corpus.rs` in the main crate replays the saved corpus through them.
//! They use only wsgw and serde_json, which the main crate depends on too, so `cargo test` can include this file
//! without libfuzzer-sys.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wsgw::config::PolicyConfig;
use wsgw::domain::envelope::{unix_millis, validate_message_id};
use wsgw::domain::frame::ErrorCode;
use wsgw::domain::routing;
use wsgw::domain::{
    ClientFrame, Destination, Envelope, Identity, SendType, ServerFrame, TokenClaims, TokenError,
    TokenSigner,
};
use wsgw::gateway::inbound::{Inbound, classify};

/// Maximum length of an envelope error message, in bytes.
///
/// The fixed text of the longest message, the unknown-field error that lists all 12 fields, is 236 bytes with an
/// empty field name. Every valid field value is at most 128 bytes, so an error that also quotes a name or value
/// cut to about 64 characters fits. An error longer than this quotes the input at a length the input chooses.
pub const MAX_ENVELOPE_ERROR_LEN: usize = 1024;

/// Signing secret of the `token` target's signer (32 bytes, the minimum).
pub const TOKEN_SECRET: &[u8; 32] = b"wsgw-fuzz-token-secret-32-bytes!";
/// A former secret that the `token` target's signer still accepts, as during a rotation.
pub const FORMER_TOKEN_SECRET: &[u8; 32] = b"wsgw-fuzz-former-secret-32bytes!";
/// A secret the signer does not accept: tokens signed with it must never verify.
pub const OTHER_TOKEN_SECRET: &[u8; 32] = b"wsgw-fuzz-other-secret-32-bytes!";
/// How far past its expiry the `token` target's signer accepts a token, in ms.
pub const TOKEN_CLOCK_SKEW_MS: u64 = 5_000;
/// Number of leading input bytes of the `token` target that set `now` (little-endian ms since the Unix epoch).
pub const TOKEN_NOW_BYTES: usize = 8;

/// Identity of the client whose frames the `client_frame` target classifies.
pub const FRAME_SENDER: (&str, &str) = ("fuzz-user", "h5");
/// The only recipient clientType that the `client_frame` policy lets the sender message.
pub const FRAME_ALLOWED_RECIPIENT_TYPE: &str = "app";

/// Checks `Envelope::from_json` on UTF-8 input.
///
/// A parsed envelope survives `to_json` and `from_json` unchanged. A rejected one gets an error whose message is
/// non-empty and at most [`MAX_ENVELOPE_ERROR_LEN`] bytes long.
pub fn envelope(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Envelope::from_json(text) {
        Ok(envelope) => check_envelope_round_trip(&envelope),
        Err(error) => {
            let message = error.to_string();
            assert!(
                !message.trim().is_empty(),
                "empty error message for {text:?}"
            );
            assert!(
                message.len() <= MAX_ENVELOPE_ERROR_LEN,
                "error message is {} bytes long for an input of {} bytes (limit {MAX_ENVELOPE_ERROR_LEN}): {}",
                message.len(),
                text.len(),
                message.chars().take(300).collect::<String>()
            );
        }
    }
}

/// Asserts that `envelope` serializes to JSON that parses back to an equal envelope and the same JSON.
fn check_envelope_round_trip(envelope: &Envelope) {
    let json = envelope.to_json();
    let again = match Envelope::from_json(&json) {
        Ok(again) => again,
        Err(error) => panic!("to_json output is rejected by from_json: {error}\njson: {json}"),
    };
    assert_eq!(
        &again, envelope,
        "round trip changed the envelope\njson: {json}"
    );
    assert_eq!(
        again.to_json(),
        json,
        "second to_json differs from the first"
    );
}

/// Checks `TokenSigner::verify` on any string.
///
/// The first [`TOKEN_NOW_BYTES`] bytes of the input set `now`, and the rest, decoded as UTF-8 with replacement
/// characters, is the token. A token that verifies is at most [`TOKEN_CLOCK_SKEW_MS`] past its expiry, names a
/// valid identity and verifies again after re-signing its claims. It does not verify under a secret the signer
/// does not accept, and neither do its claims signed with that secret. A rejected token gets Malformed,
/// BadSignature or Expired, whose messages are fixed text, so they never echo the token. When the token text is
/// itself claims JSON, those claims signed with the signing or the former secret verify back to the same claims
/// unless they expired more than [`TOKEN_CLOCK_SKEW_MS`] ago or name an invalid identity.
pub fn token(data: &[u8]) {
    let split = data.len().min(TOKEN_NOW_BYTES);
    let mut now_bytes = [0u8; TOKEN_NOW_BYTES];
    now_bytes[..split].copy_from_slice(&data[..split]);
    let now_ms = u64::from_le_bytes(now_bytes);
    let Some(now) = UNIX_EPOCH.checked_add(Duration::from_millis(now_ms)) else {
        return;
    };
    let token = String::from_utf8_lossy(&data[split..]);

    let signer = fuzz_signer();
    let former = TokenSigner::new(FORMER_TOKEN_SECRET).expect("the former secret is 32 bytes");
    let other = TokenSigner::new(OTHER_TOKEN_SECRET).expect("the other secret is 32 bytes");

    match verify_token(&signer, &token, now) {
        Ok(claims) => check_verified_claims(&signer, &other, &token, &claims, now),
        Err(error) => {
            // These variants have fixed messages, so a rejection never echoes the token.
            assert!(
                matches!(
                    error,
                    TokenError::Malformed | TokenError::BadSignature | TokenError::Expired
                ),
                "verify returned {error:?}"
            );
        }
    }

    if let Ok(claims) = serde_json::from_str::<TokenClaims>(&token) {
        check_signed_claims(&signer, &former, &other, &claims, now);
    }
}

/// Builds the signer under test: it signs with [`TOKEN_SECRET`], also accepts [`FORMER_TOKEN_SECRET`] and
/// tolerates [`TOKEN_CLOCK_SKEW_MS`].
fn fuzz_signer() -> TokenSigner {
    TokenSigner::new(TOKEN_SECRET)
        .and_then(|signer| signer.accepting(FORMER_TOKEN_SECRET))
        .expect("the fuzz secrets are 32 bytes")
        .with_clock_skew(Duration::from_millis(TOKEN_CLOCK_SKEW_MS))
}

/// Calls the verifier under test. Every `verify` call of this file goes through here, so a change of its
/// signature touches one function.
fn verify_token(
    signer: &TokenSigner,
    token: &str,
    now: SystemTime,
) -> Result<TokenClaims, TokenError> {
    signer.verify(token, now)
}

/// True when a token with these claims has expired at `now`, allowing for [`TOKEN_CLOCK_SKEW_MS`].
fn token_expired(claims: &TokenClaims, now: SystemTime) -> bool {
    claims.expires_at_ms.saturating_add(TOKEN_CLOCK_SKEW_MS) <= unix_millis(now)
}

fn check_verified_claims(
    signer: &TokenSigner,
    other: &TokenSigner,
    token: &str,
    claims: &TokenClaims,
    now: SystemTime,
) {
    assert!(
        !token_expired(claims, now),
        "an expired token verified: expires at {} ms, now {} ms",
        claims.expires_at_ms,
        unix_millis(now)
    );
    assert!(
        Identity::new(&claims.unique_id, &claims.client_type).is_ok(),
        "a token with an invalid identity verified: {claims:?}"
    );

    let resigned = signer.sign(claims);
    assert_eq!(
        verify_token(signer, &resigned, now).as_ref(),
        Ok(claims),
        "re-signed claims do not verify to the same claims"
    );

    assert_eq!(
        verify_token(other, token, now),
        Err(TokenError::BadSignature),
        "a token verified under two different secrets"
    );
    let forged = other.sign(claims);
    assert_eq!(
        verify_token(signer, &forged, now),
        Err(TokenError::BadSignature),
        "claims signed with another secret verified"
    );
}

fn check_signed_claims(
    signer: &TokenSigner,
    former: &TokenSigner,
    other: &TokenSigner,
    claims: &TokenClaims,
    now: SystemTime,
) {
    let token = signer.sign(claims);
    let result = verify_token(signer, &token, now);
    assert_eq!(
        verify_token(signer, &former.sign(claims), now),
        result,
        "a token signed with the former secret verifies differently"
    );
    if token_expired(claims, now) {
        assert_eq!(
            result,
            Err(TokenError::Expired),
            "expired claims did not get Expired"
        );
    } else if Identity::new(&claims.unique_id, &claims.client_type).is_err() {
        assert_eq!(
            result,
            Err(TokenError::Malformed),
            "claims with an invalid identity did not get Malformed"
        );
    } else {
        assert_eq!(
            result.as_ref(),
            Ok(claims),
            "signed claims do not verify to the same claims"
        );
    }

    let forged = other.sign(claims);
    assert_eq!(
        verify_token(signer, &forged, now),
        Err(TokenError::BadSignature),
        "claims signed with another secret verified"
    );
}

/// Checks `classify` on UTF-8 input, for the sender [`FRAME_SENDER`] and a policy that lets h5 message app.
///
/// Ack and reject keep the frame's messageId. A publication carries the sender's identity, a valid messageId (the
/// client's, if it gave one), a timestamp taken during the call, the client's other fields unchanged, a send type
/// other than SERVER_TO_CLIENT and the destination of the routing rules. An invalid or forbidden frame gets an
/// error frame with a non-empty reason, the code that docs/protocol.md gives for the case, and the client's
/// messageId when it gave one.
pub fn client_frame(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sender = Identity::new(FRAME_SENDER.0, FRAME_SENDER.1).expect("valid fuzz sender");
    let mut policy = PolicyConfig::default();
    policy.client_to_client.insert(
        FRAME_SENDER.1.to_owned(),
        vec![FRAME_ALLOWED_RECIPIENT_TYPE.to_owned()],
    );
    // The same parse that classify does, to compare the result with the frame.
    let parsed = serde_json::from_str::<ClientFrame>(text).ok();

    let before = unix_millis(SystemTime::now());
    let inbound = classify(text, &sender, &policy);
    let after = unix_millis(SystemTime::now());

    match inbound {
        Inbound::Ack { message_id } => {
            assert_eq!(
                parsed,
                Some(ClientFrame::Ack { message_id }),
                "classify returned Ack for a frame that is not an ack with this messageId"
            );
        }
        Inbound::Reject { message_id, reason } => {
            assert_eq!(
                parsed,
                Some(ClientFrame::Reject { message_id, reason }),
                "classify returned Reject for a frame that is not a reject with this messageId and reason"
            );
        }
        Inbound::Publish(publication) => {
            let Some(ClientFrame::Send { message: sent }) = parsed else {
                panic!("classify returned Publish for a frame that is not a send: {text:?}");
            };
            check_publication(
                &publication.envelope,
                &publication.destination,
                &sent,
                before..=after,
            );
            assert_eq!(
                publication.replay_count, 0,
                "a client send has a replay count"
            );
        }
        Inbound::Invalid(frame) => check_rejected_frame(&frame, parsed.as_ref(), false),
        Inbound::Forbidden(frame) => check_rejected_frame(&frame, parsed.as_ref(), true),
    }
}

fn check_publication(
    published: &Envelope,
    destination: &Destination,
    sent: &Envelope,
    call_time: std::ops::RangeInclusive<u64>,
) {
    assert_eq!(published.from_unique_id.as_deref(), Some(FRAME_SENDER.0));
    assert_eq!(published.from_client_type.as_deref(), Some(FRAME_SENDER.1));
    assert_ne!(published.send_type, SendType::ServerToClient);

    let Some(message_id) = published.message_id.as_deref() else {
        panic!("a publication is missing its messageId");
    };
    assert!(
        validate_message_id(message_id).is_ok(),
        "invalid messageId {message_id:?}"
    );
    if let Some(claimed) = sent.message_id.as_deref() {
        assert_eq!(message_id, claimed, "the client's messageId was replaced");
    }
    let Some(timestamp) = published.timestamp else {
        panic!("a publication is missing its timestamp");
    };
    assert!(
        call_time.contains(&timestamp),
        "timestamp {timestamp} is outside the call, {call_time:?}"
    );

    // Every field the gateway does not stamp is published as the client sent it.
    assert_eq!(published.send_type, sent.send_type);
    assert_eq!(published.message_type, sent.message_type);
    assert_eq!(published.business_type, sent.business_type);
    assert_eq!(published.to_unique_id, sent.to_unique_id);
    assert_eq!(published.to_client_type, sent.to_client_type);
    assert_eq!(published.content, sent.content);
    assert_eq!(published.tags, sent.tags);
    assert_eq!(published.businesses, sent.businesses);

    if let Err(error) = published.validate() {
        panic!("a publication fails validation: {error}");
    }
    match routing::destination(published) {
        Ok(expected) => assert_eq!(destination, &expected, "destination differs from routing"),
        Err(error) => panic!("a publication has no destination: {error}"),
    }
    if published.send_type == SendType::ClientToClient {
        assert!(
            matches!(
                destination,
                Destination::Identity(identity)
                    if identity.client_type == FRAME_ALLOWED_RECIPIENT_TYPE
            ),
            "the policy allows only {FRAME_ALLOWED_RECIPIENT_TYPE}, but the destination is {destination:?}"
        );
    }
    check_envelope_round_trip(published);
}

fn check_rejected_frame(frame: &ServerFrame, parsed: Option<&ClientFrame>, forbidden: bool) {
    let ServerFrame::Error {
        code,
        reason,
        message_id,
    } = frame
    else {
        panic!("classify returned {frame:?} for a rejected frame, not an error frame");
    };
    assert!(
        !reason.trim().is_empty(),
        "error frame with an empty reason"
    );

    let sent = match parsed {
        None => {
            assert!(!forbidden, "a frame that does not parse is Forbidden");
            assert_eq!(*code, ErrorCode::InvalidFrame);
            assert_eq!(
                message_id, &None,
                "INVALID_FRAME carries a messageId: {reason}"
            );
            return;
        }
        Some(ClientFrame::Send { message }) => message,
        Some(other) => panic!("a valid {other:?} frame was rejected: {reason}"),
    };

    if forbidden {
        assert_eq!(*code, ErrorCode::Forbidden);
        assert_eq!(
            sent.send_type,
            SendType::ClientToClient,
            "the policy forbade a message that is not CLIENT_TO_CLIENT"
        );
        assert!(message_id.is_some(), "a forbidden send has no messageId");
    } else {
        assert!(
            matches!(code, ErrorCode::InvalidEnvelope | ErrorCode::Forbidden),
            "a send that parses is answered with {code:?}"
        );
        if *code == ErrorCode::Forbidden {
            assert_eq!(
                sent.send_type,
                SendType::ServerToClient,
                "only SERVER_TO_CLIENT sends are invalid with FORBIDDEN: {reason}"
            );
        }
    }
    // A messageId too long to be valid is not echoed back; any other is.
    match sent.message_id.as_deref() {
        Some(claimed) if claimed.len() <= wsgw::domain::envelope::MAX_MESSAGE_ID_LEN => assert_eq!(
            message_id.as_deref(),
            Some(claimed),
            "the error frame does not carry the client's messageId"
        ),
        Some(_) => assert_eq!(message_id, &None, "an overlong messageId was echoed"),
        None => {}
    }
}
