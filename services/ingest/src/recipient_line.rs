//! The fast path of an NDJSON campaign's recipient line: one pass over the
//! line's bytes that checks it, then the recipient written as
//! [`write_recipient`] would write it after serde had parsed it into a
//! [`Recipient`], without building the recipient or its variables' tree:
//! the variables' bytes as they are in the line (without its whitespace,
//! when it has any).
//!
//! It takes only lines whose output it can be sure of, where serde's
//! would be the same bytes: keys in ascending order without repeats (serde's
//! maps sort them and keep the last of a repeat), strings without escapes,
//! integers that fit in 64 bits (others become floats, written anew), no
//! fractions or exponents. Whitespace between tokens is dropped, as serde
//! writes none. Anything else, including every line serde refuses, gets
//! `None`, and the caller takes serde's path, which names the problem.
//!
//! [`write_recipient`]: crate::campaigns
//! [`Recipient`]: ledger_schemas::Recipient

/// Deeper than this is left to serde (its own limit is 128).
const MAX_DEPTH: usize = 64;

/// What [`recipient`] wrote: the address (as it is in the line, between
/// its quotes) and the size of the variables' JSON (0 without any).
#[derive(Debug, PartialEq, Eq)]
pub struct Written<'a> {
    pub address: &'a str,
    pub variables_size: usize,
}

/// Writes the recipient of `line` into `out` (cleared first) as
/// `{"address":…,"variables":…}`, compact, the variables left out when
/// there are none; `vars` is scratch space (for variables with
/// whitespace). `None` when the line is not in the subset described above
/// (`out` then holds nothing of use).
pub fn recipient<'a>(line: &'a [u8], out: &mut Vec<u8>, vars: &mut Vec<u8>) -> Option<Written<'a>> {
    out.clear();
    vars.clear();
    // One check of the whole line (a short string's check costs more in
    // calls than in bytes), then strings are slices of it.
    let text = std::str::from_utf8(line).ok()?;
    let mut p = Parser { s: line, text, i: 0, spaced: false };
    p.ws();
    p.eat(b'{')?;
    let mut address = None;
    // Where the variables' object is, and whether it has whitespace in it.
    let mut variables: Option<(usize, usize, bool)> = None;
    p.ws();
    if p.peek()? != b'}' {
        loop {
            p.ws();
            let key = p.plain_string()?;
            p.ws();
            p.eat(b':')?;
            p.ws();
            match key {
                "address" if address.is_none() => address = Some(p.plain_string()?),
                "variables" if variables.is_none() => {
                    // An object only: serde refuses anything else here.
                    if p.peek()? != b'{' {
                        return None;
                    }
                    let start = p.i;
                    p.spaced = false;
                    p.value(0)?;
                    variables = Some((start, p.i, p.spaced));
                }
                _ => return None,
            }
            p.ws();
            match p.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
    } else {
        p.i += 1;
    }
    p.ws();
    if p.i != line.len() {
        return None;
    }
    let address = address?;
    // Most lines have no whitespace: their variables are written as they are.
    let vars: &[u8] = match variables {
        None => &[],
        Some((start, end, false)) => &line[start..end],
        Some((start, end, true)) => {
            compact_into(&line[start..end], vars);
            vars
        }
    };
    out.extend_from_slice(b"{\"address\":\"");
    out.extend_from_slice(address.as_bytes());
    out.push(b'"');
    // `{}` is no variables: serde skips an empty map.
    let variables_size = if vars.len() > 2 { vars.len() } else { 0 };
    if variables_size > 0 {
        out.extend_from_slice(b",\"variables\":");
        out.extend_from_slice(vars);
    }
    out.push(b'}');
    Some(Written { address, variables_size })
}

/// `value` as serde writes it: the same bytes without the whitespace
/// between tokens (the subset's strings hold no escapes, so a quote always
/// opens or closes one).
fn compact_into(value: &[u8], out: &mut Vec<u8>) {
    let mut in_string = false;
    for &b in value {
        in_string ^= b == b'"';
        if in_string || !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(b);
        }
    }
}

