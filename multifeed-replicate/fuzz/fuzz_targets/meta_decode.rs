//! The meta exchange decoder on arbitrary bytes: no panic; what decodes re-encodes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    multifeed_replicate::fuzzing::meta_decode(data);
});
