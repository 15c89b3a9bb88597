"""train.py's command line on bad input: each case exits 2 with `error: ...` naming the problem, and
no traceback (a traceback means a bug). Every case runs as its own `python train.py ...` process from
the repository root; they run concurrently, since each is mostly the cost of importing torch."""
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import train
from conftest import REPO

pytest.importorskip("transformers")

# (name, flags after the common ones, a keyword stderr must contain). RUN is the run directory made
# by `runs` below (a real 4-step checkpoint), MODEL the tiny GPT-2, BADMODEL one whose config.json is
# not JSON, and FILE a plain file.
CASES = [
    ("batch-size 0", ["--batch-size", "0"], "--batch-size 0: must be ≥ 1"),
    ("grad-accum 0", ["--grad-accum", "0"], "--grad-accum 0"),
    ("save-every 0", ["--save-every", "0"], "--save-every 0"),
    ("dtype float8", ["--dtype", "float8"], "--dtype float8: unknown; choose one of auto"),
    ("beta -1", ["--beta", "-1"], "--beta -1: must be ≥ 0"),
    ("max-steps -5", ["--max-steps", "-5"], "--max-steps -5"),
    ("warmup-steps -3", ["--warmup-steps", "-3"], "--warmup-steps -3"),
    ("r 0", ["--r", "0"], "--r 0: must be ≥ 1"),
    ("alpha 0", ["--alpha", "0"], "--alpha 0: must be > 0"),
    ("dropout 1", ["--adapter-dropout", "1"], "--adapter-dropout 1: must be in [0, 1)"),
    ("lr nan", ["--lr", "nan"], "--lr nan"),
    ("max-len 1", ["--max-len", "1"], "--max-len 1: must be ≥ 2"),
    ("several at once", ["--num-beams", "0", "--epochs", "0", "--log-every", "0"], "--log-every 0"),
    ("r not a number", ["--r", "four"], "invalid int value"),
    ("unknown task", ["--task", "mnli"], "--task mnli: unknown"),
    ("unknown method", ["--method", "adalora"], "--method adalora: unknown"),
    ("unknown data version", ["--data-version", "v2"], "--data-version v2"),
    ("unknown target", ["--targets", "qkv"], "--targets qkv"),
    ("untruncated not a target", ["--untruncated-targets", "k_proj"], "--untruncated-targets k_proj"),
    ("truncation with lora", ["--method", "lora", "--truncation", "2"], "only --method kasa truncates"),
    ("model missing", ["--model", "missing/model.gguf"], "--model missing/model.gguf: no such file"),
    ("model config.json not JSON", ["--model", "BADMODEL"], "JSON"),
    ("data dir missing", ["--data-dir", "no/such/dir"], "--data-dir no/such/dir"),
    ("out dir is a file", ["--out-dir", "FILE"], "is a file"),
    ("max-len above the model's", ["--max-len", "4096"], "reads at most 128 tokens"),
    ("resume without checkpoint", ["--resume", "--out-dir", "RUN/none"], "no checkpoint at"),
    ("resume with another r", ["--resume", "--out-dir", "RUN/good", "--r", "8"], "--r 4 -> 8"),
    ("resume with another task", ["--resume", "--out-dir", "RUN/good", "--task", "rte"], "--task e2e -> rte"),
    ("resume truncated checkpoint", ["--resume", "--out-dir", "RUN/truncated"], "delete it"),
    ("resume empty checkpoint", ["--resume", "--out-dir", "RUN/empty"], "delete it"),
    ("resume text as checkpoint", ["--resume", "--out-dir", "RUN/text"], "delete it"),
    ("resume other torch file", ["--resume", "--out-dir", "RUN/other"], "is not a train.py checkpoint"),
    ("resume malicious pickle", ["--resume", "--out-dir", "RUN/pickle"], "delete it"),
]


