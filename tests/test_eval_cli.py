"""eval.py's command line on bad input, the data readers' errors, and the one E2E evaluation path.

Each bad input to `python eval.py ...` must exit 2 with `error: <what is wrong>` on stderr and no
traceback; each bad data file must raise errors.DataError naming the file, the line and what is
expected. A train.py run scored by itself and by `eval.py --checkpoint` must give the same scores.
Offline: tiny random models, the real E2E files.
"""
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import errors
import eval as evaluation

REPO = Path(__file__).resolve().parents[1]
GOOD_CSV = 'mr,ref\n"name[Alimentum], area[city centre]",Alimentum is in the city centre.\n'


def run_eval(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "KASA_METEOR_JAR": "no-such.jar", **(env or {})}, timeout=300)


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def run_dir(root: Path, config=None, **files) -> Path:
    """A directory that looks like a train.py run: config.json (a dict, or raw text) and other files."""
    directory = root / "run"
    directory.mkdir(parents=True)
    if config is not None:
        write(directory / "config.json", config if isinstance(config, str) else json.dumps(config))
    for name, content in files.items():
        write(directory / name.replace("_", ".", 1), content)
    return directory


def e2e_config(**changes) -> dict:
    """The settings eval.py --checkpoint reads from a run's config.json (train.py's defaults)."""
    return {"task": "e2e", "model": "gpt2-medium", "method": "kasa", "dtype": "auto", "data_version": "original",
            "data_dir": None, "max_eval_examples": None, "num_beams": 10, "max_new_tokens": 64,
            "length_penalty": 0.9, "no_repeat_ngram_size": 4, "eval_batch_size": 8, **changes}


# Each case: (name, a function tmp_path -> the arguments, words stderr must hold).
REFS_TEXT = "a ref\n\nanother ref\n"
CASES = [
    ("hyps file missing", lambda t: ["--refs", write(t / "refs.txt", REFS_TEXT), "--hyps", t / "nope.txt"],
     ["nope.txt", "does not exist"]),
    ("refs file missing", lambda t: ["--refs", t / "nope.csv", "--hyps", write(t / "h.txt", "x\n")],
     ["nope.csv", "does not exist"]),
    ("count mismatch", lambda t: ["--refs", write(t / "refs.txt", REFS_TEXT), "--hyps", write(t / "h.txt", "x\n")],
     ["1 outputs", "2 reference groups"]),
    ("hyps not UTF-8", lambda t: ["--refs", write(t / "refs.txt", REFS_TEXT), "--hyps", write(t / "h.txt", b"\xff\xfe\n")],
     ["h.txt", "not UTF-8"]),
    ("hyps is a directory", lambda t: ["--refs", write(t / "refs.txt", REFS_TEXT), "--hyps", t],
     ["is a directory"]),
    ("refs text empty", lambda t: ["--refs", write(t / "refs.txt", ""), "--hyps", write(t / "h.txt", "x\n")],
     ["refs.txt", "no references"]),
    ("refs CSV empty", lambda t: ["--refs", write(t / "r.csv", ""), "--hyps", write(t / "h.txt", "x\n")],
     ["r.csv", "empty"]),
    ("refs CSV only a header", lambda t: ["--refs", write(t / "r.csv", "mr,ref\n"), "--hyps", write(t / "h.txt", "x\n")],
     ["r.csv", "only the header"]),
    ("refs CSV without mr", lambda t: ["--refs", write(t / "r.csv", "ref\nA text.\n"), "--hyps", write(t / "h.txt", "x\n")],
     ["r.csv", "line 1", "'mr' column"]),
    ("refs CSV without ref", lambda t: ["--refs", write(t / "r.csv", 'mr\n"name[A]"\n'), "--hyps", write(t / "h.txt", "x\n")],
     ["r.csv", "'ref' column"]),
    ("refs CSV short row", lambda t: ["--refs", write(t / "r.csv", 'mr,ref\n"name[A]"\n'), "--hyps", write(t / "h.txt", "x\n")],
     ["r.csv", "line 2", "1 columns"]),
    ("refs CSV malformed MR", lambda t: ["--refs", write(t / "r.csv", 'mr,ref\nname[A] area[b],A.\n'),
                                         "--hyps", write(t / "h.txt", "x\n")],
     ["r.csv", "line 2", "malformed MR"]),
    ("refs CSV not UTF-8", lambda t: ["--refs", write(t / "r.csv", "mr,ref\nname[Caf\xe9],x\n".encode("latin-1")),
                                      "--hyps", write(t / "h.txt", "x\n")],
     ["r.csv", "not UTF-8"]),
    ("hyps without refs", lambda t: ["--hyps", write(t / "h.txt", "x\n")], ["--hyps needs --refs"]),
    ("no mode", lambda t: [], ["--checkpoint"]),
    ("unknown task", lambda t: ["--checkpoint", t, "--task", "sst2"], ["invalid choice", "sst2"]),
    ("plots dir missing", lambda t: ["--plots", t / "nope"], ["nope", "does not exist"]),
    ("plots dir not a run", lambda t: ["--plots", t], ["not a run directory", "config.json"]),
    ("plots dir is a file", lambda t: ["--plots", write(t / "f.txt", "x")], ["f.txt", "not a directory"]),
    ("plots history corrupt", lambda t: ["--plots", run_dir(t, history_json="[{")], ["history.json", "not valid JSON"]),
    ("checkpoint not a run", lambda t: ["--checkpoint", t], ["not a run directory"]),
    ("config.json not JSON", lambda t: ["--checkpoint", run_dir(t, "{not json", adapter_safetensors=b"")],
     ["config.json", "not valid JSON"]),
    ("config.json not a dict", lambda t: ["--checkpoint", run_dir(t, "[1, 2]")], ["config.json", "lacks the settings"]),
    ("config.json lacks settings", lambda t: ["--checkpoint", run_dir(t, {"task": "e2e"})],
     ["config.json", "lacks the settings", "num_beams"]),
    ("a GLUE run", lambda t: ["--checkpoint", run_dir(t, e2e_config(task="sst2"))], ["'sst2' run", "E2E"]),
    ("a bad dtype", lambda t: ["--checkpoint", run_dir(t, e2e_config(dtype="float8"))], ["dtype", "float8"]),
    ("the model is missing", lambda t: ["--checkpoint", run_dir(t, e2e_config(model=str(t / "no-model")))],
     ["no-model"]),
]


