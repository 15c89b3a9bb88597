"""train.py end to end on a tiny random GPT-2 with the real GPT-2 tokenizer and real E2E rows. Offline."""
import json

import pytest
import torch

import errors
import kasa
import train

transformers = pytest.importorskip("transformers")


def run_args(model_dir, shared_data, out_dir, *extra):
    return ["--model", str(model_dir), "--data-dir", str(shared_data / "e2e"), "--out-dir", str(out_dir),
            "--max-train-examples", "48", "--batch-size", "4", "--warmup-steps", "2", "--lr", "1e-2",
            "--log-every", "1", "--max-len", "64", *extra]


@pytest.mark.parametrize("argv, beta, gamma", [
    ([], 1e-4, 1e-3),                                            # KaSA: the paper's E2E values
    (["--task", "rte"], 0.24, 2.4e-4),                           # KaSA: the task's preset
    (["--method", "lora"], 0.0, 0.0),                            # the baselines train without L2, L3
    (["--task", "rte", "--method", "pissa"], 0.0, 0.0),          # ... whatever the task's preset says
    (["--method", "milora", "--gamma", "0.5"], 0.0, 0.5),        # unless asked for
    (["--method", "kasa", "--beta", "0"], 0.0, 1e-3),
])
def test_regularizer_weights_apply_to_kasa_unless_asked(argv, beta, gamma):
    config = train.parse_config(argv)
    assert (config.beta, config.gamma) == (beta, gamma)


def test_resume_continues_exactly_and_nan_keeps_last_checkpoint(tiny_gpt2_dir, shared_data, tmp_path, monkeypatch):
    args = ["--max-steps", "8", "--save-every", "3", "--no-eval", "--grad-accum", "2"]
    train.main(run_args(tiny_gpt2_dir, shared_data, tmp_path / "full", *args))
    full = json.loads((tmp_path / "full" / "history.json").read_text())
    assert len(full) == 8 and full[-1]["loss"] < full[0]["loss"]

    # Interrupt a second run with a NaN loss at step 7: it must stop with a clear error and leave
    # the step-6 checkpoint in place.
    from conftest import with_nan_loss_at_call
    make_task = train.TASKS["e2e"]
    monkeypatch.setitem(train.TASKS, "e2e", with_nan_loss_at_call(make_task, 13))  # 2 micro-batches per step
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train.main(run_args(tiny_gpt2_dir, shared_data, tmp_path / "cut", *args))
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 6

    monkeypatch.setitem(train.TASKS, "e2e", make_task)
    train.main(run_args(tiny_gpt2_dir, shared_data, tmp_path / "cut", *args, "--resume"))
    resumed = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["step"] for h in resumed] == list(range(1, 9))
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), (a, b)
        assert a["l3"] == pytest.approx(b["l3"], rel=1e-6)


@pytest.mark.parametrize("method", ["lora", "pissa", "milora", "full"])
def test_baselines_start_from_the_pretrained_function(tiny_gpt2_dir, method):
    """LoRA adds a zero update; PiSSA/MiLoRA move r triplets from W into the adapter; none changes the
    model's output at step 0, and restore_base gives back the original weights."""
    from model import load_pretrained
    model, _ = load_pretrained(tiny_gpt2_dir)
    ids = torch.randint(0, 50257, (2, 10))
    before = model(ids)[0]
    original = model.blocks[0].attn.q_proj.weight.detach().clone()
    config = train.TrainConfig(method=method, r=4, alpha=8)
    names = train.adapt_model(model, config)
    torch.testing.assert_close(model(ids)[0], before, atol=1e-5, rtol=0)
    if method == "full":
        assert names == [] and all(p.requires_grad for p in model.parameters())
        return
    layer = model.blocks[0].attn.q_proj
    torch.testing.assert_close(layer.restore_base().weight, original, atol=1e-6, rtol=0)
    assert not layer.kasa_sigma.requires_grad
    if method != "lora":
        S = torch.linalg.svdvals(original.double())
        kept = S[4:] if method == "pissa" else S[:-4]
        torch.testing.assert_close(torch.linalg.svdvals(layer.weight.double())[:len(kept)], kept, atol=1e-5, rtol=0)
    kasa.merge_kasa(model)
    torch.testing.assert_close(model(ids)[0], before, atol=1e-5, rtol=0)


