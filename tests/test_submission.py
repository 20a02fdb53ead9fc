import numpy as np
import pandas as pd
import pytest

from conftest import make_competition
from kaggle_cifar import cli
from kaggle_cifar.errors import SubmissionError
from kaggle_cifar.submission import main, render, submission_frame, validate

CLASSES = ["cat", "dog", "frog"]


def good():
    return submission_frame(np.arange(1, 6), np.eye(3)[[0, 1, 2, 1, 0]], CLASSES)


def test_render_gives_the_checked_csv():
    text = render(good(), np.arange(1, 6), CLASSES)
    assert text.splitlines() == ["id,label", "1,cat", "2,dog", "3,frog", "4,dog", "5,cat"]


@pytest.mark.parametrize("frame, message", [
    (good().rename(columns={"label": "class"}), r"header is \['id', 'class'\]"),
    (good().iloc[:4], r"4 rows, expected one per test image \(5\)"),
    (good().iloc[[0, 2, 1, 3, 4]], r"ids are not 1\.\.5 in order: row 3 has id 3, expected 2"),
    (good().assign(label=["cat", "dog", "fish", "dog", "cat"]), r"labels that are not classes: fish"),
    (good().assign(id=[f"{i}.0" for i in range(1, 6)]), r"ids must be whole numbers as written \(1, 2, \.\.\.\): row 2 has id '1\.0'"),
])
def test_validate_refuses_bad_submissions(frame, message):
    with pytest.raises(SubmissionError, match=message):
        validate(frame.reset_index(drop=True), np.arange(1, 6), CLASSES, "sub.csv")


def test_check_command(tmp_path, capsys):
    competition = make_competition(tmp_path / "input", per_class=4, n_test=5)
    path = tmp_path / "sub.csv"
    good().to_csv(path, index=False)
    assert main(["check", str(path), "--input", str(competition)]) == 0
    pd.concat([good(), good().iloc[:1]]).to_csv(path, index=False)
    with pytest.raises(SystemExit) as leaving:
        cli.run(lambda: main(["check", str(path), "--input", str(competition)]))
    assert leaving.value.code == 2  # one error door for every script: one line, exit 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"error: {path}: 6 rows, expected one per test image (5)"
