//! The JSON protocol messages a server accepts from clients.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_secagg::wire::*;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<AdvertiseKeys>(data);
    let _ = serde_json::from_slice::<ShareKeys>(data);
    let _ = serde_json::from_slice::<ConsistencySignature>(data);
    let _ = serde_json::from_slice::<UnmaskShares>(data);
    let _ = serde_json::from_slice::<tessera_secagg::RoundConfig>(data);
});
