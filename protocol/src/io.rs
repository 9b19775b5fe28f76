//! Async frame helpers over any tokio stream (quinn's `SendStream`/`RecvStream` included).
//! They only move bytes; all checks are the sans-IO ones in [`crate::frame`].

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::FrameError;
use crate::frame::{FrameLimits, HEADER_LEN, check_len, decode_body, encode_frame};

/// Reads bytes until `buf` is full. Returns how many bytes were read before the stream ended.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut have = 0;
    while have < buf.len() {
        let n = r.read(&mut buf[have..]).await?;
        if n == 0 {
            break;
        }
        have += n;
    }
    Ok(have)
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly on a frame boundary.
pub async fn read_frame<R, T>(r: &mut R, limits: &FrameLimits) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut prefix = [0u8; HEADER_LEN];
    match fill(r, &mut prefix).await? {
        0 => return Ok(None),
        n if n < HEADER_LEN => {
            return Err(FrameError::Truncated {
                needed: HEADER_LEN,
                have: n,
            });
        }
        _ => {}
    }
    // The limit is checked before the body buffer exists.
    let len = check_len(prefix, limits)?;
    let mut body = vec![0u8; len];
    let have = fill(r, &mut body).await?;
    if have < len {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN + len,
            have: HEADER_LEN + have,
        });
    }
    decode_body(&body, limits).map(Some)
}

/// Reads one frame and fails with [`FrameError::Truncated`] if the stream ended instead.
pub async fn read_required<R, T>(r: &mut R, limits: &FrameLimits) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame(r, limits).await?.ok_or(FrameError::Truncated {
        needed: HEADER_LEN,
        have: 0,
    })
}

/// Writes one frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T, limits: &FrameLimits) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = encode_frame(msg, limits)?;
    w.write_all(&bytes).await?;
    Ok(())
}
