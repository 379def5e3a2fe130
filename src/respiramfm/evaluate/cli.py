"""`respiramfm evaluate`: the command line of the protocol (:mod:`respiramfm.evaluate.protocol`)."""

from __future__ import annotations

import argparse
import json

from respiramfm.config import add_config_arguments, load_config
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.evaluate.layout import RunLayout
from respiramfm.evaluate.protocol import evaluate
from respiramfm.evaluate.textcheck import run_textcheck
from respiramfm.utils.progress import apply_threads_flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config (configs/evaluate.yaml)",
                         "--set seeds=[0] --set systems=[respiramfm,respllm]")
    parser.add_argument("--textcheck", metavar="DATA_ROOT", default=None,
                        help="instead: the text-only COVID check on the real Coswara/Coughvid metadata under "
                             "DATA_ROOT (writes OUT/textcheck.json)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for the whole evaluation (default 0: $RESPIRAMFM_THREADS when set, "
                             "else torch's default); training inside it prints plain progress lines")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    apply_threads_flag(args.threads)
    if args.textcheck:
        res = run_textcheck(args.textcheck, out=RunLayout(cfg.out_dir).textcheck)
        print(json.dumps(res, indent=1))
        return 0
    summary = evaluate(cfg)
    print(json.dumps({"out_dir": cfg.out_dir, "averages": summary["averages"], "report": summary.get("report")},
                     indent=1))
    return 0


__all__ = ["add_arguments", "run"]
