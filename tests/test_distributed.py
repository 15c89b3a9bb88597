"""torchrun: 2 processes on the CPU (gloo) train exactly what one process does with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import REPO


def test_two_ranks_match_one_process_with_the_same_global_batch(tiny_gpt2_dir, shared_data, tmp_path):
    # 49 examples in global batches of 8: the 7th batch holds one example, so rank 1 gets none and
    # must still join the all-reduce with weight zero. Two micro-batches per step check that the
    # loss is averaged over target tokens across micro-batches and ranks. No dropout: the ranks'
    # dropout masks differ from one process's.
    common = ["--model", str(tiny_gpt2_dir), "--data-dir", str(shared_data / "e2e"), "--max-train-examples", "49",
              "--grad-accum", "2", "--max-steps", "5", "--warmup-steps", "2", "--lr", "1e-2", "--max-len", "64",
              "--adapter-dropout", "0", "--no-eval", "--no-truncation-report", "--log-every", "1"]
    train.main(common + ["--batch-size", "8", "--out-dir", str(tmp_path / "one")])
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "train.py",
         *common, "--batch-size", "4", "--out-dir", str(tmp_path / "two")],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout

    one, two = (json.loads((tmp_path / run / "history.json").read_text()) for run in ("one", "two"))
    assert [h["step"] for h in two] == [h["step"] for h in one] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["l3"] == pytest.approx(a["l3"], rel=1e-5)
    adapter_one, adapter_two = (load_file(tmp_path / run / "adapter.safetensors") for run in ("one", "two"))
    assert adapter_one.keys() == adapter_two.keys()
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], atol=1e-5, rtol=1e-4)
    assert not adapter_one["blocks.0.attn.q_proj.kasa_B"].eq(0).all()   # it trained
