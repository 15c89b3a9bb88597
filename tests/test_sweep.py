"""bench/sweep.py, the benchmark harness, on a fake runner (no model, no subprocess): resuming a
partial sweep, retrying failures, continuing an interrupted run, and mean ± std over seeds."""
import json
import statistics
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import sweep  # noqa: E402
from sweep import Run  # noqa: E402


class FakeRunner:
    """Stands in for train.py: metrics from a table, a run dir like train.py's, and every call recorded."""

    def __init__(self, bleu: dict, fail=()):
        self.bleu, self.fail, self.calls = bleu, set(fail), []

    def __call__(self, command, out_dir):
        self.calls.append(command)
        name = out_dir.name.rsplit("-", 1)[0]
        if name in self.fail:
            (out_dir / "checkpoint.pt").write_bytes(b"interrupted")
            raise RuntimeError("train.py exited with 1")
        (out_dir / "metrics.json").write_text(json.dumps({"BLEU": self.bleu[name]}))
        return {"BLEU": self.bleu[name]}


def make_runs(seeds):
    return [Run(f"{method}-s{seed}", ["--method", method, "--seed", str(seed)], {"method": method, "seed": seed})
            for seed in seeds for method in ("kasa", "lora")]


BUDGET = sweep.Budget(model="models/SmolLM2-135M-Instruct.Q4_1.gguf", e2e_data="data/e2e", glue_data="data/glue")
BLEU = {"kasa-s0": 0.50, "kasa-s1": 0.60, "kasa-s2": 0.61, "lora-s0": 0.40, "lora-s1": 0.45, "lora-s2": 0.47}


def test_a_sweep_resumes_where_it_stopped_and_retries_failures(tmp_path):
    first = FakeRunner(BLEU, fail={"lora-s1"})
    results = sweep.run_sweep(make_runs([0, 1]), tmp_path, runner=first)
    assert len(first.calls) == 4 and len(results) == 3          # lora-s1 failed: not recorded
    lines = (tmp_path / sweep.RESULTS_FILE).read_text().splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["kasa-s0", "lora-s0", "kasa-s1"]

    # Started again with one more seed: only the failed run (continued from its checkpoint) and the new seed run.
    second = FakeRunner(BLEU)
    results = sweep.run_sweep(make_runs([0, 1, 2]), tmp_path, runner=second)
    ran = [command[command.index("--seed") + 1] + command[command.index("--method") + 1] for command in second.calls]
    assert ran == ["1lora", "2kasa", "2lora"]
    assert "--resume" in second.calls[0] and "--resume" not in second.calls[1]
    assert len(results) == 6 and not list(tmp_path.glob("runs/*/checkpoint.pt"))  # finished runs drop theirs

    third = FakeRunner(BLEU)   # nothing left to do; a torn last line (a crash mid-append) is ignored
    with open(tmp_path / sweep.RESULTS_FILE, "a") as f:
        f.write('{"key": "abc", "na')
    assert len(sweep.run_sweep(make_runs([0, 1, 2]), tmp_path, runner=third)) == 6 and third.calls == []


def test_the_same_flags_are_one_run_and_dry_run_runs_nothing(tmp_path, capsys):
    runner = FakeRunner(BLEU)
    twice = make_runs([0]) + [Run("kasa-s0", ["--method", "kasa", "--seed", "0"], {"study": "other"})]
    sweep.run_sweep(twice, tmp_path, runner=runner, dry_run=True)
    assert runner.calls == [] and not (tmp_path / sweep.RESULTS_FILE).exists()
    printed = capsys.readouterr().out
    assert printed.count("train.py --method kasa --seed 0 --out-dir") == 1 and "2 to run" in printed
    sweep.run_sweep(twice, tmp_path, runner=runner)
    assert len(runner.calls) == 2


