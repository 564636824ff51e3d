"""The CLI and its config: user mistakes end as one line and exit code 2, YAML 1.2 numbers, the checks of issue 15."""

import errno
import re
import subprocess
import sys

import pytest
import yaml

from lora_one_jax.export import AdapterFileError
from lora_one_jax.models.assets import AssetError
from lora_one_train import cli
from lora_one_train.config import (
    CONFIG_DIR,
    ConfigError,
    InitConfig,
    RunConfig,
    YamlLoader,
    load_config,
    parse_overrides,
)
from lora_one_train.errors import CheckpointError, DataError, LockError, UserError


def test_config_error_is_still_importable_from_config_and_is_a_user_error():
    from lora_one_train import config, errors

    assert config.ConfigError is errors.ConfigError
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(LockError, UserError)
    assert issubclass(DataError, ValueError) and issubclass(DataError, UserError)


def test_the_readmes_learning_rate_override_is_a_float():
    cfg = load_config("default", ["optim.learning_rate=1e-4", "optim.eps=1E-9", "optim.damping=1e-6"])
    assert (cfg.optim.learning_rate, cfg.optim.eps, cfg.optim.damping) == (1e-4, 1e-9, 1e-6)


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-8", 1e-8),
        ("1E8", 1e8),
        ("+2e3", 2000.0),
        ("-1e-3", -0.001),
        ("1.5e-3", 0.0015),
        ("2.0e-4", 2e-4),
        (".5", 0.5),
        ("1.", 1.0),
        ("1_000", 1000),
        ("10", 10),
        ("0x10", 16),
        ("1.2.3", "1.2.3"),
        ("1e", "1e"),
        ("e5", "e5"),
        ("1e-4x", "1e-4x"),
        ("'1e-4'", "1e-4"),
        ("true", True),
        ("null", None),
    ],
)
def test_yaml_reads_yaml_1_2_floats_and_keeps_everything_else(text, value):
    got = yaml.load(f"x: {text}", YamlLoader)["x"]
    assert got == value and type(got) is type(value)


def test_a_yaml_file_with_exponent_floats(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  eps: 1e-8\n  learning_rate: 3e-4\ninit:\n  gamma: 64\n")
    cfg = load_config(str(path))
    assert (cfg.optim.eps, cfg.optim.learning_rate, cfg.init.gamma) == (1e-8, 3e-4, 64)


@pytest.mark.parametrize("text", ["", "\n", "# nothing but a comment\n"])
def test_an_empty_config_file_is_an_error_not_the_defaults(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path} is empty; a run config is a mapping of sections"):
        load_config(str(path))


def test_a_yaml_list_as_the_config_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: a\n- name: b\n")
    with pytest.raises(ConfigError, match=f"{path} holds a list; a run config is a mapping of sections"):
        load_config(str(path))


def test_bad_yaml_in_a_file_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n lora: {rank: 4\n")
    with pytest.raises(ConfigError, match=f"{path} is not valid YAML: .* \\(line 3, column 2\\)$"):
        load_config(str(path))


def test_bad_yaml_in_an_override_is_one_line_naming_it():
    with pytest.raises(ConfigError, match=r"^override 'lora.targets=\[q_proj' is not valid YAML: [^\n]*$"):
        parse_overrides(["lora.targets=[q_proj"])
    with pytest.raises(ConfigError, match=r"override 'train..steps=3' is not KEY=VALUE"):
        parse_overrides(["train..steps=3"])


@pytest.mark.parametrize(
    "template, message",
    [
        ("runs/{nam}", r"output_dir 'runs/\{nam\}' has the unknown placeholder \{nam\}; valid: \{name\}"),
        ("runs/{}", r"has the unknown placeholder \{\}; valid: \{name\}"),
        ("runs/{name", r"output_dir 'runs/\{name' is not a valid template .*; placeholders: \{name\}"),
        ("runs/{name.x}", r"unknown placeholder \{name.x\}"),
        ("", "output_dir must be a non-empty string"),
    ],
)
def test_unknown_placeholders_in_output_dir_name_the_valid_ones(template, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"output_dir": template})


def test_output_dir_placeholder_is_filled():
    assert (
        str(RunConfig.from_dict({"name": "x", "output_dir": "/tmp/{name}/{{literal}}"}).out_dir) == "/tmp/x/{literal}"
    )


@pytest.mark.parametrize("seed, ok", [(-1, False), (0, True), (7, True), (1.5, False), (True, False)])
def test_seeds_are_non_negative_integers(seed, ok):
    if ok:
        assert RunConfig.from_dict({"seed": seed}).seed == seed
    else:
        with pytest.raises(ConfigError, match=f"seed must be a non-negative integer, got {seed!r}"):
            RunConfig.from_dict({"seed": seed})


@pytest.mark.parametrize("gamma", ["auto", 128.0, 64, 1e-3])
def test_gamma_is_a_positive_number_or_auto(gamma):
    assert InitConfig(gamma=gamma).gamma == gamma


@pytest.mark.parametrize("gamma", [0, -1.0, float("inf"), float("nan"), "automatic", "128", True, None, [128]])
def test_other_gammas_are_refused(gamma):
    with pytest.raises(ConfigError, match="init.gamma must be a positive number or 'auto', got "):
        InitConfig(gamma=gamma)


def test_restart_is_a_boolean_set_by_the_flag():
    assert not load_config("default").restart
    assert load_config("default", cli.overrides_of(cli.parse_args(["--restart"]))).restart
    with pytest.raises(ConfigError, match="restart must be true or false, got 'yes please'"):
        RunConfig.from_dict({"restart": "yes please"})


def test_print_config_round_trips(tmp_path, capsys):
    cli.main(["default", "--set", "optim.learning_rate=1e-5", "init.gamma=auto", "--print-config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    cfg = load_config(str(tmp_path / "printed.yaml"))
    assert cfg == load_config("default", ["optim.learning_rate=1e-5", "init.gamma=auto"])
    assert cfg.optim.learning_rate == 1e-5 and cfg.logging.loggers == ("jsonl", "tensorboard")


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "seed=-1"], "seed must be a non-negative integer, got -1"),
        (["--set", "output_dir=runs/{nam}"], r"has the unknown placeholder \{nam\}; valid: \{name\}"),
        (["--set", "lora.targets=[q_proj"], r"override 'lora.targets=\[q_proj' is not valid YAML"),
        (["--set", "optim.lr=1e-4"], r"unknown key\(s\) \['lr'\] in section 'optim'"),
        (["no-such-config"], "config 'no-such-config' is neither a file nor a name"),
    ],
)
def test_user_errors_are_one_line_and_exit_code_2(argv, message, capsys):
    code, err = run_main(argv + ["--print-config"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lora-one-train: error: ")
    assert re.search(message, err)


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError, match="seed must be"):
        cli.main(["--set", "seed=-1", "--print-config", "--debug"])


@pytest.mark.parametrize(
    "error, line",
    [
        (OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/4"), "runs/x/checkpoints/4: No space "
         "left on device; the disk is full: free space, then rerun the same command to resume"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/run"), "/ro/run: Permission denied; choose a folder "
         "you can write (--output-dir) or fix its permissions"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "data.jsonl"), "data.jsonl: No such file or "
         "directory"),
        (LockError("runs/x is in use by another run (pid 12 on h, started t)"), "runs/x is in use by another run "
         "(pid 12 on h, started t)"),
        (DataError("train.jsonl changed since checkpoint 4"), "train.jsonl changed since checkpoint 4"),
        (AdapterFileError("runs/x/adapters/adapters.safetensors is truncated"), "runs/x/adapters/adapters.safetensors "
         "is truncated"),
        (AssetError("smollm2-135m: no network; set LORA_ONE_CACHE"), "smollm2-135m: no network; set LORA_ONE_CACHE"),
    ],
)  # fmt: skip
def test_file_and_folder_errors_are_one_line_with_what_to_do(monkeypatch, capsys, error, line):
    def train(args):
        raise error

    monkeypatch.setattr(cli, "train", train)
    assert run_main([], capsys) == (2, f"lora-one-train: error: {line}\n")


