"""The report inside MLflow: a `report` run holding the comparison, the figures on each
cell's parent run, and the experiment's description linking to them."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from mnist_study.tracking.names import NOTE_TAG, Role, ui_link

REPORT_LINK = "Comparison (tables, verdicts, figures):"
# MLflow keeps at most 8,000 characters of a tag; the description shows what fits.
DESCRIPTION_CHARS = 7_500


def log_report_run(tracking_uri: str, study: str, folder: Path, body: str, command: str) -> str:
    """The comparison inside MLflow: one run of the study's experiment, role `report`,
    holding the report's Markdown, CSV and figures as artifacts and the report as its
    description (which the UI renders); the experiment's description links to it. Run
    again, it is updated in place, never duplicated."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    found = client.search_runs(
        [experiment.experiment_id], f"tags.role = '{Role.REPORT}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
    else:
        source = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL"}
        run = client.create_run(
            experiment.experiment_id, run_name="report", tags={"role": Role.REPORT, **source}
        )
        run_id = run.info.run_id
    note = body
    if len(note) > DESCRIPTION_CHARS:
        note = note[:DESCRIPTION_CHARS].rsplit("\n\n", 1)[0] + "\n\n(continued in results.md)"
    client.set_tag(run_id, NOTE_TAG, note)
    for path in sorted(folder.iterdir()):
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    description = experiment.tags.get(NOTE_TAG, "").split(f"\n\n{REPORT_LINK}")[0]
    link = ui_link(experiment.experiment_id, f"runs/{run_id}")
    client.set_experiment_tag(
        experiment.experiment_id,
        NOTE_TAG,
        f"{description}\n\n{REPORT_LINK} [the `report` run]({link}).",
    )
    return run_id


def log_figures(tracking_uri: str, parent_ids: list[str], paths: list[Path]) -> None:
    """The report's figures on every cell's parent run, under `report/`."""
    client = MlflowClient(tracking_uri)
    for run_id in parent_ids:
        for path in paths:
            client.log_artifact(run_id, str(path), "report")
