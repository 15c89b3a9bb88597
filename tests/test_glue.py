"""GLUE: the TSV readers on the real files, the download code on local files, last-token pooling,
and train.py end to end on a tiny random GPT-2 (SST-2 classification, STS-B regression, --resume). Offline."""
import csv
import dataclasses
import json
import zipfile

import pytest
import torch
from safetensors.torch import load_file

import data
import kasa
import train
from model import ClassificationHead, ModelConfig, Transformer, last_token_states, load_pretrained

transformers = pytest.importorskip("transformers")

# Rows per split, as in the official GLUE release (the shared store has no QNLI train split).
ROW_COUNTS = {("cola", "train"): 8551, ("cola", "dev"): 1043, ("sst2", "train"): 67349, ("sst2", "dev"): 872,
              ("mrpc", "train"): 3668, ("mrpc", "dev"): 408, ("qnli", "dev"): 5463,
              ("rte", "train"): 2490, ("rte", "dev"): 277, ("stsb", "train"): 5749, ("stsb", "dev"): 1500}


# ----------------------------------------------------------------------------- reading the TSV files

@pytest.mark.parametrize("task, split", list(ROW_COUNTS))
def test_real_files_parse_like_a_plain_tab_split_reader(shared_data, task, split):
    """Row counts equal the official ones, and every row equals what Python's csv module reads with
    quoting switched off (an independent reader), with labels mapped to GLUE's class ids."""
    spec = data.GLUE_TASKS[task]
    path = shared_data / "glue" / spec.folder / f"{split}.tsv"
    examples = data.load_glue_split(task, path)
    assert len(examples) == ROW_COUNTS[task, split]
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[1:] if spec.header else rows
    assert len(rows) == len(examples)
    for row, example in zip(rows, examples):
        texts = [row[column].strip() for column in spec.text_columns]
        assert [example.text_a, example.text_b] == (texts if len(texts) == 2 else texts + [None])
        if task == "stsb":
            assert example.label == float(row[spec.label_column])
        else:
            assert example.label == {"0": 0, "1": 1, "entailment": 0, "not_entailment": 1}[row[spec.label_column]]


@pytest.mark.parametrize("task, text, error", [
    ("sst2", "sentence\tlabel\ngood movie\t1\nbad movie\n", r"line 3: 1 tab-separated columns, sst2 rows have 2"),
    ("sst2", "sentence\tlabel\ngood movie\tpositive\n", r"line 2: label 'positive'; sst2 labels are \['0', '1'\]"),
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n1\tA.\tB.\tcontradiction\n",
     r"line 3: label 'contradiction'"),
    ("stsb", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
             "0\tg\tf\t2012\t0\tnone\tnone\tA.\tB.\t5.5\n", r"line 2: score '5.5' is not a number in \[0, 5\]"),
    ("stsb", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
             "0\tg\tf\t2012\t0\tnone\tnone\tA.\tB.\thigh\n", r"line 2: score 'high'"),
    ("cola", "gj04\t1\t\tFine.\ngj04\t1\t\t  \n", r"line 2: empty sentence in column 4"),
    ("mrpc", "sentence\tlabel\ngood\t1\n", r"line 1: header \('sentence', 'label'\), but mrpc files start with"),
])
def test_malformed_rows_name_the_file_and_line(tmp_path, task, text, error):
    path = tmp_path / "bad.tsv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=error) as info:
        data.load_glue_split(task, path)
    assert str(path) in str(info.value)


def test_local_data_dir_must_hold_both_splits(shared_data):
    assert data.resolve_glue_files("rte", shared_data / "glue")["dev"] == shared_data / "glue" / "RTE" / "dev.tsv"
    assert data.resolve_glue_files("rte", shared_data / "glue" / "RTE")["train"].name == "train.tsv"
    with pytest.raises(FileNotFoundError, match=r"QNLI/train.tsv.*leave it unset to download"):
        data.resolve_glue_files("qnli", shared_data / "glue")
    with pytest.raises(ValueError, match="unknown GLUE task 'mnli'"):
        data.resolve_glue_files("mnli", shared_data / "glue")


# ----------------------------------------------------------------------------- downloading (from file:// URLs)

def test_download_extracts_the_task_zip_into_the_cache(shared_data, tmp_path, monkeypatch):
    source = shared_data / "glue" / "RTE"
    archive = tmp_path / "RTE.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("train.tsv", "dev.tsv"):
            z.write(source / name, f"RTE/{name}")
        z.writestr("RTE/test.tsv", "index\tsentence1\tsentence2\n")
    monkeypatch.setitem(data.GLUE_TASKS, "rte", dataclasses.replace(data.GLUE_TASKS["rte"], url=archive.as_uri()))
    cache = tmp_path / "cache"
    paths = data.resolve_glue_files("rte", cache_dir=cache)
    for split in ("train", "dev"):
        assert paths[split] == cache / "RTE" / f"{split}.tsv"
        assert paths[split].read_bytes() == (source / f"{split}.tsv").read_bytes()
    assert sorted(p.name for p in cache.rglob("*")) == ["RTE", "dev.tsv", "train.tsv"]  # zip and temp files gone


