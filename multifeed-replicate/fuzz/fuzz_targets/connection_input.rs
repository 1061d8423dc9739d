//! The connection core on a hostile script (see `multifeed_replicate::fuzzing`): no panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    multifeed_replicate::fuzzing::connection_input(data);
});
