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
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockName(String);

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
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong { len: name.len() });
        }
        if let Some((index, ch)) = name.char_indices().find(|(_, c)| c.is_control()) {
            return Err(NameError::ControlCharacter { ch, index });
        }
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for LockName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for LockName {
    type Error = NameError;
    fn try_from(value: &str) -> Result<Self, NameError> {
        Self::new(value)
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
    }
}
