//! How the process allocator treats the CPU path's scratch: an opt-in, process-wide setting
//! for programs (the `fisher` CLI calls [`keep_freed_scratch`] at start-up).
//!
//! Every micro-batch of the network path allocates and frees a few megabytes of scratch
//! (activations, δ rows, partial sums, and `gemm`'s packing buffers of 0.5–3 MiB), on the
//! calling thread and on rayon's workers. glibc's malloc gives the top of a thread's heap
//! back to the kernel as soon as more than its trim threshold is free there, and deletes a
//! thread heap that empties; with its default (dynamic) thresholds that happens every
//! micro-batch, so the next one touches fresh pages again. Measured on a 2-core Xeon
//! (784-512-512-10, N = 4096): ≈ 5,000 page faults per run — 20 MB of pages zeroed and
//! mapped again each time, with the TLB shootdowns that go with unmapping — and 25–35 % of
//! the empirical diag and the MC KFAC went to it (`benches/README.md`).
//!
//! [`keep_freed_scratch`] fixes both thresholds (`mallopt`): blocks below
//! [`MMAP_THRESHOLD`] come from the heap rather than from their own mapping, and a heap
//! keeps up to [`TRIM_THRESHOLD`] free at its top. A micro-batch's scratch is then reused
//! from one to the next, and the running sums of one call from the last. (A page fault
//! cost about 8 µs on the development VM, timed on the first touches of a fresh 4.9 MB
//! buffer: fresh memory is written at about 0.5 GB/s there.) The price is memory: up to
//! `TRIM_THRESHOLD` of freed pages per malloc arena (one per thread that allocates, at most
//! 8 per core) may stay resident. So it is
//! done only when the budget the user gave the CPU path is large
//! ([`MIN_BUDGET_BYTES`]; the default budget is); under a small `FISHER_CPU_MEMORY_MB`, where
//! memory matters more than speed, glibc's defaults stay.
//!
//! Only glibc on Linux; elsewhere (musl, macOS, Windows) the call does nothing. A user who
//! sets `GLIBC_TUNABLES` with a `glibc.malloc.` entry keeps their own settings.

/// Largest block that still comes from the heap when [`keep_freed_scratch`] applies, bytes:
/// 32 MiB, the most glibc's own dynamic threshold reaches on 64-bit systems. Above every
/// scratch block of a default micro-batch (≤ 3 MiB measured) and the 16 MB f32 partial sum
/// and result of a 2048-wide full F (W1: 77 → 70 ms once they stopped coming from fresh
/// mappings). (4 MiB, with a trim threshold of 8 MiB, gave none of the network gain; 8 MiB
/// all of it.)
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Free bytes a heap keeps at its top when [`keep_freed_scratch`] applies: two micro-batches'
/// scratch (`CpuBackend::with_batch_bytes`, 32 MiB each). 16 MiB (one lane's share) took the
/// empirical diag from 71 to 48 ms but left the running sums of each call (KFAC's f64 sums
/// are 11 MB at 784-512-512-10) on fresh pages: with 64 MiB, and micro-batches in even pairs
/// of lanes, the MC KFAC went 61 → 54 ms (with 16 MiB the even pairs were slower, 90 ms:
/// their sums' f64 copy at the end of the block came from fresh pages).
pub const TRIM_THRESHOLD: usize = 64 << 20;

/// Smallest CPU budget (`CpuBackend::with_accumulator_bytes`, `FISHER_CPU_MEMORY_MB`) for
/// which [`keep_freed_scratch`] changes anything, bytes: 256 MiB. The default budget is
/// 2 GiB; the memory-bound runs of the scale tables use 32 MiB.
pub const MIN_BUDGET_BYTES: u64 = 256 << 20;

/// What [`keep_freed_scratch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Both thresholds were set.
    Set,
    /// The budget is below [`MIN_BUDGET_BYTES`]: glibc's defaults stay.
    SmallBudget,
    /// `GLIBC_TUNABLES` already sets malloc tunables: the user's choice stays.
    UserTunables,
    /// Not glibc, or `mallopt` refused: nothing changed.
    Unsupported,
}

/// Lets the process allocator keep the CPU path's freed scratch for reuse when the CPU
/// budget `budget_bytes` is at least [`MIN_BUDGET_BYTES`] (see the [module docs](self)).
/// Process-wide and meant for programs, once, before the work starts: a library should not
/// change its host's allocator behind its back, so nothing in the engine calls it.
///
/// ```
/// use fisher_engine::backend::cpu::{allocator, DEFAULT_ACCUMULATOR_BYTES};
/// let done = allocator::keep_freed_scratch(DEFAULT_ACCUMULATOR_BYTES);
/// // A small budget never changes the allocator.
/// assert_eq!(allocator::keep_freed_scratch(32 << 20), allocator::Retention::SmallBudget);
/// # let _ = done;
/// ```
pub fn keep_freed_scratch(budget_bytes: u64) -> Retention {
    if budget_bytes < MIN_BUDGET_BYTES {
        return Retention::SmallBudget;
    }
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return Retention::UserTunables;
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> Retention {
    // Both fit a c_int. Setting either turns glibc's dynamic thresholds off, so both are set.
    let mmap = i32::try_from(MMAP_THRESHOLD).expect("32 MiB fits");
    let trim = i32::try_from(TRIM_THRESHOLD).expect("64 MiB fits");
    // SAFETY: mallopt only reads its two integer arguments; it is thread-safe in glibc
    // (it takes the arena locks itself).
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1 };
    if ok { Retention::Set } else { Retention::Unsupported }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> Retention {
    Retention::Unsupported
}
