//! Lock file paths by lock name, so that an acquisition neither hashes the name nor builds the
//! path: SHA-256 of a short name and its hex take about 170 ns, as much as all the rest lockgate
//! adds to an uncontended acquisition's system calls.
//!
//! Two levels: each thread remembers the last few paths it used (looked up with no lock and no
//! hashing: the common case of a thread taking the same locks again and again), in front of a
//! map per locker that its clones share.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::LockPath;
use crate::name::LockName;

/// How many lock file paths a locker remembers before it starts afresh.
const SHARED: usize = 4096;

/// How many paths a thread remembers.
const RECENT: usize = 4;

/// The paths of one locker and its clones.
#[derive(Debug)]
pub(super) struct LockPaths {
    /// Tells this locker's entries apart in the threads' caches: never reused, so an entry of a
    /// locker that is gone (another directory, another naming) can never be taken for ours.
    id: u64,
    shared: Mutex<HashMap<LockName, Arc<LockPath>>>,
}

/// A thread's last paths, of any locker: `(locker id, name, path)`, the oldest replaced first.
struct Recent {
    entries: [Option<(u64, LockName, Arc<LockPath>)>; RECENT],
    next: usize,
}

thread_local! {
    static THREAD: RefCell<Recent> = const {
        RefCell::new(Recent {
            entries: [const { None }; RECENT],
            next: 0,
        })
    };
}

impl Default for LockPaths {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            shared: Mutex::default(),
        }
    }
}

impl LockPaths {
    /// `f` of the path of `name`, built by `build` the first time. From the thread's cache, the
    /// path is lent without touching its reference count (an atomic operation each way, which an
    /// uncontended acquisition notices).
    ///
    /// The thread's cache stays borrowed while `f` runs: `f` may call this again (a hook, or a
    /// tracing subscriber, taking a lock), which finds the cache readable but cannot record a
    /// new entry. A thread that is ending may have lost its cache already: then the map alone
    /// serves.
    pub(super) fn with<R>(
        &self,
        name: &LockName,
        build: impl FnOnce() -> LockPath,
        f: impl FnOnce(&LockPath) -> R,
    ) -> R {
        let mut f = Some(f);
        let recent = THREAD.try_with(|t| {
            let t = t.try_borrow().ok()?;
            let (_, _, path) = t
                .entries
                .iter()
                .flatten()
                .find(|(id, n, _)| *id == self.id && n == name)?;
            Some(f.take().expect("called once")(path))
        });
        if let Ok(Some(r)) = recent {
            return r;
        }
        let path = self.get(name, build);
        f.take().expect("not called before")(&path)
    }

    /// The path of `name`, built by `build` the first time.
    pub(super) fn get(&self, name: &LockName, build: impl FnOnce() -> LockPath) -> Arc<LockPath> {
        let recent = THREAD.try_with(|t| {
            let t = t.try_borrow().ok()?;
            t.entries
                .iter()
                .flatten()
                .find(|(id, n, _)| *id == self.id && n == name)
                .map(|(_, _, path)| Arc::clone(path))
        });
        if let Ok(Some(path)) = recent {
            return path;
        }
        let path = self.shared(name, build);
        let _ = THREAD.try_with(|t| {
            if let Ok(mut t) = t.try_borrow_mut() {
                let i = t.next;
                t.entries[i] = Some((self.id, name.clone(), Arc::clone(&path)));
                t.next = (i + 1) % RECENT;
            }
        });
        path
    }

    fn shared(&self, name: &LockName, build: impl FnOnce() -> LockPath) -> Arc<LockPath> {
        let mut paths = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = paths.get(name) {
            return Arc::clone(p);
        }
        if paths.len() >= SHARED {
            paths.clear();
        }
        let p = Arc::new(build());
        paths.insert(name.clone(), Arc::clone(&p));
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn path(s: &str) -> LockPath {
        LockPath(Ok(CString::new(s).unwrap()))
    }

    /// Each locker gets its own paths, from either level, in any order of use, and a path is
    /// built once per locker.
    #[test]
    fn paths_are_per_locker_and_built_once() {
        let (a, b) = (LockPaths::default(), LockPaths::default());
        let name = |s: &str| LockName::new(s).unwrap();
        let mut built = 0;
        for round in 0..3 {
            // More names than a thread remembers, so that some come from the map.
            for i in 0..RECENT + 2 {
                let n = name(&format!("lock-{i}"));
                let pa = a.get(&n, || {
                    built += 1;
                    path(&format!("/a/{i}"))
                });
                let pb = b.get(&n, || {
                    built += 1;
                    path(&format!("/b/{i}"))
                });
                assert_eq!(pa.bytes(), format!("/a/{i}").as_bytes(), "round {round}");
                assert_eq!(pb.bytes(), format!("/b/{i}").as_bytes(), "round {round}");
            }
        }
        assert_eq!(built, 2 * (RECENT + 2));
        // Lent from the thread's cache, or from the map, also to a call inside the call.
        let n = name("lock-0");
        a.with(
            &n,
            || unreachable!("built already"),
            |p| {
                assert_eq!(p.bytes(), b"/a/0");
                let fresh = name("fresh");
                let inner = a.with(&fresh, || path("/a/fresh"), |p| p.bytes().to_vec());
                assert_eq!(inner, b"/a/fresh");
            },
        );
        // Another thread finds the paths in the map.
        std::thread::scope(|s| {
            s.spawn(|| {
                let p = a.get(&name("lock-0"), || unreachable!("built already"));
                assert_eq!(p.bytes(), b"/a/0");
            });
        });
    }
}
