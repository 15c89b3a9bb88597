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

GLUE (the six tasks of the KaSA paper's GLUE table: CoLA, SST-2, MRPC, QNLI, RTE, STS-B), read from
the official TSV files, train.tsv and dev.tsv per task folder: the GLUE release zips, and MRPC built
from its SentEval copy with GLUE's dev-ids split. Encoded for a decoder: sentence A, then for a
pair the eos token and sentence B; a classification head reads the last real token (model.py).
"""
import csv
import hashlib
import io
import math
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import ConfigError, DataError, describe_os_error, reading
from files import write_atomic, write_text_atomic


class MissingDataError(DataError, FileNotFoundError):
    """A data file or folder that is not where the settings say."""

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
    """Read one E2E CSV (original `mr,ref`, cleaned `mr,ref,fixed,orig_mr`, or MR-only `MR`).

    A file that is missing, not UTF-8, empty, only a header, without an 'mr' column, or with a bad
    row raises DataError naming the file, the line and what is expected."""
    path = Path(path)
    with reading(path, DataError, "expected an E2E CSV file in UTF-8 with a header line mr,ref"):
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: file is empty; expected a CSV with an 'mr' header")
        mr_col, ref_col = _header_index(header, ["mr"]), _header_index(header, ["ref"])
        if mr_col is None:
            raise DataError(f"{path}: line 1: no 'mr' column in header {header}; "
                            "expected the E2E CSV format (mr,ref)")
        examples = []
        for row in reader:
            if row:
                examples.append(_e2e_example(path, reader.line_num, row, header, mr_col, ref_col))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}; expected a CSV file (mr,ref)") from e
    if not examples:
        raise DataError(f"{path}: holds only the header line; expected one row per (MR, reference) pair")
    return examples


def _e2e_example(path, line: int, row: list, header: list, mr_col: int, ref_col) -> E2EExample:
    """One CSV row, checked; `line` is the physical line where the row ends (refs may span lines)."""
    if len(row) != len(header):
        raise DataError(f"{path}: line {line}: {len(row)} columns, header has "
                        f"{len(header)}; fix the row's quoting or missing column")
    mr = row[mr_col].strip()
    if not mr:
        raise DataError(f"{path}: line {line}: empty MR; every row needs an 'mr' value")
    try:
        parse_mr(mr)
    except DataError as e:
        raise DataError(f"{path}: line {line}: {e}") from e
    ref = None
    if ref_col is not None:
        ref = row[ref_col].strip()
        if not ref:
            raise DataError(f"{path}: line {line}: empty reference for MR {mr!r}; "
                            "remove the row or fill in its 'ref' value")
    return E2EExample(mr, ref)


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
            raise DataError(f"malformed MR {mr!r}: expected 'slot[value], slot[value], ...'")
        slots.append((rest[:open_at].strip(), rest[open_at + 1:close_at].strip()))
        rest = rest[close_at + 1:].strip()
        if rest.startswith(","):
            rest = rest[1:].strip()
        elif rest:
            raise DataError(f"malformed MR {mr!r}: expected ',' after ']' but found {rest[:10]!r}")
    return slots


def linearize_mr(mr: str) -> str:
    """CSV MR -> LoRA-style text: 'name : Alimentum | area : city centre'."""
    return " | ".join(f"{LORA_SLOT_NAMES.get(slot, slot)} : {value}" for slot, value in parse_mr(mr))


def eos_and_pad_ids(model_config) -> tuple[int, int]:
    """The model's eos id (the first, when it lists several, as Llama 3 does), which also separates
    context from completion; and its pad id, or eos when it has none (GPT-2). Padding never enters a
    loss or an attention, so any id works; eos keeps the vocabulary as it is."""
    eos_id = model_config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    return eos_id, model_config.pad_token_id if model_config.pad_token_id is not None else eos_id


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
        raise ConfigError(f"MR {mr!r} takes {len(context)} tokens, max_len={max_len} leaves no room "
                          "for the reference; raise max_len (--max-len)")
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


def checksum(content: bytes, algorithm: str) -> str:
    """'sha256' (plain hash) or 'git-sha1' (git blob id) of some bytes, as hex."""
    if algorithm == "sha256":
        return hashlib.sha256(content).hexdigest()
    if algorithm == "git-sha1":
        return hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; use 'sha256' or 'git-sha1'")


def file_checksum(path, algorithm: str) -> str:
    return checksum(Path(path).read_bytes(), algorithm)


def verify_checksum(name: str, content: bytes, expected: str) -> None:
    """Raise DataError if `content` (the file `name`) does not match the pinned 'algorithm:hex' checksum."""
    algorithm, want = expected.split(":", 1)
    got = checksum(content, algorithm)
    if got != want:
        raise DataError(f"{name}: {algorithm} checksum {got} != expected {want}; the download is "
                        "corrupt or upstream changed: run again, or pass --data-dir with the official files")


def fetch(url: str, name: str) -> bytes:
    """The bytes at url, with a progress bar on stderr."""
    chunks, done = [], 0
    try:
        with urllib.request.urlopen(url) as response:
            total = int(response.headers.get("Content-Length") or 0)
            for chunk in iter(lambda: response.read(1 << 16), b""):
                chunks.append(chunk)
                done += len(chunk)
                _print_progress(name, done, total)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        reason = getattr(e, "reason", None) or describe_os_error(e)
        raise DataError(f"cannot download {url}: {reason}; check the network, or download the files "
                        "yourself and pass --data-dir") from e
    print(file=sys.stderr)
    return b"".join(chunks)


def download(url: str, dest, expected_checksum: str | None = None) -> Path:
    """Download url to dest: fetch, verify the checksum, then write it atomically (files.py)."""
    dest = Path(dest)
    content = fetch(url, dest.name)
    if expected_checksum is not None:
        verify_checksum(dest.name, content, expected_checksum)
    return write_atomic(dest, lambda f: f.write(content))


def extract_member(archive: zipfile.ZipFile, member: str, dest, expected_checksum: str | None = None) -> Path:
    """Extract one file of a zip to dest: verify it, then write it atomically."""
    content = archive.read(member)
    if expected_checksum is not None:
        verify_checksum(Path(dest).name, content, expected_checksum)
    return write_atomic(dest, lambda f: f.write(content))


def _print_progress(name: str, done: int, total: int) -> None:
    if total:
        filled = 30 * done // total
        bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * done / total:5.1f}%"
    else:
        bar = f"{done / 1e6:.1f} MB"
    print(f"\rdownloading {name} {bar}", end="", file=sys.stderr, flush=True)


def open_zip(url: str) -> zipfile.ZipFile:
    """A downloaded zip, in memory (nothing is left on disk)."""
    try:
        return zipfile.ZipFile(io.BytesIO(fetch(url, url.rsplit("/", 1)[1])))
    except zipfile.BadZipFile as e:
        raise DataError(f"{url} is not a zip file ({e}); run again, or pass --data-dir with the files") from e


def download_e2e(version: str, cache_dir) -> Path:
    """Download one E2E version into cache_dir/version and verify it; return that folder."""
    target = Path(cache_dir) / version
    names = list(E2E_FILE_NAMES[version].values())
    if version == "cleaned":
        for name in names:
            if not (target / name).exists():
                download(E2E_CLEANED_URL + name, target / name, E2E_CHECKSUMS[name])
        return target
    with open_zip(E2E_RELEASE_URL) as archive:
        members = {Path(member).name: member for member in archive.namelist()}
        for name in names:
            if name not in members:
                raise DataError(f"{E2E_RELEASE_URL}: the release zip has no {name}; found {sorted(members)}")
            extract_member(archive, members[name], target / name, E2E_CHECKSUMS[name])
    return target


def resolve_e2e_files(version: str = "original", data_dir=None,
                      cache_dir=DEFAULT_CACHE_DIR) -> dict[str, Path | None]:
    """Paths of the E2E train/dev/test CSVs for version 'original' or 'cleaned'.

    data_dir given: use the files there (in data_dir, or in data_dir/original and data_dir/cleaned);
    no download. A missing train split gives train=None so the caller can train on dev and say so
    (a local copy may hold only dev and test). data_dir None: use cache_dir, downloading the
    official release into it on first use.
    """
    if version not in E2E_FILE_NAMES:
        raise DataError(f"unknown E2E version {version!r}; use 'original' or 'cleaned'")
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
        raise MissingDataError(f"E2E {version} files not found: {missing}; point --data-dir at the "
                               "folder holding them, or leave it unset to download the release")
    if not paths["train"].exists():
        paths["train"] = None
    return paths


def e2e_test_groups(version: str = "original", data_dir=None, limit: int | None = None) -> list[tuple[str, list[str]]]:
    """The E2E test MRs with their references, in the scorer's order (the first `limit`, if given)."""
    test = resolve_e2e_files(version, data_dir)["test"]
    groups = group_references(load_e2e_split(test))
    if not all(refs for _, refs in groups):
        raise DataError(f"{test} has no 'ref' column: the E2E test split needs its references (mr,ref)")
    return groups[:limit or None]


# -----------------------------------------------------------------------------
# GLUE: reading the official TSV files
#
# Lines are split on the tab character and nothing else: sentences contain quotes (SST-2, MRPC), so
# a CSV reader would merge or split rows. Class ids follow the GLUE release (and Hugging Face's
# `glue` dataset): 0 = unacceptable / negative / not equivalent / entailment.


@dataclass(frozen=True)
class GlueTask:
    """Where one GLUE task's fields sit in its TSV files."""
    folder: str                  # the task's folder in the GLUE release, in --data-dir and in the cache
    header: tuple | None         # the expected first line; None: the file has no header (CoLA)
    n_columns: int
    text_columns: tuple          # one column (a single sentence) or two (a sentence pair)
    label_column: int
    label_names: tuple | None    # the labels as written in the file, in class-id order; None: a score in [0, 5]
    url: str | None              # the task's zip in the GLUE release; None for MRPC (see download_mrpc)


GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/"
ENTAILMENT = ("entailment", "not_entailment")
GLUE_TASKS = {
    "cola": GlueTask("CoLA", None, 4, (3,), 1, ("0", "1"), GLUE_URL + "CoLA.zip"),
    "sst2": GlueTask("SST-2", ("sentence", "label"), 2, (0,), 1, ("0", "1"), GLUE_URL + "SST-2.zip"),
    "mrpc": GlueTask("MRPC", ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), 5, (3, 4), 0, ("0", "1"),
                     None),
    "qnli": GlueTask("QNLI", ("index", "question", "sentence", "label"), 4, (1, 2), 3, ENTAILMENT,
                     GLUE_URL + "QNLIv2.zip"),
    "rte": GlueTask("RTE", ("index", "sentence1", "sentence2", "label"), 4, (1, 2), 3, ENTAILMENT,
                    GLUE_URL + "RTE.zip"),
    "stsb": GlueTask("STS-B", ("index", "genre", "filename", "year", "old_index", "source1", "source2",
                               "sentence1", "sentence2", "score"), 10, (7, 8), 9, None, GLUE_URL + "STS-B.zip"),
}


