"""`respiramfm demo --data-root DIR`: the paper's T1-T9 on real datasets, laid out as their publishers ship them.

``DIR`` holds one folder per adapter (``icbhi/``, ``kauh/``, ``coswara/``, ``coughvid/``,
``ukcovid19/``, ``codatb/``; whichever exist). Stages, all under ``--out``:

1. ``prepare KEY``  per dataset folder found -> ``OUT/data/KEY.csv`` (patient-level splits, seed ``--seed``;
                   datasets of zero-shot tasks only, KAUH, Coswara and CODA TB, are test data as a whole);
2. the manifests combined into ``OUT/data/manifest.csv`` (ids carry the dataset prefix; audio paths
   re-expressed relative to the new manifest; metadata-only records kept);
3. ``embed``       with the OPERA-CT checkpoint (required: no real-data run uses an untrained encoder);
4. ``embed-text``  with the chosen LLM (Phi-2 by default, as in the paper; cut to ``--llm-layers`` like stage 2);
5. ``align``       stage 1 (``configs/align.yaml`` when present);
6. ``finetune``    stage 2 (``configs/finetune.yaml`` or ``--finetune-config``) on the supervised tasks
                   T1-T4 that have training audio and test records; the model is copied to ``OUT/model``;
7. ``evaluate``    every paper task with test records (``configs/evaluate.yaml`` when present), then
                   ``OUT/report.html`` and ``OUT/demo_summary.json``.

The merged stage-2 and evaluation settings are written to ``OUT/configs/`` so each stage can be rerun
alone. ``args.overrides`` (optional ``key=value`` list) tunes the run: plain keys go to the stage-2
config (shared by ``finetune`` and the evaluation's fine-tuning), ``align.KEY=V`` to stage 1 and
``evaluate.KEY=V`` to the evaluation. CUDA is used when available.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from respiramfm.errors import ConfigError, DataError

ADAPTER_KEYS = ("icbhi", "kauh", "coswara", "coughvid", "ukcovid19", "codatb")
PAPER_TASKS = tuple(f"T{i}" for i in range(1, 10))
QUICK = {"epochs": 2, "seeds": [0], "systems": ["respiramfm", "bts_frozen"], "n_boot": 300, "align_epochs": 60}


def _config_file(name: str) -> Path | None:
    """``configs/NAME`` from the working directory, else from the source checkout; ``None`` when absent."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / "configs" / name).is_file():
            return base / "configs" / name
    return None


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _split_overrides(items: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(stage-2, align, evaluate) override lists from one ``key=value`` list."""
    align = [o[len("align."):] for o in items if o.startswith("align.")]
    ev = [o[len("evaluate."):] for o in items if o.startswith("evaluate.")]
    return [o for o in items if not o.startswith(("align.", "evaluate."))], align, ev


def _combine(found: list[str], data: Path) -> list:
    """One manifest of every dataset's records, audio paths relative to ``data/manifest.csv``."""
    from respiramfm.data.records import read_manifest, relative_audio_path, resolve_audio_path, write_manifest

    manifest, records = data / "manifest.csv", []
    for key in found:
        for r in read_manifest(data / f"{key}.csv"):
            if not r.record_id.startswith(f"{r.dataset}/"):
                raise DataError(f"record id {r.record_id!r} lacks its dataset prefix", path=data / f"{key}.csv")
            if r.audio_path:
                r.audio_path = relative_audio_path(resolve_audio_path(r, data), manifest)
            records.append(r)
    write_manifest(records, manifest)
    return records


def _zero_shot_only() -> set[str]:
    """Datasets the paper uses only for zero-shot tasks (KAUH, Coswara, CODA TB): never trained on."""
    from respiramfm.data.tasks import get_task

    tasks = [get_task(n) for n in PAPER_TASKS]
    return {t.dataset for t in tasks if t.role == "zero-shot"} - {t.dataset for t in tasks if t.role == "supervised"}


def _plan(records: list) -> tuple[list[str], list[str], dict[str, str]]:
    """(trained supervised tasks, evaluated tasks, skipped task -> reason) for T1-T9 on these records."""
    from respiramfm.data.tasks import get_task

    trained, evaluated, skipped = [], [], {}
    test = [r for r in records if r.split == "test"]
    train = [r for r in records if r.split == "train" and r.has_audio]
    for name in PAPER_TASKS:
        task = get_task(name)
        if task.role == "supervised" and not task.select(train):
            skipped[name] = f"no {task.dataset} training record with audio"  # e.g. T3: TBscreen is not public
        elif not task.select(test):
            skipped[name] = f"no {task.dataset} test record"
        else:
            trained += [name] if task.role == "supervised" else []
            evaluated.append(name)
    return trained, evaluated, skipped


def run_real(args: argparse.Namespace) -> int:
    """Run prepare -> ... -> evaluate on the real datasets under ``args.data_root``; returns 0 on success."""
    import copy

    from respiramfm.align.train import AlignConfig
    from respiramfm.config import apply_overrides, from_dict, load_config, save_config, to_dict
    from respiramfm.demo import _available, _copy_model, _stage, finish
    from respiramfm.encoders.store import EmbeddingStore
    from respiramfm.evaluate.protocol import EvaluateConfig
    from respiramfm.fusion.train_config import FinetuneConfig

    ckpt = getattr(args, "opera_checkpoint", None)
    if not ckpt:
        raise ConfigError("real data need the OPERA-CT checkpoint: pass --opera-checkpoint PATH (see `respiramfm "
                          "fetch-opera`); an untrained encoder is never used on real recordings")
    if not Path(ckpt).is_file():
        raise ConfigError("OPERA-CT checkpoint not found", path=ckpt)
    ft_file = getattr(args, "finetune_config", None) or _config_file("finetune.yaml")
    if ft_file and not Path(ft_file).is_file():
        raise ConfigError("stage-2 config not found", path=ft_file)
    layers, device, quick = int(getattr(args, "llm_layers", 0) or 0), _device(), bool(args.quick)
    if layers < 0:
        raise ConfigError(f"llm_layers must be >= 0 (0 = every layer), got {layers}")
    root, out = Path(args.data_root), Path(args.out)
    if not root.is_dir():
        raise DataError("data root not found", path=root)
    found = [k for k in ADAPTER_KEYS if (root / k).is_dir()]
    if not found:
        raise DataError(f"no dataset folder found; expected one or more of {', '.join(k + '/' for k in ADAPTER_KEYS)}",
                        path=root)
    absent = [k for k in ADAPTER_KEYS if k not in found]
    print(f"== real data under {root}: found {', '.join(found)}; absent: {', '.join(absent) or 'none'}")
    ft_over, align_over, eval_over = _split_overrides(list(getattr(args, "overrides", None) or []))
    data, timings = out / "data", {}
    manifest = data / "manifest.csv"

    zero_shot = _zero_shot_only()
    for key in found:  # 1. one manifest per dataset; zero-shot-only datasets are test data throughout
        whole = ["--fractions", "0,0,1"] if key in zero_shot else []
        if whole:
            print(f"   ({key} serves only zero-shot tasks: every {key} patient goes to the test split)")
        _stage(f"prepare-{key}", ["prepare", key, "--root", str(root / key), "--out", str(data / f"{key}.csv"),
                                  "--seed", str(args.seed), *whole], timings)
    records = _combine(found, data)  # 2.
    print(f"   combined {len(records)} records ({sum(r.has_audio for r in records)} with audio) -> {manifest}")
    trained, evaluated, skipped = _plan(records)
    for name, why in skipped.items():
        print(f"   ({name} skipped: {why})")
    if not trained:
        raise DataError("stage 2 needs a supervised paper task (T1-T4) with training audio and test records; "
                        f"found only {', '.join(found)}", path=root)

    audio, text = out / "audio_emb", out / "text_emb"  # 3-4.
    _stage("embed", ["embed", "--manifest", str(manifest), "--encoder", "opera-ct", "--checkpoint", str(ckpt),
                     "--out", str(audio), "--device", device, "--no-progress"], timings)
    _stage("embed-text", ["embed-text", "--manifest", str(manifest), "--out", str(text), "--backbone", args.backbone,
                          "--device", device, *(["--num-layers", str(layers)] if layers > 0 else [])], timings)

    al = to_dict(load_config(AlignConfig, _config_file("align.yaml")))  # 5.
    al.update(audio_store=str(audio), text_store=str(text), manifest=str(manifest), out_dir=str(out / "align"),
              progress=False, **({"epochs": QUICK["align_epochs"]} if quick else {}))
    al["projector"]["in_dim"] = EmbeddingStore(audio).dim
    save_config(from_dict(AlignConfig, apply_overrides(al, align_over), where="align settings").validate(),
                out / "configs" / "align.yaml")
    _stage("align", ["align", "--config", str(out / "configs" / "align.yaml")], timings)

    mine = {"manifests": [str(manifest)], "audio_store": [str(audio)], "text_store": str(text),  # 6-7. settings
            "projector": str(out / "align"), "encoder": str(ckpt), "tasks": evaluated, "out_dir": str(out / "evaluate"),
            "quick": quick, "systems_options": {"respiramfm": {"finetune_dir": str(out / "finetune" / "seed{seed}")}}}
    if quick:
        mine.update(seeds=QUICK["seeds"], n_boot=QUICK["n_boot"], systems=QUICK["systems"])
    if getattr(args, "systems", None):
        mine["systems"] = list(args.systems)
    ev = to_dict(load_config(EvaluateConfig, _config_file("evaluate.yaml")))
    ev = apply_overrides({**ev, **mine}, eval_over)
    ev["systems"] = _available(list(ev["systems"]))
    evcfg = from_dict(EvaluateConfig, ev, where="evaluate settings")
    first = evcfg.seeds[0] if evcfg.seeds else 0
    ft = to_dict(load_config(FinetuneConfig, ft_file))
    ft["model"].update(backbone=str(args.backbone), num_layers=layers)
    ft.update(progress=False, **({"epochs": QUICK["epochs"]} if quick else {}))
    ftcfg = from_dict(FinetuneConfig, apply_overrides(ft, ft_over), where="stage-2 settings")
    ftcfg.manifests, ftcfg.audio_store, ftcfg.task_files = [str(manifest)], [str(audio)], []
    ftcfg.projector, ftcfg.tasks, ftcfg.seed = str(out / "align"), trained, int(first)
    ftcfg.out_dir = str(out / "finetune" / f"seed{first}")
    save_config(ftcfg.validate(), out / "configs" / "finetune.yaml")
    _stage("finetune", ["finetune", "--config", str(out / "configs" / "finetune.yaml")], timings)
    _copy_model(Path(ftcfg.out_dir) / "model", out / "model")

    evcfg.finetune = copy.deepcopy(ftcfg)  # the same stage-2 run, so the evaluation reuses it for the first seed
    save_config(evcfg.validate(), out / "configs" / "evaluate.yaml")
    _stage("evaluate", ["evaluate", "--config", str(out / "configs" / "evaluate.yaml")], timings)
    summary = {"simulated": False, "data_root": str(root), "datasets": found,
               "records": {k: sum(r.dataset == k for r in records) for k in found},
               "tasks": {"trained": trained, "evaluated": evaluated, "skipped": skipped},
               "backbone": args.backbone, "llm_layers": layers, "opera_checkpoint": str(ckpt), "device": device,
               "systems": evcfg.systems, "seeds": evcfg.seeds}
    return finish(out, summary, timings, f"on real data ({', '.join(found)})")
