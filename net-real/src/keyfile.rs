//! Persistent identity key files.
