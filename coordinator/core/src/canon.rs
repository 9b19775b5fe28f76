//! The canonical binary encoding behind every hash and signature of the core.
//!
//! Serde's output depends on map order and format details, so hashed and signed data is
//! written by hand, field by field, in a fixed order:
//!
//! | value  | bytes |
//! |--------|-------|
//! | `u8`   | 1 byte |
//! | `u64`  | 8 bytes, big-endian |
//! | `bool` | 1 byte, `0` or `1` |
//! | bytes / UTF-8 text | `u64` length, then the bytes |
//! | list   | `u64` count, then each item |
//! | option | `0`, or `1` then the value |
//!
//! Every encoding starts with a domain tag (written as text), e.g. `tollgate/operation/v1`, so
//! bytes hashed for one purpose can never be mistaken for another. Length prefixes make the
//! encoding injective: two different field sequences never produce the same bytes.

use sha2::{Digest, Sha256};

/// Writes a canonical encoding.
#[derive(Debug, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// Starts an encoding with its domain tag.
    pub fn new(domain: &str) -> Self {
        let mut e = Encoder { buf: Vec::new() };
        e.str(domain);
        e
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Eight bytes, big-endian.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `0` or `1`.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Length-prefixed bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
        self
    }

    /// Length-prefixed UTF-8.
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    /// `0`, or `1` and the text.
    pub fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(s) => self.u8(1).str(s),
        }
    }

    /// A count followed by each text.
    pub fn strs<'a>(&mut self, items: impl ExactSizeIterator<Item = &'a str>) -> &mut Self {
        self.u64(items.len() as u64);
        for s in items {
            self.str(s);
        }
        self
    }

    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }

    /// Lowercase hex SHA-256 of the encoded bytes.
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(&self.buf))
    }
}

/// Why canonical bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonError {
    /// The input ended inside a field.
    #[error("truncated: needed {needed} more bytes at offset {at}")]
    Truncated {
        /// Bytes missing.
        needed: u64,
        /// Where.
        at: usize,
    },
    /// A field held a value outside its domain.
    #[error("invalid {field} at offset {at}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Where.
        at: usize,
    },
    /// Bytes remained after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// Reads a canonical encoding, checking every length against what is left (so a hostile
/// length never causes an allocation).
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Decoder<'a> {
    /// Starts reading and checks the domain tag.
    pub fn new(buf: &'a [u8], domain: &str) -> Result<Self, CanonError> {
        let mut d = Decoder { buf, at: 0 };
        if d.str("domain")? != domain {
            return Err(CanonError::Invalid {
                field: "domain",
                at: 0,
            });
        }
        Ok(d)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], CanonError> {
        let left = (self.buf.len() - self.at) as u64;
        if n > left {
            return Err(CanonError::Truncated {
                needed: n - left,
                at: self.at,
            });
        }
        let n = n as usize;
        let out = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, CanonError> {
        Ok(self.take(1)?[0])
    }

    /// Eight bytes, big-endian.
    pub fn u64(&mut self) -> Result<u64, CanonError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// Length-prefixed bytes.
    pub fn bytes(&mut self) -> Result<&'a [u8], CanonError> {
        let n = self.u64()?;
        self.take(n)
    }

    /// Length-prefixed UTF-8; `field` names it in errors.
    pub fn str(&mut self, field: &'static str) -> Result<&'a str, CanonError> {
        let at = self.at;
        let b = self.bytes()?;
        std::str::from_utf8(b).map_err(|_| CanonError::Invalid { field, at })
    }

    /// A count of texts, each length-prefixed. The count is bounded by the bytes left.
    pub fn strs(&mut self, field: &'static str) -> Result<Vec<&'a str>, CanonError> {
        let at = self.at;
        let n = self.u64()?;
        // Each item takes at least 8 bytes, so a larger count is a lie.
        if n > ((self.buf.len() - self.at) / 8) as u64 {
            return Err(CanonError::Invalid { field, at });
        }
        (0..n).map(|_| self.str(field)).collect()
    }

    /// Fails unless everything was read.
    pub fn finish(self) -> Result<(), CanonError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            n => Err(CanonError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_length_prefixed() {
        let mut e = Encoder::new("t/v1");
        e.u8(7)
            .u64(42)
            .bool(true)
            .str("ab")
            .strs(["x", "yz"].into_iter());
        let bytes = e.finish();
        let mut d = Decoder::new(&bytes, "t/v1").unwrap();
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u64().unwrap(), 42);
        assert_eq!(d.u8().unwrap(), 1);
        assert_eq!(d.str("s").unwrap(), "ab");
        assert_eq!(d.strs("l").unwrap(), vec!["x", "yz"]);
        d.finish().unwrap();
    }

    #[test]
    fn field_boundaries_matter() {
        let h = |a: &str, b: &str| {
            let mut e = Encoder::new("t");
            e.str(a).str(b);
            e.sha256_hex()
        };
        assert_ne!(h("ab", "c"), h("a", "bc"));
    }

    #[test]
    fn rejects_wrong_domain_truncation_lies_and_trailing_bytes() {
        let mut e = Encoder::new("t");
        e.str("hello");
        let bytes = e.finish();
        assert!(Decoder::new(&bytes, "other").is_err());
        let mut d = Decoder::new(&bytes[..bytes.len() - 1], "t").unwrap();
        assert!(matches!(d.str("s"), Err(CanonError::Truncated { .. })));
        let mut lie = Encoder::new("t");
        lie.u64(u64::MAX);
        let lie = lie.finish();
        let mut d = Decoder::new(&lie, "t").unwrap();
        assert!(d.strs("l").is_err());
        let mut extra = Encoder::new("t");
        extra.u8(1);
        let extra = extra.finish();
        assert_eq!(
            Decoder::new(&extra, "t").unwrap().finish(),
            Err(CanonError::Trailing(1))
        );
    }
}
