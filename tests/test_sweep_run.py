"""The sweep through the trainer (issue 17): a tiny grid and two seeds on the toy model, resumable, with a report."""

import json

import pytest

from lora_one_train.config import ConfigError, RunConfig
from lora_one_train.sweep import load_results
from lora_one_train.sweep_run import run_sweep, split_label
from tests.test_trainer import tiny_config


def sweep_config(tmp_path, rows=120, **over) -> dict:
    path = tmp_path / "parity-120.jsonl"
    data = [{"q": f"Is {i} even?", "choices": ["no", "yes"], "label": int(i % 2 == 0)} for i in range(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    cfg = tiny_config(tmp_path, methods=["lora", "lora-one"], **{"train.steps": 2, "checkpoint.every": 0, **over})
    cfg["task"]["spec"] = f"jsonl:{path}"
    cfg["eval"]["diagnostics"] = True
    cfg["sweep"] = {"grid": [1e-3, 1e-2], "seeds": [0, 1], "val_size": 16}
    return cfg


def test_labels_name_a_method_and_its_variant():
    assert split_label("lora") == ("lora", {})
    assert split_label("lora-one+gamma=auto+optim.damping=1e-3") == (
        "lora-one",
        {"init": {"gamma": "auto"}, "optim": {"damping": 1e-3}},
    )
    with pytest.raises(ConfigError, match="is not <key>=<value>"):
        split_label("lora-one+lora.rank=4")


@pytest.mark.slow
def test_a_sweep_chooses_rates_pairs_seeds_and_resumes(tmp_path, capsys):
    cfg = RunConfig.from_dict(sweep_config(tmp_path))
    report = run_sweep(cfg, progress=False)
    verdict = "- **lora-one** against `lora` (seeds 0, 1): held-out score "
    assert verdict in capsys.readouterr().out  # the answer, printed at the end
    results = load_results(cfg.out_dir)
    grid = {name: r for name, r in results.items() if name.startswith("grid/")}
    seeds = {name: r for name, r in results.items() if name.startswith("seeds/")}
    assert len(grid) >= 4 and all(r["val"]["answer_loss"] > 0 for r in grid.values())  # 2 rates (+ extension)
    assert len(seeds) == 4  # 2 methods x 2 seeds at each method's chosen rate
    for method in ("lora", "lora-one"):
        rates = {r["lr"] for r in seeds.values() if r["method"] == method}
        assert len(rates) == 1
    # paired by seed: the same data, so a method's step-0 held-out loss is the same at both rates
    first = {(r["method"], r["seed"]): r["history"][0]["eval/answer_loss"] for r in seeds.values()}
    assert first[("lora", 0)] != first[("lora-one", 0)]
    lora_one = next(r for r in seeds.values() if r["method"] == "lora-one")
    assert "eval/align/left_mean" not in lora_one["history"][0] and "align/left_mean" in lora_one["history"][0]
    assert lora_one["init"]["grad_stability"]
    text = report.read_text()
    assert "Paired differences against `lora`" in text and "| lora-one |" in text and verdict in text
    mtimes = {p: p.stat().st_mtime for p in cfg.out_dir.glob("*/*/*/result.json")}
    run_sweep(cfg, progress=False)  # finished: nothing is trained again
    assert {p: p.stat().st_mtime for p in cfg.out_dir.glob("*/*/*/result.json")} == mtimes


def test_gamma_auto_through_the_trainer_is_logged_and_used(tmp_path):
    """init.gamma: auto picks one of the candidates by the loss on the examples after the gradient examples,
    logs what it chose at step 0, and trains from the adapters of that gamma."""
    import numpy as np

    import lora_one_jax as lj
    from lora_one_train.run import run

    cfg = tiny_config(tmp_path, methods=["lora-one"], **{"init.gamma": "auto", "train.steps": 1})
    cfg["eval"]["diagnostics"] = False
    history = run(RunConfig.from_dict(cfg), progress=False)["methods"]["lora-one"]["history"]
    first = history[0]
    scored = {float(k.removeprefix("init/gamma_loss/")): v for k, v in first.items() if "gamma_loss/" in k}
    # the golden search scores some of the 8 candidates (at least 3), never one outside them
    assert 3 <= len(scored) <= 8 and set(scored) <= set(lj.step_size.DEFAULT_GAMMAS)
    assert all(np.isfinite(list(scored.values()))) and first["init/gamma"] == min(scored, key=scored.get)
    assert first["init/gamma_forward_passes"] == 4 * len(scored)  # 16 examples in batches of 4 per candidate
    # its cost in training steps: the report divides the seconds by the logged seconds per step
    assert first["init/gamma_seconds"] > 0 and [r["step_seconds"] > 0 for r in history if "loss" in r] == [True]
    assert 0 <= first["init/gamma_compile_seconds"] < first["init/gamma_seconds"]


@pytest.mark.slow
def test_a_run_that_would_train_as_a_finished_one_reuses_its_result(tmp_path):
    """lora-one+gamma=auto beside lora-one at the gamma auto chose: the same run, trained once. The reused
    result equals what training gives (a sweep that trains it), and a run at another gamma is trained."""
    base = sweep_config(tmp_path, **{"eval.diagnostics": False})
    base["sweep"]["seeds"] = [0]

    def sweep(folder, labels):
        cfg = RunConfig.from_dict(
            {**base, "output_dir": str(tmp_path / folder), "sweep": {**base["sweep"], "methods": labels}}
        )
        run_sweep(cfg, progress=False)
        return load_results(cfg.out_dir)

    auto = sweep("shared", ["lora-one+gamma=auto"])
    gamma = {r["init"]["gamma"] for r in auto.values()}.pop()  # the seed's choice, whatever the rate
    chosen, other = f"lora-one+gamma={gamma:g}", f"lora-one+gamma={gamma * 4:g}"
    both = sweep("shared", ["lora-one+gamma=auto", chosen, other])
    reused = {name: r for name, r in both.items() if r["method"] == chosen}
    assert len(reused) == len(auto) >= 3  # every grid and seeds run of the chosen gamma
    for name, r in reused.items():
        twin = both[r["same_as"]]
        assert twin["method"] == "lora-one+gamma=auto" and (twin["lr"], twin["phase"]) == (r["lr"], r["phase"])
        assert r["init"]["gamma"] == gamma and "gamma_auto" not in r["init"]
        assert [p.name for p in (tmp_path / "shared" / name).iterdir()] == ["result.json"]  # nothing trained
    assert not any("same_as" in r for r in both.values() if r["method"] == other)
    assert (
        f"| {chosen} | 0 | {gamma:g} | - | - | - | as `seeds/lora-one+gamma=auto/"
        in (tmp_path / "shared" / "report.md").read_text()
    )
    trained = sweep("alone", [chosen])
    for name, r in reused.items():
        phase = "val" if r["phase"] == "grid" else "held_out"
        assert trained[name][phase] == r[phase]  # what training gives, exactly


def test_a_worker_takes_the_first_run_no_other_worker_holds(tmp_path):
    from lora_one_train.lock import RunLock
    from lora_one_train.sweep import Run
    from lora_one_train.sweep_run import train_one

    class Runner:  # what train_one needs of a Sweep: its folder, and a run trained into a record
        cfg = RunConfig.from_dict(tiny_config(tmp_path))
        trained: list = []

        def train(self, run, results):
            self.trained.append(run.name)
            return {"method": run.method}

    runner, root = Runner(), Runner.cfg.out_dir
    todo = [Run("lora", 1e-3, 0, "grid"), Run("lora", 1e-2, 0, "grid")]
    with RunLock(todo[0].folder(root)):  # another worker trains the first
        assert train_one(runner, todo, {}) is True
        assert runner.trained == [todo[1].name] and todo[1].result_path(root).is_file()
        assert not (todo[1].folder(root) / ".lock").exists()  # released once its result is written
        assert train_one(runner, todo[:1], {}) is False  # every run left is held: wait
    todo[0].result_path(root).write_text("{}")  # the other worker finished it while this one waited
    assert train_one(runner, todo[:1], {}) is True and runner.trained == [todo[1].name]

    # a run that may train exactly as a held run of its slot (gamma: auto beside lora-one) waits for it
    slot = [Run("lora-one", 1e-3, 0, "seeds"), Run("lora-one+gamma=auto", 1e-3, 0, "seeds")]
    with RunLock(slot[0].folder(root)):
        assert train_one(runner, slot, {}) is False
        assert train_one(runner, [*slot, Run("lora-one+gamma=auto", 1e-3, 1, "seeds")], {}) is True
    assert runner.trained[-1] == "seeds/lora-one+gamma=auto/lr1.00e-03-seed1"


def test_joining_needs_a_running_sweep_with_the_same_config(tmp_path):
    from lora_one_train.errors import UserError
    from lora_one_train.lock import RunLock
    from lora_one_train.sweep_run import check_joinable, write_sweep_record

    cfg = RunConfig.from_dict(sweep_config(tmp_path))
    with pytest.raises(UserError, match="no sweep is running in .*start it without --join first"):
        check_joinable(cfg)
    with RunLock(cfg.out_dir):  # the sweep's first worker
        write_sweep_record(cfg)
        check_joinable(cfg)  # same config: joins
        other = sweep_config(tmp_path)
        other["sweep"]["seeds"] = [0, 1, 2]
        with pytest.raises(UserError, match=r"has another config \(sweep.seeds: \[0, 1\] -> \[0, 1, 2\]\)"):
            check_joinable(RunConfig.from_dict(other))
    with pytest.raises(UserError, match="no sweep is running"):  # its first worker has ended
        check_joinable(cfg)


@pytest.mark.slow
def test_two_workers_share_a_sweep_and_train_each_run_once(tmp_path, monkeypatch):
    """A sweep and a worker that joins it (threads here; processes in use): every run trained by one of them,
    the plan's later runs (seeds at the chosen rates) found by both, the report written by the first."""
    import threading
    import time

    from lora_one_train import sweep_run

    monkeypatch.setattr(sweep_run, "WAIT_SECONDS", 0.1)
    trained, train = [], sweep_run.Sweep.train

    def counted(self, run, results=None):
        trained.append((threading.current_thread().name, run.name))
        return train(self, run, results)

    monkeypatch.setattr(sweep_run.Sweep, "train", counted)
    cfg = RunConfig.from_dict(sweep_config(tmp_path, **{"eval.diagnostics": False}))
    reports = {}
    first = threading.Thread(target=lambda: reports.update(first=run_sweep(cfg, progress=False)), name="first")
    first.start()
    while not (cfg.out_dir / sweep_run.SWEEP_RECORD).is_file():
        time.sleep(0.05)
    reports["joined"] = run_sweep(cfg, progress=False, join=True)
    first.join()
    results = load_results(cfg.out_dir)
    names = [name for _, name in trained]
    assert sorted(names) == sorted(results) and len(set(names)) == len(names)  # each run once
    assert sum(name.startswith("seeds/") for name in names) == 4
    assert {worker for worker, _ in trained} == {"first", "MainThread"}  # both had work (10 runs)
    assert reports["joined"] is None and reports["first"].is_file()
    assert not list(cfg.out_dir.rglob(".lock"))

    # a joined worker waiting for the first worker's last run ends cleanly when the first one ends
    from lora_one_train.lock import RunLock

    last = cfg.out_dir / names[-1] / "result.json"
    saved = last.read_text()
    last.unlink()
    with RunLock(cfg.out_dir), RunLock(last.parent):  # the first worker, training the last run
        joined = threading.Thread(target=lambda: reports.update(late=run_sweep(cfg, progress=False, join=True)))
        joined.start()
        time.sleep(1.0)
        last.write_text(saved)
    joined.join()
    assert reports["late"] is None and len(trained) == len(names)  # it trained nothing
