//! Who and where this process is, for the holder information recorded with leases.

/// This host's name (a pod's name in a pod), or `None` when it cannot be read.
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
pub(crate) fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or fails.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    (!name.is_empty()).then_some(name)
}

/// The name of the user `uid`, or the number when it has none.
pub(crate) fn user_name(uid: u32) -> String {
    let mut pw = std::mem::MaybeUninit::<libc::passwd>::uninit();
    let mut buf = vec![0 as libc::c_char; 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getpwuid_r writes `pw` and strings into `buf`
    // and sets `out` to `pw` on success.
    let r =
        unsafe { libc::getpwuid_r(uid, pw.as_mut_ptr(), buf.as_mut_ptr(), buf.len(), &mut out) };
    if r == 0 && !out.is_null() {
        // SAFETY: on success `pw_name` points to a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr((*out).pw_name) };
        if let Ok(name) = name.to_str() {
            if !name.is_empty() {
                return name.to_owned();
            }
        }
    }
    uid.to_string()
}

/// The name of the user this process runs as.
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
pub(crate) fn current_user() -> String {
    // SAFETY: getuid cannot fail.
    user_name(unsafe { libc::getuid() })
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_found() {
        assert_eq!(super::user_name(0), "root");
        assert!(super::host_name().is_some_and(|h| !h.is_empty()));
        assert!(!super::current_user().is_empty());
    }
}
