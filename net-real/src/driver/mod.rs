//! Instance drivers (process; docker later).
