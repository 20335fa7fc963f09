//! Property tests of lock names, and of the names they become in storage.

use proptest::prelude::*;

use crate::name::{LockName, NameError, MAX_NAME_LEN};

proptest! {
    /// A string is a lock name exactly when it is 1 to 1024 bytes without a control character,
    /// and the error says which rule it broke.
    #[test]
    fn names_are_accepted_by_the_documented_rule(s in prop_oneof![
        any::<String>(),
        "[^\\p{Cc}]{1,400}",
        Just("x".repeat(MAX_NAME_LEN)),
        Just("é".repeat(MAX_NAME_LEN / 2 + 1)),
    ]) {
        let control = s.char_indices().find(|(_, c)| c.is_control());
        // What acquisitions use (no allocation for a short name) decides alike.
        prop_assert_eq!(LockName::try_from(s.as_str()), LockName::new(s.clone()));
        match LockName::new(s.clone()) {
            Ok(n) => {
                prop_assert!(!s.is_empty() && s.len() <= MAX_NAME_LEN && control.is_none());
                prop_assert_eq!(n.as_str(), s.as_str());
            }
            Err(NameError::Empty) => prop_assert!(s.is_empty()),
            Err(NameError::TooLong { len }) => {
                prop_assert!(len == s.len() && len > MAX_NAME_LEN);
            }
            Err(NameError::ControlCharacter { ch, index }) => {
                prop_assert!(s.len() <= MAX_NAME_LEN);
                prop_assert_eq!(control, Some((index, ch)));
            }
        }
    }

    /// Every valid name becomes a lock file name its naming recognises, never with a path
    /// separator, and (Kubernetes) an annotation key the API server accepts: a DNS prefix and
    /// a name of at most 63 characters of [a-z0-9].
    #[test]
    fn storage_names_are_always_valid(s in "[^\\p{Cc}]{1,200}") {
        use crate::file::Naming;
        let hex = |f: &str| f.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let sha = Naming::Sha256.file_name(&s);
        prop_assert!(sha.len() == 64 && hex(&sha), "{}", sha);
        let murmur = Naming::LegacyMurmur3.file_name(&s);
        prop_assert!((1..=8).contains(&murmur.len()) && hex(&murmur), "{}", murmur);
        prop_assert!(murmur.len() == 1 || !murmur.starts_with('0'), "Go's %x: {}", murmur);
        #[cfg(feature = "kubernetes")]
        {
            let key = crate::kubernetes::annotation_key(&s);
            let name = key.strip_prefix("lockgate.io/").expect("the prefix");
            prop_assert_eq!(name.len(), 56);
            prop_assert!(hex(name));
        }
    }
}