@dataclass(frozen=True)
class GlueExample:
    text_a: str
    text_b: str | None       # the second sentence of a pair; None for CoLA and SST-2
    label: int | float       # a class id, or the STS-B similarity score in [0, 5]


def glue_spec(task: str) -> GlueTask:
    if task not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[task]


def load_glue_split(task: str, path) -> list[GlueExample]:
    """Read one GLUE TSV file (train.tsv or dev.tsv) of `task`; sentences are stripped of outer spaces.

    A file that is missing, not UTF-8, empty, only a header, with another header, or with a bad
    row raises DataError naming the file, the line and what is expected."""
    spec, path = glue_spec(task), Path(path)
    with reading(path, DataError, f"expected the {spec.folder} TSV file of the GLUE release, in UTF-8"):
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # utf-8-sig drops MRPC's byte-order mark
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: file is empty; expected the {spec.folder} TSV file of the GLUE release")
    if spec.header is not None:
        header = tuple(lines[0].rstrip("\r").split("\t"))
        if header != spec.header:
            raise DataError(f"{path}: line 1: header {header}, but {task} files start with {spec.header}; "
                            f"is this the {spec.folder} file?")
    first = 1 if spec.header is None else 2
    examples = [_glue_example(path, task, number, line.rstrip("\r"))
                for number, line in enumerate(lines[first - 1:], start=first) if line.rstrip("\r")]
    if not examples:
        raise DataError(f"{path}: holds only the header line; expected one {task} example per line after it")
    return examples