def test_report_only_returns_the_finished_runs_and_runs_nothing(tmp_path):
    sweep.run_sweep(make_runs([0]), tmp_path, runner=FakeRunner(BLEU))
    idle = FakeRunner(BLEU)
    results = sweep.run_sweep(make_runs([0, 1]), tmp_path, runner=idle, report_only=True)
    assert idle.calls == [] and sorted(r["name"] for r in results.values()) == ["kasa-s0", "lora-s0"]
    assert sweep.command_line("compare.py", ["--seeds", "0", "--report-only"]) == "python bench/compare.py --seeds 0"
    assert sweep.shown(sweep.REPO / "bench" / "results") == "bench/results" and sweep.shown(tmp_path) == str(tmp_path)
    header = sweep.report_header("T", "ablation.py", ["--seeds", "0", "--report-only"], "0", sweep.REPO / "bench" / "r")
    assert header[:2] == ["# T\n", "Command: `python bench/ablation.py --seeds 0`"]
    assert "seeds 0;" in header[2] and "bench/r/runs.jsonl." in header[2]


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    runs = make_runs([0, 1, 2])
    results = sweep.run_sweep(runs, tmp_path, runner=FakeRunner(BLEU, fail={"lora-s2"}))
    rows = sweep.summarize(runs, results, ["BLEU"])
    assert [(row["method"], row["runs"]) for row in rows] == [("kasa", "3/3"), ("lora", "2/3")]
    kasa = [BLEU["kasa-s0"], BLEU["kasa-s1"], BLEU["kasa-s2"]]
    assert rows[0]["BLEU"] == pytest.approx((np.mean(kasa), np.std(kasa, ddof=1)))
    assert rows[1]["BLEU"] == pytest.approx((0.425, statistics.stdev([0.40, 0.45])))

    table = sweep.markdown_table(rows, ["method", "BLEU", "runs"])
    assert table.splitlines()[2] == f"| kasa | {np.mean(kasa):.4f} ± {np.std(kasa, ddof=1):.4f} | 3/3 |"
    assert sweep.summarize(runs[:1], {}, ["BLEU"])[0]["BLEU"] is None    # nothing finished yet: a "—" cell
    assert sweep.markdown_table([], ["method", "final_accuracy"]).splitlines()[0] == "| method | accuracy |"
    assert "| — |" in sweep.markdown_table(sweep.summarize(runs[:1], {}, ["BLEU"]), ["method", "BLEU"])
    sweep.write_report(tmp_path / "t.md", table)
    assert (tmp_path / "t.md").read_text() == table and not list(tmp_path.glob("*.tmp"))


