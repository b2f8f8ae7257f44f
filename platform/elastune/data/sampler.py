"""The stateless elastic sampler: which dataset sample sits at each global position.

Global position p (the p-th sample the job ever trains on) reads sample
`permutation(seed, epoch = p // N)[p mod N]`. The permutation is a keyed Feistel network over
[0, 2^k) with cycle walking onto [0, N): a bijection computed per index in O(1) memory, so no
rank ever materialises or stores an epoch's order, and resuming at any world size needs only
`samples_seen`.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

_ROUNDS = 4
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@functools.lru_cache(maxsize=64)
def _round_keys(seed: int, epoch: int) -> tuple[np.uint64, ...]:
    digest = hashlib.sha256(f"elastune-perm:{seed}:{epoch}".encode()).digest()
    return tuple(np.uint64(int.from_bytes(digest[8 * i : 8 * i + 8], "little")) for i in range(_ROUNDS))


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    # splitmix64 finaliser keyed per round: a cheap, well-distributed round function.
    with np.errstate(over="ignore"):
        z = (x + key) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def permute(indices: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Map each index in [0, n) to its image under the epoch's permutation of [0, n)."""
    indices = np.asarray(indices, dtype=np.uint64)
    if n <= 1:
        return indices.astype(np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2  # balanced Feistel halves
    half = bits // 2
    low_mask = np.uint64((1 << half) - 1)
    keys = _round_keys(seed, epoch)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & low_mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & low_mask)
        return (left << np.uint64(half)) | right

    out = feistel(indices)
    outside = out >= np.uint64(n)
    while outside.any():  # cycle walking: re-apply until the image lands in [0, n)
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


def sample_indices(positions: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """Dataset indices for global positions (any mix of epochs)."""
    positions = np.asarray(positions, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_samples)
    if len(positions) and epochs[0] == epochs[-1]:  # the usual case: positions inside one epoch
        return permute(offsets, num_samples, seed, int(epochs[0]))
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = permute(offsets[sel], num_samples, seed, int(epoch))
    return out


def positions(samples_seen: int, start: int, size: int) -> np.ndarray:
    """Global positions [samples_seen + start, samples_seen + start + size)."""
    return np.arange(samples_seen + start, samples_seen + start + size, dtype=np.int64)


def tally(indices: np.ndarray) -> tuple[int, int, int]:
    """What a step read, in three sums that add up across ranks: (samples, sum of indices, sum of
    hashed indices). Equal tallies mean the same multiset with overwhelming probability; every
    sum stays below 2^53, so float64 all-reduces carry them exactly (for under 2^22 samples a step)."""
    idx = np.asarray(indices, dtype=np.uint64)
    hashed = (idx * np.uint64(2654435761)) & np.uint64(0x7FFFFFFF)  # Knuth's multiplicative hash, 31 bits
    return len(idx), int(idx.sum()), int(hashed.sum())
