"""LoRA-One against a tuned LoRA on real data: the trainer's sweep (``lora-one-train --sweep``) on each arm.

    python benchmarks/quality.py                        # every arm below (hours on 2 CPU cores; resumable)
    python benchmarks/quality.py --arms tweets          # one arm
    python benchmarks/quality.py --quick                # the toy model, a few steps: checks the pipeline
    python benchmarks/quality.py --set train.steps=300  # any trainer override, applied to every arm
    python benchmarks/quality.py --report               # reports of the runs finished so far, no training

On a CPU, arms run side by side with a core each (Linux ``taskset``) get more done than one arm on every
core: on 2 cores, two processes pinned to one core each made 1.15x the steps of one process using both::

    taskset -c 0 python benchmarks/quality.py --arms tweets &  taskset -c 1 python benchmarks/quality.py --arms asdiv

and when one arm is done, its core joins the other (``--join``: a second worker on the same sweep; the two
train different runs)::

    taskset -c 1 python benchmarks/quality.py --arms tweets --join

The protocol is the sweep's (``configs/sweep-tweets.yaml``, ``lora_one_train.sweep``): no logic of its own
here. Each arm writes ``runs/<arm>/report.md`` (with ``grid.png`` and ``curves.png``); rerunning resumes
where it stopped. It prints the devices it runs on, and runs unchanged on a GPU or TPU.
"""

from __future__ import annotations

import argparse

from lora_one_train.config import load_config
from lora_one_train.sweep_run import run_sweep, write_sweep_report

#: arm -> (config, overrides): the two tasks, and a low-data arm where an init should matter most.
ARMS = {
    "tweets": ("sweep-tweets", []),
    "asdiv": ("sweep-asdiv", []),
    "tweets-256": ("sweep-tweets", ["name=sweep-tweets-256", "task.train_size=256"]),
}

#: ``--quick``: the toy model and a handful of steps on every arm (checks the pipeline, measures nothing).
QUICK = [
    "model.spec=toy-llama",
    "train.steps=4",
    "eval.every=2",
    "eval.limit=16",
    "eval.final_limit=16",
    "sweep.grid=[1.0e-3, 1.0e-2]",
    "sweep.seeds=[0, 1]",
    "sweep.val_size=32",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, among {list(ARMS)}")
    parser.add_argument("--quick", action="store_true", help="toy model, a few steps (a pipeline check)")
    parser.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--join", action="store_true", help="one more worker on each arm's running sweep")
    parser.add_argument("--report", action="store_true", help="write each arm's report from its finished runs")
    args = parser.parse_args(argv)
    for arm in args.arms.split(","):
        config, overrides = ARMS[arm]
        quick = [*QUICK, "output_dir=runs/quick/{name}"] if args.quick else []
        cfg = load_config(config, [*overrides, *quick, *args.overrides])
        print(f"### {arm}: {cfg.out_dir}")
        if args.report:
            print(f"report: {write_sweep_report(cfg)}")
        else:
            run_sweep(cfg, progress=not args.no_progress, join=args.join)


if __name__ == "__main__":
    main()
