"""Every error a user can cause derives from :class:`FeatureCacheError`.

The CLI turns each one into a one-line message and the exit code of its class in a
single place (``featurecache.cli.FcGroup.invoke``); library users catch the root class.
The codes: 2 for unusable input or options, 3 for a missing, locked, damaged or
inconsistent cache or run, 4 for the machine: a file that could not be written (a full
disk, a quota, a read-only file system, no permission). Raise a subclass: the root class
itself exits with 1, the code of an unexpected error.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatureCacheError(Exception):
    """Root of every error featurecache raises on purpose."""

    exit_code = 1


class InputError(FeatureCacheError):
    """What was asked for cannot be used: an option, the images, a name, a file (exit code 2)."""

    exit_code = 2


class StateError(FeatureCacheError):
    """A cache or run on disk is missing, locked, damaged or inconsistent (exit code 3)."""

    exit_code = 3


class HostError(FeatureCacheError):
    """The machine refused: no space left, over quota, a read-only file system, no permission (exit code 4)."""

    exit_code = 4


# The classes raised, by what went wrong; the exit code comes from the parent.
class UsageError(InputError):
    """An option or argument has a value that cannot be used (``--batch-size 0``, an unknown device)."""


class DataError(InputError):
    """The images or the dataset description cannot be used."""


class BackboneError(InputError):
    """Unknown backbone, weights, layer or preprocessing."""


class HeadError(InputError):
    """Unknown head, bad parameter grid or unusable split for fitting."""


class FinetuneError(InputError):
    """The network cannot be assembled or trained as asked."""


class PipelineError(InputError):
    """A pipeline file is malformed."""


class CacheError(StateError):
    """A feature cache is missing, incomplete, locked or inconsistent."""


class CacheLockedError(CacheError):
    """Another process is writing the same cache entry."""


class RunError(StateError):
    """A run directory is missing, broken or does not match its cache."""


class StorageError(HostError):
    """A file or folder could not be written; the message names the path and the free space."""


class FeatureCacheWarning(UserWarning):
    """Something the user should know that does not stop the work (shown as one line by the CLI)."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean: a, b?)"`` for the closest matches, or ``""``."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered and lowered in c.lower()][:n]
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``2 epochs``, ``2 batches``, ``1,000 images``."""
    ending = "es" if word.endswith(("s", "x", "sh", "tch")) else "s"  # batches, but epochs
    return f"{n:,} {word}{'' if n == 1 else ending}"
