//! The handover protocol's messages and their wire form, apart from any socket, so the
//! parser can be fuzzed like the others.
//!
//! A frame is a 10-byte header — the magic `LGHO`, the protocol version, the message
//! kind, the payload length (u32, big-endian) — then a JSON payload of at most
//! [`MAX_PAYLOAD`] bytes. The listening sockets ride along with the `Offer` frame as
//! SCM_RIGHTS, in the order the offer lists them. A conversation:
//!
//! ```text
//! newcomer → running:  Hello { pid, version }
//! running → newcomer:  Offer { pid, sockets }   (+ one descriptor per socket)
//!                      or Refused { reason }    (another newcomer is already at it)
//! newcomer → running:  Commit                   (it is ready: stop accepting)
//! running → newcomer:  Committed                (stopped: the sockets are yours)
//! ```
//!
//! A version other than [`VERSION`] is refused with a message saying which versions
//! differ, so a future protocol can be told apart from garbage.

use serde::{Deserialize, Serialize};

pub(crate) const MAGIC: [u8; 4] = *b"LGHO";
pub(crate) const VERSION: u8 = 1;
pub(crate) const HEADER_LEN: usize = 10;
/// Far above any real offer (a few dozen sockets), far below anything that could hurt.
pub(crate) const MAX_PAYLOAD: usize = 64 * 1024;
/// The most descriptors one offer may carry (listeners, the admin and handoff sockets).
pub(crate) const MAX_SOCKETS: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Message {
    Hello { pid: u32, version: String },
    Offer { pid: u32, sockets: Vec<Offered> },
    Commit,
    Committed,
    Refused { reason: String },
}

/// What a handed-over descriptor is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Offered {
    pub(crate) role: Role,
    /// The listener's name (empty for the admin and handoff sockets).
    pub(crate) name: String,
    /// The address it listens on, as the sender sees it: `127.0.0.1:6379`, `@name`.
    pub(crate) addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    Listener,
    Admin,
    Handoff,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("not a legate handover message (the first bytes are {0:?}, not \"LGHO\")")]
    Magic([u8; 4]),
    #[error("handover protocol version {got}, this legate speaks version {VERSION}")]
    Version { got: u8 },
    #[error("a handover message of {0} bytes (at most {MAX_PAYLOAD})")]
    TooLong(u32),
    #[error("a malformed handover message: {0}")]
    Payload(String),
    #[error("an offer of {0} sockets (at most {MAX_SOCKETS})")]
    TooManySockets(usize),
}

/// The frame for `message`.
pub(crate) fn encode(message: &Message) -> Vec<u8> {
    // Serializing these plain types to JSON cannot fail.
    let payload = serde_json::to_vec(message).unwrap_or_default();
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.push(VERSION);
    frame.push(0);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// The payload length a header announces, once the header is known to be ours.
pub(crate) fn decode_header(header: &[u8; HEADER_LEN]) -> Result<usize, ProtocolError> {
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != MAGIC {
        return Err(ProtocolError::Magic(magic));
    }
    if header[4] != VERSION {
        return Err(ProtocolError::Version { got: header[4] });
    }
    let len = u32::from_be_bytes([header[6], header[7], header[8], header[9]]);
    if len as usize > MAX_PAYLOAD {
        return Err(ProtocolError::TooLong(len));
    }
    Ok(len as usize)
}

pub(crate) fn decode_payload(payload: &[u8]) -> Result<Message, ProtocolError> {
    let message: Message = serde_json::from_slice(payload)
        .map_err(|error| ProtocolError::Payload(error.to_string()))?;
    if let Message::Offer { sockets, .. } = &message {
        if sockets.len() > MAX_SOCKETS {
            return Err(ProtocolError::TooManySockets(sockets.len()));
        }
    }
    Ok(message)
}

/// A whole frame from bytes: the fuzz target's entry, and the tests'.
pub(crate) fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
    let Some(header) = frame.first_chunk::<HEADER_LEN>() else {
        return Err(ProtocolError::Payload(format!(
            "{} bytes, shorter than a header",
            frame.len()
        )));
    };
    let len = decode_header(header)?;
    let payload = &frame[HEADER_LEN..];
    if payload.len() != len {
        return Err(ProtocolError::Payload(format!(
            "the header announces {len} bytes, {} follow",
            payload.len()
        )));
    }
    decode_payload(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        for message in [
            Message::Hello {
                pid: 7,
                version: "0.1.0".into(),
            },
            Message::Offer {
                pid: 8,
                sockets: vec![Offered {
                    role: Role::Listener,
                    name: "redis".into(),
                    addr: "127.0.0.1:6379".into(),
                }],
            },
            Message::Commit,
            Message::Committed,
            Message::Refused {
                reason: "busy".into(),
            },
        ] {
            assert_eq!(decode(&encode(&message)), Ok(message));
        }
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(matches!(
            decode(b"GET / HTTP/1.1\r\n\r\n"),
            Err(ProtocolError::Magic(_))
        ));
        let mut frame = encode(&Message::Commit);
        frame[4] = 9;
        assert_eq!(decode(&frame), Err(ProtocolError::Version { got: 9 }));
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[VERSION, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(decode(&huge), Err(ProtocolError::TooLong(u32::MAX)));
        let mut short = encode(&Message::Commit);
        short.pop();
        assert!(matches!(decode(&short), Err(ProtocolError::Payload(_))));
        assert!(matches!(decode(b"LG"), Err(ProtocolError::Payload(_))));
        let mut bad_json = MAGIC.to_vec();
        bad_json.extend_from_slice(&[VERSION, 0, 0, 0, 0, 2, b'{', b'}']);
        assert!(matches!(decode(&bad_json), Err(ProtocolError::Payload(_))));
    }

    #[test]
    fn an_offer_of_too_many_sockets_is_refused() {
        let offered = Offered {
            role: Role::Listener,
            name: String::new(),
            addr: String::new(),
        };
        let message = Message::Offer {
            pid: 1,
            sockets: vec![offered; MAX_SOCKETS + 1],
        };
        assert_eq!(
            decode(&encode(&message)),
            Err(ProtocolError::TooManySockets(MAX_SOCKETS + 1))
        );
    }
}
