//! The one error type of the protocol crate.

/// Why a frame could not be read or written. Every variant names what was wrong; none of them
/// is ever produced by a panic path.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announced more bytes than the configured maximum. Nothing was
    /// allocated for the body.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    Oversize { len: u64, max: u32 },
    /// The stream ended in the middle of a frame.
    #[error("truncated frame: needed {needed} bytes, stream ended after {have}")]
    Truncated { needed: usize, have: usize },
    /// A zero-length frame (never valid: every body is a non-empty envelope).
    #[error("empty frame")]
    Empty,
    /// The body is not a valid MessagePack envelope of the expected message type.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// The body nests deeper than the decoder allows.
    #[error("frame body nests deeper than {max_depth} levels")]
    TooDeep { max_depth: usize },
    /// The envelope is written in a protocol version we do not speak.
    #[error("unsupported protocol version {got} (supported {min}..={max})")]
    UnsupportedVersion { got: u16, min: u16, max: u16 },
    /// Version negotiation found no common version.
    #[error(
        "no common protocol version: ours {ours_min}..={ours_max}, theirs {theirs_min}..={theirs_max}"
    )]
    NoCommonVersion {
        ours_min: u16,
        ours_max: u16,
        theirs_min: u16,
        theirs_max: u16,
    },
    /// The peer sent a message that is valid on its own but not at this point of the exchange.
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    /// A message could not be encoded (or encodes above the maximum frame size).
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// The underlying stream failed.
    #[error("i/o error on frame stream: {0}")]
    Io(#[from] std::io::Error),
}
