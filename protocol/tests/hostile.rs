//! Hostile input: truncated, oversize, garbage, deeply nested and wrong-version frames each give
//! their typed error, never a panic, and nothing is allocated beyond the frame cap.
//!
//! A counting global allocator records the largest single allocation, so "no allocation beyond
//! the cap" is measured, not assumed.
#![allow(unsafe_code)] // the counting allocator below, and nothing else
#![allow(clippy::unwrap_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use tollgate_protocol::agent::AgentRequest;
use tollgate_protocol::ctl::CtlRequest;
use tollgate_protocol::frame::{Envelope, encode_envelope};
use tollgate_protocol::{FrameDecoder, FrameError, FrameLimits, decode_body, encode_frame};

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Tests that reset and read LARGEST take this lock, so they do not see each other's buffers.
static MEASURE: Mutex<()> = Mutex::new(());

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SMALL: FrameLimits = FrameLimits {
    max_frame: 64 * 1024,
    max_depth: 16,
};

/// Runs `f` and returns the largest single allocation made meanwhile.
fn largest_allocation_during(f: impl FnOnce()) -> usize {
    let _guard = MEASURE.lock().unwrap_or_else(|p| p.into_inner());
    LARGEST.store(0, Ordering::SeqCst);
    f();
    LARGEST.load(Ordering::SeqCst)
}

fn valid_frame() -> Vec<u8> {
    encode_frame(
        &CtlRequest::Approve {
            run_id: uuid::Uuid::from_u128(9),
            operation_hash: "ab".repeat(32),
        },
        &SMALL,
    )
    .unwrap()
}

#[test]
fn every_truncation_is_typed() {
    let frame = valid_frame();
    for cut in 0..frame.len() {
        let mut dec = FrameDecoder::new(SMALL);
        dec.push(&frame[..cut]).unwrap();
        assert!(
            dec.next_message::<CtlRequest>().unwrap().is_none(),
            "cut {cut} produced a message"
        );
        match dec.finish() {
            Ok(()) => assert_eq!(cut, 0),
            Err(FrameError::Truncated { have, .. }) => assert_eq!(have, cut),
            Err(other) => panic!("cut {cut}: {other}"),
        }
    }
}

#[tokio::test]
async fn truncated_stream_is_typed_by_the_async_reader() {
    let frame = valid_frame();
    for cut in [1, 3, 4, 5, frame.len() - 1] {
        let mut r: &[u8] = &frame[..cut];
        let err = tollgate_protocol::io::read_frame::<_, CtlRequest>(&mut r, &SMALL)
            .await
            .unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn oversize_length_is_rejected_without_allocating_it() {
    let largest = largest_allocation_during(|| {
        let mut dec = FrameDecoder::new(SMALL);
        let err = dec.push(&u32::MAX.to_be_bytes()).unwrap_err();
        assert!(
            matches!(err, FrameError::Oversize { len, max } if len == u64::from(u32::MAX) && max == SMALL.max_frame)
        );
    });
    assert!(
        largest < 4096,
        "decoder allocated {largest} bytes for a rejected frame"
    );
}

#[test]
fn oversize_length_is_rejected_by_the_async_reader_without_allocating_it() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut bytes = (SMALL.max_frame + 1).to_be_bytes().to_vec();
    bytes.extend([0u8; 16]);
    let largest = largest_allocation_during(|| {
        let mut r: &[u8] = &bytes;
        let err = rt
            .block_on(tollgate_protocol::io::read_frame::<_, CtlRequest>(
                &mut r, &SMALL,
            ))
            .unwrap_err();
        assert!(matches!(err, FrameError::Oversize { .. }), "{err}");
    });
    assert!(
        largest < 4096,
        "reader allocated {largest} bytes for a rejected frame"
    );
}

#[test]
fn declared_lengths_inside_a_body_are_not_trusted() {
    // A MessagePack str32 header claiming 4 GiB inside a 10-byte body.
    let mut body = vec![0x82, 0xa1, b'v', 0x01, 0xa3, b'm', b's', b'g', 0xdb];
    body.extend(u32::MAX.to_be_bytes());
    let largest = largest_allocation_during(|| {
        let err = decode_body::<CtlRequest>(&body, &SMALL).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    });
    assert!(
        largest <= SMALL.max_frame as usize,
        "allocated {largest} bytes from a declared length"
    );
}

#[test]
fn deeply_nested_body_is_too_deep() {
    // {"v":1,"msg":[[[[...]]]]} nested far beyond the cap.
    let mut body = vec![0x82, 0xa1, b'v', 0x01, 0xa3, b'm', b's', b'g'];
    body.extend(std::iter::repeat_n(0x91, 10_000)); // fixarray of one element, 10k deep
    body.push(0xc0);
    let err = decode_body::<CtlRequest>(&body, &SMALL).unwrap_err();
    assert!(
        matches!(err, FrameError::TooDeep { max_depth: 16 }),
        "{err}"
    );
}

#[test]
fn wrong_version_is_unsupported_version() {
    let frame = encode_envelope(
        &Envelope {
            v: 1,
            msg: CtlRequest::Status,
        },
        &SMALL,
    )
    .unwrap();
    let err = decode_body::<CtlRequest>(&frame[4..], &SMALL).unwrap_err();
    assert!(
        matches!(
            err,
            FrameError::UnsupportedVersion {
                got: 1,
                min: 2,
                max: 2
            }
        ),
        "{err}"
    );
    // Even when the message itself is one this version cannot parse.
    let frame = encode_envelope(
        &Envelope {
            v: 9,
            msg: "NewRequestKind",
        },
        &SMALL,
    )
    .unwrap();
    let err = decode_body::<CtlRequest>(&frame[4..], &SMALL).unwrap_err();
    assert!(
        matches!(err, FrameError::UnsupportedVersion { got: 9, .. }),
        "{err}"
    );
}

#[test]
fn wrong_message_type_and_garbage_are_malformed() {
    let frame = encode_frame(&CtlRequest::Status, &SMALL).unwrap();
    let err = decode_body::<AgentRequest>(&frame[4..], &SMALL).unwrap_err();
    assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    let err = decode_body::<AgentRequest>(b"\xff\xfe\xfd garbage", &SMALL).unwrap_err();
    assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    assert!(matches!(
        decode_body::<AgentRequest>(b"", &SMALL),
        Err(FrameError::Empty)
    ));
    let mut dec = FrameDecoder::new(SMALL);
    assert!(matches!(dec.push(&[0, 0, 0, 0]), Err(FrameError::Empty)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes never panic the decoder and never make it allocate past the cap.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let largest = largest_allocation_during(|| {
            let mut dec = FrameDecoder::new(SMALL);
            if dec.push(&bytes).is_ok() {
                while let Ok(Some(_)) = dec.next_message::<AgentRequest>() {}
                let _ = dec.finish();
            }
            let _ = decode_body::<CtlRequest>(&bytes, &SMALL);
        });
        prop_assert!(largest <= SMALL.max_frame as usize + 4096);
    }

    /// A valid frame with one byte changed decodes to something or to a typed error.
    #[test]
    fn mutated_frames_never_panic(idx in any::<usize>(), val in any::<u8>()) {
        let mut frame = valid_frame();
        let i = idx % frame.len();
        frame[i] = val;
        let mut dec = FrameDecoder::new(SMALL);
        if dec.push(&frame).is_ok() {
            let _ = dec.next_message::<CtlRequest>();
        }
    }
}
