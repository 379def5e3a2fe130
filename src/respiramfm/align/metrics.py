"""Validation metrics for stage 1: audio→text retrieval, alignment and uniformity.

Retrieval ranks the *distinct* validation texts for every validation audio. Duplicate
contexts are collapsed first (one candidate per text id), so a hit means "the retrieved
text equals the true text" and the chance level is ``k / n_distinct`` — reported next to
R@k so "far above chance" can be read off the log.

Alignment and uniformity follow Wang & Isola (ICML 2020) on L2-normalised embeddings:
``alignment = E‖z_a − z_t‖²`` over positive pairs (lower is better) and
``uniformity = log E exp(−2‖z − z'‖²)`` over distinct pairs of projected audio (lower =
more spread over the sphere).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def unique_text_columns(text: torch.Tensor, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(one text vector per distinct id, the distinct ids), in first-occurrence order."""
    seen: dict[int, int] = {}
    for i, t in enumerate(text_ids.tolist()):
        seen.setdefault(t, i)
    first = torch.tensor(list(seen.values()), dtype=torch.long, device=text.device)
    return text.index_select(0, first), text_ids.index_select(0, first)


@torch.no_grad()
def retrieval_ranks(z_audio: torch.Tensor, z_text: torch.Tensor, text_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """0-based rank of each audio's true text among the distinct texts, and the number of distinct texts.

    A rank counts the distinct texts scored strictly higher than the true one, so ties
    are resolved in the true text's favour (ties are measure-zero for trained models).
    """
    a = F.normalize(z_audio, dim=-1)
    cand, cand_ids = unique_text_columns(F.normalize(z_text, dim=-1), text_ids)
    sims = a @ cand.T                                            # (N, U)
    col_of = {int(t): j for j, t in enumerate(cand_ids.tolist())}
    true_col = torch.tensor([col_of[int(t)] for t in text_ids.tolist()], device=sims.device)
    true_sim = sims.gather(1, true_col.view(-1, 1))
    return (sims > true_sim).sum(dim=1), cand.shape[0]


@torch.no_grad()
def alignment(z_audio: torch.Tensor, z_text: torch.Tensor) -> float:
    a, t = F.normalize(z_audio, dim=-1), F.normalize(z_text, dim=-1)
    return float((a - t).pow(2).sum(dim=1).mean())


@torch.no_grad()
def uniformity(z: torch.Tensor, max_points: int = 2048, t: float = 2.0) -> float:
    """Wang-Isola uniformity over the first ``max_points`` rows (evaluation order is fixed)."""
    z = F.normalize(z[:max_points], dim=-1)
    n = z.shape[0]
    if n < 2:
        return float("nan")
    sq = torch.cdist(z, z).pow(2)
    iu = torch.triu_indices(n, n, offset=1, device=z.device)
    vals = -t * sq[iu[0], iu[1]]
    return float(torch.logsumexp(vals, dim=0) - math.log(vals.numel()))


def retrieval_metrics(z_audio: torch.Tensor, z_text: torch.Tensor, text_ids: torch.Tensor,
                      ks=(1, 5)) -> dict[str, float]:
    """R@k, their chance levels, mean reciprocal rank and median rank (1-based) over distinct texts."""
    ranks, n_distinct = retrieval_ranks(z_audio, z_text, text_ids)
    out: dict[str, float] = {}
    for k in ks:
        out[f"r{k}"] = float((ranks < k).float().mean())
        out[f"chance_r{k}"] = min(1.0, k / n_distinct)
    out["mrr"] = float((1.0 / (ranks.float() + 1)).mean())
    out["median_rank"] = float(ranks.float().median() + 1)
    out["n_distinct_texts"] = n_distinct
    return out