NO_MATPLOTLIB = importlib.util.find_spec("matplotlib") is None  # then --plots draws nothing, so reads nothing


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict:
    """Every case's `python eval.py ...`, run side by side (each one's start is mostly importing torch)."""
    runs = {name: make_args(tmp_path_factory.mktemp(name.replace(" ", "_"))) for name, make_args, _ in CASES}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(run_eval, *args, env={"HF_HUB_OFFLINE": "1"}) for name, args in runs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name, words", [(name, words) for name, _, words in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_a_clear_error(cli_results, name, words):
    if NO_MATPLOTLIB and "plots history" in name:
        pytest.skip("without matplotlib --plots draws nothing, so reads nothing")
    result = cli_results[name]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_debug_shows_the_traceback(tmp_path):
    result = run_eval("--plots", tmp_path / "nope", "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr and "error:" in result.stderr


def test_every_flag_has_help_with_its_default():
    actions = [a for a in evaluation.build_arg_parser()._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in actions} == {"refs", "hyps", "checkpoint", "plots", "task", "debug"}
    for action in actions:
        assert action.help and "(default: " in action.help, action.option_strings


# ----------------------------------------------------------------------------- a run's adapter


def test_truncated_or_foreign_adapter_is_a_clear_error(tiny_gpt2_dir, tmp_path):
    """A run of the tiny GPT-2 whose adapter.safetensors is cut short, or is another model's."""
    from safetensors.torch import save_file
    config = e2e_config(model=str(tiny_gpt2_dir))
    truncated = run_dir(tmp_path / "a", config, adapter_safetensors=b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    result = run_eval("--checkpoint", truncated)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "adapter.safetensors" in result.stderr and "corrupt, truncated" in result.stderr

    foreign = run_dir(tmp_path / "b", config)
    save_file({"blocks.0.attn.q_proj.kasa_A": torch.zeros(2, 2)}, foreign / "adapter.safetensors")
    result = run_eval("--checkpoint", foreign)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "does not fit the run's model" in result.stderr


def test_the_run_and_eval_checkpoint_give_the_same_scores(tiny_gpt2_dir, shared_data, tmp_path, monkeypatch):
    """One E2E evaluation path: train.py's own score of a run equals `python eval.py --checkpoint`
    on it (the same test MRs, beams and autocast; bf16 autocast here, the CPU's lower precision)."""
    import train
    monkeypatch.setenv("KASA_METEOR_JAR", "no-such.jar")  # METEOR is None both ways (tested in test_metrics.py)
    out = tmp_path / "run"
    trained = train.main(["--model", str(tiny_gpt2_dir), "--data-dir", str(shared_data / "e2e"), "--out-dir", str(out),
                          "--max-train-examples", "16", "--batch-size", "4", "--warmup-steps", "1", "--lr", "1e-2",
                          "--max-steps", "2", "--max-len", "64", "--max-eval-examples", "3", "--num-beams", "2",
                          "--max-new-tokens", "6", "--eval-batch-size", "2", "--dtype", "bfloat16",
                          "--no-truncation-report"])
    predictions = (out / "predictions.txt").read_text(encoding="utf-8")
    (out / "predictions.txt").unlink()
    result = run_eval("--checkpoint", out)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    scores = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "eval_mrs")
    assert {k: printed[k] for k in scores} == {k: trained[k] for k in scores}
    assert (out / "predictions.txt").read_text(encoding="utf-8") == predictions
    assert json.loads((out / "metrics.json").read_text()) == trained     # the same scores, train_steps kept


def test_run_precision_follows_the_runs_dtype():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert evaluation.run_precision("auto", "cpu") == (None, fp32)
    assert evaluation.run_precision("float32", "cuda") == (None, fp32)
    assert evaluation.run_precision("bfloat16", "cpu") == (bf16, bf16)      # the frozen base in bf16 on the CPU too
    assert evaluation.run_precision("float16", "cpu") == (fp16, fp32)      # fp16 on the CPU: autocast only
    assert evaluation.run_precision("float16", "cuda") == (fp16, fp16)      # the frozen base in half precision
    assert evaluation.run_precision("float16", "cuda", "full") == (fp16, fp32)  # trained weights stay fp32
    with pytest.raises(errors.ConfigError, match="float8"):
        evaluation.run_precision("float8", "cpu")


# ----------------------------------------------------------------------------- data files (API)

E2E_BAD = [
    ("", "file is empty"),
    ("mr,ref\n", "holds only the header line"),
    ("mr,ref\r\n\r\n", "holds only the header line"),
    ("ref\nA.\n", "line 1: no 'mr' column"),
    ('mr,ref\n"name[A]",A.\n"name[B]"\n', "line 3: 1 columns, header has 2"),
    ('mr,ref\n"name[A]",A.,extra\n', "line 2: 3 columns, header has 2"),
    ('mr,ref\n"name[A]",\n', "line 2: empty reference"),
    ('mr,ref\nname A,A.\n', "line 2: malformed MR"),
    ("mr,ref\nname[Caf\xe9],A.\n".encode("latin-1"), "not UTF-8"),
]


@pytest.mark.parametrize("content, message", E2E_BAD)
def test_e2e_csv_errors_name_the_file_the_line_and_what_is_expected(tmp_path, content, message):
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(errors.DataError) as info:
        data.load_e2e_split(path)
    assert str(path) in str(info.value) and message in str(info.value)
    assert "expected" in str(info.value) or "remove the row" in str(info.value) or "fix" in str(info.value)


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
GLUE_BAD = [
    ("rte", "", "file is empty"),
    ("rte", RTE_HEADER, "holds only the header line"),
    ("cola", "\n\n", "file is empty"),
    ("rte", RTE_HEADER + "0\tA.\tB.\n", "line 2: 3 tab-separated columns, rte rows have 4"),
    ("rte", RTE_HEADER + "0\tA.\tB.\tyes\n", "line 2: label 'yes'; rte labels are"),
    ("sst2", "sentence\tlabel\nfine\t1\nbad\t2\n", "line 3: label '2'"),
    ("stsb", "index\tsentence1\tsentence2\tlabel\n", "line 1: header"),
    ("sst2", "sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"), "not UTF-8"),
]