def test_mrpc_is_built_from_its_source_with_the_dev_ids_split(shared_data, tmp_path, monkeypatch):
    """The SentEval file holds train and dev pairs mixed (CRLF lines, a byte-order mark); the dev ids
    pick the dev rows. The result equals the shared MRPC files byte for byte."""
    shared = shared_data / "glue" / "MRPC"
    header, *train_rows = (shared / "train.tsv").read_text(encoding="utf-8").splitlines()
    dev_rows = (shared / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    mixed = [row for pair in zip(train_rows, dev_rows) for row in pair] + train_rows[len(dev_rows):]
    source = tmp_path / "msr_paraphrase_train.txt"
    source.write_bytes(("\r\n".join([header] + mixed) + "\r\n").encode("utf-8"))
    ids = tmp_path / "mrpc_dev_ids.tsv"
    ids.write_text("".join("\t".join(row.split("\t")[1:3]) + "\n" for row in dev_rows), encoding="utf-8")
    assert header.startswith("\ufeff")
    monkeypatch.setattr(data, "MRPC_SOURCES", {"msr_paraphrase_train.txt": (source.as_uri(), None),
                                               "mrpc_dev_ids.tsv": (ids.as_uri(), None)})
    paths = data.resolve_glue_files("mrpc", cache_dir=tmp_path / "cache")
    for split in ("train", "dev"):
        assert paths[split].read_bytes() == (shared / f"{split}.tsv").read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache" / "MRPC").iterdir()) == ["dev.tsv", "train.tsv"]


# ----------------------------------------------------------------------------- tokenisation

def test_pairs_are_truncated_longest_first_around_the_separator(shared_data):
    from model import load_tokenizer
    tokenizer = load_tokenizer(shared_data / "gpt2-tokenizer")
    long_a, short_b = " ".join(["alpha"] * 30), "beta gamma"
    examples = [data.GlueExample(long_a, short_b, 0), data.GlueExample(long_a, long_a + " delta", 1)]
    a_ids, b_ids = tokenizer.encode(long_a).ids, tokenizer.encode(short_b).ids
    kept_short, kept_both = data.encode_glue_examples(tokenizer, examples, sep_id=50256, max_len=12)
    assert kept_short == a_ids[:12 - 1 - len(b_ids)] + [50256] + b_ids  # only the longer sentence loses tokens
    assert kept_both == a_ids[:6] + [50256] + a_ids[:5]                 # both cut, A keeps the extra token
    single = data.encode_glue_examples(tokenizer, [data.GlueExample(long_a, None, 1)], sep_id=50256, max_len=7)
    assert single == [a_ids[:7]]


# ----------------------------------------------------------------------------- the head reads the last real token

def test_last_token_states_with_left_and_right_padding():
    hidden = torch.randn(4, 7, 5, dtype=torch.float64)
    lengths = [7, 3, 1, 5]
    for left in (False, True):
        mask = torch.zeros(4, 7, dtype=torch.long)
        for row, n in enumerate(lengths):
            mask[row, slice(7 - n, 7) if left else slice(0, n)] = 1
        expected = torch.stack([hidden[row, 6 if left else n - 1] for row, n in enumerate(lengths)])
        assert torch.equal(last_token_states(hidden, mask), expected)
    with pytest.raises(ValueError, match="all zeros"):
        last_token_states(hidden, torch.zeros(4, 7, dtype=torch.long))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_batch_scores_equal_each_sequence_alone(family):
    """Left- or right-padded (with eos, as GPT-2 must), every row's scores equal those of the same
    sequence run on its own without padding."""
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2 if family == "llama" else None,
                      d_model=32, max_position=32, eos_token_id=3)
    model, head = Transformer(cfg).eval(), ClassificationHead(32, 3)
    sequences = [torch.randint(4, 64, (n,)) for n in (9, 4, 1, 6)]
    alone = torch.stack([head(model.hidden_states(s[None]), torch.ones(1, len(s)))[0] for s in sequences])
    for left in (False, True):
        ids = torch.full((4, 9), cfg.eos_token_id)
        mask = torch.zeros(4, 9, dtype=torch.long)
        for row, s in enumerate(sequences):
            span = slice(9 - len(s), 9) if left else slice(0, len(s))
            ids[row, span], mask[row, span] = s, 1
        batched = head(model.hidden_states(ids, mask), mask)
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- train.py end to end

