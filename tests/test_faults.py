"""Faults during a run: kill -9 during checkpoint writes, a full disk, a NaN before the first save.
A killed run always leaves a loadable checkpoint and --resume ends with the adapter an uninterrupted
run trains; a failed save names the file and the cause and leaves the previous checkpoint intact."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import errors
import train
from conftest import REPO, SHARED_DATA, with_nan_loss_at_call

pytest.importorskip("transformers")


def args(model_dir, out_dir, *extra):
    return ["--model", str(model_dir), "--data-dir", str(SHARED_DATA / "e2e"), "--out-dir", str(out_dir),
            "--max-train-examples", "40", "--batch-size", "4", "--max-len", "64", "--warmup-steps", "2",
            "--lr", "1e-2", "--no-eval", "--no-truncation-report", "--log-every", "1", *extra]


def test_kill_during_checkpoint_writes_then_resume_gives_the_same_adapter(tiny_gpt2_dir, tmp_path):
    """--save-every 1 with --group-by-length: SIGKILL the process while a checkpoint write is under way
    (its temporary file exists), at a random one of its first writes, four times; after every kill the
    checkpoint loads, and --resume finishes. The adapter equals an uninterrupted run's, bit for bit."""
    flags = ["--max-steps", "12", "--save-every", "1", "--group-by-length"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "train.py", *args(tiny_gpt2_dir, tmp_path / "whole", *flags)]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)

    cut, rng, kills = tmp_path / "cut", random.Random(0), 0
    command = [sys.executable, "train.py", *args(tiny_gpt2_dir, cut, *flags)]
    for attempt in range(4):
        process = subprocess.Popen(command + (["--resume"] if (cut / "checkpoint.pt").exists() else []), cwd=REPO,
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        writes, seen = rng.randint(1, 4), set()  # kill during about the writes-th checkpoint write
        while process.poll() is None and len(seen) < writes:
            seen.update(p.name for p in cut.glob(".checkpoint.pt.*.tmp"))
            time.sleep(0.0005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        assert process.returncode in (0, -signal.SIGKILL), process.stderr.read().decode()[-2000:]
        if (cut / "checkpoint.pt").exists():
            assert torch.load(cut / "checkpoint.pt", weights_only=True)["step"] >= 1
    assert kills >= 2
    subprocess.run(command + ["--resume"] * (cut / "checkpoint.pt").exists(), cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)
    whole, resumed = load_file(tmp_path / "whole" / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not list(cut.glob(".*.tmp"))  # the killed writes' temporary files are gone


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(tiny_gpt2_dir, tmp_path, monkeypatch):
    """The third save (step 3) runs out of space half-way: the error names checkpoint.pt and the cause,
    no temporary file stays, and the step-2 checkpoint still loads. (Simulated: no root needed.)"""
    real_save, calls = torch.save, {"n": 0}

    def save_on_a_full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.raises(errors.OutputError, match=r"cannot write .*checkpoint\.pt: no space left on device"):
        train.main(args(tiny_gpt2_dir, tmp_path, "--max-steps", "4", "--save-every", "1"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_nan_before_the_first_save_names_no_checkpoint(tiny_gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(train.TASKS, "e2e", with_nan_loss_at_call(train.TASKS["e2e"], 2))
    with pytest.raises(train.LossNotFinite, match="no checkpoint was saved yet") as info:
        train.main(args(tiny_gpt2_dir, tmp_path, "--max-steps", "4", "--save-every", "3"))
    assert "last good checkpoint" not in str(info.value) and isinstance(info.value, errors.UserError)
    assert not (tmp_path / "checkpoint.pt").exists()