def test_untruncated_targets_keep_their_full_weight(tiny_gpt2_dir):
    """--untruncated-targets v_proj: KaSA on q and v, but only q loses its r smallest triplets."""
    from model import load_pretrained
    model, _ = load_pretrained(tiny_gpt2_dir)
    original = {name: model.blocks[0].attn.get_submodule(name).weight.detach().clone() for name in ("q_proj", "v_proj")}
    names = train.adapt_model(model, train.TrainConfig(r=4, alpha=8, untruncated_targets=("v_proj",)))
    assert sorted(names) == sorted(f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    q, v = model.blocks[0].attn.q_proj, model.blocks[0].attn.v_proj
    assert q.kasa_dropped_Vt.shape[0] == 4 and v.kasa_dropped_Vt.shape[0] == 0
    torch.testing.assert_close(v.weight, original["v_proj"], atol=0, rtol=0)
    S = torch.linalg.svdvals(q.weight.double())
    assert S[-4:].max() < 1e-5 * S[0] < S[-5]   # rank k − r
    assert q.kasa_sigma.requires_grad and v.kasa_sigma.requires_grad
    with pytest.raises(errors.ConfigError, match="untruncated-targets"):
        train.adapt_model(load_pretrained(tiny_gpt2_dir)[0], train.TrainConfig(untruncated_targets=("k_proj",)))


def test_e2e_end_to_end_train_decode_score(tiny_gpt2_dir, shared_data, tmp_path):
    """A few steps on real E2E rows, then the merged model beam-searches a few test MRs and is scored;
    eval.py --checkpoint on the run dir reproduces the same outputs from the saved adapter. The run
    also leaves its truncation report and, with --export, a merged HF checkpoint and a PEFT adapter."""
    import eval as evaluation
    from data import group_references, load_e2e_split
    out = tmp_path / "run"
    metrics = train.main(run_args(tiny_gpt2_dir, shared_data, out, "--max-steps", "4", "--max-eval-examples", "5",
                                  "--num-beams", "3", "--max-new-tokens", "8", "--eval-batch-size", "2",
                                  "--export"))
    report = json.loads((out / "truncation_report.json").read_text())
    assert len(report["layers"]) == 4 and all(row["truncation"] == 4 for row in report["layers"])  # 2 blocks × q, v
    assert {p.name for p in (out / "export").iterdir()} == {"hf", "peft"}
    assert (out / "export" / "peft" / "adapter_config.json").is_file() and (out / "export" / "hf" / "config.json").is_file()
    assert set(metrics) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} and metrics["train_steps"] == 4
    assert metrics["eval_mrs"] == 5 and 0 <= metrics["BLEU"] <= 1
    assert json.loads((out / "metrics.json").read_text()) == metrics
    predictions = (out / "predictions.txt").read_text(encoding="utf-8").splitlines()
    references = evaluation.read_multi_references(out / "references.txt")
    test_groups = group_references(load_e2e_split(
        shared_data / "e2e" / "original" / "testset_w_refs.csv"))[:5]
    assert len(predictions) == 5 and references == [refs for _, refs in test_groups]
    assert evaluation.bleu_score(predictions, references) == metrics["BLEU"]

    again = evaluation.main(["--task", "e2e", "--checkpoint", str(out)])
    assert (out / "predictions.txt").read_text(encoding="utf-8").splitlines() == predictions
    assert again["BLEU"] == metrics["BLEU"]


def test_max_steps_0_scores_the_untuned_model(tiny_gpt2_dir, shared_data, tmp_path):
    """--method lora --max-steps 0: a zero adapter, nothing trained, nothing plotted; the base model is scored."""
    metrics = train.main(run_args(tiny_gpt2_dir, shared_data, tmp_path, "--method", "lora", "--max-steps", "0",
                                  "--max-eval-examples", "2", "--num-beams", "1", "--max-new-tokens", "4"))
    assert metrics["train_steps"] == 0 and 0 <= metrics["BLEU"] <= 1
    assert json.loads((tmp_path / "history.json").read_text()) == [] and not (tmp_path / "plots").exists()


def test_group_by_length_is_a_seeded_shuffle_with_little_padding(shared_data):
    """--group-by-length: every example once per epoch, batches of similar length (padding on the real
    E2E dev lengths drops from about a quarter of all positions to a few percent), the order a function
    of (seed, epoch) alone (so --resume is exact); without it, the plain seeded randperm of before."""
    from model import load_tokenizer
    import data
    tokenizer = load_tokenizer(shared_data / "gpt2-tokenizer")
    rows = data.load_e2e_split(shared_data / "e2e" / "original" / "devset.csv")[:1200]
    lengths = [len(data.encode_e2e_example(tokenizer, ex.mr, ex.ref, 50256, 512)[0]) for ex in rows]

    def padding(batches):
        return 1 - sum(lengths[i] for b in batches for i in b) / sum(max(lengths[i] for i in b) * len(b) for b in batches)
    plain = train.epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=False)
    expected = torch.randperm(1200, generator=torch.Generator().manual_seed(4)).tolist()
    assert [i for b in plain for i in b] == expected and all(len(b) == 8 for b in plain)
    grouped = train.epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(1200)) and len(grouped) == 150
    assert grouped == train.epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=True)
    assert grouped != train.epoch_batches(lengths, 8, seed=3, epoch=2, group_by_length=True)
    assert padding(plain) > 0.15 and padding(grouped) < 0.05
    # batches are sorted within chunks of 50, then shuffled: neighbours in the epoch are not sorted
    assert [max(lengths[i] for i in b) for b in grouped] != sorted((max(lengths[i] for i in b) for b in grouped), reverse=True)


def test_the_truncation_warning_adds_train_py_flags(tmp_path, monkeypatch, capsys):
    """kasa.py's warning speaks of its own API; train.py prints its own flags after it."""
    report = {"loss_original": 1.0, "loss_truncated": 1.5, "warning": "truncation raises the loss",
              "layers": [{"name": f"blocks.{i}.attn.{p}", "truncation": 4, "dropped_sigma": [0.1], "energy_share": 0.0,
                          "delta_loss": 0.2 if p == "v_proj" else 0.0, "kept_sigma": []}
                         for i in range(2) for p in ("q_proj", "v_proj")],
              "harmless_targets": ["q_proj"], "harmful_targets": ["v_proj"]}   # as kasa.truncation_report sums them
    monkeypatch.setattr(kasa, "truncation_report", lambda model, compute_loss, **options: report)
    assert train.report_truncation(None, [], "cpu", None, tmp_path) is report
    printed = capsys.readouterr().out
    assert "WARNING: truncation raises the loss" in printed
    assert "With train.py: --targets q_proj, or --untruncated-targets v_proj, or --truncation 0." in printed
    assert json.loads((tmp_path / "truncation_report.json").read_text()) == report
