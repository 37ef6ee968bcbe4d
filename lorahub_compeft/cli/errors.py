"""The one error handler's triage: a known failure becomes one message naming the problem and
the fix, printed whole (a message that lists its problems keeps its list)."""
from __future__ import annotations

import errno
import pickle
import re
import select
import sys

from lorahub_compeft.io.adapters import AdapterError, HubOfflineError


def _is_connection_error(err: BaseException) -> bool:
    """The Hub could not be reached (offline, or HF_HUB_OFFLINE=1 with nothing cached)."""
    if isinstance(err, BrokenPipeError):  # a ConnectionError too, but about our own output
        return False
    names = {t.__name__ for t in type(err).__mro__}
    text = str(err)
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                         "HFValidationError"}) or "huggingface.co" in text \
        or "couldn't connect" in text.lower() or "offline" in text.lower()


def _disk_full(err: BaseException) -> str | None:
    """When `err` says the disk is full: the file being written, as " (writing FILE)", or ""
    if unknown; else None. safetensors says it in its message only ("... (os error 28)")."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f" (writing {err.filename})" if err.filename else ""
    if type(err).__name__ == "SafetensorError" and \
            re.search(rf"os error ({errno.ENOSPC}|{errno.EDQUOT})\b", str(err)):
        return ""
    return None


def stdout_closed() -> bool:
    """Whether nobody reads our output any more (`... | head -1` after head has exited)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured)
        return False


def error_message(err: BaseException, args) -> str | None:
    """The message, naming the problem and the fix, for a known failure, else None."""
    whole = str(err).strip() or type(err).__name__
    first = whole.splitlines()[0]  # of a foreign message, only its first line fits inside ours
    if isinstance(err, KeyboardInterrupt):
        return "interrupted; nothing half-written was kept (every output is written atomically)"
    if isinstance(err, pickle.UnpicklingError):
        return ("a weights file holds pickled objects, which are never run or loaded; use a "
                "model or adapter saved as safetensors (save_pretrained(safe_serialization=True))")
    if isinstance(err, (AdapterError, HubOfflineError)):  # ours, naming what failed: as it is
        return whole
    if args is not None and getattr(args, "command", None) == "bbh" and \
            not getattr(args, "bbh_dir", None) and _is_connection_error(err):
        return ("cannot download Big-Bench Hard from the Hugging Face Hub (offline?); point at "
                "local files with --bbh-dir DIR (or LORAHUB_COMPEFT_BBH_DIR), a folder of BBH "
                "<task>.json files")
    if _is_connection_error(err):
        model = getattr(args, "model", None)
        what = f"model {model!r}" if model else "a model or adapter"
        return (f"cannot load {what} from the Hugging Face Hub or its cache ({first}); pass a "
                "local folder (e.g. --model path/to/model), or connect and retry")
    full = _disk_full(err)
    if full is not None:
        return (f"no space left on the device{full}; free some space or write elsewhere "
                "(nothing half-written was kept)")
    if type(err).__name__ == "SafetensorError":  # safetensors' one type for every I/O failure
        return f"a safetensors file could not be read or written ({first})"
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({first})"
    if isinstance(err, (ValueError, FileExistsError, FileNotFoundError, IsADirectoryError,
                        NotADirectoryError, PermissionError)):
        return whole if not isinstance(err, OSError) or not err.filename else \
            f"{err.filename}: {err.strerror or whole}"
    if isinstance(err, (OSError, RecursionError, MemoryError)):
        return f"{type(err).__name__}: {whole}"
    return None
