"""``lora-one-train``: fine-tune a pretrained model with LoRA-One (or a baseline) from a YAML config.

    lora-one-train                                   # configs/default.yaml: SmolLM2-135M, LoRA vs LoRA-One
    lora-one-train math-llama2-7b                    # a shipped config name, or a path to a YAML file
    lora-one-train --set train.steps=200 optim.learning_rate=1e-4
    lora-one-train --compare lora,lora-one,pissa     # several methods, identical data and seed
    lora-one-train --print-config > my.yaml          # the resolved config, to edit and run

Rerunning the same command after an interruption resumes from the last checkpoint; --restart deletes the
run's checkpoints and starts over. Mistakes (config, data, files, folders) end with one line on stderr and
exit code 2 (--debug shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import sys

from lora_one_train.config import DEFAULT_CONFIG, load_config
from lora_one_train.errors import UserError

PROG = "lora-one-train"
#: exit codes: a user mistake (as argparse's own), an interruption (as a shell reports SIGINT)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

#: the core library's errors about the user's files and assets (modules, class names): user errors too
CORE_USER_ERRORS = {
    "lora_one_jax.export": "AdapterFileError",
    "lora_one_jax.data.tasks": "DataError",
    "lora_one_jax.models.assets": "AssetError",
}

_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space, then rerun the same command to resume",
    errno.EDQUOT: "the disk quota is exceeded: free space, then rerun the same command to resume",
    errno.EACCES: "choose a folder you can write (--output-dir) or fix its permissions",
    errno.EPERM: "choose a folder you can write (--output-dir) or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another folder with --output-dir",
}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line as a namespace; a wrong flag exits with code 2 and argparse's usage line.

    Example:
        >>> args = parse_args(["default", "--set", "train.steps=3", "--restart"])
        >>> args.config, args.overrides, args.restart, args.debug
        ('default', ['train.steps=3'], True, False)
    """
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="a shipped config name or a YAML path")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override config values (parsed as YAML), e.g. train.steps=200 optim.learning_rate=1e-4",
    )
    methods = parser.add_mutually_exclusive_group()
    methods.add_argument("--compare", metavar="M1,M2", help="methods to compare (overrides `methods`)")
    methods.add_argument("--method", help="a single method (overrides `methods`)")
    parser.add_argument("--output-dir", help="where the run goes (overrides `output_dir`)")
    parser.add_argument("--restart", action="store_true", help="delete the run's checkpoints and start over")
    parser.add_argument(
        "--sweep", action="store_true", help="a fair comparison: learning-rate grid, seeds, report (section `sweep`)"
    )
    parser.add_argument(
        "--join",
        action="store_true",
        help="with --sweep: one more worker on the sweep running in the same folder (same config): workers train "
        "different runs",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (also LORA_ONE_PROGRESS=0)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a user error")
    return parser.parse_args(argv)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides plus those the flags stand for.

    Example:
        >>> overrides_of(parse_args(["--compare", "lora,lora-one", "--output-dir", "/tmp/r", "--restart"]))
        ['methods=[lora,lora-one]', 'output_dir=/tmp/r', 'restart=true']
    """
    overrides = list(args.overrides)
    if args.compare:
        overrides.append(f"methods=[{args.compare}]")
    if args.method:
        overrides.append(f"methods=[{args.method}]")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.restart:
        overrides.append("restart=true")
    if args.sweep:
        overrides.append("sweep.enabled=true")
    return overrides


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types the CLI reports as one line: ``UserError``, ``OSError`` and the core's user errors
    (from the modules already imported: an error can only come from a loaded module; importing the others
    would slow down ``--help``).

    Example:
        >>> import lora_one_jax.export
        >>> [t.__name__ for t in user_errors()][:3]
        ['UserError', 'OSError', 'AdapterFileError']
    """
    core = tuple(getattr(sys.modules[m], name) for m, name in CORE_USER_ERRORS.items() if m in sys.modules)
    return (UserError, OSError, *core)


def error_line(error: BaseException) -> str:
    """What the CLI prints for a user error or a file/folder error (``OSError``): what is wrong, what to do.

    Example:
        >>> error_line(PermissionError(13, "Permission denied", "runs/x/config.yaml"))
        'runs/x/config.yaml: Permission denied; choose a folder you can write (--output-dir) or fix its permissions'
    """
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename is not None else ""
        hint = _OS_HINTS.get(error.errno)
        return f"{where}{error.strerror}" + (f"; {hint}" if hint else "")
    return str(error) or type(error).__name__


def train(args: argparse.Namespace) -> None:
    """Load the config and run it (or print it with ``--print-config``)."""
    cfg = load_config(args.config, overrides_of(args))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return
    if args.join and not cfg.sweep.enabled:
        raise UserError("--join adds a worker to a sweep: use it with --sweep (or a config whose sweep is enabled)")
    from lora_one_train.mesh import setup_distributed

    setup_distributed(cfg)
    if cfg.sweep.enabled:
        from lora_one_train.sweep_run import run_sweep

        run_sweep(cfg, progress=not args.no_progress, join=args.join)
        return
    from lora_one_train.run import run

    run(cfg, progress=not args.no_progress)


def main(argv=None) -> None:
    """``lora-one-train``: user errors are one line on stderr and exit code 2; bugs keep their traceback."""
    args = parse_args(argv)
    try:
        train(args)
    except Exception as e:
        if args.debug or not isinstance(e, user_errors()):
            raise
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":
    main()
