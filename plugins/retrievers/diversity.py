"""Near-duplicate suppression for a level's ranked candidates.

A long static scene (a camera on an empty corridor, a benchmark filler held for minutes) stores
one near-identical block per frame. When its blocks score high they fill a level's top-k with
copies of one moment, and the budget reads one scene many times. Greedy suppression keeps the
ranking but passes over a candidate too like a block already chosen (cosine similarity of their
block vectors above a threshold), the way non-maximum suppression keeps one box per object.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mukv.errors import expect


def diverse_order(vectors: torch.Tensor, k: int, threshold: float) -> torch.Tensor:
    """Positions of the first ``k`` candidates, in ranked order, that are not near-duplicates.

    Candidates are taken in their given (ranked) order; one whose cosine similarity with a
    candidate already taken exceeds ``threshold`` is passed over. When fewer than ``k`` remain,
    the passed-over candidates fill the rest in their ranked order, so the result always holds
    ``min(k, n)`` positions.

    Args:
        vectors: ``[n, V]`` the candidates' block vectors, best-ranked first.
        k: how many to choose.
        threshold: cosine similarity above which two blocks count as the same moment, in (0, 1].

    Returns:
        int64 ``[min(k, n)]`` positions into ``vectors``.
    """
    expect(vectors, torch.Tensor, "diverse_order: vectors")
    n = int(vectors.shape[0])
    k = min(int(k), n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    unit = F.normalize(vectors.float(), dim=-1)
    close = (unit @ unit.T > threshold).cpu()  # [n, n]
    blocked = torch.zeros(n, dtype=torch.bool)
    taken: list[int] = []
    for j in range(n):
        if blocked[j]:
            continue
        taken.append(j)
        if len(taken) == k:
            break
        blocked |= close[j]
    if len(taken) < k:
        chosen = set(taken)
        taken += [j for j in range(n) if j not in chosen][: k - len(taken)]
    return torch.tensor(taken, dtype=torch.long)
