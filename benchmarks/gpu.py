"""The paper's shapes on an accelerator: one JSON line per figure (called by benchmarks/gpu.sh).

* ``opera_ct``: full-size OPERA-CT (HTS-AT, embed 96, depths 2-2-6-2, 768-d output) with random
  weights of the real shape, embeddings/s on 8-s spectrograms from the real front end, fp32 and bf16;
* ``stage2_step``: a Phi-2-sized random backbone (transformers ``PhiConfig``: hidden 2560, 32
  layers, 32 heads, MLP 10240; no download) in bf16 with LoRA r16 on every layer, one
  training step (shared-prompt forward, backward, AdamW) at batch 16: step time, samples/s,
  peak memory;
* ``prefix_kv``: the same model in eval mode, 256 records scored with the prompt's KV cache
  computed once per task vs every record padded in full: samples/s both ways.

``--smoke`` runs every part at toy sizes on the CPU (a check of the code path and the
arguments, not a measurement). Without ``--smoke`` and without CUDA it exits with a message.

    python benchmarks/gpu.py [--only opera_ct,stage2_step,prefix_kv] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PARTS = ("opera_ct", "stage2_step", "prefix_kv")
PHI2 = {"hidden_size": 2560, "num_layers": 32, "heads": 32, "intermediate_size": 10240, "max_positions": 2048}
TOY = {"hidden_size": 64, "num_layers": 2, "heads": 4, "intermediate_size": 128, "max_positions": 512}


def emit(figure: str, **values) -> None:
    print(json.dumps({"benchmark": "gpu", "figure": figure, **values}), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> float:
    fn()  # warm-up (kernels, allocator)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def opera_ct(device: str, smoke: bool) -> None:
    from respiramfm.audio import opera_spectrogram_batch
    from respiramfm.encoders.registry import get_encoder
    from respiramfm.models.htsat import HTSAT

    fe = get_encoder("opera-ct").frontend
    wave = (0.1 * np.random.default_rng(0).standard_normal(int(8 * fe.sr))).astype(np.float32)
    spec = torch.as_tensor(opera_spectrogram_batch([wave], fe)[0])
    sizes = {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)} if smoke else {}
    torch.manual_seed(0)
    model = HTSAT(drop_path_rate=0.0, **sizes).to(device).eval().requires_grad_(False)
    batch = 2 if smoke else 64
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        x = spec[None].repeat(batch, 1, 1).to(device, dtype)
        with torch.inference_mode():
            sec = timed(lambda: m(x), device, 1 if smoke else 10)
            out = m(x)
        emit("opera_ct_embeddings", dtype=str(dtype).replace("torch.", ""), batch=batch,
             input_shape=list(spec.shape), out_dim=int(out.shape[-1]), embeddings_per_s=round(batch / sec, 1),
             params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1), device=device)


def phi_model(device: str, smoke: bool):
    from respiramfm.llm.backbones import tiny_backbone
    from respiramfm.models.configuration import FusionConfig, LoraSettings, ProjectorConfig
    from respiramfm.models.fusion import RespiraMFM
    from respiramfm.models.projector import build_projector

    shape = TOY if smoke else PHI2
    dtype = "float32" if smoke else "bfloat16"
    backbone = tiny_backbone("phi", dtype=dtype, device=device, **shape)
    proj = build_projector(ProjectorConfig(in_dim=768, hidden=1024, out_dim=shape["hidden_size"], final="layernorm"))
    cfg = FusionConfig(backbone="tiny-phi", dtype=dtype, lora=LoraSettings(r=16, alpha=32, dropout=0.1))
    return RespiraMFM(cfg, proj, backbone=backbone)


def items(n: int, tasks=("T1", "T4", "T5", "T9")):
    from respiramfm.models.sequence import FusionItem

    rng = np.random.default_rng(0)
    ctx = "Gender: male. Age: 61. Patient presents with the following respiratory symptoms: cough, fever, wheezing."
    return [FusionItem(task=tasks[i % len(tasks)], audio=rng.standard_normal(768).astype(np.float32),
                       audio_type="lung", context=ctx, label=i % 2) for i in range(n)]


def stage2(device: str, smoke: bool, model=None):
    from respiramfm.fusion.infer import items_to_resolved, shared_prefix_logits

    model = model or phi_model(device, smoke)
    batch = 16
    with torch.no_grad():  # one task per step, as training plans its micro-batches
        resolved = items_to_resolved(model, items(batch, tasks=("T4",)))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    model.train()
    labels = torch.tensor([r.label for r in resolved], device=model.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss = torch.nn.functional.cross_entropy(shared_prefix_logits(model, resolved).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec = timed(step, device, 1 if smoke else 10)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    emit("stage2_step", backbone="phi-2-sized random" if not smoke else "toy phi", dtype=str(model.backbone.dtype).replace("torch.", ""),
         lora_r=16, batch=batch, step_ms=round(sec * 1000, 1), samples_per_s=round(batch / sec, 1),
         params_m=round(model.backbone.n_params / 1e6, 1), peak_mem_gib=None if peak is None else round(peak, 2),
         device=device)
    return model


def prefix_kv(device: str, smoke: bool, model=None) -> None:
    from respiramfm.fusion.infer import items_to_resolved, predict_logits

    model = model or phi_model(device, smoke)
    n = 16 if smoke else 256
    with torch.no_grad():
        resolved = items_to_resolved(model, items(n))
    out = {}
    for use_cache in (True, False):
        sec = timed(lambda: predict_logits(model, resolved, batch_size=32, use_cache=use_cache), device, 1 if smoke else 3)
        out["cached" if use_cache else "full"] = round(n / sec, 1)
    emit("prefix_kv_inference", records=n, batch=32, samples_per_s_prefix_kv=out["cached"],
         samples_per_s_full=out["full"], speedup=round(out["cached"] / out["full"], 2), device=device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the code path only")
    args = ap.parse_args()
    parts = [p for p in args.only.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS}")
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (use --smoke for a CPU check of the code path)", file=sys.stderr)
        return 0
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        emit("device", name=torch.cuda.get_device_name(0), torch=torch.__version__,
             memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    if "opera_ct" in parts:
        opera_ct(device, args.smoke)
    model = None
    if "stage2_step" in parts:
        model = stage2(device, args.smoke)
    if "prefix_kv" in parts:
        prefix_kv(device, args.smoke, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
