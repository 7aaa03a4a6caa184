//! What the fuzz targets in `fuzz_targets/` share: the checks each target makes
//! on one input. The targets themselves are one-liners around these.

pub mod node;
pub mod wire;
