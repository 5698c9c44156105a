//! Mutual challenge-response: both sides succeed with the same secret, each side refuses
//! a wrong one, and a tampered or reflected answer is refused.

use tandem::core::auth::{AuthError, Connector, Listener};
use tandem::core::wire::Msg;

fn handshake(
    c_secret: &[u8],
    l_secret: &[u8],
) -> (Result<Msg, AuthError>, Option<Result<(), AuthError>>) {
    let (c, challenge) = Connector::start(c_secret, [1; 32]).expect("start");
    let mut l = Listener::new(l_secret, [2; 32]).expect("listener");
    let response = l
        .on_challenge(&challenge)
        .expect("challenge is well formed");
    let proof = c.on_response(&response);
    let verdict = proof.as_ref().ok().map(|p| l.on_proof(p));
    (proof, verdict)
}

#[test]
fn same_secret_authenticates_both_ways() {
    let (proof, verdict) = handshake(b"s3cret", b"s3cret");
    assert!(proof.is_ok());
    assert_eq!(verdict, Some(Ok(())));
}

#[test]
fn wrong_secret_is_refused_by_the_connector() {
    let (proof, _) = handshake(b"s3cret", b"other");
    assert_eq!(proof.unwrap_err(), AuthError::BadMac);
}

#[test]
fn wrong_secret_is_refused_by_the_listener() {
    // A connector with the wrong secret that skips checking the response still cannot
    // produce a proof the listener accepts.
    let (_, challenge) = Connector::start(b"wrong", [1; 32]).expect("start");
    let mut l = Listener::new(b"right", [2; 32]).expect("listener");
    let response = l.on_challenge(&challenge).expect("response");
    let (c_wrong, _) = Connector::start(b"wrong", [1; 32]).expect("start");
    assert!(c_wrong.on_response(&response).is_err());
    let forged = Msg::AuthProof { mac: [0; 32] };
    assert_eq!(l.on_proof(&forged), Err(AuthError::BadMac));
}

#[test]
fn reflected_and_tampered_answers_are_refused() {
    let (c, challenge) = Connector::start(b"k", [1; 32]).expect("start");
    let mut l = Listener::new(b"k", [2; 32]).expect("listener");
    let response = l.on_challenge(&challenge).expect("response");
    // Reflecting the listener's own MAC back as the proof fails (role labels differ).
    let Msg::AuthResponse { mac, .. } = response.clone() else {
        unreachable!()
    };
    assert_eq!(l.on_proof(&Msg::AuthProof { mac }), Err(AuthError::BadMac));
    // Flipping one bit of the response fails on the connector.
    let Msg::AuthResponse { nonce, mut mac } = response else {
        unreachable!()
    };
    mac[0] ^= 1;
    assert_eq!(
        c.on_response(&Msg::AuthResponse { nonce, mac }),
        Err(AuthError::BadMac)
    );
    // Out-of-order messages are refused, never panic.
    assert_eq!(l.on_proof(&Msg::Ping { id: 1 }), Err(AuthError::Unexpected));
    assert!(Connector::start(b"", [0; 32]).is_err());
}
