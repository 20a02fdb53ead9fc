"""Bad input: one clear error naming the file and the problem, before any training."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import call_script, make_competition
from kaggle_cifar.data import cached_images, load_test, load_train
from kaggle_cifar.errors import InputError


def load(competition, folds=2):
    return load_train(competition, competition / ".cache", folds)


@pytest.fixture
def small(tmp_path):
    return make_competition(tmp_path / "input", per_class=4, n_test=6)


def test_missing_labels_file(small):
    (small / "trainLabels.csv").unlink()
    with pytest.raises(InputError, match=r"trainLabels\.csv: missing"):
        load(small)


def test_missing_image_folder(small):
    for f in (small / "test").iterdir():
        f.unlink()
    (small / "test").rmdir()
    with pytest.raises(InputError, match=r"test: missing image folder"):
        load_test(small, small / ".cache")


def test_empty_folder(small):
    for f in (small / "test").iterdir():
        f.unlink()
    with pytest.raises(InputError, match=r"test: empty image folder"):
        load_test(small, small / ".cache")


def test_files_beside_the_images_are_left_out_with_a_warning_and_an_image_misnamed_is_refused(small, caplog):
    (small / "test" / "Thumbs.db").write_bytes(b"\0" * 64)  # what Windows and macOS leave in a folder of images
    (small / "test" / ".DS_Store").write_bytes(b"\0" * 64)
    (small / "test" / "notes").write_text("to do")
    assert load_test(small, small / ".cache")[0].tolist() == [1, 2, 3, 4, 5, 6]
    assert "test: left out 2 file(s) that are not images: Thumbs.db, notes" in caplog.text
    Image.open(small / "test" / "1.png").save(small / "test" / "1.jpg")
    with pytest.raises(InputError, match=r"test: images not named <id>\.png: 1\.jpg"):
        load_test(small, small / ".cache")


def test_duplicate_id(small):
    with open(small / "trainLabels.csv", "a") as f:
        f.write("3,dog\n")
    with pytest.raises(InputError, match=r"trainLabels\.csv: duplicate ids: 3"):
        load(small)


def test_label_that_is_not_a_class(small):
    text = (small / "trainLabels.csv").read_text().replace("\n5,", "\n5,dgo-typo\n5,", 1)
    lines = [line for line in text.splitlines() if not (line.startswith("5,") and "typo" not in line)]
    (small / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"trainLabels\.csv: .*'dgo-typo' \(1 image\(s\): ids 5\)"):
        load(small)


def test_labelled_image_missing(small):
    (small / "train" / "7.png").unlink()
    with pytest.raises(InputError, match=r"train: missing images for labelled ids 7"):
        load(small)


def test_corrupt_and_wrong_size_pngs_are_all_named(small):
    (small / "train" / "4.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(small / "train" / "9.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(small / "train" / "11.png")  # grayscale
    with pytest.raises(InputError) as e:
        load(small)
    message = str(e.value)
    assert "3 bad image(s)" in message
    assert "4.png: not a readable PNG" in message
    assert "9.png: 28x28 with 3 channel(s), expected 32x32 with 3 channel(s)" in message
    assert "11.png: 32x32 with 1 channel(s)" in message
    assert not (small / ".cache" / "train.npy").exists()  # no half-built cache left behind


def test_test_ids_must_be_1_to_n(small):
    (small / "test" / "3.png").rename(small / "test" / "30.png")
    with pytest.raises(InputError, match=r"test: ids are not 1\.\.6; missing 3"):
        load_test(small, small / ".cache")


def test_cache_is_reused_and_rebuilt_when_its_source_changes(small):
    first = load(small).images.copy()
    npy = small / ".cache" / "train.npy"
    built = npy.stat().st_mtime_ns
    np.testing.assert_array_equal(load(small).images, first)
    assert npy.stat().st_mtime_ns == built  # reused, not decoded again
    new_pixels = np.full((32, 32, 3), 9, np.uint8)
    Image.fromarray(new_pixels).save(small / "train" / "2.png")
    os.utime(small / "train" / "2.png", ns=(built + 10**9, built + 10**9))
    np.testing.assert_array_equal(load(small).images[1], new_pixels)  # rebuilt from the new PNG


def test_truncated_cache_is_rebuilt(small):
    ids = np.arange(1, 7)
    good = cached_images(small / "test", ids, small / ".cache").copy()
    npy = small / ".cache" / "test.npy"
    npy.write_bytes(npy.read_bytes()[:200])  # e.g. a disk that filled up under an older version
    np.testing.assert_array_equal(cached_images(small / "test", ids, small / ".cache"), good)


def test_check_mode_reports_the_problem_and_trains_nothing(small, tmp_path):
    (small / "train" / "4.png").write_bytes(b"garbage")
    proc = call_script("train_folds.py", "--input", str(small), "--run-dir", str(tmp_path / "run"), "--folds", "2", "--check", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "4.png: not a readable PNG" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_check_mode_on_good_input(small, tmp_path):
    proc = call_script("train_folds.py", "--input", str(small), "--run-dir", str(tmp_path / "run"), "--folds", "2", "--check")
    assert "input OK" in proc.stderr
    assert not (tmp_path / "run").exists()
