"""The project's errors, and the one place a command line turns them into `error: ...`.

A bad flag, a missing file or a corrupt checkpoint is the user's to fix: we raise one of the errors
below with the problem and the fix, and the command line prints `error: <message>` to stderr and
exits 2 (argparse's convention), with no traceback. Any other exception is a bug and keeps its
traceback. `--debug` (or KASA_DEBUG=1) shows the traceback of every error.

kasa.py stays self-contained (torch only), so it has its own `kasa.KaSAError`; the command lines
treat it as a user error too.
"""
import contextlib
import errno
import json
import os
import sys
import traceback
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it.

    ConfigError, DataError and CheckpointError are ValueErrors too, so code that caught the
    ValueError these checks used to raise still catches them."""


class ConfigError(UserError, ValueError):
    """A flag or setting out of its range, or settings that do not fit together."""


class DataError(UserError, ValueError):
    """A data file that is missing, empty, malformed or not UTF-8."""


class CheckpointError(UserError, ValueError):
    """A model or training checkpoint that is missing, truncated, corrupt or of another run."""


class OutputError(UserError, OSError):
    """A file that cannot be written: no space left, a read-only directory, no permission.

    An OSError too, as the failed write it reports, so code that caught that OSError still does."""


class LossNotFinite(UserError, FloatingPointError):
    """The loss became NaN or infinite: the settings (lr, precision) are the user's to change."""


def describe_os_error(error: OSError) -> str:
    """'no space left on device' rather than '[Errno 28] No space left on device: ...'."""
    reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOENT: "no such file or directory",
               errno.EISDIR: "is a directory", errno.ENOTDIR: "not a directory"}
    return reasons.get(error.errno, error.strerror or str(error)).lower()


@contextlib.contextmanager
def reading(path, error: type = DataError, fix: str = ""):
    """Wrap the library errors of reading `path` into `error`, naming the file and the fix.

        with errors.reading(path, CheckpointError, "delete it, or point --out-dir elsewhere"):
            state = torch.load(path, weights_only=True)

    Only the exceptions a bad file can raise are wrapped (OS errors, decoding errors, and the
    ValueError / RuntimeError / EOFError that json, safetensors, tokenizers and torch.load raise on
    a corrupt file); our own UserErrors pass through unchanged.
    """
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as e:
        raise error(f"{path} does not exist{'; ' + fix if fix else ''}") from e
    except OSError as e:
        raise error(f"cannot read {path}: {describe_os_error(e)}{'; ' + fix if fix else ''}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}){'; ' + fix if fix else ''}") from e
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
                    f"{'; ' + fix if fix else ''}") from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - json, safetensors, tokenizers and torch.load each have their own
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"cannot read {path}: it is corrupt, truncated or of the wrong kind ({reason[:200]})"
                    f"{'; ' + fix if fix else ''}") from e


@contextlib.contextmanager
def users_files(error: type, what: str):
    """The OSError / ValueError of a missing or malformed model or data file, as `error` (ours pass)."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise error(f"{what} ({type(e).__name__}: {e})") from e


def user_errors() -> tuple:
    """The exception types the command lines report as `error: ...` (ours and kasa.py's)."""
    import kasa
    return (UserError, getattr(kasa, "KaSAError", UserError))


def run_cli(main, argv=None):
    """Run `main(argv)`; report a user error as `error: ...` on stderr and exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("KASA_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        return main(argv)
    except user_errors() as e:
        if debug:
            traceback.print_exc()
        prog = Path(sys.argv[0]).name
        print(f"{prog}: error: {e}", file=sys.stderr)
        if not debug:
            print(f"{prog}: (run with --debug or KASA_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
