"""`mnist-study ui` as a new user meets it: headless Chromium from a clean profile opens
the bare address, then clicks its way to the study, a cell and a final seed. Every page
must be MLflow's model-training mode (MLflow 3.17 defaults a new browser to GenAI), the
study must open on its cells' numbers, and a final run must list its model."""

from __future__ import annotations

import subprocess
import time

import pytest
from browser import CHROMIUM, Browser
from helpers import answers, command, copy_of, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian's; .ci/run installs it)"),
]
# GenAI mode's sidebar entries and its pop-up.
GENAI_ONLY = ("MCP registry", "Detect Issues", "Judges", "Evaluation runs")


@pytest.fixture
def ui(finished, tmp_path):
    _, tracking, _ = copy_of(finished, tmp_path)
    port = free_port()
    server = subprocess.Popen(
        command("ui", "--tracking-uri", tracking, "--port", str(port)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{port}/"
    try:  # the server is stopped however the test ends, a failed start included
        answers(server, address + "health")  # MLflow answers through the layer
        browser = Browser(tmp_path / "profile")
        try:
            yield browser, address
        finally:
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def model_training(page: str) -> None:
    shown = [word for word in GENAI_ONLY if word in page]
    assert not shown, f"GenAI mode's {shown} on the page"


def test_every_page_a_click_reaches_from_the_bare_address_is_model_training(ui):
    browser, address = ui
    browser.open(address)  # what a bookmark of the port opens
    front = browser.wait_for("tiny", "Model registry")
    model_training(front)
    assert browser.local_storage()["mlflow.workflowType_v1"] == '"machine_learning"'

    browser.click("tiny")  # the study, from the front page's list
    study = browser.wait_for("Run Name", "baseline", "batchnorm", "2 matching runs")
    model_training(study)
    assert "workflowType=machine_learning" in browser.url()
    # Its cells, best first, their numbers as columns (the study's saved view).
    assert "Sort: test_acc_mean" in study
    for column in ("test_acc_mean", "test_acc_mean_lo95", "test_acc_mean_up95", "best_lr"):
        assert column in study, column

    browser.click("baseline")  # a cell's run lists its trials and seeds
    browser.wait_for("Child runs", "baseline/seed-0", "baseline/trial-0")
    browser.click("baseline/seed-0")  # a final seed
    final = browser.wait_for("Parent run", "accuracy/test", "Logged models (1)")
    model_training(final)
    deadline = time.time() + 60  # the models' rows come with a request of their own
    while "Ready" not in (listed := browser.text().split("Logged models (1)")[-1][:300]):
        assert time.time() < deadline, f"the run's logged model is not listed Ready: {listed}"
        time.sleep(0.5)

    browser.click("Model metrics", tag="button")  # its curves
    curves = browser.wait_for(
        "baseline/seed-0 (accuracy/train)", "baseline/seed-0 (accuracy/validation)"
    )
    model_training(curves)
    assert "/model-metrics" in browser.url()

    # Back on the study, its search box cleared as a person would: every run, sort kept.
    browser.open(address)
    browser.click("tiny")
    browser.wait_for("Sort: test_acc_mean", "2 matching runs")
    box = "[...document.querySelectorAll('input')].find(e => e.value.includes('role'))"
    assert browser.eval(f"(() => {{ const i = {box}; i.focus(); i.select(); return i.value; }})()")
    browser.press("Backspace", 8)
    browser.press("Enter", 13)
    cleared = browser.wait_for("Sort: test_acc_mean", "10 matching runs")
    model_training(cleared)


def test_a_users_own_choice_of_genai_mode_is_kept(ui):
    browser, address = ui
    browser.open(address)
    browser.wait_for("tiny", "Model registry")
    browser.eval("localStorage.setItem('mlflow.workflowType_v1', '\"genai\"')")
    browser.open(address + "#/experiments")
    browser.eval("location.reload()")
    browser.wait_for("tiny", "MCP registry")  # GenAI's sidebar: the layer did not undo it
