//! The Hyperpool pool daemon (`hyperpool serve`).
mod store;