class Exploit:
    """Unpickling this would create a file: a checkpoint must never run it."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def runs(tiny_gpt2_dir, tmp_path_factory):
    """A real 4-step run, copies of its checkpoint damaged in each way, and every case's result."""
    from conftest import SHARED_DATA
    root = tmp_path_factory.mktemp("cli")
    common = ["--model", str(tiny_gpt2_dir), "--data-dir", str(SHARED_DATA / "e2e"), "--max-train-examples", "16",
              "--batch-size", "4", "--max-len", "64", "--warmup-steps", "1", "--no-eval", "--no-truncation-report"]
    train.main(common + ["--max-steps", "4", "--out-dir", str(root / "good")])
    good = (root / "good" / "checkpoint.pt").read_bytes()
    damaged = {"truncated": good[:len(good) // 2], "empty": b"", "text": b"not a checkpoint\n",
               "pickle": pickle.dumps(Exploit(str(root / "pwned")))}
    for name, content in damaged.items():
        (root / name).mkdir()
        (root / name / "checkpoint.pt").write_bytes(content)
    (root / "other").mkdir()
    torch.save({"weights": torch.zeros(2)}, root / "other" / "checkpoint.pt")
    (root / "badmodel").mkdir()
    (root / "badmodel" / "config.json").write_text("{'not': json", encoding="utf-8")
    (root / "file").write_text("x", encoding="utf-8")

    def run(case):
        flags = [{"BADMODEL": str(root / "badmodel"), "FILE": str(root / "file")}.get(arg, arg.replace("RUN", str(root)))
                 for arg in case[1]]
        env = {k: v for k, v in os.environ.items() if k != "KASA_DEBUG"} | {"OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "train.py", *common, "--out-dir", str(root / "unused"), *flags],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip((case[0] for case in CASES), pool.map(run, CASES)))
    return root, results


@pytest.mark.parametrize("name, flags, keyword", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_a_clear_error(runs, name, flags, keyword):
    result = runs[1][name]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error:" in result.stderr and keyword in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_a_malicious_checkpoint_never_runs(runs):
    assert not (runs[0] / "pwned").exists()


def test_debug_shows_the_traceback(tiny_gpt2_dir):
    result = subprocess.run([sys.executable, "train.py", "--model", str(tiny_gpt2_dir), "--batch-size", "0", "--debug"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_every_flag_has_help_and_its_default(capsys):
    for argv, expected in ([], "(≥ 0; default: 0.0001)"), (["--task", "rte"], "(≥ 0; default: 0.24, the rte preset)"):
        with pytest.raises(SystemExit):
            train.parse_config(argv + ["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for field in train.TrainConfig.__dataclass_fields__:
            flag = "--" + field.replace("_", "-")
            assert f"{flag} " in text or f"{flag}, " in text, flag
        assert text.count("default:") == len(train.TrainConfig.__dataclass_fields__)
        assert f"--beta X weight of L2 = Σ‖Δσ‖² (Eq. 11); 0 for the other methods unless given {expected}" in text


def test_the_paper_setting_on_a_cpu_names_a_cpu_sized_run(tmp_path, capsys):
    train.start_run(train.TrainConfig(out_dir=str(tmp_path)))
    printed = capsys.readouterr().out
    assert "needs a GPU" in printed and "--model HuggingFaceTB/SmolLM2-135M-Instruct --max-steps 300" in printed
    train.start_run(train.TrainConfig(out_dir=str(tmp_path), max_steps=300))
    assert "needs a GPU" not in capsys.readouterr().out


def test_resume_applies_and_notes_the_settings_that_may_change(runs, tmp_path, tiny_gpt2_dir, capsys):
    import shutil
    from conftest import SHARED_DATA
    shutil.copytree(runs[0] / "good", tmp_path / "run")
    train.main(["--model", str(tiny_gpt2_dir), "--data-dir", str(SHARED_DATA / "e2e"), "--max-train-examples", "16",
                "--batch-size", "4", "--max-len", "64", "--warmup-steps", "1", "--no-eval", "--no-truncation-report",
                "--max-steps", "5", "--log-every", "5", "--resume", "--out-dir", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    prefix = "note: resuming with changed settings: "
    note = next(line for line in printed.splitlines() if line.startswith(prefix))
    changed = {part.split(" /")[0] for part in note.removeprefix(prefix).split("; ")}
    assert changed == {"--max-steps 4 -> 5", "--log-every 10 -> 5", "--out-dir"}
    assert "resumed from" in printed and "step 5/5" in printed
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 5
