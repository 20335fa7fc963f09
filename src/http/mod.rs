//! The HTTP lock protocol: Go lockgate's, plus extensions Go ignores. See `PROTOCOL.md`,
//! section "HTTP locks".

pub mod protocol;