def _glue_example(path, task: str, number: int, line: str) -> GlueExample:
    """One TSV line (number `number` of `path`), checked."""
    spec = GLUE_TASKS[task]
    cells = line.split("\t")
    if len(cells) != spec.n_columns:
        raise DataError(f"{path}: line {number}: {len(cells)} tab-separated columns, {task} rows have "
                        f"{spec.n_columns}; fix or remove the row (a tab inside a sentence?)")
    raw = cells[spec.label_column].strip()
    if spec.label_names is None:
        try:
            label = float(raw)
        except ValueError:
            label = math.nan
        if not 0 <= label <= 5:
            raise DataError(f"{path}: line {number}: score {raw!r} is not a number in [0, 5]")
    elif raw in spec.label_names:
        label = spec.label_names.index(raw)
    else:
        raise DataError(f"{path}: line {number}: label {raw!r}; {task} labels are {list(spec.label_names)}")
    texts = [cells[column].strip() for column in spec.text_columns]
    if not all(texts):
        raise DataError(f"{path}: line {number}: empty sentence in column {spec.text_columns[texts.index('')] + 1}")
    return GlueExample(texts[0], texts[1] if len(texts) == 2 else None, label)


# -----------------------------------------------------------------------------
# GLUE: tokenisation for a decoder


