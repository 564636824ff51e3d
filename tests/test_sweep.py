"""The sweep's grid, its one-time extension, the choice of rate, the resumable plan and the validation split."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest

from lora_one_train.sweep import (
    DEFAULT_GRID,
    Run,
    carve_validation,
    choose_rate,
    chosen_rates,
    extend_grid,
    load_results,
    log_grid,
    plan,
    validation_indices,
)


def test_default_grid_is_five_log_spaced_points():
    assert len(DEFAULT_GRID) == 5 and DEFAULT_GRID[0] == 3e-5 and DEFAULT_GRID[-1] == 3e-3
    ratios = np.diff(np.log(DEFAULT_GRID))
    np.testing.assert_allclose(ratios, np.log(10) / 2, rtol=2e-3)  # 100x over 4 steps: sqrt(10) each


@pytest.mark.parametrize(
    ("losses", "expected_extra"),
    [((0.5, 0.6, 0.7, 0.8, 0.9), 3e-5 / math.sqrt(10)), ((0.9, 0.8, 0.7, 0.6, 0.5), 3e-3 * math.sqrt(10))],
)
def test_extend_grid_adds_one_point_past_the_best_edge(losses, expected_extra):
    grid = extend_grid(DEFAULT_GRID, dict(zip(DEFAULT_GRID, losses)))
    assert len(grid) == 6 and grid == tuple(sorted(grid))
    (extra,) = set(grid) - set(DEFAULT_GRID)
    assert extra == pytest.approx(expected_extra, rel=2e-3)


def test_extend_grid_interior_optimum_and_diverged_edges():
    assert extend_grid(DEFAULT_GRID, dict(zip(DEFAULT_GRID, (0.9, 0.5, 0.6, 0.7, 0.8)))) == DEFAULT_GRID
    # the top rate diverged (inf): the best is the 4th rate, inside the grid
    assert extend_grid(DEFAULT_GRID, dict(zip(DEFAULT_GRID, (0.9, 0.8, 0.7, 0.6, math.inf)))) == DEFAULT_GRID


def test_extend_grid_rejects_nan_missing_and_all_diverged():
    with pytest.raises(ValueError, match="NaN"):
        extend_grid((1e-4, 1e-3), {1e-4: float("nan"), 1e-3: 0.5})
    with pytest.raises(ValueError, match="missing"):
        extend_grid((1e-4, 1e-3), {1e-4: 0.5})
    with pytest.raises(ValueError, match="diverged"):
        extend_grid((1e-4, 1e-3), {1e-4: math.inf, 1e-3: math.inf})
    with pytest.raises(ValueError, match="distinct"):
        extend_grid((1e-4, 1e-4), {1e-4: 0.5})


def test_choose_rate_by_loss_then_score():
    assert choose_rate({1e-4: 0.5, 1e-3: 0.4}, {1e-4: 0.9, 1e-3: 0.1}) == 1e-3  # loss decides, not accuracy
    assert choose_rate({1e-4: 0.4, 1e-3: 0.4}, {1e-4: 0.5, 1e-3: 0.6}) == 1e-3  # a tie: the better score
    assert choose_rate({1e-4: 0.4, 1e-3: 0.4}) == 1e-4  # then the lower rate


def _simulate(methods, optimum, *, grid=DEFAULT_GRID, seeds=(0, 1, 2), interrupt_after=None):
    """Run the sweep loop against a fake objective: validation loss = (log10(lr) - log10(optimum[method]))^2."""
    results, executed = {}, []
    while True:
        todo = [r for r in plan(methods, results, grid=grid, seeds=seeds) if r.name not in results]
        if not todo or (interrupt_after is not None and len(executed) == interrupt_after):
            return results, executed
        run = todo[0]
        executed.append(run)
        if run.phase == "grid":
            loss = (math.log10(run.lr) - math.log10(optimum[run.method])) ** 2
            results[run.name] = {"val": {"answer_loss": loss, "score": 1 - loss}}
        else:
            results[run.name] = {"history": []}


def test_simulated_sweep_extends_once_and_chooses_the_best_rate():
    optimum = {"inside": 3e-4, "edge": 1e-2, "far": 1.0, "low": 1e-6}
    results, executed = _simulate(list(optimum), optimum)
    names = [r.name for r in executed]
    assert len(names) == len(set(names))  # nothing runs twice
    chosen = chosen_rates(optimum, results)
    assert chosen["inside"]["lr"] == 3e-4 and len(chosen["inside"]["grid"]) == 5
    assert chosen["edge"]["lr"] == pytest.approx(3e-3 * math.sqrt(10), rel=2e-3)  # the extension point
    # the optimum is far past the top edge: the grid is still extended only once
    assert len(chosen["far"]["grid"]) == 6 and chosen["far"]["lr"] == max(chosen["far"]["grid"])
    assert len(chosen["low"]["grid"]) == 6 and chosen["low"]["lr"] == min(chosen["low"]["grid"])
    for method, info in chosen.items():
        seed_runs = [r for r in executed if r.phase == "seeds" and r.method == method]
        assert [(r.lr, r.seed) for r in seed_runs] == [(info["lr"], s) for s in (0, 1, 2)]
        assert all(r.seed == 0 for r in executed if r.phase == "grid")


def test_sweep_resumes_without_rerunning():
    optimum = {"lora": 1e-2, "lora-one": 1e-4}
    full, executed = _simulate(list(optimum), optimum)
    for cut in (1, 5, 11, len(executed) - 1):
        partial, first = _simulate(list(optimum), optimum, interrupt_after=cut)
        results, resumed = dict(partial), []  # resume from the results the interrupted sweep left on disk
        while todo := [r for r in plan(list(optimum), results) if r.name not in results]:
            resumed.append(todo[0])
            results[todo[0].name] = full[todo[0].name]
        assert first + resumed == executed  # the same runs in the same order, none twice


def test_plan_waits_for_the_grid_before_choosing():
    grid = (1e-4, 1e-3)
    res = {"grid/lora/lr1.00e-04-seed0": {"val": {"answer_loss": 0.5}}}
    assert [r.phase for r in plan(["lora"], res, grid=grid)] == ["grid", "grid"]
    res["grid/lora/lr1.00e-03-seed0"] = {"diverged": True}  # best at the bottom edge -> 1e-5 next
    runs = plan(["lora"], res, grid=grid)
    assert [r.lr for r in runs] == [1e-5, 1e-4, 1e-3]
    with pytest.raises(ValueError, match="val"):
        plan(["lora"], {"grid/lora/lr1.00e-04-seed0": {"history": []}}, grid=grid)


def test_run_names_are_stable_and_folder_safe(tmp_path):
    run = Run("lora-one+gamma=auto", 0.000949, 2, "seeds")
    assert run.name == "seeds/lora-one+gamma=auto/lr9.49e-04-seed2"
    assert Run("lora", 9.4868e-4, 2, "seeds") == run.__class__("lora", 9.49e-4, 2, "seeds")  # rounded to 3 digits
    assert run.result_path(tmp_path) == tmp_path / run.name / "result.json"
    with pytest.raises(ValueError, match="folder"):
        Run("lora/one", 1e-3, 0, "grid")
    with pytest.raises(ValueError, match="phase"):
        Run("lora", 1e-3, 0, "final")


def test_validation_indices_are_deterministic_disjoint_and_sized():
    a = validation_indices(5000, 300, seed=3, skip=40)
    assert np.array_equal(a, validation_indices(5000, 300, seed=3, skip=40))
    assert not np.array_equal(a, validation_indices(5000, 300, seed=4, skip=40))
    assert len(a) == len(set(a.tolist())) == 300 and a.min() >= 40 and a.max() < 5000
    assert np.all(np.diff(a) > 0)
    with pytest.raises(ValueError, match="fewer than 300"):
        validation_indices(5000, 200)
    with pytest.raises(ValueError, match="cannot give"):
        validation_indices(340, 300, skip=40)


def test_carve_validation_keeps_gradient_examples_first_and_partitions_the_split():
    ds = datasets.Dataset.from_dict({"x": list(range(1000))})
    rest, val = carve_validation(ds, 300, seed=1, skip=8)
    rest, val = list(rest["x"]), list(val["x"])
    assert rest[:8] == list(range(8))  # the gradient examples are still the first ones
    assert sorted(rest + val) == list(range(1000)) and not set(rest) & set(val)
    assert rest == sorted(rest)  # order kept
    assert val == validation_indices(1000, 300, seed=1, skip=8).tolist()


def test_log_grid_rejects_bad_bounds():
    with pytest.raises(ValueError, match="low < high"):
        log_grid(1e-3, 1e-4)


# ----------------------------------------------------------------------------- the report


def _seeded_results(optimum):
    """A finished simulated sweep whose seeds runs carry held-out curves (the better rate, the lower loss)."""
    results, _ = _simulate(list(optimum), optimum)
    records = []
    for name, rec in results.items():
        phase, method, rest = name.split("/")
        lr, seed = float(rest[2:].split("-seed")[0]), int(rest.split("-seed")[1])
        rec = {**rec, "method": method, "lr": lr, "seed": seed, "phase": phase}
        if phase == "seeds":
            end = 0.6 + 0.1 * (method == "lora") + 0.01 * seed
            rec["history"] = [
                {"step": 0, "eval/answer_loss": 2.0, "eval/score": 0.3},
                {"step": 25, "eval/answer_loss": (2.0 + end) / 2, "eval/score": 0.5, "align/left_mean": 20.0 + seed},
                {"step": 50, "eval/answer_loss": end, "eval/score": 0.6, "align/left_mean": 25.0 + seed},
            ]
            rec["held_out"] = {"answer_loss": end, "score": 0.62 + 0.03 * (method != "lora") + 0.01 * seed}
        records.append(rec)
    return records


def test_report_tables_and_plots_from_a_simulated_sweep(tmp_path):
    from lora_one_train import stats
    from lora_one_train.sweep_report import write_report

    optimum = {"lora": 1e-2, "lora-one": 3e-4}
    records = _seeded_results(optimum)
    path = write_report(records, tmp_path, ablations=[("lora-one", "lora")])
    text = path.read_text()
    assert (tmp_path / "grid.png").stat().st_size > 1000 and (tmp_path / "curves.png").stat().st_size > 1000
    chosen = chosen_rates(optimum, {Run(r["method"], r["lr"], r["seed"], r["phase"]).name: r for r in records})
    assert f"| lora | {chosen['lora']['lr']:.2e} |" in text and "| yes |" in text  # lora chose the extension
    assert f"| lora-one | {chosen['lora-one']['lr']:.2e} |" in text
    # the paired difference of the final held-out score: +0.03 on every seed
    d = stats.paired_difference({s: 0.65 + 0.01 * s for s in range(3)}, {s: 0.62 + 0.01 * s for s in range(3)})
    assert f"+0.030 [{d['low']:+.3f}, {d['high']:+.3f}]*" in text
    # lora's final loss (0.71 mean) is reached by lora-one: 2.0 -> 0.6 linear from 25 to 50 steps
    steps = [
        stats.steps_to_level(r["history"], 0.71, "eval/answer_loss")
        for r in records
        if r.get("held_out") and r["method"] == "lora-one"
    ]
    assert f"{np.mean(steps):.1f} (3/3 seeds)" in text
    diagnostics = text.split("## Diagnostics")[1]  # the last logged alignment, mean ± CI over seeds 25, 26, 27
    assert "align/left_mean" in diagnostics
    assert f"| lora-one | 26.0 ± {stats.mean_ci([25.0, 26.0, 27.0])['half_width']:.1f} (n=3) |" in diagnostics


def test_partial_report_shows_the_best_grid_rate_so_far():
    from lora_one_train.sweep_report import grid_section

    grid = [
        {"method": "lora", "lr": lr, "seed": 0, "phase": "grid", "val": {"answer_loss": loss, "score": None}}
        for lr, loss in [(1e-4, 0.8), (3e-4, 0.6), (1e-3, 0.7)]
    ]
    assert "| lora | (3.00e-04 so far) |" in "\n".join(grid_section(grid))
    seeds = [{"method": "lora", "lr": 1e-3, "seed": 0, "phase": "seeds", "history": []}]  # the sweep's choice wins
    assert "| lora | 1.00e-03 |" in "\n".join(grid_section(grid + seeds))


def test_report_states_gamma_autos_cost_in_the_runs_own_training_steps():
    from lora_one_train.sweep_report import gamma_section

    history = [{"step": s, "loss": 1.0, "step_seconds": t} for s, t in [(1, 2.0), (2, 2.0), (3, 11.0)]]
    auto = {"gamma": 256.0, "gamma_auto": {"forward_passes": 6, "seconds": 5.0}}  # before compile was logged
    rec = {"method": "lora-one+gamma=auto", "seed": 1, "phase": "seeds", "init": auto, "history": history}
    old = {"method": "lora-one", "seed": 1, "phase": "seeds", "init": {"gamma": 128.0}, "history": []}
    compiled = {"gamma": 128.0, "gamma_auto": {"forward_passes": 6, "seconds": 9.0, "compile_seconds": 4.0}}
    twin = {**rec, "seed": 2, "init": compiled, "same_as": "seeds/lora-one/lr1.00e-03-seed2"}
    lines = gamma_section([rec, old, twin])
    assert "| lora-one+gamma=auto | 1 | 256 | 6 | 5.0 | 2.5 | yes |" in lines  # 5 s over the median step of 2 s
    assert "| lora-one | 1 | 128 | - | - | - | yes |" in lines
    # 9 s of which 4 s compiling: 5 s of scoring, 2.5 steps of 2 s
    assert "| lora-one+gamma=auto | 2 | 128 | 6 | 9.0 (4.0) | 2.5 | as `seeds/lora-one/lr1.00e-03-seed2` |" in lines


def test_report_reads_the_final_held_out_record_first():
    from lora_one_train.sweep_report import final

    rec = {"held_out": {"answer_loss": 0.5, "score": None}, "history": [{"step": 3, "eval/score": 0.4}]}
    assert final(rec, "answer_loss") == 0.5 and final(rec, "score") == 0.4
    assert final({"history": []}, "score") is None


def test_report_rejects_inconsistent_seed_runs(tmp_path):
    from lora_one_train.sweep_report import write_report

    base = {"method": "lora", "phase": "seeds", "history": [{"step": 0, "eval/answer_loss": 1.0}]}
    with pytest.raises(ValueError, match="one per seed"):
        write_report([{**base, "lr": 1e-3, "seed": 0}, {**base, "lr": 1e-3, "seed": 0}], tmp_path)
    with pytest.raises(ValueError, match="several learning rates"):
        write_report([{**base, "lr": 1e-3, "seed": 0}, {**base, "lr": 1e-4, "seed": 1}], tmp_path)


def test_load_results_finds_only_finished_runs(tmp_path):
    import json

    done = Run("lora", 3e-4, 1, "seeds")
    done.result_path(tmp_path).parent.mkdir(parents=True)
    done.result_path(tmp_path).write_text(json.dumps({"history": [], "diverged": False}))
    Run("lora", 1e-3, 0, "grid").folder(tmp_path).mkdir(parents=True)  # started, no result yet: not done
    assert load_results(tmp_path) == {done.name: {"history": [], "diverged": False}}
    todo = [
        r for r in plan(["lora"], load_results(tmp_path), grid=(1e-3, 1e-2)) if r.name not in load_results(tmp_path)
    ]
    assert [r.name for r in todo] == ["grid/lora/lr1.00e-03-seed0", "grid/lora/lr1.00e-02-seed0"]


def test_verdict_judges_each_method_by_its_paired_intervals_and_steps_to_the_references_loss():
    from lora_one_train.sweep_report import verdict_section

    def rec(method, seed, end_step, end_loss, score):
        history = [{"step": 0, "eval/answer_loss": 2.0}, {"step": end_step, "eval/answer_loss": end_loss}]
        held = {"answer_loss": end_loss, "score": score}
        return {"method": method, "seed": seed, "lr": 1e-3, "phase": "seeds", "history": history, "held_out": held}

    runs = {
        "lora": [rec("lora", s, 100, loss, sc) for s, loss, sc in [(0, 1.0, 0.60), (1, 1.1, 0.62), (2, 0.9, 0.64)]],
        # reaches 1.0 / 1.1 / 0.9 at steps 33.3 / 30 / 36.7 of lora's 100: 1/3 of the steps on average
        "fast": [rec("fast", s, 50, 0.5, sc) for s, sc in [(0, 0.61), (1, 0.60), (2, 0.66)]],
        "slow": [rec("slow", s, 100, 1.5, 0.5) for s in range(3)],
    }
    fast, slow = verdict_section(runs, "lora")
    # score differences +0.01, -0.02, +0.02 straddle 0; loss differences -0.5, -0.6, -0.4 do not
    assert "held-out score +0.003 [" in fast and "]: **no significant difference**" in fast
    assert "held-out answer loss -0.500 [-0.748, -0.252]*: **better**" in fast  # t(2) 4.303 x 0.1 / sqrt(3)
    assert "reached in 0.33x its steps (3/3 seeds)" in fast
    assert "answer loss +0.500" in slow and "**worse**" in slow and "loss never reached (0/3 seeds)" in slow
    assert verdict_section({"fast": runs["fast"]}, "lora") == []  # no reference: no verdict
