"""Output directories: replaced only when ann2snn wrote them, and written by one run at a time (POSIX).

Every output directory ann2snn writes holds a marker file, `.ann2snn-output`. The marker records what wrote the
directory and lists the files written there. `force` replaces a directory only when its marker lists every entry
in it. A directory without a marker, or one that holds anything else, is refused with the reason. (`export` adds
the files it writes into an existing directory to that list, and creates the marker if there is none.)

A run claims its output before any work. It creates `.<name>.partial` beside the output, with the marker in it,
and holds an exclusive lock (flock) on that directory for as long as it runs. It writes its files there, and
`commit` then renames the claim into the output's place. A second run for the same output finds the claim and
is refused, and the message names the process that holds it. The kernel releases a process's locks when it
ends, even when it is SIGKILLed. So a claim whose lock can be taken was left by a run that has ended: the next
run takes it over and clears it. On a file system that cannot lock, such a claim cannot be proven abandoned. It
is then refused and named, so that the user can remove it."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ann2snn.errors import ConversionWarning
from ann2snn.io.atomic import atomic_write

MARKER = ".ann2snn-output"
MARKER_FORMAT = "ann2snn-output"
MARKER_VERSION = 1
_CLAIM_SUFFIX = ".partial"
_LISTED_ENTRIES = 5


class OutputRefused(ValueError):
    """An output that cannot be written, or must not be replaced. Nothing has been changed."""


# ---------------------------------------------------------------------------------------------------
# The marker


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of a directory that ann2snn wrote. None when the directory has no marker, or has one that
    ann2snn did not write."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT and isinstance(marker.get("files"), list):
        return marker
    return None


def _write_marker(directory: Path, written_by: str, files: Sequence[str] = ()) -> None:
    marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "written_by": written_by,
              "host": socket.gethostname(), "pid": os.getpid(),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": sorted(files)}
    atomic_write(directory / MARKER, (json.dumps(marker, indent=1) + "\n").encode())


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED_ENTRIES])
    return shown + (f" and {len(names) - _LISTED_ENTRIES} more" if len(names) > _LISTED_ENTRIES else "")


def _not_written_by_us(directory: Path, marker: dict[str, Any]) -> list[str]:
    """The entries of `directory` that its marker does not list as ann2snn's. A listed name that is no longer
    a plain file counts too."""
    listed = set(marker["files"])
    return sorted(entry.name + "/" * entry.is_dir() for entry in directory.iterdir()
                  if entry.name != MARKER and not (entry.name in listed and _is_plain_file(entry)))


# ---------------------------------------------------------------------------------------------------
# What may be replaced


def _holds(directory: Path, path: Path) -> bool:
    return path == directory or directory in path.parents


def _refusal(out: Path, shown: Path, force: bool, inputs: Sequence[Path]) -> str | None:
    """Why `out` (given as `shown`) cannot be written, or cannot be replaced whole; None when it can."""
    if out.is_symlink():
        return f"output path {shown} is a symbolic link; give the directory itself, or choose another --out"
    resolved = out.resolve()
    if _holds(resolved, Path.cwd().resolve()):
        return (f"output directory {shown} is the current directory or holds it, and ann2snn replaces its output "
                "directory whole; choose a directory of its own, e.g. --out NAME")
    for path in inputs:
        if _holds(resolved, Path(path).resolve()):
            return f"output directory {shown} holds {path}, which this run reads; choose another --out"
    if not out.exists():
        return None
    if not out.is_dir():
        return f"output path {shown} exists and is not a directory; choose another --out"
    if os.path.ismount(out):
        return (f"output directory {shown} is a mount point, and ann2snn replaces its output directory whole by "
                "renaming it, which a mount point cannot be; choose a directory inside it")
    marker = read_marker(out) or ({"files": []} if not any(out.iterdir()) else None)
    if marker is None:
        return (f"output directory {shown} already exists and was not written by ann2snn (it has no {MARKER} "
                "marker); ann2snn replaces only its own outputs, even with --force: choose another --out")
    foreign = _not_written_by_us(out, marker)
    if foreign:
        return (f"output directory {shown} holds {_listing(foreign)}, which ann2snn did not write; ann2snn "
                "replaces only its own outputs, even with --force: move them, or choose another --out")
    if not force:
        return f"output directory {shown} already exists; pass --force to replace it"
    return None


def check_files_replaceable(directory: Path, names: Sequence[str], force: bool) -> None:
    """Before `names` are written into `directory`: refuse to replace any file that exists, unless `force` is
    given and the directory's marker lists that file as ann2snn's."""
    existing = [name for name in names if (directory / name).exists() or (directory / name).is_symlink()]
    if (directory / MARKER).exists() and read_marker(directory) is None:
        raise OutputRefused(f"{directory / MARKER} was not written by ann2snn; choose another --out")
    if not existing:
        return
    if not force:
        raise OutputRefused(f"{_listing(existing)} already exist{'s' * (len(existing) == 1)} in {directory}; pass "
                            "--force to replace them, or choose another --out")
    marker = read_marker(directory)
    listed = set(marker["files"]) if marker is not None else set()
    foreign = [name for name in existing if name not in listed or not _is_plain_file(directory / name)]
    if foreign:
        one = len(foreign) == 1
        why = f"its {MARKER} does not list {'it' if one else 'them'}" if marker else f"it has no {MARKER} marker"
        raise OutputRefused(f"{_listing(foreign)} in {directory} {'was' if one else 'were'} not written by ann2snn "
                            f"({why}); ann2snn replaces only its own files, even with --force: choose another --out")


def record_files(directory: Path, names: Sequence[str], written_by: str) -> None:
    """Add `names`, just written into `directory`, to the files that its marker lists as ann2snn's. Creates the
    marker if the directory has none."""
    marker = read_marker(directory)
    if marker is None:
        _write_marker(directory, written_by, names)
    else:
        atomic_write(directory / MARKER, (json.dumps({**marker, "files": sorted({*marker["files"], *names})},
                                                     indent=1) + "\n").encode())


# ---------------------------------------------------------------------------------------------------
# Claims


def _lock(fd: int, wait: bool) -> bool | None:
    """Take the exclusive lock of the directory open as `fd`. False while another process holds it; None when
    this file system cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _still_at(fd: int, path: Path) -> bool:
    """Whether `path` still names the directory open as `fd`. Its holder may have renamed or removed it
    before it let go of the lock."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino)


def _lock_if_abandoned(path: Path) -> tuple[int | None, bool | None]:
    """For the directory at `path`, left by a run: an open fd that holds its lock if that run has ended, and
    else None. The second value is what `_lock` said (False: the run is alive; None: the file system cannot
    tell)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None, False
    locked = _lock(fd, wait=False)
    if locked and _still_at(fd, path):
        return fd, True
    os.close(fd)
    return None, locked


