//! Property tests of locker URL parsing.

use proptest::prelude::*;

use crate::errors::code;
use crate::locator::Locator;
use lockgate::file::Naming;

/// A URL part without the separators of `kubernetes://[CONTEXT@][NAMESPACE/]RESOURCE/NAME`.
fn part() -> impl Strategy<Value = String> {
    "[^/@]{1,20}"
}

proptest! {
    /// Nothing panics: any string is a locator or a usage error (exit 64).
    #[test]
    fn any_string_parses_or_is_a_usage_error(url in any::<String>()) {
        if let Err(f) = Locator::parse(&url, Naming::Sha256) {
            prop_assert_eq!(f.code, code::USAGE);
        }
    }

    /// `kubernetes://[CONTEXT@]NAMESPACE/RESOURCE/NAME` gives its parts back, an empty
    /// namespace meaning cluster-scoped (two parts leave the namespace to the client: tested
    /// in `locator.rs`).
    #[test]
    fn kubernetes_urls_give_their_parts_back(
        context in prop::option::of(part()),
        namespace in prop::option::of(part()),
        resource in part(),
        name in part(),
    ) {
        let url = format!(
            "kubernetes://{}{}/{resource}/{name}",
            context.as_ref().map(|c| format!("{c}@")).unwrap_or_default(),
            namespace.clone().unwrap_or_default()
        );
        let parsed = Locator::parse(&url, Naming::Sha256).unwrap();
        prop_assert_eq!(parsed, Locator::Kubernetes {
            context,
            namespace,
            default_namespace: false,
            resource,
            name,
            create_missing: false,
            kubeconfig: None,
        });
    }

    /// `file:DIR`, `file://DIR`: the directory as written.
    #[test]
    fn file_urls_name_their_directory(dir in "[^\\x00]{1,40}", slashes in any::<bool>()) {
        // `file:////x` and `file://x` both name what follows the `//`.
        prop_assume!(!dir.starts_with("//"));
        let url = if slashes { format!("file://{dir}") } else { format!("file:{dir}") };
        let parsed = Locator::parse(&url, Naming::LegacyMurmur3).unwrap();
        prop_assert_eq!(parsed, Locator::File { dir: dir.into(), naming: Naming::LegacyMurmur3 });
    }

    /// Any other scheme is refused.
    #[test]
    fn other_schemes_are_refused(scheme in "[a-z]{1,10}", rest in ".{0,20}") {
        prop_assume!(!["file", "kubernetes"].contains(&scheme.as_str()));
        let f = Locator::parse(&format!("{scheme}:{rest}"), Naming::Sha256).unwrap_err();
        prop_assert_eq!(f.code, code::USAGE);
    }
}
