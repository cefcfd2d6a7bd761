//! Keeping freed memory from piling up in the allocator.
//!
//! glibc's `malloc` (the default allocator of Rust programs on most Linux
//! systems) keeps memory a program freed: one arena per thread up to eight
//! per core, and a threshold for serving large blocks from `mmap` that
//! rises after every large free, after which large blocks come from
//! arenas that rarely shrink. A job with large state frees large blocks
//! all the time (snapshot parts, restore batches, write buffers of the
//! redb state backend), on many threads (tokio's blocking pool): measured
//! with 10 M keys in the redb state backend, the process's peak resident
//! memory was two to three times its peak heap.
//! [`limit_allocator_retention`] fixes the threshold at 1 MiB (large
//! blocks go back to the system when freed), trims the heap top above
//! 1 MiB and caps the arenas at the number of cores.

/// Configures glibc's `malloc` to give freed memory back (see the module
/// documentation). Call it once, first thing in `main`, before threads
/// start; the `sluice` CLI does. A no-op where the allocator is not glibc's
/// (musl, macOS, Windows) — or use an allocator crate (`mimalloc`,
/// `tikv-jemallocator`) as the global allocator instead. Environment
/// variables `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_` and
/// `MALLOC_TRIM_THRESHOLD_`, when set, win.
///
/// ```
/// sluice_runtime::limit_allocator_retention();
/// let v = vec![0u8; 4 << 20]; // served by mmap, unmapped when dropped
/// drop(v);
/// ```
pub fn limit_allocator_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
        let settings = [
            ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 1 << 20),
            ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 1 << 20),
            (
                "MALLOC_ARENA_MAX",
                libc::M_ARENA_MAX,
                cores.min(64) as libc::c_int,
            ),
        ];
        for (env, param, value) in settings {
            if std::env::var_os(env).is_none() {
                // SAFETY: mallopt only sets allocator parameters; it is
                // safe to call at any time (glibc takes its own lock).
                unsafe {
                    libc::mallopt(param, value);
                }
            }
        }
    }
}
