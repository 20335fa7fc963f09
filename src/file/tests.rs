use super::*;

/// Vectors produced by Go lockgate v0.1.1 (`util.Sha256Hash`, `util.MurmurHash`).
#[test]
fn file_names_match_go_lockgate() {
    for (name, murmur, sha) in [
        (
            "a",
            "3c2569b2",
            "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb",
        ),
        (
            "host/lock",
            "4ac8b4c9",
            "6c944066d0d3947e1c59f56cbbed65cf103c250b17d14ce77ce5baeacca1dd49",
        ),
        (
            "über",
            "a006a72c",
            "b51c854170449c382397a108bc58403e78fb72c80a1b2b0674b30ea3b88a19f0",
        ),
    ] {
        assert_eq!(Naming::LegacyMurmur3.file_name(name), murmur, "{name}");
        assert_eq!(Naming::Sha256.file_name(name), sha, "{name}");
        assert!(Naming::LegacyMurmur3.matches(murmur));
    }
    // Go prints the murmur3 sum with %x: no leading zeros.
    assert_eq!(Naming::LegacyMurmur3.file_name("lock-163"), "1d532d1");
    assert!(Naming::Sha256.matches(&Naming::Sha256.file_name("x")));
    assert!(!Naming::Sha256.matches("README"));
}
