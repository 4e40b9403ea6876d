"""The atomic swap of a snapshot: it is built in ``DIR.tmp-<pid>-<uuid>``
beside ``DIR`` and swapped in at the end (``renameat2(RENAME_EXCHANGE)`` where
the kernel has it, else two renames), so a killed or failed export leaves the
previous snapshot as it was; leftovers of killed exports are removed by the
next export to the same folder. Data files are not fsynced: the swap protects
against a killed process, not against losing power."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import uuid
from pathlib import Path

from ..errors import MetabatchError
from .manifest import MANIFEST

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def swap_in(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out``, replacing what is there; the old one is removed."""
    if not out.exists():
        os.replace(new, out)
        return
    if _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old snapshot
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(out: Path) -> None:
    """Remove the build folders of exports to ``out`` that were killed."""
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-(\d+)-[0-9a-f]+$")
    for sibling in out.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and sibling.is_dir() and not _pid_alive(int(match.group(2))):
            shutil.rmtree(sibling, ignore_errors=True)


def check_out_folder(out: Path) -> None:
    """Refuse to replace a folder that is not a snapshot (a typo must not delete data)."""
    if out.exists():
        if not out.is_dir():
            raise MetabatchError(f"`{out}` exists and is not a folder", "choose another --out")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise MetabatchError(
                f"`{out}` exists and is not a metabatch snapshot (no {MANIFEST})",
                "choose another --out, or empty the folder first",
            )
    elif not out.parent.is_dir():
        raise MetabatchError(f"the folder `{out.parent}` does not exist", "create it first")


def new_build_folder(out: Path) -> Path:
    """A new, empty folder beside ``out`` to build a snapshot in."""
    build = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    build.mkdir()
    return build
