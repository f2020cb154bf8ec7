//! Minimal JSON writer into a fixed buffer (printed in one go at the end).

use core::fmt::{self, Write};

/// A byte buffer that implements `fmt::Write`; overflow sets `truncated`.
pub struct Buf<'a> {
    bytes: &'a mut [u8],
    len: usize,
    pub truncated: bool,
}

impl<'a> Buf<'a> {
    pub fn new(bytes: &'a mut [u8]) -> Self {
        Buf { bytes, len: 0, truncated: false }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.bytes.len() - self.len;
        if s.len() > room {
            self.truncated = true;
            return Err(fmt::Error);
        }
        self.bytes[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
        self.len += s.len();
        Ok(())
    }
}

/// Writes JSON objects/arrays with comma bookkeeping.
pub struct Json<'w, W: Write> {
    out: &'w mut W,
    first: bool,
}

impl<'w, W: Write> Json<'w, W> {
    pub fn new(out: &'w mut W) -> Self {
        Json { out, first: true }
    }

    fn sep(&mut self) {
        if !self.first {
            let _ = self.out.write_char(',');
        }
        self.first = false;
    }

    fn key(&mut self, k: &str) {
        self.sep();
        let _ = write!(self.out, "\"{}\":", k);
    }

    pub fn begin_object(&mut self) {
        let _ = self.out.write_char('{');
        self.first = true;
    }
    pub fn end_object(&mut self) {
        let _ = self.out.write_char('}');
        self.first = false;
    }
    /// An object as an element of an array.
    pub fn begin_object_item(&mut self) {
        self.sep();
        self.begin_object();
    }
    pub fn begin_object_field(&mut self, k: &str) {
        self.key(k);
        self.begin_object();
    }
    pub fn begin_array_field(&mut self, k: &str) {
        self.key(k);
        let _ = self.out.write_char('[');
        self.first = true;
    }
    pub fn end_array(&mut self) {
        let _ = self.out.write_char(']');
        self.first = false;
    }

    pub fn u64(&mut self, k: &str, v: u64) {
        self.key(k);
        let _ = write!(self.out, "{}", v);
    }
    /// A float with `decimals` digits (finite values only; others become null).
    pub fn f64(&mut self, k: &str, v: f64, decimals: usize) {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.out, "{:.*}", decimals, v);
        } else {
            let _ = self.out.write_str("null");
        }
    }
    pub fn null(&mut self, k: &str) {
        self.key(k);
        let _ = self.out.write_str("null");
    }
    pub fn bool(&mut self, k: &str, v: bool) {
        self.key(k);
        let _ = self.out.write_str(if v { "true" } else { "false" });
    }
    /// A string; the caller's text is plain ASCII without quotes or backslashes.
    pub fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        let _ = self.out.write_char('"');
        for c in v.chars() {
            let _ = match c {
                '"' => self.out.write_str("\\\""),
                '\\' => self.out.write_str("\\\\"),
                c if (c as u32) < 0x20 => write!(self.out, "\\u{:04x}", c as u32),
                c => self.out.write_char(c),
            };
        }
        let _ = self.out.write_char('"');
    }
    /// A `[a, b]` pair inside an array.
    pub fn pair(&mut self, a: u64, b: u64) {
        self.sep();
        let _ = write!(self.out, "[{},{}]", a, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_nested_objects_and_arrays_have_commas_in_the_right_places() {
        let mut bytes = [0u8; 256];
        let mut b = Buf::new(&mut bytes);
        let mut j = Json::new(&mut b);
        j.begin_object();
        j.u64("a", 1);
        j.begin_object_field("o");
        j.str("s", "x\"y");
        j.bool("t", true);
        j.end_object();
        j.begin_array_field("h");
        j.pair(1, 2);
        j.pair(3, 4);
        j.end_array();
        j.f64("f", 1.5, 2);
        j.null("n");
        j.end_object();
        assert_eq!(
            core::str::from_utf8(b.as_bytes()).unwrap(),
            r#"{"a":1,"o":{"s":"x\"y","t":true},"h":[[1,2],[3,4]],"f":1.50,"n":null}"#
        );
    }

    #[test]
    fn test_buffer_overflow_sets_truncated() {
        let mut bytes = [0u8; 4];
        let mut b = Buf::new(&mut bytes);
        let _ = core::fmt::Write::write_str(&mut b, "hello");
        assert!(b.truncated);
    }
}
