//! The Ferry operator.
//!
//! Layout: reconcilers per kind arrive in `reconcile/`; for now the crate only links the
//! shared API so that the workspace builds as a whole.
