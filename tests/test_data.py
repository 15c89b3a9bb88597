"""data.py's E2E reading, formatting and download, on the real files in ../shared/data/e2e. Offline."""
import hashlib
import re
import zipfile

import pytest
from tokenizers import Tokenizer

import data


def test_official_and_cleaned_csvs_have_the_documented_sizes(shared_data):
    e2e = shared_data / "e2e"
    dev = data.load_e2e_split(e2e / "original" / "devset.csv")
    test = data.load_e2e_split(e2e / "original" / "testset_w_refs.csv")
    assert (len(dev), len(data.group_references(dev))) == (4672, 547)
    assert (len(test), len(data.group_references(test))) == (4693, 630)
    assert len(data.load_e2e_split(e2e / "cleaned" / "devel-fixed.no-ol.csv")) == 4299
    mr_only = data.load_e2e_split(e2e / "original" / "testset.csv")
    assert len(mr_only) == 630 and all(ex.ref is None for ex in mr_only)
    groups = data.group_references(test)
    assert sum(len(refs) for _, refs in groups) == 4693
    assert groups[0][0] == test[0].mr


def test_linearized_mrs_match_the_lora_paper_files(shared_data):
    """LoRA's valid.txt holds the same 4,672 dev rows as `context||reference`; our contexts equal theirs
    wherever their (pre-tokenized) values are untouched by tokenization."""
    dev = data.load_e2e_split(shared_data / "e2e" / "original" / "devset.csv")
    lines = (shared_data / "e2e" / "lora_format" / "valid.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(dev)
    compared = 0
    for ex, line in zip(dev, lines):
        context = line.split("||")[0].strip()
        if re.search(r"[£\-.]", ex.mr):   # LoRA's copies split "£20-25" into "£ 20 - 25"
            continue
        assert data.linearize_mr(ex.mr) == context
        compared += 1
    assert compared > 3000


def test_encoded_example_masks_the_context_and_ends_with_eos(shared_data):
    tok = Tokenizer.from_file(str(shared_data / "gpt2-tokenizer" / "tokenizer.json"))
    mr, ref = "name[Alimentum], area[city centre]", "Alimentum is in the city centre."
    ids, targets = data.encode_e2e_example(tok, mr, ref, eos_id=50256, max_len=512)
    context = tok.encode("name : Alimentum | area : city centre").ids + [50256]
    completion = tok.encode(" " + ref).ids + [50256]
    assert ids == context + completion
    # targets[t] is the label of position t: the next token, only where that token is in the completion
    assert targets == [-100] * (len(context) - 1) + completion + [-100]
    assert tok.decode(completion[:-1]) == " " + ref
    short_ids, short_targets = data.encode_e2e_example(tok, mr, ref, eos_id=50256, max_len=len(context) + 3)
    assert len(short_ids) == len(short_targets) == len(context) + 3
    with pytest.raises(ValueError, match="raise max_len"):
        data.encode_e2e_example(tok, mr, ref, eos_id=50256, max_len=len(context))
    batch = data.collate_e2e([(ids, targets), (short_ids, short_targets)], pad_id=0)
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["attention_mask"][1].sum() == len(short_ids) and (batch["targets"][1, len(short_ids):] == -100).all()


@pytest.mark.parametrize("content,message", [
    ("mr,ref\n\"name[A], area[b]\"\n", r"line 2: 1 columns, header has 2"),
    ("mr,ref\n\"name[A]\",ok\n\" \",text\n", r"line 3: empty MR"),
    ("mr,ref\n\"name[A]\",\n", r"line 2: empty reference"),
    ("ref\nsome text\n", r"line 1: no 'mr' column"),
    ("", r"file is empty"),
])
def test_malformed_rows_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        data.load_e2e_split(path)


def test_malformed_mr_is_refused():
    assert data.parse_mr("name[The Eagle], eatType[coffee shop]") == [("name", "The Eagle"), ("eatType", "coffee shop")]
    with pytest.raises(ValueError, match="malformed MR"):
        data.parse_mr("name[The Eagle] eatType[pub]")


def test_download_verifies_checksum_and_never_leaves_partial_files(tmp_path):
    source = tmp_path / "source.csv"
    source.write_bytes(b"mr,ref\n\"name[A]\",A.\n")
    good = "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    dest = data.download(source.as_uri(), tmp_path / "cache" / "file.csv", good)
    assert dest.read_bytes() == source.read_bytes()
    with pytest.raises(ValueError, match="checksum"):
        data.download(source.as_uri(), tmp_path / "cache" / "other.csv", "sha256:" + "0" * 64)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["file.csv"]
    git_blob = hashlib.sha1(b"blob %d\0" % source.stat().st_size + source.read_bytes()).hexdigest()
    assert data.file_checksum(source, "git-sha1") == git_blob


def test_release_zip_is_extracted_and_verified(tmp_path, shared_data, monkeypatch):
    """download_e2e on a local copy of the release layout (the official zip holds the CSVs in a folder)."""
    names = data.E2E_FILE_NAMES["original"]
    archive = tmp_path / "e2e-dataset.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for split in ("dev", "test"):
            z.write(shared_data / "e2e" / "original" / names[split], f"e2e-dataset/{names[split]}")
        z.writestr("e2e-dataset/trainset.csv", "mr,ref\n")   # not the real file: its checksum must fail
    monkeypatch.setattr(data, "E2E_RELEASE_URL", archive.as_uri())
    with pytest.raises(ValueError, match="trainset.csv.*checksum"):
        data.download_e2e("original", tmp_path / "cache")
    folder = tmp_path / "cache" / "original"
    assert not (folder / "trainset.csv").exists() and not list(folder.glob("*.part"))
