//! End-to-end tests for plugin-host live in `tests/tests/`; this crate has no library code.
//! Its build script builds the example plugins, the worker-shim and the C plugin first.
