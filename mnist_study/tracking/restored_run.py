"""Tunings restored from a page's published raw runs (`run --restore`), kept in MLflow:
one `restored` run per file restored, holding the rows it restored (STUDY-runs.csv and
STUDY-curves.csv) as artifacts, from which the report reads them back beside the
study's own runs."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from mnist_study.tracking.names import NOTE_TAG, Role

SHA_TAG = "restored_sha256"  # the published file's sha256: one restored run per file


def log_restored(
    tracking_uri: str, experiment_id: str, files: list[Path], sha256: str, note: str, command: str
) -> str:
    """The restored run of the file whose sha256 is given, created once (found again on a
    rerun that a kill interrupted, its artifacts written again), then FINISHED."""
    client = MlflowClient(tracking_uri)
    found = client.search_runs(
        [experiment_id],
        f"tags.role = '{Role.RESTORED}' and tags.{SHA_TAG} = '{sha256}'",
        max_results=1,
    )
    if found and found[0].info.status == "FINISHED":
        return found[0].info.run_id
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {"role": Role.RESTORED, SHA_TAG: sha256, NOTE_TAG: note}
        tags |= {"mlflow.source.name": command, "mlflow.source.type": "LOCAL"}
        run_id = client.create_run(experiment_id, run_name="restored", tags=tags).info.run_id
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def restored_files(tracking_uri: str, experiment_id: str, into: Path) -> list[tuple[str, Path]]:
    """(note, runs CSV downloaded under `into`, its curves beside it) of each finished
    restored run of the experiment, oldest first."""
    client = MlflowClient(tracking_uri)
    found = client.search_runs(
        [experiment_id],
        f"tags.role = '{Role.RESTORED}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    out = []
    for run in found:
        folder = into / run.info.run_id
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(folder), tracking_uri=tracking_uri
        )
        (runs_csv,) = folder.glob("*-runs.csv")
        out.append((run.data.tags.get(NOTE_TAG, ""), runs_csv))
    return out
