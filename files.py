"""Atomic files: a crash, a kill or a full disk never leaves half a file where a good one was.

Every file the project writes goes through `write_atomic`: the content goes to a temporary file
beside the target, is flushed to disk, and only then renamed over the target (`os.replace` is
atomic on POSIX and Windows). If anything fails, the temporary file is removed, the old file stays
as it was, and the error names the path and the cause (no space left, read-only, ...).
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from errors import OutputError, describe_os_error


def _output_error(path: Path, error: BaseException) -> OutputError:
    if isinstance(error, OSError):
        cause = describe_os_error(error)
    else:  # torch.save reports a failed write as a RuntimeError ("unexpected pos") with no errno
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        cause = "no space left on device" if free is not None and free < (1 << 20) else str(error).splitlines()[0]
    fix = "free some space, or choose another --out-dir" if "space" in cause or "quota" in cause else \
        "make the directory writable, or choose another --out-dir"
    return OutputError(f"cannot write {path}: {cause}; {fix} (the previous file, if any, is unchanged)")


def write_atomic(path, write: Callable[[object], None], binary: bool = True) -> Path:
    """Call write(file) on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _output_error(path, e) from e
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, OutputError):  # OutputError: says it already
            raise _output_error(path, e) from e
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text), binary=False)


def save_torch_atomic(obj, path) -> Path:
    import torch
    return write_atomic(path, lambda f: torch.save(obj, f))


def save_safetensors_atomic(tensors: dict, path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save
    blob = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, metadata=metadata)
    return write_atomic(path, lambda f: f.write(blob))


def make_out_dir(out_dir) -> Path:
    """Create a run's --out-dir, and remove the temporary files a killed run left there (write_atomic's)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create --out-dir {out_dir}: {describe_os_error(e)}") from e
    for leftover in out_dir.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()
    return out_dir


class DirectoryInUse(OutputError, FileExistsError):
    """out_dir is a file, or a directory with files of its own: write_dir_atomic does not replace it."""


def write_dir_atomic(out_dir, file_names: tuple, write: Callable[[Path], None]) -> Path:
    """Call write(directory) on a fresh directory beside out_dir, then move it into place.

    A crash leaves either the old directory or the new one, never half of one. An existing out_dir
    is replaced only if it holds nothing but `file_names` (so a run directory is never lost)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DirectoryInUse(f"{out_dir} is a file: export into a directory")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in file_names) if out_dir.exists() else []
    if foreign:
        raise DirectoryInUse(f"{out_dir} exists and holds other files ({', '.join(foreign[:5])}); "
                             f"export into a new or empty directory, e.g. {out_dir / 'export'}")
    tmp, old = (out_dir.with_name(f".{out_dir.name}.{suffix}{os.getpid()}") for suffix in ("tmp", "old"))
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for leftover in (tmp, old):  # from a crashed export
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise _output_error(out_dir, e) from e
    try:
        write(tmp)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise _output_error(out_dir, e) from e
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
