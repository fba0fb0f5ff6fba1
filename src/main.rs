// The engine allocates many small, short-lived strings per event (decode, outputs);
// mimalloc handles that pattern far better than glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
    augur::cli::main()
}

/// mimalloc advises the kernel to back its arenas with transparent huge pages. Where
/// THP is `madvise` (Debian's default for both `enabled` and `defrag`), a page fault
/// there zeroes 2 MiB, after compacting memory synchronously when no huge page is free.
/// In a worker at 5k events/s that zeroing was 18% of its CPU, and the stalls fell on
/// checkpoints: they took 12 ms (median) and up to 62 ms of a partition task's time,
/// against 7 and 15 ms without THP (BENCHMARKS.md). An explicit `MIMALLOC_ALLOW_THP`
/// in the environment is mimalloc's to apply, and is left alone.
#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes nothing but
    // this process's THP eligibility. A kernel without it returns an error, which
    // leaves THP as it was.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(not(target_os = "linux"))]
fn disable_transparent_huge_pages() {}
