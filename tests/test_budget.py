"""bench/budget.py, the learning-curve sweep, on fake runs (no model, no subprocess): the plan and
its order, the flags as train.py reads them, the curves, the catch-up step and partial curves."""
import json
import sys

import pytest

import data
import tasks
import train
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import budget  # noqa: E402
import sweep  # noqa: E402


@pytest.fixture
def paths(tmp_path):
    model = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model.write_bytes(b"")
    (tmp_path / "e2e").mkdir()
    (tmp_path / "glue").mkdir()
    return model, tmp_path


def fake_budget(paths, **changes):
    model, root = paths
    return sweep.Budget(**{**dict(model=str(model), e2e_data=str(root / "e2e"), glue_data=str(root / "glue"),
                                  e2e_steps=0, glue_steps=2000, dev_rows=872), **changes})


def test_the_plan_puts_seed_0_of_kasa_and_lora_first_and_has_every_method(paths):
    runs = budget.build_runs(["e2e", "sst2"], [0, 1, 2], fake_budget(paths))
    labels = [(r.labels["task"], r.labels["method"], r.labels["seed"]) for r in runs]
    assert labels[:4] == [("sst2", "KaSA", 0), ("sst2", "LoRA", 0), ("e2e", "KaSA", 0), ("e2e", "LoRA", 0)]
    for task, method in [("sst2", "KaSA"), ("sst2", "LoRA"), ("e2e", "KaSA"), ("e2e", "LoRA")]:
        assert sorted(s for t, m, s in labels if (t, m) == (task, method)) == [0, 1, 2]
    for task, method in [("sst2", "PiSSA"), ("e2e", "PiSSA"), ("e2e", "KaSA, no truncation"),
                         ("e2e", "KaSA, activation truncation")]:
        assert [s for t, m, s in labels if (t, m) == (task, method)] == [0]
    assert len(runs) == 16 and len({r.key for r in runs}) == len(runs)


def test_the_flags_are_the_papers_recipe_as_train_py_reads_them(paths, tmp_path):
    runs = budget.build_runs(["e2e", "sst2"], [0], fake_budget(paths))
    configs = {(r.labels["task"], r.labels["method"]): train.parse_config(r.flags + ["--out-dir", str(tmp_path / "o")])
               for r in runs}
    e2e = configs["e2e", "KaSA"]
    assert (e2e.epochs, e2e.max_steps, e2e.batch_size, e2e.lr, e2e.warmup_steps, e2e.warmup_ratio) == (5, None, 8, 2e-4, 500, 0)
    assert (e2e.label_smoothing, e2e.r, e2e.alpha, e2e.adapter_dropout, e2e.beta, e2e.gamma) == (0.1, 4, 32, 0.1, 1e-4, 1e-3)
    assert (e2e.eval_every, e2e.save_every, e2e.val_mrs, e2e.num_beams, e2e.max_eval_examples) == (250, 250, 50, 4, 50)
    assert configs["e2e", "KaSA, no truncation"].truncation == 0
    assert (configs["e2e", "LoRA"].beta, configs["e2e", "LoRA"].gamma) == (0, 0)
    sst2 = configs["sst2", "PiSSA"]
    assert (sst2.max_steps, sst2.max_train_examples, sst2.eval_every, sst2.max_eval_examples, sst2.r) == (2000, 16000, 250, 872, 8)