@pytest.mark.parametrize("error", [KeyError("missing"), ValueError("a bug"), TypeError("a bug")])
def test_programming_errors_keep_their_traceback(monkeypatch, error):
    def train(args):
        raise error

    monkeypatch.setattr(cli, "train", train)
    with pytest.raises(type(error)) as e:
        cli.main([])
    assert e.value is error


def test_an_interruption_says_how_to_resume(monkeypatch, capsys):
    def train(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", train)
    code, err = run_main([], capsys)
    assert code == 130 and "interrupted; rerun the same command to resume" in err


def test_compare_and_method_together_is_a_usage_error(capsys):
    code, err = run_main(["--compare", "lora,pissa", "--method", "lora"], capsys)
    assert code == 2 and "not allowed with argument" in err


def test_the_installed_command_prints_one_line_for_an_empty_config(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "lora_one_train", "empty.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "lora-one-train: error: empty.yaml is empty; a run config is a "\
        "mapping of sections, e.g. configs/default.yaml"  # fmt: skip
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_resolves_by_name(path):
    assert load_config(path.stem) == load_config(str(path))


def test_a_run_into_a_folder_another_run_holds_is_refused_before_writing_anything(tmp_path, capsys):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lora_one_train.lock import RunLock\nwith RunLock(sys.argv[1]):\n"
         "    print('held', flush=True); sys.stdin.read()", str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run_main(["--output-dir", str(folder), "--set", "model.spec=toy-llama"], capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"lora-one-train: error: {folder} is in use by another run (pid {holder.pid} on " in err
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_file_where_the_output_folder_should_be_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    code, err = run_main(["--output-dir", str(tmp_path / "afile" / "run"), "--set", "model.spec=toy-llama"], capsys)
    assert (code, err) == (2, f"lora-one-train: error: {tmp_path / 'afile' / 'run'}: Not a directory\n")


def test_a_numeric_name_is_refused_with_how_to_quote_it():
    with pytest.raises(
        ConfigError, match="name must be a non-empty string \\(quote numbers: name: '2024'\\), got 2024"
    ):
        load_config("default", ["name=2024"])
    assert load_config("default", ["name='2024'"]).out_dir.name == "2024"


def test_join_adds_a_worker_to_a_running_sweep_only(tmp_path, capsys):
    code, err = run_main(["default", "--join"], capsys)
    assert code == 2 and "--join adds a worker to a sweep: use it with --sweep" in err
    code, err = run_main(["sweep-tweets", "--join", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and f"--join: no sweep is running in {tmp_path}; start it without --join first" in err
