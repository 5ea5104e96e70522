"""Files written whole or not at all: through a temporary file beside the target, then
renamed over it, so a killed or failed write (no space left, a read-only folder) leaves
the file as it was, never a cut one that the next run takes for finished."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Floats in a CSV to 10 significant digits: 0.9611, not 0.9611000000000001.
CSV_FLOATS = "%.10g"


def write_atomic(path: Path, payload: bytes | str) -> None:
    path = Path(path)
    data = payload.encode() if isinstance(payload, str) else payload
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these files are for everyone
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
