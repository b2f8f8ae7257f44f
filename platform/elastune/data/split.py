"""Which documents a dataset holds out for evaluation: whole documents, chosen by their content.

A document goes to the held-out side when a hash of its bytes falls below the fraction, so the
choice depends on nothing but the document: the same source gives the same split in any order,
and two copies of one text land on the same side (no held-out text is also trained on). Windows
are cut within each side, so no window mixes the two.
"""

from __future__ import annotations

import hashlib

MAX_FRACTION = 0.5  # more held out than trained on is a mistake, not a split


def held_out(document: bytes, fraction: float) -> bool:
    """Whether `document` belongs to the held-out side of a `fraction` split."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(b"elastune-split:" + document).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2**64


def fraction_problem(fraction: float) -> str | None:
    """Why `fraction` cannot be a held-out fraction (None: it can)."""
    if not 0.0 < fraction <= MAX_FRACTION:
        return f"must be above 0 and at most {MAX_FRACTION} (a share of the documents, e.g. 0.05)"
    return None