def _unwritable(shown: Path, where: Path, error: OSError) -> OutputRefused:
    return OutputRefused(f"cannot write output directory {shown}: {error.strerror} ({where}); choose another --out")


def _busy(shown: Path, claim: Path, locked: bool | None) -> str:
    marker = read_marker(claim)
    if marker is None:
        return (f"output directory {shown} is claimed by {claim}, which was not made by ann2snn; remove it, or "
                "choose another --out")
    holder = (f"process {marker.get('pid')} on {marker.get('host')} ({marker.get('written_by')}, since "
              f"{marker.get('time')})")
    if locked is None:  # no lock to tell a live run from a dead one
        return (f"output directory {shown} is claimed by {holder} in {claim}, and this file system cannot tell "
                f"whether that run is still alive; if it has ended, remove {claim}; else choose another --out")
    return (f"output directory {shown} is being written by another run, {holder}; wait for it to end, or choose "
            "another --out")


class OutputClaim:
    """An output directory claimed by this process (see the module docstring). Write the files into
    `directory`, then `commit()` puts them in place of `out`. Until then, a previous `out` stays as it was."""

    def __init__(self, out: Path, shown: Path, force: bool, written_by: str, directory: Path, fd: int | None,
                 made: list[Path]) -> None:
        self.out, self.shown, self.force, self.written_by, self.directory = out, shown, force, written_by, directory
        self._fd = fd  # holds the lock; None where the file system cannot lock
        self._made = made  # the missing parents made for the claim, removed again if it is given up
        self._committed = False

    def commit(self) -> list[str]:
        """Put the claimed directory in place of the output, and return the names of the files in it. A
        previous output is replaced only now, after a last check that it is still ann2snn's."""
        files = sorted(entry.name for entry in self.directory.iterdir() if entry.name != MARKER)
        _write_marker(self.directory, self.written_by, files)
        refusal = _refusal(self.out, self.shown, self.force, ())  # the output may have changed during the run
        if refusal is not None:
            raise OutputRefused(refusal)
        if self.out.exists():
            retired = self.out.parent / f".{self.out.name}.old-{secrets.token_hex(4)}"
            self.out.rename(retired)
            try:
                self.directory.rename(self.out)
            except BaseException:  # Ctrl-C between the two renames included: put the previous output back
                retired.rename(self.out)
                raise
            shutil.rmtree(retired)
        else:
            self.directory.rename(self.out)
        self._committed = True
        return files

    def release(self) -> None:
        """Give the claim up. Without a commit, everything the claim made is removed."""
        if not self._committed:
            shutil.rmtree(self.directory, ignore_errors=True)
            _remove_empty(self._made)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _make_missing(directory: Path, shown: Path) -> list[Path]:
    """Make `directory` and its missing parents. Returns those made, outermost first."""
    missing = []
    while not directory.exists() and not directory.is_symlink():
        missing.append(directory)
        directory = directory.parent
    if not missing and not directory.is_dir():
        raise _unwritable(shown, directory, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    made: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            made.append(path)
    except OSError as error:
        _remove_empty(made)
        raise _unwritable(shown, directory, error) from error
    return made


def _remove_empty(made: list[Path]) -> None:
    for path in reversed(made):
        try:
            path.rmdir()
        except OSError:  # no longer empty: something else writes there now
            return


def _remove_abandoned_attempts(out: Path, shown: Path) -> None:
    """Remove the directories that runs which ended left while they claimed `out` (see `_take`). A directory
    is removed only if it holds ann2snn's marker."""
    prefix = f".{out.name}{_CLAIM_SUFFIX}-"
    try:
        leftovers = [entry for entry in out.parent.iterdir() if entry.name.startswith(prefix)]
    except OSError as error:
        raise _unwritable(shown, out.parent, error) from error
    for leftover in leftovers:
        fd, _ = _lock_if_abandoned(leftover)
        if fd is None:
            continue
        try:
            if read_marker(leftover) is not None:
                shutil.rmtree(leftover)
        finally:
            os.close(fd)


def _take_over(claim: Path, fd: int, shown: Path, written_by: str) -> tuple[int, Path]:
    """Take over the claim of a run that ended, once it is proven to be ann2snn's, and clear it."""
    left = read_marker(claim)
    if left is None:
        os.close(fd)
        raise OutputRefused(_busy(shown, claim, True))
    # The new marker first: a claim is never empty, so that no other run can rename its own claim over it.
    _write_marker(claim, written_by)
    for entry in claim.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    warnings.warn(f"{claim}: left by an ann2snn run that ended (process {left.get('pid')} on {left.get('host')}, "
                  f"{left.get('written_by')}, since {left.get('time')}); its partial outputs were removed",
                  ConversionWarning, stacklevel=2)
    return fd, claim


def _take(out: Path, shown: Path, written_by: str) -> tuple[int | None, Path]:
    """Claim `out`: the fd that holds the claim's lock (None where the file system cannot lock), and the
    claim's directory."""
    claim = out.parent / f".{out.name}{_CLAIM_SUFFIX}"
    fd, locked = _lock_if_abandoned(claim)
    if fd is not None:
        return _take_over(claim, fd, shown, written_by)
    if claim.exists() or claim.is_symlink():
        raise OutputRefused(_busy(shown, claim, locked))
    # The claim appears complete, marker and lock included, by one rename. A rename onto a directory that is
    # not empty fails, so only one run can make it.
    attempt = out.parent / f".{out.name}{_CLAIM_SUFFIX}-{secrets.token_hex(4)}"
    try:
        attempt.mkdir()
    except OSError as error:
        raise _unwritable(shown, out.parent, error) from error
    fd = os.open(attempt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Wait for the lock: another run that is checking whether this attempt was abandoned lets go at once.
        if not _lock(fd, wait=True):
            os.close(fd)
            fd = None
        _write_marker(attempt, written_by)
        os.rename(attempt, claim)
    except BaseException as error:
        shutil.rmtree(attempt, ignore_errors=True)
        if fd is not None:
            os.close(fd)
        if isinstance(error, OSError) and error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputRefused(_busy(shown, claim, False)) from error
        raise
    return fd, claim


def claim_output(out: str | Path, *, force: bool = False, written_by: str = "ann2snn",
                 inputs: Sequence[str | Path] = ()) -> OutputClaim:
    """Claim the output directory `out` for this process, before any work. It is refused (OutputRefused) when
    it cannot be written, when it exists and `force` is not given, when it exists and is not ann2snn's alone,
    when it holds the current directory or one of the `inputs` this run reads, or when another run has claimed
    it. Prefer `claimed_output`, which also gives the claim up."""
    shown = Path(out)
    out = Path(os.path.abspath(shown))
    refusal = _refusal(out, shown, force, [Path(path) for path in inputs])
    if refusal is not None:
        raise OutputRefused(refusal)
    made = _make_missing(out.parent, shown)
    try:
        _remove_abandoned_attempts(out, shown)
        fd, directory = _take(out, shown, written_by)
    except BaseException:
        _remove_empty(made)
        raise
    return OutputClaim(out, shown, force, written_by, directory, fd, made)


@contextmanager
def claimed_output(out: str | Path, *, force: bool = False, written_by: str = "ann2snn",
                   inputs: Sequence[str | Path] = ()) -> Iterator[OutputClaim]:
    """`claim_output`, given up when the block ends. Without `commit()`, nothing is left behind (see
    `OutputClaim`)."""
    claim = claim_output(out, force=force, written_by=written_by, inputs=inputs)
    try:
        yield claim
    finally:
        claim.release()
