"""``lora-one-train``: fine-tune a pretrained model with LoRA-One (or a baseline) from a YAML config.

    lora-one-train                                   # configs/default.yaml: SmolLM2-135M, LoRA vs LoRA-One
    lora-one-train math-llama2-7b                    # a config name from configs/, or a path to a YAML file
    lora-one-train --set train.steps=200 lora.rank=16
    lora-one-train --compare lora,lora-one,pissa     # several methods, identical data and seed

Rerunning the same command after an interruption resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from lora_one_train.config import DEFAULT_CONFIG, ConfigError, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="lora-one-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="config name in configs/ or a YAML path")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override config values, e.g. train.steps=200 lora.rank=16",
    )
    parser.add_argument("--compare", metavar="M1,M2", help="methods to compare (overrides `methods`)")
    parser.add_argument("--method", help="a single method (overrides `methods`)")
    parser.add_argument("--output-dir", help="where the run goes (overrides `output_dir`)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (also LORA_ONE_PROGRESS=0)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.compare and args.method:
        raise SystemExit("lora-one-train: give --compare or --method, not both")
    if args.compare:
        overrides.append(f"methods=[{args.compare}]")
    if args.method:
        overrides.append(f"methods=[{args.method}]")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    try:
        cfg = load_config(args.config, overrides)
        from lora_one_train.mesh import setup_distributed

        setup_distributed(cfg)
        from lora_one_train.run import run

        run(cfg, progress=not args.no_progress)
    except ConfigError as e:
        print(f"lora-one-train: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
