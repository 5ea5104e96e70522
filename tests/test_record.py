"""The study's record: the tags a study writes on its experiment, and a resume compared
with them in one place (StudyRecord.check_resume)."""

from __future__ import annotations

import pytest

from mnist_study.errors import SpecError, StoresDisagree
from mnist_study.study.record import NoStudy, Resume, StudyRecord
from mnist_study.study.spec_file import parse_spec
from mnist_study.tracking.names import EXTENDED_TAG, IDENTITY_TAG, MIXED_TAG, NOTE_TAG, SPEC_TAG

SPEC = """
[study]
trials = 2
tunings = 3
seeds = [0, 1]
[variants.baseline]
search.lr = { low = 1e-3, high = 3e-3, log = true }
"""
IDENTITY = {"code": "c0de", "threads": "1", "device": "cpu", "data": "da7a", "commit": "abc"}


def record(tmp_path, text: str = SPEC, **identity: str) -> StudyRecord:
    return StudyRecord(parse_spec(text, tmp_path / "rec.toml"), IDENTITY | identity)


def test_the_same_study_resumes_and_writes_only_its_identity(tmp_path):
    started = record(tmp_path)
    tags = started.to_tags()
    assert set(tags) == {NOTE_TAG, SPEC_TAG, IDENTITY_TAG}
    assert started.check_resume(None, "store", False) == Resume()  # a new study
    again = record(tmp_path, commit="def")  # another commit, the same code: the same study
    resume = again.check_resume(tags, "store", False)
    assert resume == Resume()
    assert again.experiment_tags(tags, resume) == {IDENTITY_TAG: again.to_tags()[IDENTITY_TAG]}
    assert again.experiment_tags(None, resume) == again.to_tags()
    assert StudyRecord.appended(resume) == {EXTENDED_TAG: "", MIXED_TAG: ""}


def test_more_tunings_extend_the_record_and_another_design_is_refused(tmp_path):
    tags = record(tmp_path).to_tags()
    larger = record(tmp_path, SPEC.replace("tunings = 3", "tunings = 5"))
    resume = larger.check_resume(tags, "store", False)
    assert resume == Resume(extension="study.tunings 3 -> 5")
    assert larger.experiment_tags(tags, resume)[SPEC_TAG] == larger.to_tags()[SPEC_TAG]
    with pytest.raises(
        SpecError, match=r"changed since study 'rec' started in store \(\[study\]\)"
    ):
        record(tmp_path, SPEC.replace("trials = 2", "trials = 3")).check_resume(
            tags, "store", False
        )


def test_another_identity_is_refused_unless_allowed_then_recorded_as_a_mix(tmp_path):
    tags = record(tmp_path).to_tags()
    other = record(tmp_path, threads="2")
    with pytest.raises(StoresDisagree, match=r"ran with other threads \(threads 1 -> 2\)"):
        other.check_resume(tags, "store", False)
    resume = other.check_resume(tags, "store", True)
    assert resume == Resume(mixed="threads 1 -> 2")
    assert StudyRecord.appended(resume)[MIXED_TAG] == "threads 1 -> 2"


def test_an_experiment_that_holds_no_study_is_refused(tmp_path):
    with pytest.raises(SpecError, match="exists but holds no study"):
        record(tmp_path).check_resume({"mlflow.note.content": ""}, "store", False)


def test_the_record_reads_back_from_its_tags_and_any_other_experiment_says_why_not(tmp_path):
    started = record(tmp_path)
    tags = started.to_tags() | {EXTENDED_TAG: "study.tunings 3 -> 5", MIXED_TAG: "threads 1 -> 2"}
    back = StudyRecord.from_tags(tags, "rec")
    assert back.spec.settings == started.spec.settings
    assert back.spec.variants == started.spec.variants
    assert back.identity == IDENTITY
    assert (back.extensions, back.mixes) == ("study.tunings 3 -> 5", "threads 1 -> 2")
    older = StudyRecord.from_tags({SPEC_TAG: tags[SPEC_TAG]}, "rec")  # before identities
    assert (older.identity, older.extensions, older.mixes) == ({}, "", "")
    with pytest.raises(NoStudy, match="^it records no spec$"):
        StudyRecord.from_tags({"mlflow.user": "someone"}, "rec")
    with pytest.raises(NoStudy, match="does not read .*not valid TOML"):  # a description
        StudyRecord.from_tags({"mlflow.note.content": "made by hand"}, "rec")
    with pytest.raises(NoStudy, match="its recorded spec does not read"):
        StudyRecord.from_tags({SPEC_TAG: '{"study": {"trials": "many"}}'}, "rec")
    for broken in ("not json", "[1, 2]", "7"):  # an identity that does not read: none
        assert StudyRecord.from_tags(tags | {IDENTITY_TAG: broken}, "rec").identity == {}
