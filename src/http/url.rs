//! The lock server's URL: `http[s]://[user:password@]host[:port][/prefix]`.

use crate::error::Error;

/// The server's URL split into what requests need.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `scheme://host[:port][/prefix]`, without credentials and without a trailing `/`.
    pub base: String,
    pub https: bool,
    /// The password of `http://user:PASSWORD@host` (how Go's client carries a token).
    pub password: Option<String>,
}

/// Parses `http[s]://[user:password@]host[:port][/prefix]`.
pub(crate) fn parse_url(url: &str) -> Result<Endpoint, Error> {
    let bad = |why: &str| {
        Error::InvalidConfig(format!(
            "lock server URL {:?} {why}; expected http[s]://HOST:PORT[/PREFIX]",
            redact(url)
        ))
    };
    let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(bad("is not http:// or https://"));
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if path.contains(['?', '#']) {
        return Err(bad("has a query or a fragment"));
    }
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if host.is_empty() {
        return Err(bad("names no host"));
    }
    let scheme = if https { "https" } else { "http" };
    let base = format!("{scheme}://{host}{}", path.trim_end_matches('/'));
    // Every request URI is the base plus an endpoint path: check the base parses as one.
    base.parse::<http::Uri>()
        .map_err(|_| bad("is not a valid URL"))?;
    let password = userinfo
        .and_then(|u| u.split_once(':'))
        .map(|(_, p)| p.to_owned())
        .filter(|p| !p.is_empty());
    Ok(Endpoint {
        base,
        https,
        password,
    })
}

/// `url` with the password of its user information replaced, for messages.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://…@{host}{}", &rest[end..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_prefixes_and_credentials() {
        let e = parse_url("http://127.0.0.1:7780").unwrap();
        assert_eq!(e.base, "http://127.0.0.1:7780");
        assert!(!e.https && e.password.is_none());
        let e = parse_url("https://lockgate:s3cret@locks.example:443/ci/locker/").unwrap();
        assert_eq!(e.base, "https://locks.example:443/ci/locker");
        assert!(e.https);
        assert_eq!(e.password.as_deref(), Some("s3cret"));
        for bad in [
            "ftp://x",
            "http://",
            "http://@/x",
            "http://h:1/?q",
            "127.0.0.1:7780",
            "http://h o",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_never_show_the_password() {
        assert_eq!(redact("http://lockgate:s3cret@h:1/p"), "http://…@h:1/p");
        assert_eq!(redact("http://h:1"), "http://h:1");
        let e = parse_url("http://u:s3cret@h o").unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
