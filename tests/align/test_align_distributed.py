"""gather_with_grad + local_loss on 2 real gloo processes equals the single-process loss and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from respiramfm.align.losses import LOSS_KINDS, ContrastiveLoss
from respiramfm.models.configuration import ProjectorConfig
from respiramfm.models.projector import build_projector

N, D_AUDIO, D_TEXT, WORLD = 8, 16, 12, 2
IDS = [0, 1, 2, 0, 3, 1, 4, 0]          # duplicates inside a rank and across ranks


def _batch():
    g = torch.Generator().manual_seed(7)
    audio = torch.randn(N, D_AUDIO, generator=g, dtype=torch.float64)
    text = torch.randn(N, D_TEXT, generator=g, dtype=torch.float64)
    for i, t in enumerate(IDS):                  # same id -> same text vector
        text[i] = text[IDS.index(t)]
    return audio, text, torch.tensor(IDS)


def _model_and_loss(kind):
    torch.manual_seed(3)
    cfg = ProjectorConfig(in_dim=D_AUDIO, hidden=20, out_dim=D_TEXT, dropout=0.0, final="layernorm")
    model = build_projector(cfg).double()
    loss_fn = ContrastiveLoss(kind, tau=0.1).double()
    return model, loss_fn


def _grads(model, loss_fn):
    out = {f"p.{k}": p.grad.detach().clone() for k, p in model.named_parameters()}
    if loss_fn.logit_scale is not None:
        out["logit_scale"] = loss_fn.logit_scale.grad.detach().clone()
    return out


def _worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        audio, text, ids = _batch()
        n_local = N // WORLD
        sl = slice(rank * n_local, (rank + 1) * n_local)
        results = {}
        for kind in LOSS_KINDS:
            model, loss_fn = _model_and_loss(kind)
            loss = loss_fn(model(audio[sl]), text[sl], ids[sl])
            loss.backward()
            grads = _grads(model, loss_fn)
            for g in grads.values():              # what DDP does: average gradients over ranks
                dist.all_reduce(g)
                g /= WORLD
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[f"{kind}/loss"] = (mean_loss / WORLD).numpy()
            results[f"{kind}/local_loss"] = loss.detach().numpy()
            results.update({f"{kind}/{k}": v.numpy() for k, v in grads.items()})
        if rank == 0:
            np.savez(out_file, **results)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    out_file = tmp_path / "dist.npz"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    got = dict(np.load(out_file))
    audio, text, ids = _batch()
    for kind in LOSS_KINDS:
        model, loss_fn = _model_and_loss(kind)
        loss = loss_fn(model(audio), text, ids)
        loss.backward()
        assert float(got[f"{kind}/loss"]) == pytest.approx(float(loss.detach()), abs=1e-12), kind
        # the per-rank losses differ from the global one: each rank really scored only its rows
        assert abs(float(got[f"{kind}/local_loss"]) - float(loss.detach())) > 1e-6, kind
        expected = _grads(model, loss_fn)
        for k, v in expected.items():
            np.testing.assert_allclose(got[f"{kind}/{k}"], v.numpy(), rtol=1e-9, atol=1e-12, err_msg=f"{kind} {k}")
        assert ("logit_scale" in expected) == (kind != "infonce")
