"""Data loading for KaSA experiments.

E2E NLG Challenge (restaurant domain), read from the official CSV release:
  - original: tuetschek/e2e-dataset v1.0.0 (trainset.csv, devset.csv, testset_w_refs.csv)
  - cleaned:  tuetschek/e2e-cleaning (train-fixed.no-ol.csv, devel-fixed.no-ol.csv, test-fixed.csv)
Each CSV row is one (MR, human reference) pair; an MR appears on several rows, one per reference.

Training format follows the LoRA paper's E2E scripts (microsoft/LoRA, examples/NLG):
  context    = linearised MR, e.g. "name : Alimentum | area : city centre | family friendly : no"
  separator  = one <|endoftext|> token after the context. LoRA's format_converting_e2e.py drops the
               "||" from the context and gpt2_encode.py --add_bos appends token 50256 instead, so the
               separator is a token id, not text (here: the eos_id the caller passes).
  completion = " " + reference, then <|endoftext|> (gpt2_encode.py encodes ' ' + completion, --add_eos)
Loss is on completion tokens only (the target of the separator position is the first reference
token, as in LoRA's FT_Dataset mask). Slot names are renamed as in LoRA's data files (eatType ->
"Type", priceRange -> "price", familyFriendly -> "family friendly"); unlike those files, slot values
and references are kept as written in the CSV (LoRA's copies are pre-tokenised: "£ 20 - 25").
"""
import csv
import hashlib
import os
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

# -----------------------------------------------------------------------------
# E2E: reading the official CSV files


@dataclass(frozen=True)
class E2EExample:
    mr: str          # meaning representation as in the CSV: "name[Alimentum], area[city centre]"
    ref: str | None  # human reference; None in files without references (testset.csv)


