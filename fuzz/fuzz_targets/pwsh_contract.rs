//! Feeds arbitrary bytes to the pwsh session-host contract decoder: every line a supervised
//! `pwsh` child prints (its output is remote input: a profile, a hostile target, a broken
//! script can print anything). Any panic is a bug; so is a decoded response that does not
//! survive its own re-encoding, a line past the limit that decodes, or probe facts whose keys
//! are not all `probe.*`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_coordinator::transport::pwsh::contract::{
    ContractError, Response, decode_response, script_facts,
};

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    match decode_response(data, MAX) {
        Ok(resp) => {
            assert!(data.len() <= MAX, "a line past the limit decoded");
            let again = serde_json::to_string(&resp).expect("a decoded response encodes");
            let back: Response =
                decode_response(again.as_bytes(), usize::MAX).expect("its encoding decodes");
            assert_eq!(back, resp, "a response changed through its own encoding");
            let _ = (resp.id(), resp.kind());
        }
        Err(ContractError::TooLong { len, max }) => assert!(len > max),
        Err(_) => {}
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(facts) = script_facts(text)
    {
        assert!(facts.keys().all(|k| k.starts_with("probe.")), "{facts:?}");
    }
});
