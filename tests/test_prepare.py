"""From a tiny raw Kaggle download (zip of .7z archives, made here with py7zr) to the layout."""

from __future__ import annotations

import os
import zipfile

import py7zr
import pytest

from conftest import make_competition
from kaggle_cifar.data import load_test, load_train
from kaggle_cifar.errors import InputError
from kaggle_cifar.prepare import prepare


@pytest.fixture
def download(tmp_path):
    """input/cifar-10.zip as `kaggle competitions download -c cifar-10 -p input` leaves it."""
    src = make_competition(tmp_path / "src", per_class=4, n_test=6)
    raw = tmp_path / "raw"
    raw.mkdir()
    for part in ("train", "test"):
        with py7zr.SevenZipFile(raw / f"{part}.7z", "w") as z:
            z.writeall(src / part, arcname=part)
    download = tmp_path / "input"
    download.mkdir()
    with zipfile.ZipFile(download / "cifar-10.zip", "w") as z:
        for name in ("train.7z", "test.7z"):
            z.write(raw / name, name)
        for name in ("trainLabels.csv", "sampleSubmission.csv"):
            z.write(src / name, name)
    return download, src


def test_prepare_unpacks_the_zip_and_archives_and_is_then_a_no_op(download):
    folder, src = download
    assert prepare(folder) == folder
    assert sorted(p.name for p in (folder / "train").iterdir()) == sorted(p.name for p in (src / "train").iterdir())
    assert (folder / "test" / "6.png").read_bytes() == (src / "test" / "6.png").read_bytes()
    assert not list(folder.glob(".*partial")) and not (folder / "train.7z").exists()
    assert len(load_train(folder, folder / ".cache", 2).labels.ids) == 12
    assert len(load_test(folder, folder / ".cache")[0]) == 6
    stamp = (folder / "train").stat().st_mtime_ns
    assert prepare(folder) == folder and (folder / "train").stat().st_mtime_ns == stamp


def test_read_only_notebook_input_is_unpacked_to_a_writable_folder(download, tmp_path):
    folder, _ = download
    with zipfile.ZipFile(folder / "cifar-10.zip") as z:  # Kaggle mounts the zip's contents, read-only
        z.extractall(tmp_path / "kaggle-input")
    mounted = tmp_path / "kaggle-input"
    os.chmod(mounted, 0o555)
    try:
        dest = prepare(mounted, tmp_path / "work" / "input")
    finally:
        os.chmod(mounted, 0o755)
    assert dest == tmp_path / "work" / "input"
    assert len(list((dest / "test").iterdir())) == 6 and (dest / "trainLabels.csv").is_file()
    assert (mounted / "train.7z").exists()  # the read-only input is left as it was


def test_corrupt_archive_is_named(download):
    folder, _ = download
    with zipfile.ZipFile(folder / "cifar-10.zip") as z:
        z.extractall(folder)
    (folder / "cifar-10.zip").unlink()
    (folder / "test.7z").write_bytes(b"7z? no")
    with pytest.raises(InputError, match=r"test\.7z: not a readable 7z archive"):
        prepare(folder)
    assert not (folder / "test").exists()


def test_nothing_to_prepare_is_an_error(tmp_path):
    with pytest.raises(InputError, match=r"no train/ folder, train\.7z or cifar-10\.zip \(download with"):
        prepare(tmp_path)


def test_the_download_itself_is_unpacked_beside_it(download):
    folder, _ = download
    renamed = folder / "cifar-10 (1).zip"  # as a browser saves a second download
    (folder / "cifar-10.zip").rename(renamed)
    assert prepare(renamed) == folder and len(load_test(folder, folder / ".cache")[0]) == 6
    assert prepare(renamed) == folder  # then a no-op


def test_an_input_that_is_no_competition_folder_is_named_with_what_to_give_and_nothing_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a read-only input's copy would go
    competition = make_competition(tmp_path / "competition", per_class=2, n_test=2)
    made = sorted(tmp_path.rglob("*"))
    with pytest.raises(InputError, match=r"train: no train/ folder.*it holds images itself: the competition's "
                                         rf"folder is the one above it, {competition}\)"):
        prepare(competition / "train")
    with pytest.raises(InputError, match=r"trainLabels\.csv: a file; give the competition's folder"):
        prepare(competition / "trainLabels.csv")
    with pytest.raises(InputError, match=r"nothere: no such folder \(download the competition with"):
        prepare(tmp_path / "nothere")
    assert sorted(tmp_path.rglob("*")) == made


def test_train_folds_prepares_a_raw_download_by_itself(download, tmp_path):
    from conftest import call_script

    folder, _ = download
    proc = call_script("train_folds.py", "--input", str(folder), "--run-dir", str(tmp_path / "run"), "--folds", "2",
                       "--check")
    assert "input OK: 12 training images in 3 classes" in proc.stderr
    assert (folder / "train").is_dir() and (folder / "test").is_dir()


def test_users_own_archives_are_kept(download):
    folder, _ = download
    with zipfile.ZipFile(folder / "cifar-10.zip") as z:
        z.extractall(folder)
    (folder / "cifar-10.zip").unlink()
    assert prepare(folder) == folder
    assert (folder / "train.7z").is_file() and (folder / "test.7z").is_file()
    assert len(list((folder / "train").iterdir())) == 12
