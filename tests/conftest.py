"""Shared test setup: run from the repo root with no install step."""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Real data lives beside the checkout (../shared/data); KASA_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("KASA_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A random 2-layer GPT-2 (no pad token, as the real one) in Hugging Face layout, with the real
    GPT-2 BPE files beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    assert cfg.pad_token_id is None
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    for name in ("vocab.json", "vocab.bpe"):
        shutil.copy(SHARED_DATA / "gpt2-tokenizer" / name, path / name)
    return path


def with_nan_loss_at_call(make_task, call: int):
    """A train.TASKS entry whose task loss turns NaN at its `call`-th evaluation (1-based):
    interrupts a run mid-way, to test the NaN stop and --resume."""
    calls = {"n": 0}

    def make(config, model, tokenizer):
        task = make_task(config, model, tokenizer)
        clean_loss = task.loss

        def loss(model, batch):
            calls["n"] += 1
            return clean_loss(model, batch) * (float("nan") if calls["n"] == call else 1.0)
        task.loss = loss
        return task
    return make
