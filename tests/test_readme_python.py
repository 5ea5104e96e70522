"""README's "Reading a study ... from Python", run as written (on a finished tiny study
in place of `quick`), in a fresh interpreter from a folder holding `mlruns/`."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, copy_stores


def test_the_readme_python_snippet_runs_and_reads_the_study(finished, tmp_path):
    readme = (REPO / "README.md").read_text()
    [snippet] = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    snippet = snippet.replace('"quick"', '"tiny"').replace("quick.baseline", "tiny.baseline")
    copy_stores(finished, tmp_path / "mlruns")  # where `make` keeps a study's stores
    check = (
        "\nprint(len(finals), type(model).__name__, len(tuning.trials),"
        " sorted(finals['tags.role'].unique()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", snippet + check],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # The tiny study: 2 variants x 2 final seeds; the baseline tuned with 2 trials.
    assert done.stdout.strip().splitlines()[-1] == "4 SeedCNN 2 ['final']"
