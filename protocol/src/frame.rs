//! Sans-IO framing: `u32` big-endian length + MessagePack [`Envelope`].
//!
//! Nothing here touches a socket. [`encode_frame`] turns a message into bytes,
//! [`FrameDecoder`] turns bytes (in any chunking) back into messages, and [`decode_body`]
//! decodes one complete body. The length is checked before the body buffer exists, and the
//! MessagePack decoder runs with a nesting cap and never pre-allocates from a declared length.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::FrameError;
use crate::version::{PROTOCOL_VERSION, SUPPORTED};

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Bounds every decoder and encoder enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest body accepted or produced, in bytes.
    pub max_frame: u32,
    /// Deepest MessagePack nesting accepted.
    pub max_depth: usize,
}

impl FrameLimits {
    /// 4 MiB bodies, 32 levels of nesting: far above any legitimate message.
    pub const DEFAULT: FrameLimits = FrameLimits {
        max_frame: 4 * 1024 * 1024,
        max_depth: 32,
    };
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What every frame body carries: the protocol version it is written in, and the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub v: u16,
    pub msg: T,
}

/// Only the version of an envelope; decoded first so that a message from an unknown version is
/// reported as [`FrameError::UnsupportedVersion`], not as a confusing decode failure.
#[derive(Deserialize)]
struct VersionOnly {
    v: u16,
}

/// Encodes `msg` in the current protocol version as one frame (prefix included).
pub fn encode_frame<T: Serialize>(msg: &T, limits: &FrameLimits) -> Result<Vec<u8>, FrameError> {
    encode_envelope(
        &Envelope {
            v: PROTOCOL_VERSION,
            msg,
        },
        limits,
    )
}

/// Encodes an explicit envelope as one frame. Tests use it to write other versions.
pub fn encode_envelope<T: Serialize>(
    env: &Envelope<T>,
    limits: &FrameLimits,
) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    rmp_serde::encode::write_named(&mut buf, env).map_err(|e| FrameError::Encode(e.to_string()))?;
    let body_len = buf.len() - HEADER_LEN;
    let len = u32::try_from(body_len)
        .ok()
        .filter(|len| *len <= limits.max_frame)
        .ok_or(FrameError::Oversize {
            len: body_len as u64,
            max: limits.max_frame,
        })?;
    buf[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

/// Checks a length prefix against the limits. Call before allocating the body.
pub fn check_len(prefix: [u8; HEADER_LEN], limits: &FrameLimits) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix);
    if len > limits.max_frame {
        return Err(FrameError::Oversize {
            len: u64::from(len),
            max: limits.max_frame,
        });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    Ok(len as usize)
}

fn map_decode_err(e: rmp_serde::decode::Error, limits: &FrameLimits) -> FrameError {
    match e {
        rmp_serde::decode::Error::DepthLimitExceeded => FrameError::TooDeep {
            max_depth: limits.max_depth,
        },
        other => FrameError::Malformed(other.to_string()),
    }
}

fn decode_exact<T: DeserializeOwned>(body: &[u8], limits: &FrameLimits) -> Result<T, FrameError> {
    let mut rest: &[u8] = body;
    let value = {
        // `Read` over a slice: string and binary lengths are read incrementally, never
        // pre-allocated from the declared length.
        let mut de = rmp_serde::Deserializer::new(&mut rest);
        de.set_max_depth(limits.max_depth);
        T::deserialize(&mut de).map_err(|e| map_decode_err(e, limits))?
    };
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after message",
            rest.len()
        )));
    }
    Ok(value)
}

/// Decodes one complete frame body (without its prefix) into a message.
pub fn decode_body<T: DeserializeOwned>(
    body: &[u8],
    limits: &FrameLimits,
) -> Result<T, FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    if body.len() > limits.max_frame as usize {
        return Err(FrameError::Oversize {
            len: body.len() as u64,
            max: limits.max_frame,
        });
    }
    let VersionOnly { v } = decode_exact(body, limits)?;
    if !SUPPORTED.contains(v) {
        return Err(FrameError::UnsupportedVersion {
            got: v,
            min: SUPPORTED.min,
            max: SUPPORTED.max,
        });
    }
    let env: Envelope<T> = decode_exact(body, limits)?;
    Ok(env.msg)
}

/// Incremental decoder: feed it bytes in any chunking, take whole messages out.
///
/// The buffer holds at most one partial frame plus whatever the last [`push`](Self::push)
/// delivered; a length prefix above the limit fails as soon as its four bytes are in.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: FrameLimits,
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            buf: Vec::new(),
        }
    }

    /// Appends received bytes. Fails at once if a complete length prefix is over the limit.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.buf.extend_from_slice(bytes);
        self.pending_len().map(|_| ())
    }

    fn pending_len(&self) -> Result<Option<usize>, FrameError> {
        match self.buf.get(..HEADER_LEN) {
            Some(prefix) => {
                let mut p = [0u8; HEADER_LEN];
                p.copy_from_slice(prefix);
                check_len(p, &self.limits).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Takes the next complete frame body out of the buffer, if one is there.
    pub fn next_body(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(len) = self.pending_len()? else {
            return Ok(None);
        };
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let body = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(body))
    }

    /// Takes and decodes the next complete message, if one is there.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_body()? {
            Some(body) => decode_body(&body, &self.limits).map(Some),
            None => Ok(None),
        }
    }

    /// Call at end of stream: bytes of an unfinished frame are a [`FrameError::Truncated`].
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let needed = match self.pending_len()? {
            Some(len) => HEADER_LEN + len,
            None => HEADER_LEN,
        };
        Err(FrameError::Truncated {
            needed,
            have: self.buf.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_handles_byte_by_byte_delivery() {
        let limits = FrameLimits::DEFAULT;
        let mut bytes = encode_frame(&"hello".to_string(), &limits).unwrap();
        bytes.extend(encode_frame(&"world".to_string(), &limits).unwrap());
        let mut dec = FrameDecoder::new(limits);
        let mut got = Vec::new();
        for b in bytes {
            dec.push(&[b]).unwrap();
            while let Some(m) = dec.next_message::<String>().unwrap() {
                got.push(m);
            }
        }
        dec.finish().unwrap();
        assert_eq!(got, vec!["hello".to_string(), "world".to_string()]);
    }

    #[test]
    fn oversize_prefix_fails_before_body_arrives() {
        let limits = FrameLimits {
            max_frame: 16,
            max_depth: 8,
        };
        let mut dec = FrameDecoder::new(limits);
        let err = dec.push(&17u32.to_be_bytes()).unwrap_err();
        assert!(
            matches!(err, FrameError::Oversize { len: 17, max: 16 }),
            "{err}"
        );
    }

    #[test]
    fn encoder_refuses_to_write_oversize_frames() {
        let limits = FrameLimits {
            max_frame: 8,
            max_depth: 8,
        };
        let err = encode_frame(&"a string longer than eight bytes", &limits).unwrap_err();
        assert!(matches!(err, FrameError::Oversize { max: 8, .. }), "{err}");
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let limits = FrameLimits::DEFAULT;
        let frame = encode_frame(&1u8, &limits).unwrap();
        let mut body = frame[HEADER_LEN..].to_vec();
        body.push(0xc0);
        assert!(matches!(
            decode_body::<u8>(&body, &limits),
            Err(FrameError::Malformed(_))
        ));
    }
}
