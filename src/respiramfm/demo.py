"""`respiramfm demo` (what `make demo` runs): the whole pipeline end to end, offline.

A thin command line over the pipeline recipe (:mod:`respiramfm.pipeline`): ``--preset`` picks a
pipeline preset (where the data come from), ``--settings`` the stage settings it trains with,
the other flags fill them, ``--set KEY=VALUE`` then changes any setting of the typed
:class:`~respiramfm.pipeline.config.PipelineConfig` (``--set finetune.epochs=1``,
``--set evaluate.seeds=[0]``), and ``--config FILE`` starts from a pipeline YAML instead
(e.g. a run's own ``OUT/pipeline.yaml``).

* default (``--preset simulated``): the SIMULATED cohort -> ``logmel-stats`` embeddings -> SmolLM2
  text targets -> stage 1 -> stage 2 -> the T1-T9 protocol with every baseline over two seeds,
  the BTS-style data-efficiency curve and ``OUT/report.html`` (``--quick``: one seed, four
  systems), with the ``cpu`` settings (configs/cpu/: stage 1 with the symmetric CLIP loss and a
  learnable temperature, stage 2 on SmolLM2's first 4 layers in bf16, input order
  [audio | prompt | context]);
* ``--data-root DIR --opera-checkpoint FILE`` (``--preset real``): the paper's T1-T9 on real
  datasets with the ``paper`` settings (configs/paper/: one-way InfoNCE at a fixed temperature
  0.07, Phi-2, [prompt | context | audio]).

``--settings paper|cpu|ours`` (ours = configs/{align,finetune,evaluate}.yaml) replaces a
preset's settings; docs/settings.md lists how the three differ. Every stage resumes: the same
command run again after an interruption finishes the run and writes the same report.
"""

from __future__ import annotations

import argparse

from respiramfm.config import apply_overrides, from_dict, load_config, preset_names, to_dict
from respiramfm.errors import ConfigError
from respiramfm.pipeline import presets
from respiramfm.pipeline.config import PipelineConfig
from respiramfm.pipeline.recipe import run_pipeline
from respiramfm.pipeline.real_lung import run_real_lung  # also registers the real-lung preset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="smaller cohort and shorter training")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (split seed with --data-root)")
    parser.add_argument("--backbone", default=None,
                        help="LLM of both stages (default: the settings': SmolLM2 with cpu and ours, phi-2 with paper)")
    parser.add_argument("--llm-layers", type=int, default=None,
                        help="keep the LLM's first N decoder layers in both stages (0 = all; default: the "
                             "settings': 4 with cpu, all with paper and ours)")
    parser.add_argument("--opera-checkpoint", default=None, help="embed with this OPERA-CT checkpoint")
    parser.add_argument("--pretrain-encoder", action="store_true",
                        help="pretrain a tiny HTS-AT OPERA-style on the cohort instead of the logmel-stats encoder")
    parser.add_argument("--efficiency", default=None, metavar="SYSTEM",
                        help="system of the data-efficiency curve (default bts_frozen; none with --quick; "
                             "'respiramfm' retrains stage 2 per fraction: about 3 more minutes)")
    parser.add_argument("--data-root", default=None,
                        help="real datasets laid out as published (icbhi/, kauh/, ...): the paper's T1-T9")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="pipeline preset: " + "; ".join(f"{p.name} = {p.help}, settings {p.settings}"
                                                             for p in presets.PIPELINE_PRESETS.values())
                        + " (default: real with --data-root, else simulated)")
    parser.add_argument("--settings", default=None, metavar="NAME",
                        help=f"stage settings preset: {', '.join(preset_names())} (configs/NAME/; ours = "
                             "configs/{align,finetune,evaluate}.yaml; docs/settings.md); default: the preset's")
    parser.add_argument("--finetune-config", default=None,
                        help="a stage-2 YAML replacing the settings' finetune.yaml")
    parser.add_argument("--config", default=None, help="a pipeline YAML (e.g. OUT/pipeline.yaml) instead of a preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a pipeline setting (dotted, YAML value), e.g. --set finetune.epochs=1")


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The preset the flags describe (or ``--config``), with the ``--set`` overrides applied."""
    if args.llm_layers is not None and args.llm_layers < 0:
        raise ConfigError(f"--llm-layers must be >= 0, got {args.llm_layers}")
    if args.config:
        return load_config(PipelineConfig, args.config, args.overrides)
    name = args.preset or ("real" if args.data_root else "simulated")
    options = presets.PresetOptions(
        out=args.out, quick=args.quick, seed=args.seed, settings=args.settings, backbone=args.backbone,
        llm_layers=args.llm_layers, finetune_config=args.finetune_config, data_root=args.data_root,
        opera_checkpoint=args.opera_checkpoint, pretrain_encoder=args.pretrain_encoder, efficiency=args.efficiency)
    cfg = presets.build(name, options)
    if not args.overrides:
        return cfg
    return from_dict(PipelineConfig, apply_overrides(to_dict(cfg), args.overrides), where="--set")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    (run_real_lung if cfg.preset == "real-lung" else run_pipeline)(cfg)
    return 0


__all__ = ["add_arguments", "config_from_args", "run"]