def glue_args(task, model_dir, shared_data, out_dir, *extra):
    return ["--task", task, "--model", str(model_dir), "--data-dir", str(shared_data / "glue"),
            "--out-dir", str(out_dir), "--max-train-examples", "48", "--batch-size", "8", "--epochs", "2",
            "--max-eval-examples", "40", "--eval-batch-size", "16", "--max-len", "64", "--log-every", "1",
            "--lr", "5e-3", *extra]


def test_sst2_trains_the_head_with_the_adapter_and_scores_the_saved_pair(tiny_gpt2_dir, shared_data, tmp_path):
    """12 steps (2 epochs): dev accuracy after each epoch, final and best reported; the saved adapter and
    head, loaded onto a fresh model and run one sentence at a time, give the final accuracy (sklearn)."""
    from sklearn.metrics import accuracy_score
    out = tmp_path / "run"
    metrics = train.main(glue_args("sst2", tiny_gpt2_dir, shared_data, out))
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["train_steps"] == 12 and metrics["final_epoch"] == 2 and metrics["best_epoch"] in (1, 2)
    assert metrics["best_accuracy"] >= metrics["final_accuracy"]
    evaluations = torch.load(out / "checkpoint.pt", weights_only=True)["evaluations"]
    assert [e["epoch"] for e in evaluations] == [1]
    assert metrics["best_accuracy"] == max(evaluations[0]["accuracy"], metrics["final_accuracy"])

    model, tokenizer = load_pretrained(tiny_gpt2_dir)
    kasa.load_kasa_state_dict(model, load_file(out / "adapter.safetensors"))
    head = ClassificationHead(32, 2)
    head.load_state_dict(load_file(out / "head.safetensors"))
    dev = data.load_glue_split("sst2", shared_data / "glue" / "SST-2" / "dev.tsv")[:40]
    with torch.no_grad():
        predictions = [head(model.eval().hidden_states(torch.tensor([ids])), torch.ones(1, len(ids))).argmax().item()
                       for ids in data.encode_glue_examples(tokenizer, dev, 50256, 64)]
    assert accuracy_score([ex.label for ex in dev], predictions) == pytest.approx(metrics["final_accuracy"])


def test_stsb_is_a_regression_with_pearson_and_spearman(tiny_gpt2_dir, shared_data, tmp_path):
    from scipy.stats import pearsonr, spearmanr
    out = tmp_path / "run"
    metrics = train.main(glue_args("stsb", tiny_gpt2_dir, shared_data, out, "--max-steps", "3"))
    assert metrics["train_steps"] == 3 and metrics["final_epoch"] == metrics["best_epoch"] == 0.5
    rows = [line.split("\t") for line in (out / "dev_predictions.tsv").read_text().splitlines()[1:]]
    predictions, labels = [float(p) for p, _ in rows], [float(label) for _, label in rows]
    dev = data.load_glue_split("stsb", shared_data / "glue" / "STS-B" / "dev.tsv")[:40]
    assert labels == [ex.label for ex in dev] and len(set(predictions)) > 1  # real-valued scores, not classes
    assert metrics["final_pearson"] == pytest.approx(pearsonr(predictions, labels)[0], abs=1e-6)
    assert metrics["final_spearman"] == pytest.approx(spearmanr(predictions, labels)[0], abs=1e-6)
    assert set(load_file(out / "head.safetensors")) == {"score.weight", "score.bias"}
    assert load_file(out / "head.safetensors")["score.weight"].shape == (1, 32)


def test_resume_restores_the_head_and_the_epoch_scores_exactly(tiny_gpt2_dir, shared_data, tmp_path, monkeypatch):
    args = ["--save-every", "5"]
    full = train.main(glue_args("rte", tiny_gpt2_dir, shared_data, tmp_path / "full", *args))

    from conftest import with_nan_loss_at_call
    make_task = train.TASKS["rte"]
    monkeypatch.setitem(train.TASKS, "rte", with_nan_loss_at_call(make_task, 9))
    with pytest.raises(FloatingPointError):
        train.main(glue_args("rte", tiny_gpt2_dir, shared_data, tmp_path / "cut", *args))
    checkpoint = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 5 and set(checkpoint["head"]) == {"score.weight", "score.bias"}

    monkeypatch.setitem(train.TASKS, "rte", make_task)
    resumed = train.main(glue_args("rte", tiny_gpt2_dir, shared_data, tmp_path / "cut", *args, "--resume"))
    assert resumed == full
    for name in ("head.safetensors", "adapter.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
