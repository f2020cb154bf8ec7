//! Error helpers shared by every layer.
//!
//! Errors stay typed (`thiserror`, one enum per module, causes as `#[source]`) up to where
//! they are shown; a line that must carry the whole chain (a log line, a thread's stop
//! reason, an API error body) renders it with [`error_chain`].

use std::error::Error;

/// "error: cause: root cause" for a typed error and its sources.
pub fn error_chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn test_error_chain_with_source_joins_every_cause() {
        let e = Outer(std::io::Error::other("root cause"));
        assert_eq!(error_chain(&e), "outer: root cause");
    }

    #[test]
    fn test_error_chain_without_source_is_the_message() {
        let e = std::io::Error::other("alone");
        assert_eq!(error_chain(&e), "alone");
    }
}
