//! The Ferry CLI.