@pytest.mark.parametrize("task, content, message", GLUE_BAD)
def test_glue_tsv_errors_name_the_file_the_line_and_what_is_expected(tmp_path, task, content, message):
    path = write(tmp_path / "bad.tsv", content)
    with pytest.raises(errors.DataError) as info:
        data.load_glue_split(task, path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_data_is_a_data_error_and_a_file_not_found_error(tmp_path):
    with pytest.raises(errors.DataError, match="does not exist"):
        data.load_e2e_split(tmp_path / "nope.csv")
    with pytest.raises(errors.DataError, match="does not exist"):
        data.load_glue_split("rte", tmp_path / "nope.tsv")
    for resolve in (lambda: data.resolve_e2e_files("original", tmp_path), lambda: data.resolve_glue_files("rte", tmp_path)):
        with pytest.raises(FileNotFoundError) as info:
            resolve()
        assert isinstance(info.value, errors.DataError) and "--data-dir" in str(info.value)


def test_a_failed_download_is_a_data_error_and_leaves_nothing(tmp_path):
    with pytest.raises(errors.DataError, match="cannot download .*pass --data-dir"):
        data.download((tmp_path / "nowhere.csv").as_uri(), tmp_path / "cache" / "file.csv")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_e2e_rows_that_span_lines_keep_their_line_numbers(tmp_path):
    path = write(tmp_path / "multi.csv", GOOD_CSV + '"name[B]","one\ntwo"\n"name[C]"\n')
    with pytest.raises(errors.DataError, match=r"line 5: 1 columns"):
        data.load_e2e_split(path)
    assert len(data.load_e2e_split(write(tmp_path / "good.csv", GOOD_CSV))) == 1
