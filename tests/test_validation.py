"""--eval-every: periodic validation during training, on a tiny random GPT-2 with the real GPT-2
tokenizer and real E2E / SST-2 rows. Offline."""
import json

import pytest
import torch

import data
import errors
import tasks
import train

pytest.importorskip("transformers")


def e2e_args(model_dir, shared_data, out_dir, *extra):
    return ["--model", str(model_dir), "--data-dir", str(shared_data / "e2e"), "--out-dir", str(out_dir),
            "--max-train-examples", "24", "--batch-size", "4", "--warmup-steps", "2", "--lr", "1e-2",
            "--max-len", "64", "--max-new-tokens", "8", "--no-truncation-report", "--no-eval", *extra]


def validation_steps(history: list) -> list:
    return [entry["step"] for entry in history if "validation" in entry]


def test_hold_out_takes_every_row_of_the_held_out_mrs_and_is_the_same_for_every_seed(shared_data):
    rows = data.load_e2e_split(shared_data / "e2e" / "original" / "devset.csv")
    kept, held = tasks.hold_out_mrs(rows, 7)
    held_mrs = {mr for mr, _ in held}
    assert len(held_mrs) == 7 and not held_mrs & {ex.mr for ex in kept}
    assert len(kept) + sum(len(refs) for _, refs in held) == len(rows)   # nothing else is dropped
    assert held == tasks.hold_out_mrs(rows, 7)[1]
    with pytest.raises(errors.ConfigError, match="none would be left"):
        tasks.hold_out_mrs(rows, len(data.group_references(rows)))


def test_e2e_validates_at_the_right_steps_on_mrs_it_does_not_train_on_and_resume_keeps_them(
        tiny_gpt2_dir, shared_data, tmp_path, monkeypatch, capsys):
    args = ["--max-steps", "5", "--eval-every", "2", "--val-mrs", "3", "--save-every", "2"]
    seen = {}
    make_task = train.TASKS["e2e"]

    def spying_task(config, model, tokenizer):  # keeps the task, to compare its rows with the validation MRs
        seen["task"] = task = make_task(config, model, tokenizer)
        seen["tokenizer"], seen["eos"] = tokenizer, data.eos_and_pad_ids(model.config)[0]
        return task
    monkeypatch.setitem(train.TASKS, "e2e", spying_task)
    train.main(e2e_args(tiny_gpt2_dir, shared_data, tmp_path / "full", *args))
    assert "3 dev MRs" in capsys.readouterr().out                           # the log says what is held out
    full = json.loads((tmp_path / "full" / "history.json").read_text())
    assert validation_steps(full) == [2, 4, 5]                              # every 2 steps, and the last
    assert [sorted(entry) for entry in full if "validation" not in entry] == [sorted(full[0])] * 2
    scores = full[1]["validation"]
    assert scores["eval_mrs"] == 3 and 0 <= scores["BLEU"] <= 1 and scores["loss"] > 0
    assert (tmp_path / "full" / "plots" / "validation.png").is_file()

    # No validation MR is among the training rows: no training sequence starts with its context.
    rows = data.load_e2e_split(shared_data / "e2e" / "original" / "devset.csv")
    _, held = tasks.hold_out_mrs(rows, 3)
    contexts = [data.encode_e2e_context(seen["tokenizer"], mr, seen["eos"]) for mr, _ in held]
    train_ids = [input_ids for input_ids, _ in seen["task"].train_examples]
    assert train_ids and not any(ids[:len(c)] == c for ids in train_ids for c in contexts)
    assert len(train_ids) == len([ex for ex in rows if ex.mr not in {mr for mr, _ in held}])

    # Stopped by a NaN loss at step 5 (after the step-4 checkpoint), then resumed: the same validation.
    from conftest import with_nan_loss_at_call
    monkeypatch.setitem(train.TASKS, "e2e", with_nan_loss_at_call(make_task, 5))
    with pytest.raises(FloatingPointError):
        train.main(e2e_args(tiny_gpt2_dir, shared_data, tmp_path / "cut", *args))
    assert validation_steps(json.loads((tmp_path / "cut" / "history.json").read_text())) == [2, 4]  # written as it goes
    monkeypatch.setitem(train.TASKS, "e2e", make_task)
    train.main(e2e_args(tiny_gpt2_dir, shared_data, tmp_path / "cut", *args, "--resume"))
    resumed = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert validation_steps(resumed) == [2, 4, 5]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        if "validation" in a:
            assert a["validation"]["loss"] == pytest.approx(b["validation"]["loss"], rel=1e-5)
            assert a["validation"]["BLEU"] == pytest.approx(b["validation"]["BLEU"], abs=1e-6)


def test_validation_loss_is_the_teacher_forced_loss_on_the_held_out_references(tiny_gpt2_dir, shared_data, tmp_path):
    from model import load_pretrained
    model, tokenizer = load_pretrained(tiny_gpt2_dir)
    config = train.TrainConfig(data_dir=str(shared_data / "e2e"), eval_every=1, val_mrs=2, max_new_tokens=4,
                               eval_batch_size=3, max_len=64)
    task = tasks.e2e_task(config, model, tokenizer)
    model.eval()
    scores = task.validate(model, tmp_path)
    _, held = tasks.hold_out_mrs(data.load_e2e_split(shared_data / "e2e" / "original" / "devset.csv"), 2)
    eos = data.eos_and_pad_ids(model.config)[0]
    losses, counts = [], []
    with torch.no_grad():
        for mr, refs in held:
            for ref in refs:  # one sequence at a time: no padding at all
                ids, targets = data.encode_e2e_example(tokenizer, mr, ref, eos, 64)
                logits = model(torch.tensor([ids]))[0][0].double()
                mask = torch.tensor(targets) != -100
                losses.append(torch.nn.functional.cross_entropy(logits[mask], torch.tensor(targets)[mask],
                                                                reduction="sum").item())
                counts.append(int(mask.sum()))
    assert scores["loss"] == pytest.approx(sum(losses) / sum(counts), rel=1e-4)
    assert scores["eval_mrs"] == 2 and (tmp_path / "predictions.txt").is_file()


def test_glue_validates_with_the_dev_metric(tiny_gpt2_dir, shared_data, tmp_path):
    train.main(["--task", "sst2", "--model", str(tiny_gpt2_dir), "--data-dir", str(shared_data / "glue"),
                "--out-dir", str(tmp_path), "--max-steps", "4", "--max-train-examples", "64", "--batch-size", "4",
                "--max-eval-examples", "16", "--eval-every", "3", "--max-len", "32", "--no-truncation-report"])
    history = json.loads((tmp_path / "history.json").read_text())
    assert validation_steps(history) == [3, 4]
    assert set(history[2]["validation"]) >= {"accuracy", "seconds"}
    final = json.loads((tmp_path / "metrics.json").read_text())      # the test score is the last step's
    assert final["final_accuracy"] == pytest.approx(history[3]["validation"]["accuracy"])


def test_eval_every_without_held_out_mrs_is_the_users_to_fix(tiny_gpt2_dir, shared_data, tmp_path):
    with pytest.raises(errors.ConfigError, match="--val-mrs 50"):
        train.main(e2e_args(tiny_gpt2_dir, shared_data, tmp_path, "--eval-every", "2"))
    with pytest.raises(errors.ConfigError, match="E2E only"):
        train.parse_config(["--task", "sst2", "--val-mrs", "5"])
