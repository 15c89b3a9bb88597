"""The documentation against what it documents: result tables, flags, paths, the front page's size."""
import re
import subprocess
import sys

from conftest import REPO

DOCS = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def markdown_tables(text: str) -> list[str]:
    """Each block of consecutive lines starting with '|', as one string."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            tables.append("\n".join(block))
            block = []
    return tables


def test_markdown_tables_are_split_into_blocks():
    text = "intro\n| a | b |\n|---|---|\n| 1 | 2 |\n\ntext\n| c |\n"
    assert markdown_tables(text) == ["| a | b |\n|---|---|\n| 1 | 2 |", "| c |"]


def test_result_tables_are_the_generated_reports_byte_for_byte():
    """bench/README.md shows the sweeps' tables as bench/results/**/*.md has them, so regenerating a
    report without updating the write-up fails here."""
    generated = {table for report in (REPO / "bench" / "results").rglob("*.md")
                 for table in markdown_tables(report.read_text(encoding="utf-8"))}
    shown = markdown_tables((REPO / "bench" / "README.md").read_text(encoding="utf-8"))
    assert shown, "bench/README.md has no result tables"
    missing = [table.splitlines()[2] for table in shown if table not in generated]
    assert not missing, f"tables in bench/README.md that no report in bench/results/ has (first data rows): {missing}"


def test_docs_name_no_path_of_the_build_environment():
    pattern = re.compile(r"/work/|\.\./shared|shared store|/tmp/")
    hits = [f"{doc.relative_to(REPO)}:{n}: {line.strip()}" for doc in DOCS
            for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_front_page_stays_short():
    assert len((REPO / "README.md").read_bytes()) <= 12_000


def test_flags_in_the_docs_exist():
    """Every --flag the front page and docs/ mention is one that train.py or eval.py accepts."""
    helps = "".join(subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                                   text=True, check=True).stdout for script in ("train.py", "eval.py"))
    accepted = set(re.findall(r"--[a-z][a-z0-9-]*", helps))
    accepted |= {"--" + flag for flag in re.findall(r"--\[no-\]([a-z][a-z0-9-]*)", helps)}
    accepted |= {"--no-" + flag for flag in re.findall(r"--\[no-\]([a-z][a-z0-9-]*)", helps)}
    others = {"--debug", "--nproc_per_node", "--no-deps"}  # run_cli's, torchrun's and pip's
    docs = [doc for doc in DOCS if doc.parent.name != "bench"]  # bench/README.md: the bench scripts' flags
    mentioned = {flag for doc in docs for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*",
                                                              doc.read_text(encoding="utf-8"))}
    unknown = sorted(mentioned - accepted - others)
    assert not unknown, f"flags the docs mention that train.py and eval.py do not accept: {unknown}"
