"""pass@k with the unbiased estimator of the Codex paper (arXiv 2107.03374 §2.1).

    pass@k = mean over problems of 1 - C(n - c, k) / C(n, k)

computed in the numerically stable product form the reference harnesses use. A k is reported only when
every problem has at least k samples (human-eval's rule).
"""

from __future__ import annotations

import math

DEFAULT_KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_ks(counts: dict[str, tuple[int, int]], ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """{task_id: (n, c)} -> {"pass@k": mean} for each k that every problem's n reaches."""
    if not counts:
        return {}
    least = min(n for n, _ in counts.values())
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts) for k in ks if k <= least}