def test_planned_e2e_steps_are_5_epochs_of_the_dev_rows_left_after_the_hold_out(shared_data, paths):
    b = fake_budget(paths, e2e_data=str(shared_data / "e2e"))
    rows = data.load_e2e_split(shared_data / "e2e" / "original" / "devset.csv")
    held = {mr for mr, _ in tasks.hold_out_mrs(rows, 50)[1]}
    kept = sum(ex.mr not in held for ex in rows)
    assert budget.planned_steps("e2e", b) == 5 * -(-kept // 8) and kept < len(rows)
    assert budget.planned_steps("e2e", fake_budget(paths, e2e_data=str(shared_data / "e2e"), e2e_steps=30)) == 30


def test_catch_up_step_needs_two_lora_seeds_and_the_kasa_mean_within_one_std():
    lora = {250: [0.50, 0.60], 500: [0.60, 0.70], 750: [0.70]}
    assert budget.catch_up_step({250: [0.40], 500: [0.60, 0.62], 750: [0.9]}, lora) == 500   # 0.61 ≥ 0.65 − 0.0707
    assert budget.catch_up_step({250: [0.40], 500: [0.50], 750: [0.9]}, lora) is None        # 750: one LoRA seed


def accuracy(method, seed, step):
    """The fake runs' validation accuracy: LoRA starts higher, KaSA catches up at step 1000."""
    return (0.9 if method == "lora" else 0.5 + step / 2500) + seed * 0.01


class FakeTrain:
    """Stands in for train.py: a history.json with validation at every 250 steps, and metrics.json."""

    def __init__(self):
        self.calls = []

    def __call__(self, command, out_dir):
        self.calls.append(command)
        method, seed = command[command.index("--method") + 1], int(command[command.index("--seed") + 1])
        history = [{"step": s, "loss": 1.0, **({"validation": {"accuracy": accuracy(method, seed, s)}}
                                                if s % 250 == 0 else {})} for s in range(1, 2001)]
        (out_dir / "history.json").write_text(json.dumps(history))
        metrics = {"final_accuracy": accuracy(method, seed, 2000), "best_accuracy": 0.99}
        (out_dir / "metrics.json").write_text(json.dumps(metrics))
        return metrics


def test_a_sweep_stores_the_curves_reports_them_and_reads_partial_runs(paths, tmp_path, capsys):
    model, root = paths
    argv = ["--tasks", "sst2", "--seeds", "0,1", "--model", str(model), "--glue-data", str(root / "glue"),
            "--results-dir", str(tmp_path / "results")]
    fake = FakeTrain()
    budget.main(argv, runner=fake)
    assert len(fake.calls) == 5                                                  # KaSA, LoRA × 2 seeds, PiSSA
    records = [json.loads(line) for line in (tmp_path / "results" / sweep.RESULTS_FILE).read_text().splitlines()]
    assert [p["step"] for p in records[0]["metrics"]["validation"]] == list(range(250, 2001, 250))
    text = (tmp_path / "results" / "budget.md").read_text()
    kasa_1000 = (accuracy("kasa", 0, 1000) + accuracy("kasa", 1, 1000)) / 2
    assert f"| 1000 | {kasa_1000:.4f} ± 0.0071 (2) |" in text
    assert "first at step 1000" in text and (tmp_path / "results" / "budget.png").is_file()

    # A third seed, interrupted at step 500: --report-only shows its points as partial, then the
    # sweep continues it from its checkpoint.
    argv[3] = "0,1,2"
    runs = budget.build_runs(["sst2"], [0, 1, 2], sweep.budget_from_args(
        sweep.sweep_arg_parser("").parse_args(argv[2:] + ["--glue-steps", "2000", "--dev-rows", "872"])))
    cut = next(r for r in runs if r.labels == {"task": "sst2", "method": "KaSA", "seed": 2})
    cut_dir = budget.run_dir(tmp_path / "results", cut)
    cut_dir.mkdir(parents=True)
    FakeTrain()(cut.flags + ["--out-dir", str(cut_dir)], cut_dir)
    history = json.loads((cut_dir / "history.json").read_text())[:500]
    (cut_dir / "history.json").write_text(json.dumps(history))
    (cut_dir / "metrics.json").unlink()
    (cut_dir / "checkpoint.pt").write_bytes(b"step 500")
    budget.main(argv + ["--report-only"], runner=fake)
    text = (tmp_path / "results" / "budget.md").read_text()
    assert f"{cut.name} (to step 500)" in text and "| 500 | " in text and " (3) |" in text
    assert len(fake.calls) == 5
    budget.main(argv, runner=fake)
    assert "--resume" in fake.calls[5] and len(fake.calls) == 7                  # KaSA s2 resumed, LoRA s2
    assert "Partial curves" not in (tmp_path / "results" / "budget.md").read_text()


def test_dry_run_lists_the_runs_and_an_estimate_at_the_load_measured_now(paths, tmp_path, capsys):
    model, root = paths
    argv = ["--tasks", "sst2", "--seeds", "0", "--model", str(model), "--glue-data", str(root / "glue"),
            "--results-dir", str(tmp_path), "--dry-run"]
    budget.main(argv)
    out = capsys.readouterr().out
    assert "budget-sst2-kasa-s0: 2,000 steps, ~0.5 h" in out and "estimate: 1.6 h" in out and "measured" not in out
    # A run under way at 8 s per step (10x the free-core 0.8): its ETA over the steps left.
    run = budget.build_runs(["sst2"], [0], fake_budget(paths))[0]
    budget.run_dir(tmp_path, run).mkdir(parents=True)
    (budget.run_dir(tmp_path, run) / "log.txt").write_text(
        "step 10/2000 | loss 0.7 | ETA 4:25:20\nstep 20/2000 | loss 0.6 | l2 0.1 | ETA 4:24:00\n")
    budget.main(argv)
    out = capsys.readouterr().out
    assert "budget-sst2-kasa-s0 at step 20, 8.0 s/step (10.0x" in out and "about 16 h" in out
    assert not (tmp_path / "budget.md").exists()