def test_every_script_plans_one_run_per_configuration():
    """Scripts asking for the same configuration share its run: the key depends on the flags only."""
    import ablation
    import compare
    budget, seeds = BUDGET, [0, 1, 2]
    runs = ablation.build_runs(["e2e", "sst2"], seeds, list(ablation.STUDIES), budget)
    assert len({run.key for run in runs}) == 23 * 2 * 3   # 23 configurations (the activation-criterion variant is the 23rd)
    assert all(run.labels["seed"] == 0 for run in runs[:len(runs) // 3])   # seed 0 of everything first
    compared = compare.build_runs(["e2e", "sst2"], ["kasa", "lora"], seeds, budget, full_lr=2e-5)
    shared = {run.key for run in compared} & {run.key for run in runs}
    assert len(shared) == 2 * 2 * 3    # kasa and lora at the preset rank, both tasks, every seed


def test_batching_reuses_compares_random_runs_and_counts_padding_exactly():
    """batching.py's random-batch runs are compare.py's (one run); only --group-by-length differs."""
    import batching
    import compare
    runs = batching.build_runs(BUDGET, [0, 1, 2])
    compared = {run.key for run in compare.build_runs(["e2e"], list(batching.METHODS), [0, 1, 2], BUDGET, 2e-5)
                if run.labels["method"] in batching.METHODS}  # not the untuned base
    assert {run.key for run in runs if run.labels["batching"] == "random"} == compared
    grouped = [run for run in runs if run.labels["batching"] == "grouped"]
    assert len(grouped) == 6 and all(run.flags[-3] == "--group-by-length" for run in grouped)
    lengths = [3, 5, 2, 2]  # batches [0, 1] and [2, 3]: (3 + 5 + 2 + 2) real of (2 * 5 + 2 * 2) positions
    assert batching.padding_share(lengths, [[0, 1], [2, 3]]) == pytest.approx(1 - 12 / 14)


def test_rank_table_puts_methods_across_and_counts_each_rows_runs():
    import ablation
    rows = [{"r": r, "method": method, "BLEU": (0.1 * r, None), "runs": runs}
            for r, runs in ((1, "1/3"), (4, "3/3")) for method in ablation.RANK_METHODS]
    lines = ablation.rank_table(rows, "BLEU").splitlines()
    assert lines[0] == "| r | " + " | ".join(ablation.RANK_METHODS) + " | runs |"
    assert lines[2] == "| 1 | " + " | ".join(["0.1000"] * 4) + " | 4/12 |"
    assert lines[3] == "| 4 | " + " | ".join(["0.4000"] * 4) + " | 12/12 |"


def test_run_keys_ignore_where_the_model_and_data_live(tmp_path):
    """A record written with other paths (another checkout, the model moved) is the same run: the
    key hashes paths by their last component, and finished records are keyed from their command."""
    here = sweep.run_flags("e2e", BUDGET, "kasa", seed=0)
    elsewhere = sweep.Budget(model="/elsewhere/SmolLM2-135M-Instruct.Q4_1.gguf", e2e_data="/srv/e2e",
                             glue_data="/srv/glue")
    assert sweep.run_key(here) == sweep.run_key(sweep.run_flags("e2e", elsewhere, "kasa", seed=0))
    assert sweep.run_key(here) != sweep.run_key(sweep.run_flags("e2e", BUDGET, "kasa", seed=1))
    renamed = sweep.Budget(model="/elsewhere/other.gguf", e2e_data="/srv/e2e", glue_data="/srv/glue")
    assert sweep.run_key(here) != sweep.run_key(sweep.run_flags("e2e", renamed, "kasa", seed=0))
    # A record as earlier versions wrote it: absolute paths in the command, a key hashed from them.
    old_flags = sweep.run_flags("e2e", elsewhere, "kasa", seed=0)
    record = {"key": "0123456789", "name": "e2e-kasa-s0", "metrics": {"BLEU": 0.5}, "seconds": 1.0,
              "command": sweep.shlex.join(["/usr/bin/python", "/old/checkout/train.py", *old_flags,
                                           "--out-dir", "bench/results/x/runs/e2e-kasa-s0-0123456789"])}
    (tmp_path / sweep.RESULTS_FILE).write_text(json.dumps(record) + "\n")
    runner = FakeRunner(BLEU)
    results = sweep.run_sweep([Run("e2e-kasa-s0", here, {"seed": 0})], tmp_path, runner=runner)
    assert runner.calls == [] and results[sweep.run_key(here)]["metrics"] == {"BLEU": 0.5}


def test_paths_come_from_flags_or_the_environment_else_a_clear_error(tmp_path, monkeypatch):
    import errors
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    (tmp_path / "data" / "e2e").mkdir(parents=True)
    monkeypatch.delenv(sweep.MODEL_ENV, raising=False)
    monkeypatch.delenv(sweep.DATA_ENV, raising=False)
    parse = sweep.sweep_arg_parser("doc").parse_args
    bare = sweep.budget_from_args(parse([]))
    with pytest.raises(errors.ConfigError, match="--model PATH.*KASA_SMOLLM2_GGUF"):
        sweep.run_flags("e2e", bare, "kasa")
    monkeypatch.setenv(sweep.MODEL_ENV, str(model))
    with pytest.raises(errors.ConfigError, match="--data-dir DIR.*KASA_DATA_DIR"):
        sweep.run_flags("e2e", sweep.budget_from_args(parse([])), "kasa")
    monkeypatch.setenv(sweep.DATA_ENV, str(tmp_path / "data"))
    budget = sweep.budget_from_args(parse([]))
    assert (budget.model, budget.e2e_data) == (str(model), str(tmp_path / "data" / "e2e"))
    assert sweep.budget_from_args(parse(["--e2e-data", str(tmp_path)])).e2e_data == str(tmp_path)
    with pytest.raises(errors.ConfigError, match="no-such.gguf .*does not exist"):
        sweep.budget_from_args(parse(["--model", str(tmp_path / "no-such.gguf")]))


def test_sweep_command_lines_report_a_missing_model_as_an_error(tmp_path):
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k not in (sweep.MODEL_ENV, sweep.DATA_ENV)}
    for script in ("compare.py", "ablation.py", "e2e_quality.py", "glue_quality.py"):
        out = subprocess.run([sys.executable, str(REPO / "bench" / script), "--dry-run",
                              "--results-dir", str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert out.returncode == 2, (script, out.stderr)
        assert "error: no model: pass --model PATH" in out.stderr and "Traceback" not in out.stderr