def _header_index(header, names):
    """Index of the first header cell (case-insensitive) in names, or None."""
    lowered = [cell.strip().lstrip("\ufeff").lower() for cell in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def load_e2e_split(path) -> list[E2EExample]:
    """Read one E2E CSV (original `mr,ref`, cleaned `mr,ref,fixed,orig_mr`, or MR-only `MR`)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: file is empty; expected a CSV with an 'mr' header")
        mr_col = _header_index(header, ["mr"])
        ref_col = _header_index(header, ["ref"])
        if mr_col is None:
            raise ValueError(f"{path}: line 1: no 'mr' column in header {header}; "
                             "expected the E2E CSV format (mr,ref)")
        examples = []
        for row in reader:
            line = reader.line_num  # physical line where this row ends (refs may span lines)
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}: line {line}: {len(row)} columns, header has "
                                 f"{len(header)}; fix the row's quoting or missing column")
            mr = row[mr_col].strip()
            if not mr:
                raise ValueError(f"{path}: line {line}: empty MR; every row needs an 'mr' value")
            ref = None
            if ref_col is not None:
                ref = row[ref_col].strip()
                if not ref:
                    raise ValueError(f"{path}: line {line}: empty reference for MR {mr!r}; "
                                     "remove the row or fill in its 'ref' value")
            examples.append(E2EExample(mr, ref))
    return examples


def group_references(examples) -> list[tuple[str, list[str]]]:
    """Group references by MR, MRs in order of first appearance (the evaluation order).

    The cleaned test set repeats MRs on non-adjacent rows, so this groups by value, not by runs."""
    groups: dict[str, list[str]] = {}
    for ex in examples:
        refs = groups.setdefault(ex.mr, [])
        if ex.ref is not None:
            refs.append(ex.ref)
    return list(groups.items())


# -----------------------------------------------------------------------------
# E2E: LoRA-style formatting and tokenisation

# CSV slot name -> the name LoRA's E2E data files use
LORA_SLOT_NAMES = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """'name[Alimentum], area[city centre]' -> [('name', 'Alimentum'), ('area', 'city centre')]."""
    slots = []
    rest = mr.strip()
    while rest:
        open_at, close_at = rest.find("["), rest.find("]")
        if open_at <= 0 or close_at < open_at:
            raise ValueError(f"malformed MR {mr!r}: expected 'slot[value], slot[value], ...'")
        slots.append((rest[:open_at].strip(), rest[open_at + 1:close_at].strip()))
        rest = rest[close_at + 1:].strip()
        if rest.startswith(","):
            rest = rest[1:].strip()
        elif rest:
            raise ValueError(f"malformed MR {mr!r}: expected ',' after ']' but found {rest[:10]!r}")
    return slots


def linearize_mr(mr: str) -> str:
    """CSV MR -> LoRA-style text: 'name : Alimentum | area : city centre'."""
    return " | ".join(f"{LORA_SLOT_NAMES.get(slot, slot)} : {value}" for slot, value in parse_mr(mr))


def encode_e2e_context(tokenizer, mr: str, eos_id: int) -> list[int]:
    """Prompt tokens for an MR: the linearised MR, then the separator token (eos_id, as LoRA)."""
    return tokenizer.encode(linearize_mr(mr)).ids + [eos_id]


def encode_e2e_example(tokenizer, mr: str, ref: str, eos_id: int, max_len: int):
    """Token ids for one (MR, reference) pair, and next-token targets for them.

    Returns (input_ids, targets), two equal-length lists: targets[t] is the label for the logits at
    position t (input_ids[t + 1]), or -100 where no loss is taken (context positions, and the last
    position, which has no next token). Sequences longer than max_len lose the end of the reference.
    """
    context = encode_e2e_context(tokenizer, mr, eos_id)
    completion = tokenizer.encode(" " + ref).ids + [eos_id]
    if len(context) >= max_len:
        raise ValueError(f"MR {mr!r} takes {len(context)} tokens, max_len={max_len} leaves no room "
                         "for the reference; raise max_len")
    input_ids = (context + completion)[:max_len]
    targets = [-100] * (len(context) - 1) + input_ids[len(context):] + [-100]
    return input_ids, targets


def collate_e2e(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, targets) to the longest in the batch."""
    width = max(len(input_ids) for input_ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, tgt) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        targets[row, :len(tgt)] = torch.tensor(tgt, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attention_mask}


# -----------------------------------------------------------------------------
# E2E: locating the files, downloading the official release when they are missing

E2E_RELEASE_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
E2E_CLEANED_URL = "https://raw.githubusercontent.com/tuetschek/e2e-cleaning/master/cleaned-data/"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "kasa" / "e2e"

E2E_FILE_NAMES = {
    "original": {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"},
    "cleaned": {"train": "train-fixed.no-ol.csv", "dev": "devel-fixed.no-ol.csv",
                "test": "test-fixed.csv"},
}

# Pinned checksums of the official files. SHA-256 where the file was available to hash; the two
# training sets were not, so they are pinned by their git blob id in the official repositories
# (sha1 of b"blob <size>\0" + content, what `git hash-object` prints). The release zip itself is
# not pinned: its extracted CSVs are.
E2E_CHECKSUMS = {
    "trainset.csv": "git-sha1:fa3a5e1124d2aa0d768881e38f8ee73e63d5880d",
    "devset.csv": "sha256:fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9",
    "testset_w_refs.csv": "sha256:edc8db685e39bb9824d5bd70c18b1c9b0412d14b527aa960e2d1c8251ee15ccd",
    "train-fixed.no-ol.csv": "git-sha1:e20296cac3a1df19254e06d7c4132bc6e6ae088f",
    "devel-fixed.no-ol.csv": "sha256:bb88df2565826a463f96e93a5ab69a8c6460de54f2e68179eb94f0019f430d4d",
    "test-fixed.csv": "sha256:99b43c2769a09d62fc5d37dcffaa59d4092bcffdc611f226258681df61269b17",
}


def file_checksum(path, algorithm: str) -> str:
    """'sha256' (plain file hash) or 'git-sha1' (git blob id) of a file, as hex."""
    path = Path(path)
    if algorithm == "sha256":
        digest = hashlib.sha256()
    elif algorithm == "git-sha1":
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}; use 'sha256' or 'git-sha1'")
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path, expected: str) -> None:
    """Raise if the file does not match the pinned 'algorithm:hex' checksum."""
    algorithm, want = expected.split(":", 1)
    got = file_checksum(path, algorithm)
    if got != want:
        raise ValueError(f"{path}: {algorithm} checksum {got} != expected {want}; the download is "
                         "corrupt or upstream changed: delete the file and run again")


