"""Who writes what at save, and who owns which slice under ZeRO-1: pure rules, no I/O.

Three training layouts exist:
  replicated  every rank holds all parameters and all optimizer state (DDP);
  zero1       every rank holds all parameters, but only its slice of the optimizer state: the
              trainable parameters of each dtype, flattened in order, split into W even ranges;
  fsdp        every rank holds its rows of each parameter, of its gradient and of its optimizer
              state (FSDP2's dim-0 sharding: fsdp_rows).
Every rank computes the same answers from the same inputs, so nobody has to talk to agree.
"""

from __future__ import annotations

from elastune.checkpoint.format import Piece

LAYOUTS = ("replicated", "zero1", "fsdp")


def assign_owners(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Split replicated tensors among ranks so each writes about the same bytes, nothing twice.

    Greedy: largest tensor first to the least-loaded rank (ties: lower rank, then name order).
    """
    load = [0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


def pieces_to_write(held: dict[str, Piece], rank: int, world_size: int) -> dict[str, Piece]:
    """What this rank writes: its share of the replicated pieces, and all its sharded ones."""
    owners = assign_owners({n: p.nbytes for n, p in held.items() if p.replicated}, world_size)
    return {n: p for n, p in held.items() if not p.replicated or owners[n] == rank}


# Up to this many bytes of state, one rank snapshots a step whole (ranks take turns) rather than
# every rank handing over its share: a hand-over is an actor call, and at this size the call costs
# more than the bytes (about 2 ms of CPU on each side against 0.2 ms to copy 1 MB; BENCHMARKS.md).
ONE_WRITER_BYTES = 8 * 1024 * 1024


def snapshot_writer(held: dict[str, Piece], turn: int, world_size: int) -> int | None:
    """The one rank that writes a snapshot whole, when every piece is replicated (any rank holds
    it all) and the state is small; None: every rank hands over its share (pieces_to_write).
    `turn`: the snapshot's number (step // snapshot_every_steps), so consecutive snapshots go to
    consecutive ranks: each rank makes one hand-over in W and the checkpoint service one call per
    snapshot, whatever the world size."""
    if held and all(p.replicated for p in held.values()) and sum(p.nbytes for p in held.values()) <= ONE_WRITER_BYTES:
        return turn % world_size
    return None


def even_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's range of `total` elements split into W contiguous ranges differing by at most one."""
    return total * rank // world_size, total * (rank + 1) // world_size


def fsdp_rows(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's rows [r0, r1) of a tensor of `rows` rows sharded on dim 0 as FSDP2 (torch.chunk)
    cuts it: ceil(rows / W) a rank, so the last ranks may hold fewer rows, or none (5 rows on 4
    ranks: 2, 2, 1, 0)."""
    per = -(-rows // world_size)
    start = min(rank * per, rows)
    return start, min(start + per, rows)


def zero1_slices(sizes: list[int], rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(index, lo, hi) of each tensor whose elements [lo, hi) fall in this rank's range of the
    concatenation of `sizes` (one dtype's trainable parameters, in order)."""
    start, stop = even_range(sum(sizes), rank, world_size)
    out, offset = [], 0
    for i, n in enumerate(sizes):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((i, lo - offset, hi - offset))
        offset += n
    return out
