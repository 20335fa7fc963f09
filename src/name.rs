//! Lock names and their validation.

use std::fmt;

/// The longest lock name accepted, in bytes of UTF-8.
///
/// Lock names are hashed into file names and annotation keys, so their length never reaches
/// the file system or the API server; the limit keeps records, HTTP bodies and status output
/// bounded.
pub const MAX_NAME_LEN: usize = 1024;

/// A validated lock name: non-empty UTF-8, at most [`MAX_NAME_LEN`] bytes, no control
/// characters (NUL, newline, escape, ...).
#[derive(Clone)]
pub struct LockName(Repr);

/// The longest name kept without a heap allocation: every acquisition makes a `LockName` of the
/// caller's `&str`, and an allocation is a good part of what an uncontended file lock costs in
/// user space. 30 bytes keep a `LockName` at 32 bytes.
const INLINE: usize = 30;

#[derive(Clone)]
enum Repr {
    /// `len` valid bytes of UTF-8 at the start of `bytes`.
    Inline {
        len: u8,
        bytes: [u8; INLINE],
    },
    Heap(String),
}

/// Why a string is not a valid lock name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is the empty string.
    #[error("lock name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("lock name is {len} bytes long, the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// Length of the rejected name in bytes.
        len: usize,
    },
    /// The name contains a control character.
    #[error("lock name contains the control character {ch:?} at byte {index}")]
    ControlCharacter {
        /// The offending character.
        ch: char,
        /// Its byte offset in the name.
        index: usize,
    },
}

impl LockName {
    /// Validates `name`.
    ///
    /// # Errors
    ///
    /// [`NameError`] when the name is empty, longer than [`MAX_NAME_LEN`] bytes or contains a
    /// control character.
    ///
    /// ```
    /// use lockgate::{LockName, NameError};
    /// assert!(LockName::new("deploy/production").is_ok());
    /// assert_eq!(LockName::new(""), Err(NameError::Empty));
    /// ```
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        check(&name)?;
        Ok(match Self::inline(&name) {
            Some(inline) => inline,
            None => Self(Repr::Heap(name)),
        })
    }

    /// Validates `name` and copies it, without allocating when it is short.
    #[inline]
    fn from_str_ref(name: &str) -> Result<Self, NameError> {
        let len = name.len();
        if (1..=INLINE).contains(&len) {
            // The common case, checked on the copy at a fixed length, without branches: printable
            // ASCII (the padding is a space).
            let mut bytes = [b' '; INLINE];
            bytes[..len].copy_from_slice(name.as_bytes());
            if bytes
                .iter()
                .fold(true, |ok, &b| ok & (b' '..0x7f).contains(&b))
            {
                return Ok(Self(Repr::Inline {
                    len: len as u8,
                    bytes,
                }));
            }
        }
        check(name)?;
        Ok(Self::inline(name).unwrap_or_else(|| Self(Repr::Heap(name.to_owned()))))
    }

    fn inline(name: &str) -> Option<Self> {
        let len = name.len();
        if len > INLINE {
            return None;
        }
        let mut bytes = [0; INLINE];
        bytes[..len].copy_from_slice(name.as_bytes());
        Some(Self(Repr::Inline {
            len: len as u8,
            bytes,
        }))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => {
                let bytes = &bytes[..usize::from(*len)];
                // SAFETY: copied from a `&str` (`inline`), and `len` is its length: whole
                // characters of UTF-8.
                unsafe { std::str::from_utf8_unchecked(bytes) }
            }
            Repr::Heap(s) => s,
        }
    }
}

/// The rules of [`LockName::new`].
fn check(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    // The control characters in UTF-8: one byte below 0x20 or 0x7f (C0 and DEL), or 0xc2
    // followed by 0x80 to 0x9f (C1). A byte scan finds them without decoding characters.
    let bytes = name.as_bytes();
    let control = (0..bytes.len()).find(|&i| {
        let b = bytes[i];
        b < 0x20 || b == 0x7f || (b == 0xc2 && matches!(bytes.get(i + 1), Some(0x80..=0x9f)))
    });
    if let Some(index) = control {
        let ch = name[index..]
            .chars()
            .next()
            .expect("a character starts here");
        return Err(NameError::ControlCharacter { ch, index });
    }
    Ok(())
}

impl PartialEq for LockName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for LockName {}

impl std::hash::Hash for LockName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for LockName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LockName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for LockName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl TryFrom<&str> for LockName {
    type Error = NameError;
    #[inline]
    fn try_from(value: &str) -> Result<Self, NameError> {
        Self::from_str_ref(value)
    }
}

impl TryFrom<String> for LockName {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, NameError> {
        Self::new(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in [
            "a",
            "deploy/production",
            "über ünïcødé",
            "x".repeat(MAX_NAME_LEN).as_str(),
        ] {
            assert_eq!(LockName::new(n).unwrap().as_str(), n);
        }
    }

    /// Short names are kept inline, long ones on the heap: both read back the same, and compare,
    /// hash and order as their strings do.
    #[test]
    fn inline_and_heap_names_are_the_same_names() {
        use std::collections::hash_map::DefaultHasher;
        use std::hash::{Hash, Hasher};
        let hash = |n: &LockName| {
            let mut h = DefaultHasher::new();
            n.hash(&mut h);
            h.finish()
        };
        let short = "x".repeat(INLINE);
        let long = "x".repeat(INLINE + 1);
        for s in [short.as_str(), long.as_str(), "é", "deploy/production"] {
            let (a, b) = (LockName::new(s).unwrap(), LockName::try_from(s).unwrap());
            assert_eq!((a.as_str(), b.as_str()), (s, s));
            assert_eq!(a, b);
            let mut h = DefaultHasher::new();
            s.hash(&mut h);
            assert_eq!((hash(&a), hash(&b)), (h.finish(), h.finish()));
        }
        let (s, l) = (LockName::new(short).unwrap(), LockName::new(long).unwrap());
        assert!(matches!(s.0, Repr::Inline { .. }) && matches!(l.0, Repr::Heap(_)));
        assert!(s < l && s != l);
        assert_eq!(std::mem::size_of::<LockName>(), 32);
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(LockName::new(""), Err(NameError::Empty));
        assert_eq!(
            LockName::new("x".repeat(MAX_NAME_LEN + 1)),
            Err(NameError::TooLong {
                len: MAX_NAME_LEN + 1
            })
        );
        assert_eq!(
            LockName::new("a\0b"),
            Err(NameError::ControlCharacter { ch: '\0', index: 1 })
        );
        assert!(matches!(
            LockName::new("line\nbreak"),
            Err(NameError::ControlCharacter { ch: '\n', .. })
        ));
        // C1 controls are two bytes of UTF-8; other characters starting with 0xc2 are fine.
        assert_eq!(
            LockName::try_from("é\u{85}"),
            Err(NameError::ControlCharacter {
                ch: '\u{85}',
                index: 2
            })
        );
        assert_eq!(
            LockName::try_from("\u{7f}").unwrap_err(),
            NameError::ControlCharacter {
                ch: '\u{7f}',
                index: 0
            }
        );
        assert!(LockName::try_from("\u{a0}\u{bf}").is_ok());
    }
}