def encode_glue_examples(tokenizer, examples: list[GlueExample], sep_id: int, max_len: int) -> list[list[int]]:
    """Token ids of each example: sentence A, or for a pair sentence A, sep_id, sentence B.

    A pair longer than max_len loses tokens from the end of its longer sentence, one at a time (the
    'longest_first' truncation of the official scripts' tokenizer); a single sentence loses its end.
    """
    first = [encoding.ids for encoding in tokenizer.encode_batch([ex.text_a for ex in examples])]
    if examples[0].text_b is None:
        return [ids[:max_len] for ids in first]
    second = [encoding.ids for encoding in tokenizer.encode_batch([ex.text_b for ex in examples])]
    encoded = []
    for a, b in zip(first, second):
        while len(a) + 1 + len(b) > max_len:
            (a if len(a) > len(b) else b).pop()
        encoded.append(a + [sep_id] + b)
    return encoded


def collate_glue(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, label); labels become class ids (int64) or scores (float32)."""
    width = max(len(input_ids) for input_ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    labels = torch.tensor([label for _, label in batch])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -----------------------------------------------------------------------------
# GLUE: locating the files, downloading the official release when they are missing

GLUE_CACHE_DIR = Path.home() / ".cache" / "kasa" / "glue"
GLUE_SPLITS = ("train", "dev")

# MRPC is not in the GLUE zips (its licence). GLUE's download script takes the SentEval copy of the
# MSR Paraphrase Corpus training file and moves the pairs listed in mrpc_dev_ids.tsv to dev.tsv.
# Checksums: as recorded for these URLs by Hugging Face's `glue` dataset (dataset_infos.json).
MRPC_SOURCES = {
    "msr_paraphrase_train.txt": (
        "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
        "sha256:60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89"),
    "mrpc_dev_ids.tsv": (
        "https://dl.fbaipublicfiles.com/glue/data/mrpc_dev_ids.tsv",
        "sha256:971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7"),
}


def download_mrpc(target) -> Path:
    """Build MRPC's train.tsv and dev.tsv in `target` as GLUE's download script does; return target."""
    target, sources = Path(target), {}
    for name, (url, expected) in MRPC_SOURCES.items():
        content = fetch(url, name)
        if expected is not None:
            verify_checksum(name, content, expected)
        with reading(url, DataError, "run again, or pass --data-dir with MRPC's train.tsv and dev.tsv"):
            sources[name] = content.decode("utf-8")
    dev_ids = {tuple(line.strip().split("\t")) for line in sources["mrpc_dev_ids.tsv"].split("\n") if line.strip()}
    header, *rows = sources["msr_paraphrase_train.txt"].split("\n")
    splits = {"train": [header.strip()], "dev": [header.strip()]}  # the header keeps its byte-order mark, as GLUE's
    for number, row in enumerate(rows, start=2):
        if not row.strip():
            continue
        cells = row.strip().split("\t")
        if len(cells) != 5:
            raise DataError(f"{MRPC_SOURCES['msr_paraphrase_train.txt'][0]}: line {number}: {len(cells)} columns, "
                            "expected 5 (Quality, #1 ID, #2 ID, #1 String, #2 String); run again")
        splits["dev" if (cells[1], cells[2]) in dev_ids else "train"].append("\t".join(cells))
    for split, lines in splits.items():
        write_text_atomic(target / f"{split}.tsv", "\n".join(lines) + "\n")
    return target


def download_glue(task: str, cache_dir=GLUE_CACHE_DIR) -> Path:
    """Download one GLUE task's train.tsv and dev.tsv into cache_dir/<folder>; return that folder."""
    spec = glue_spec(task)
    target = Path(cache_dir) / spec.folder
    if spec.url is None:
        return download_mrpc(target)
    with open_zip(spec.url) as archive:
        for split in GLUE_SPLITS:
            member = f"{spec.folder}/{split}.tsv"
            if member not in archive.namelist():
                raise DataError(f"{spec.url}: the zip has no {member}; found {sorted(archive.namelist())}")
            extract_member(archive, member, target / f"{split}.tsv")
    return target


def resolve_glue_files(task: str, data_dir=None, cache_dir=GLUE_CACHE_DIR) -> dict[str, Path]:
    """Paths of a GLUE task's train.tsv and dev.tsv.

    data_dir given: data_dir/<folder> (e.g. DATA/glue/SST-2 for --data-dir DATA/glue), or data_dir itself when it
    is the task folder; no download. data_dir None: cache_dir/<folder>, downloaded on first use.
    """
    spec = glue_spec(task)
    if data_dir is None:
        folder = Path(cache_dir) / spec.folder
        if not all((folder / f"{split}.tsv").exists() for split in GLUE_SPLITS):
            download_glue(task, cache_dir)
    else:
        data_dir = Path(data_dir)
        folder = data_dir / spec.folder if (data_dir / spec.folder).is_dir() else data_dir
    paths = {split: folder / f"{split}.tsv" for split in GLUE_SPLITS}
    missing = [str(path) for path in paths.values() if not path.exists()]
    if missing:
        raise MissingDataError(f"GLUE {spec.folder} files not found: {missing}; point --data-dir at the folder "
                               f"holding {spec.folder}/train.tsv and dev.tsv, or leave it unset to download "
                               "the official release")
    return paths
