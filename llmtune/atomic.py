"""Folders that appear complete or not at all: build next to the target, then rename."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a staging folder on the target's filesystem; when the block succeeds it becomes `target`.

    replace=True swaps an existing target out whole (re-running a merge or publish is safe);
    replace=False keeps a target another process finished first (shared caches). On error nothing is left.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            try:
                staging.rename(target)
            except OSError:  # another process renamed its complete copy into place first
                if not target.exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
