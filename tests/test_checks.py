"""checks.py: skipped images and byte-identical duplicates (the leakage check), and the report's rendering."""
import numpy as np

from pipeline.checks import data_checks, duplicate_groups, note, summary
from pipeline.report import checks_text

IDS = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "g.jpg"]
SHA = ["h1", "h1", "h2", "h3", "h3", "h3", ""]   # g: hash unknown, never grouped
LABELS = np.array([0, 0, 1, 0, 1, 0, 1])
SPLIT = np.array(["train", "test", "train", "train", "val", "train", "test"])
NAMES = ["bus", "car"]


class FakeCache:
    """FeatureCache's reading API over arrays; every row is a candidate (the cache's superset, at its widest)."""
    ids, sha256, labels, split, class_names = IDS, np.array(SHA), LABELS, SPLIT, NAMES
    skipped = [("x.jpg", "truncated image data")]

    def rows_sharing_content(self):
        return np.arange(len(self.ids))

    def ids_of(self, rows):
        return [self.ids[r] for r in rows]

    def sha256_of(self, rows):
        return [self.sha256[r] for r in rows]


def test_duplicate_groups_by_content():
    groups = duplicate_groups(IDS, SHA, LABELS, SPLIT, NAMES)
    assert [g["ids"] for g in groups] == [["a.jpg", "b.jpg"], ["d.jpg", "e.jpg", "f.jpg"]]
    assert groups[1]["labels"] == ["bus", "car", "bus"] and groups[1]["splits"] == ["train", "val", "train"]
    assert duplicate_groups(IDS, [""] * 7, LABELS, SPLIT, NAMES) == []


def test_data_checks_counts_leaks_and_conflicts():
    checks = data_checks(FakeCache())
    assert checks["n_duplicate_groups"] == 2 and checks["n_duplicate_images"] == 5
    assert checks["n_groups_across_splits"] == 2
    assert checks["n_groups_conflicting_labels"] == 1
    assert checks["n_eval_images_seen_in_train"] == 2  # b (test) and e (val)
    assert checks["skipped"] == [{"id": "x.jpg", "reason": "truncated image data"}] and checks["n_skipped"] == 1
    line = summary(checks)
    assert "1 image skipped" in line and "2 val/test images are byte-identical to train images" in line
    assert "(2 duplicate groups span splits)" in line and "1 duplicate group has conflicting labels" in line


def test_a_group_of_val_and_test_only_is_not_called_a_copy_of_train():
    checks = {"n_skipped": 2, "n_groups_across_splits": 1, "n_eval_images_seen_in_train": 0,
              "n_groups_conflicting_labels": 0}
    assert summary(checks) == "2 images skipped; val and test share byte-identical images (1 duplicate group spans splits)"


class Clean(FakeCache):
    sha256 = np.array(["1", "2", "3", "4", "5", "6", "7"])
    skipped = []


def test_clean_data_says_nothing():
    assert summary(data_checks(Clean())) == "" and note(data_checks(Clean())) == ""


def test_note_suggests_dropping_duplicates_only_when_they_leak():
    leaking = note(data_checks(FakeCache()))
    assert leaking.startswith("note: 1 image skipped; 2 val/test") and "DROP_DUPLICATES=1" in leaking

    class OnlySkipped(Clean):
        skipped = [("x.jpg", "truncated image data")]
    assert note(data_checks(OnlySkipped())) == "note: 1 image skipped; `make report` lists them"


def test_report_lists_every_group_and_skip():
    text, items = checks_text(data_checks(FakeCache()))
    assert "1 image skipped" in text and "2 across splits" in text and "1 with conflicting labels" in text
    assert items[0] == "skipped x.jpg: truncated image data"
    assert "across splits: a.jpg (bus, train), b.jpg (bus, test)" in items
    assert "labels disagree: d.jpg (bus, train), e.jpg (car, val), f.jpg (bus, train)" in items
    assert checks_text(None)[1] == []
