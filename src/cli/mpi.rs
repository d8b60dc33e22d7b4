//! `fisher compute --mpi` under `mpirun -np K`: rank r computes shard r of K (its exact
//! partial sums, in memory), rank 0 gathers the parts in rank order, merges them and writes
//! `--out` with the output policy of every command. The merge is exact, so the result is
//! bit for bit the single process's on the CPU (see `fisher_engine::fisher::sums`).
//!
//! Errors are collective: every rank reaches the same checkpoints ([`agree`]); when one
//! fails, all stop there, rank 0 prints the lowest failing rank's error on one line, and
//! every rank exits with that error's code. Only rank 0 prints.

use std::sync::atomic::{AtomicI32, Ordering};

/// This process's MPI rank (0 when not under MPI): only rank 0 prints.
static RANK: AtomicI32 = AtomicI32::new(0);

/// Whether this process may print (it is not a rank other than 0 of an MPI run).
pub fn prints() -> bool {
    RANK.load(Ordering::Relaxed) == 0
}

/// An error shared by every rank of an MPI run: the exit code and the one line of the
/// failing rank (`rank r: …`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RankError {
    /// The exit code the failing rank classified its error with.
    pub code: u8,
    /// Its one-line message, prefixed with the rank when there are several.
    pub message: String,
}

/// Whether the command line asks for `--mpi` (checked before clap, so that MPI is
/// initialized before any message is printed).
#[cfg(feature = "mpi")]
pub fn requested() -> bool {
    std::env::args_os().skip(1).any(|a| a == "--mpi")
}

#[cfg(feature = "mpi")]
pub use with_mpi::*;

#[cfg(feature = "mpi")]
mod with_mpi {
    use std::path::PathBuf;

    use fisher_engine::io::partial;
    use fisher_engine::pipeline::compute;
    use fisher_engine::pipeline::merge::{self, MergeOutcome};
    use mpi::collective::SystemOperation;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use super::{RankError, RANK};
    use crate::cli::compute::ComputeConfig;
    use crate::cli::exit::{classify, one_line, run_error};

    /// Bytes per message when parts move to rank 0 (MPI counts are 32-bit).
    const CHUNK: usize = 256 << 20;
    /// Tag of the part messages.
    const TAG: i32 = 7;

    /// Initializes MPI (a single process of size 1 when not under mpirun) and makes a panic
    /// on any rank abort the whole job instead of leaving the others waiting.
    pub fn init() -> anyhow::Result<mpi::environment::Universe> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| anyhow::anyhow!("MPI was already initialized"))?;
        RANK.store(universe.world().rank(), std::sync::atomic::Ordering::Relaxed);
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            hook(info);
            SimpleCommunicator::world().abort(101);
        }));
        Ok(universe)
    }

    /// Every rank's `mine` at the same checkpoint: `Ok` everywhere when all succeeded,
    /// otherwise the lowest failing rank's error (its code and one line) on every rank.
    fn agree<T>(world: &SimpleCommunicator, mine: anyhow::Result<T>) -> anyhow::Result<T> {
        let failed = mine.is_err() as u8;
        let mut any = 0u8;
        world.all_reduce_into(&failed, &mut any, SystemOperation::max());
        let mine = match mine {
            Ok(value) if any == 0 => return Ok(value),
            Ok(_) => None,
            Err(e) => Some(e),
        };
        // The failing ranks' (code, message), gathered to rank 0; the first one broadcast.
        let line = mine.as_ref().map(|e| {
            let text = one_line(e);
            let text = if world.size() > 1 { format!("rank {}: {text}", world.rank()) } else { text };
            let mut bytes = vec![classify(e) as u8];
            bytes.extend(text.into_bytes());
            bytes
        });
        let parts = gather(world, line.as_deref().unwrap_or(&[]));
        let mut first = parts.and_then(|all| all.into_iter().find(|p| !p.is_empty())).unwrap_or_default();
        let mut len = first.len() as u64;
        world.process_at_rank(0).broadcast_into(&mut len);
        first.resize(len as usize, 0);
        if len > 0 {
            world.process_at_rank(0).broadcast_into(&mut first[..]);
        }
        let (code, text) = first.split_first().map(|(c, t)| (*c, String::from_utf8_lossy(t).into_owned())).unwrap_or((1, "an MPI rank failed".into()));
        Err(RankError { code, message: text }.into())
    }

    /// Every rank's bytes on rank 0, in rank order (`None` on the other ranks): the lengths
    /// first, then each part in pieces of at most [`CHUNK`] bytes, point to point.
    fn gather(world: &SimpleCommunicator, mine: &[u8]) -> Option<Vec<Vec<u8>>> {
        let root = world.process_at_rank(0);
        let len = mine.len() as u64;
        if world.rank() == 0 {
            let mut lens = vec![0u64; world.size() as usize];
            root.gather_into_root(&len, &mut lens[..]);
            let mut out = vec![mine.to_vec()];
            for (r, &n) in lens.iter().enumerate().skip(1) {
                // Each length was reported by a rank that holds that many bytes in memory.
                let mut part = vec![0u8; n as usize];
                for piece in part.chunks_mut(CHUNK) {
                    world.process_at_rank(r as i32).receive_into_with_tag(piece, TAG);
                }
                out.push(part);
            }
            Some(out)
        } else {
            root.gather_into(&len);
            for piece in mine.chunks(CHUNK) {
                root.send_with_tag(piece, TAG);
            }
            None
        }
    }

    /// Runs `fisher compute --mpi` on this rank; `Some` (the merge) on rank 0. Every rank
    /// returns the same error when one fails.
    pub fn run(cfg: &ComputeConfig) -> anyhow::Result<Option<MergeOutcome>> {
        let world = SimpleCommunicator::world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let mut request = cfg.request.clone();
        // The ranks of one node (those sharing memory), numbered 0.. on it, spread over its
        // equally good GPUs unless an adapter is named (collective: every rank calls it).
        let local = world.split_shared(world.rank()).rank() as usize;
        if request.gpu.local_index.is_none() {
            request.gpu.local_index = Some(local);
        }
        if rank != 0 {
            request.out = None; // only rank 0 checks and writes the output
        }
        let mine = compute::shard_part(&request, (rank, size))
            .map_err(run_error)
            .and_then(|(part, _)| partial::to_bytes(&part).map_err(Into::into));
        let bytes = agree(&world, mine)?;
        let parts = gather(&world, &bytes);
        drop(bytes);
        let merged = match parts {
            Some(parts) => (|| -> anyhow::Result<Option<MergeOutcome>> {
                let out = cfg.request.out.clone().expect("--mpi needs --out (checked)");
                let parts = parts
                    .iter()
                    .enumerate()
                    .map(|(r, bytes)| {
                        let origin = PathBuf::from(format!("rank {r}"));
                        Ok((origin.clone(), partial::from_bytes(bytes, &origin)?))
                    })
                    .collect::<fisher_engine::Result<Vec<_>>>()?;
                merge::check_parts(&parts)?;
                Ok(Some(merge::write_merged(&parts, &out)?))
            })(),
            None => Ok(None),
        };
        agree(&world, merged)
    }
}

#[cfg(not(feature = "mpi"))]
/// Without the `mpi` feature, `--mpi` is a usage error.
pub fn run(_: &crate::cli::compute::ComputeConfig) -> anyhow::Result<Option<fisher_engine::pipeline::merge::MergeOutcome>> {
    Err(crate::cli::exit::usage(
        "--mpi needs a fisher built with MPI: install Open MPI (libopenmpi-dev openmpi-bin libclang-dev) and build with `cargo build --release --features mpi`",
    ))
}
