//! An error and all its sources on one line, `outer: cause: root cause`, so a wrapped reason
//! (a TLS alert inside a QUIC close inside a connect error) reaches the operator. The one copy,
//! here because every crate of the workspace may need it.

/// `e`, then each of its sources, joined by `": "`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("connect failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn every_source_is_named_in_order() {
        let e = Outer(std::io::Error::other("certificate revoked"));
        assert_eq!(super::chain(&e), "connect failed: certificate revoked");
    }
}
