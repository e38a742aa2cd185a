#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses one of the three checks.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::token(data));
