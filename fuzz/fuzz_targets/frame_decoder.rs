//! Feeds arbitrary bytes, in arbitrary chunkings, to the frame decoder for both links.
//! Any panic, overflow or allocation past the cap is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_protocol::agent::{AgentRequest, AgentResponse};
use tollgate_protocol::ctl::{CtlRequest, CtlResponse};
use tollgate_protocol::{FrameDecoder, FrameLimits, decode_body};

const LIMITS: FrameLimits = FrameLimits { max_frame: 64 * 1024, max_depth: 16 };

fn drain<T: serde::de::DeserializeOwned>(data: &[u8], chunk: usize) {
    let mut dec = FrameDecoder::new(LIMITS);
    for piece in data.chunks(chunk.max(1)) {
        if dec.push(piece).is_err() {
            return;
        }
        loop {
            match dec.next_message::<T>() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = dec.finish();
}

fuzz_target!(|data: &[u8]| {
    let chunk = data.first().map(|b| *b as usize % 17 + 1).unwrap_or(1);
    drain::<AgentRequest>(data, chunk);
    drain::<AgentResponse>(data, chunk);
    drain::<CtlRequest>(data, chunk);
    drain::<CtlResponse>(data, chunk);
    let _ = decode_body::<CtlRequest>(data, &LIMITS);
    let _ = decode_body::<AgentResponse>(data, &LIMITS);
});