def download(url: str, dest, expected_checksum: str | None = None) -> Path:
    """Download url to dest with a progress bar; write a temp file, verify, then rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                done += len(chunk)
                _print_progress(dest.name, done, total)
        print(file=sys.stderr)
        if expected_checksum is not None:
            verify_checksum(tmp, expected_checksum)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _print_progress(name: str, done: int, total: int) -> None:
    if total:
        filled = 30 * done // total
        bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * done / total:5.1f}%"
    else:
        bar = f"{done / 1e6:.1f} MB"
    print(f"\rdownloading {name} {bar}", end="", file=sys.stderr, flush=True)


def download_e2e(version: str, cache_dir) -> Path:
    """Download one E2E version into cache_dir/version and verify it; return that folder."""
    target = Path(cache_dir) / version
    target.mkdir(parents=True, exist_ok=True)
    names = list(E2E_FILE_NAMES[version].values())
    if version == "cleaned":
        for name in names:
            if not (target / name).exists():
                download(E2E_CLEANED_URL + name, target / name, E2E_CHECKSUMS[name])
        return target
    zip_path = download(E2E_RELEASE_URL, Path(cache_dir) / "e2e-dataset.zip")
    with zipfile.ZipFile(zip_path) as archive:
        members = {Path(member).name: member for member in archive.namelist()}
        for name in names:
            if name not in members:
                raise ValueError(f"{E2E_RELEASE_URL}: the release zip has no {name}; "
                                 f"found {sorted(members)}")
            extracted = target / (name + ".part")
            with archive.open(members[name]) as src, open(extracted, "wb") as out:
                out.write(src.read())
            try:
                verify_checksum(extracted, E2E_CHECKSUMS[name])
            except ValueError:
                os.remove(extracted)
                raise
            os.replace(extracted, target / name)
    os.remove(zip_path)
    return target


def resolve_e2e_files(version: str = "original", data_dir=None,
                      cache_dir=DEFAULT_CACHE_DIR) -> dict[str, Path | None]:
    """Paths of the E2E train/dev/test CSVs for version 'original' or 'cleaned'.

    data_dir given: use the files there (in data_dir or data_dir/version, e.g. the shared store's
    e2e/); no download. A missing train split gives train=None so the caller can train on dev and
    say so (the shared store has no train split). data_dir None: use cache_dir, downloading the
    official release into it on first use.
    """
    if version not in E2E_FILE_NAMES:
        raise ValueError(f"unknown E2E version {version!r}; use 'original' or 'cleaned'")
    names = E2E_FILE_NAMES[version]
    if data_dir is None:
        folder = Path(cache_dir) / version
        if not all((folder / name).exists() for name in names.values()):
            download_e2e(version, cache_dir)
        return {split: folder / name for split, name in names.items()}

    data_dir = Path(data_dir)
    folder = data_dir / version if (data_dir / version).is_dir() else data_dir
    paths = {split: folder / name for split, name in names.items()}
    missing = [str(paths[split]) for split in ("dev", "test") if not paths[split].exists()]
    if missing:
        raise FileNotFoundError(f"E2E {version} files not found: {missing}; point data_dir at the "
                                "folder holding them, or leave it unset to download the release")
    if not paths["train"].exists():
        paths["train"] = None
    return paths
