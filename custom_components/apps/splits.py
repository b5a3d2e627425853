"""The split of a data set's subjects into training, validation and test sections."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["PAPER_SPLIT", "SECTIONS", "split_subjects"]


#: Datalist sections, in order.
SECTIONS: tuple[str, ...] = ("training", "validation", "test")

#: Training/validation/test counts of the paper's BraTS split (354 subjects).
PAPER_SPLIT: tuple[int, int, int] = (200, 60, 94)


def split_subjects(subjects: Sequence[str], seed: int = 0, fractions: Sequence[float] = (0.56, 0.17, 0.27),
                   paper_split: bool = True) -> dict[str, Any]:
    """Deterministic training/validation/test split of subject ids.

    The ids are sorted, then shuffled with ``numpy.random.default_rng(seed)``, so the split depends only on the set
    of ids and the seed. With ``paper_split`` and at least 354 subjects, the first 200 shuffled ids go to training,
    the next 60 to validation and all the others to test (94, plus any subject beyond 354: extra subjects never
    change the training protocol). Otherwise validation and test get ``round(fraction * n)`` subjects each, at least
    one, and training the rest.

    Returns ``{"seed", "rule", "counts", "training", "validation", "test"}`` with sorted id lists per section.
    """
    # not monai.data.partition_dataset: it splits by ratios only (no fixed 200/60/94 counts with the rest to test),
    # gives no at-least-one-subject guarantee per section, and shuffles with another generator (existing splits of
    # this seed would change)
    ids = [str(s) for s in subjects]
    if len(set(ids)) != len(ids):
        dup = sorted({s for s in ids if ids.count(s) > 1})
        raise ValueError(f"subject ids must be unique, got duplicates {dup[:5]}.")
    fractions = _check_fractions(fractions)
    n = len(ids)
    if n < 3:
        raise ValueError(f"at least 3 accepted subjects are needed for training/validation/test splits, got {n}.")
    order = [sorted(ids)[i] for i in np.random.default_rng(int(seed)).permutation(n)]
    if paper_split and n >= sum(PAPER_SPLIT):
        n_train, n_val = PAPER_SPLIT[0], PAPER_SPLIT[1]
        extra = n - sum(PAPER_SPLIT)
        rule = f"paper split {PAPER_SPLIT[0]}/{PAPER_SPLIT[1]}/{PAPER_SPLIT[2]}"
        rule += f" (+{extra} subject(s) beyond {sum(PAPER_SPLIT)} added to test)" if extra else ""
    else:
        n_val = max(1, int(np.floor(fractions[1] * n + 0.5)))
        n_test = max(1, int(np.floor(fractions[2] * n + 0.5)))
        while n - n_val - n_test < 1:  # keep at least one training subject
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        n_train = n - n_val - n_test
        rule = "fractions " + "/".join(f"{f:g}" for f in fractions)
        if paper_split:
            rule += f" (fewer than {sum(PAPER_SPLIT)} subjects for the paper split)"
    sections = {
        "training": sorted(order[:n_train]),
        "validation": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }
    return {"seed": int(seed), "rule": rule, "counts": {k: len(v) for k, v in sections.items()}, **sections}


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if isinstance(fractions, str) or len(fractions) != 3:
        raise ValueError(f"fractions must be 3 numbers (training, validation, test), got {fractions!r}.")
    values = tuple(float(f) for f in fractions)
    if min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions!r} (sum {sum(values):g}).")
    return values  # type: ignore[return-value]