/// The index of the first byte of `s` that ends a plain string: a quote, a
/// backslash or a control character. Eight bytes at a time: for each
/// condition, the lowest byte that a word's bit trick flags is the first
/// byte that meets it (a false flag can only come above a true one).
fn string_end(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_in = |w: u64| w.wrapping_sub(ONES) & !w;
    let mut i = 0;
    while let Some(word) = s.get(i..i + 8) {
        let w = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let flags = (zero_in(w ^ (ONES * u64::from(b'"')))
            | zero_in(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w))
            & HIGHS;
        if flags != 0 {
            return Some(i + (flags.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    s[i..].iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).map(|p| i + p)
}

struct Parser<'a> {
    s: &'a [u8],
    /// The same bytes, valid UTF-8.
    text: &'a str,
    i: usize,
    /// Whether `ws` skipped anything since this was last cleared.
    spaced: bool,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        Some(b)
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.next()? == b).then_some(())
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
            self.spaced = true;
        }
    }

    /// A string without escapes or control characters: what is between
    /// the quotes (which are ASCII, so the ends are character boundaries).
    fn plain_string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        let len = string_end(&self.s[start..])?;
        self.i = start + len;
        self.eat(b'"')?;
        self.text.get(start..start + len)
    }

    /// One value of the subset, passed over; what serde writes for it is
    /// its bytes made compact (`compact_into`).
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.plain_string()?;
            }
            b'{' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                self.ws();
                if self.peek()? == b'}' {
                    self.i += 1;
                } else {
                    let mut last: Option<&str> = None;
                    loop {
                        self.ws();
                        let key = self.plain_string()?;
                        // Ascending without repeats, as serde's map writes them.
                        if last.is_some_and(|l| l >= key) {
                            return None;
                        }
                        last = Some(key);
                        self.ws();
                        self.eat(b':')?;
                        self.ws();
                        self.value(depth + 1)?;
                        self.ws();
                        match self.next()? {
                            b',' => continue,
                            b'}' => break,
                            _ => return None,
                        }
                    }
                }
            }
            b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                } else {
                    loop {
                        self.ws();
                        self.value(depth + 1)?;
                        self.ws();
                        match self.next()? {
                            b',' => {}
                            b']' => break,
                            _ => return None,
                        }
                    }
                }
            }
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            b'-' | b'0'..=b'9' => self.integer()?,
            _ => return None,
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if !self.s[self.i..].starts_with(word) {
            return None;
        }
        self.i += word.len();
        Some(())
    }

    /// An integer serde keeps as one (i64 below zero, u64 from zero), in
    /// the form it writes it: no leading zeros, no `-0`, no fraction or
    /// exponent after it.
    fn integer(&mut self) -> Option<()> {
        let negative = self.peek()? == b'-';
        if negative {
            self.i += 1;
        }
        let digits = self.s[self.i..].iter().take_while(|b| b.is_ascii_digit()).count();
        let text = &self.s[self.i..self.i + digits];
        self.i += digits;
        if digits == 0 || (text[0] == b'0' && (digits > 1 || negative)) {
            return None;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let mut magnitude: u64 = 0;
        for &d in text {
            magnitude = magnitude.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        if negative && magnitude > i64::MIN.unsigned_abs() {
            return None;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger_schemas::Recipient;

    /// What serde's path writes for `line`, or `None` where it refuses it.
    fn serde_writes(line: &[u8]) -> Option<(Vec<u8>, String, usize)> {
        let r: Recipient = serde_json::from_slice(line).ok()?;
        let mut out = Vec::new();
        let size = crate::campaigns::write_recipient(&mut out, &r).ok()?;
        Some((out, r.address, size))
    }

    fn fast(line: &str) -> Option<(Vec<u8>, String, usize)> {
        let (mut out, mut vars) = (Vec::new(), Vec::new());
        let w = recipient(line.as_bytes(), &mut out, &mut vars)?;
        let address = w.address.to_owned();
        Some((out, address, w.variables_size))
    }

    #[test]
    fn plain_lines_are_written_as_serde_writes_them() {
        for line in [
            r#"{"address":"a@example.com"}"#,
            r#"{"address":"a@example.com","variables":{}}"#,
            r#"{"variables":{"name":"Ann","order":7},"address":"a@example.com"}"#,
            r#" { "address" : "a@example.com" , "variables" : { "a" : [ 1 , -2 , true , null , { } , [ ] ] , "b" : { "c" : "d" } } } "#,
            r#"{"address":"ünï@example.com","variables":{"max":18446744073709551615,"min":-9223372036854775808,"ñame":"Zoë ✓"}}"#,
        ] {
            let got = fast(line).unwrap_or_else(|| panic!("not taken: {line}"));
            assert_eq!(Some(got), serde_writes(line.as_bytes()), "{line}");
        }
    }

    #[test]
    fn what_serde_would_write_differently_or_refuse_is_left_to_it() {
        for line in [
            // serde sorts keys, keeps the last of a repeat, writes escapes its own way
            r#"{"address":"a@example.com","variables":{"b":1,"a":2}}"#,
            r#"{"address":"a@example.com","variables":{"a":1,"a":2}}"#,
            r#"{"address":"a@example.com","variables":{"a":"\u0041\/"}}"#,
            r#"{"address":"a\u0040example.com"}"#,
            // numbers it writes anew
            r#"{"address":"a@example.com","variables":{"a":1.50}}"#,
            r#"{"address":"a@example.com","variables":{"a":1e3}}"#,
            r#"{"address":"a@example.com","variables":{"a":-0}}"#,
            r#"{"address":"a@example.com","variables":{"a":18446744073709551616}}"#,
            r#"{"address":"a@example.com","variables":{"a":-9223372036854775809}}"#,
            // and what it refuses
            r#"{"address":"a@example.com","variables":{"a":01}}"#,
            r#"{"address":"a@example.com","variables":[]}"#,
            r#"{"address":"a@example.com","variables":null}"#,
            r#"{"address":"a@example.com","extra":1}"#,
            r#"{"address":"a@example.com","address":"b@example.com"}"#,
            r#"{"variables":{}}"#,
            r#"{"address":"a@example.com"} x"#,
            r#"{"address":"a@example.com","variables":{"a":tru}}"#,
            r#"{"address":"a@example.com",}"#,
            "{\"address\":\"a\tb@example.com\"}",
            r#"["a@example.com"]"#,
            "",
        ] {
            assert_eq!(fast(line), None, "taken: {line}");
        }
        let deep =
            format!(r#"{{"address":"a@example.com","variables":{{"a":{}1{}}}}}"#, "[".repeat(70), "]".repeat(70));
        assert_eq!(fast(&deep), None, "too deep for the fast path");
        let invalid_utf8 = b"{\"address\":\"a\xff@example.com\"}";
        assert!(recipient(invalid_utf8, &mut Vec::new(), &mut Vec::new()).is_none());
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (-1e6f64..1e6).prop_map(serde_json::Value::from),
            "[a-zé✓ \"\\\\/\t]{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-c]{0,2}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A line as a producer might write it: the JSON of `value` with
    /// whitespace put between its tokens, its object keys possibly out of
    /// order or repeated (the text of a whole map is taken as it is).
    fn spaced(json: &str, spaces: &[u8]) -> String {
        let mut out = String::new();
        let mut in_string = false;
        let mut escaped = false;
        let mut k = 0;
        for c in json.chars() {
            if in_string {
                out.push(c);
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
                continue;
            }
            if c == '"' {
                in_string = true;
            }
            if matches!(c, ',' | ':' | '{' | '}' | '[' | ']') {
                let n = spaces.get(k).copied().unwrap_or(0) % 3;
                k += 1;
                out.push_str(&" \t\r\n"[..n as usize]);
            }
            out.push(c);
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        /// Whatever the fast path takes, it writes what serde's path would
        /// write, with the same address and variables' size.
        #[test]
        fn the_fast_path_writes_what_serde_writes_or_leaves_the_line_to_it(
            address in "[a-z0-9.@é\\\\\"]{0,12}",
            variables in proptest::collection::vec(("[a-d]{0,2}", json_value()), 0..5),
            reversed in proptest::prelude::any::<bool>(),
            spaces in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            address_first in proptest::prelude::any::<bool>(),
        ) {
            let mut vars: Vec<String> = variables
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
                .collect();
            if reversed {
                vars.reverse();
            }
            let address = serde_json::to_string(&address).unwrap();
            let variables = format!("{{{}}}", vars.join(","));
            let line = if address_first {
                format!(r#"{{"address":{address},"variables":{variables}}}"#)
            } else {
                format!(r#"{{"variables":{variables},"address":{address}}}"#)
            };
            let line = spaced(&line, &spaces);
            if let Some(got) = fast(&line) {
                proptest::prop_assert_eq!(Some(got), serde_writes(line.as_bytes()), "{}", line);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// The word-at-a-time scan finds what a byte-by-byte one finds, at
        /// any length and wherever the end is (or with none), whatever the
        /// bytes around it (high bytes included: they borrow differently).
        #[test]
        fn a_string_ends_where_a_byte_by_byte_scan_says(
            plain in proptest::collection::vec(0x20u8..=0xff, 0..40),
            end in proptest::prelude::prop_oneof![
                proptest::prelude::Just(None),
                proptest::prelude::Just(Some(b'"')),
                proptest::prelude::Just(Some(b'\\')),
                proptest::strategy::Strategy::prop_map(0u8..0x20, Some),
            ],
            at in 0usize..40,
            after in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12),
        ) {
            let mut s: Vec<u8> = plain.into_iter().filter(|&b| b != b'"' && b != b'\\').collect();
            if let Some(e) = end {
                s.insert(at.min(s.len()), e);
                s.extend(after);
            }
            let naive = s.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            proptest::prop_assert_eq!(string_end(&s), naive, "{:?}", s);
        }
    }

    #[test]
    fn most_generated_lines_take_the_fast_path() {
        let line =
            serde_json::json!({ "address": "c1@example.com", "variables": { "name": "Customer 1", "order": 1 } });
        assert!(fast(&line.to_string()).is_some());
        let pretty = serde_json::to_string_pretty(&line).unwrap().replace('\n', " ");
        assert!(fast(&pretty).is_some());
    }
}
