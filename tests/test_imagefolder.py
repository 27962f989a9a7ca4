"""Image folders: listing with named errors, the cheap and the full file checks, writing
Fashion-MNIST as JPEGs, and the `hvdscale data` command (exit codes, one-line errors)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, WORKERS, job_env

sys.path.insert(0, str(WORKERS))
import dali_images  # noqa: E402

from hvdscale.data import imagefolder as imf  # noqa: E402
from hvdscale.errors import DataError  # noqa: E402


def hvdscale(*args):
    cmd = [sys.executable, "-c", "import sys; from hvdscale.cli import main; sys.exit(main())",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=job_env(), cwd=REPO,
                          timeout=120)


def test_labels_follow_sorted_class_folders(tmp_path):
    for name in ("zebra", "ant", "moth"):
        (tmp_path / name).mkdir()
        for i in range(2):
            dali_images.flat_image(tmp_path / name / f"{i}.jpg", 100)
    listing = imf.list_images(tmp_path)
    assert listing.classes == ["ant", "moth", "zebra"]
    assert listing.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [p.split("/")[-2] for p in listing.files] == ["ant", "ant", "moth", "moth", "zebra", "zebra"]


def test_checks_find_non_images_and_truncated_files(tmp_path):
    good = tmp_path / "good.jpg"
    dali_images.flat_image(good, 50)
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    dali_images.undecodable_jpeg(tmp_path / "garbled.jpg")
    assert imf.marker_problem(good) is None and imf.decode_problem(good) is None
    assert "truncated JPEG" in imf.marker_problem(tmp_path / "cut.jpg")
    assert "unknown file header" in imf.marker_problem(tmp_path / "text.jpg")
    assert imf.marker_problem(tmp_path / "empty.png") == "empty file"
    assert "not an image file" in imf.marker_problem(tmp_path / "notes.txt")
    assert imf.marker_problem(tmp_path / "garbled.jpg") is None      # only a decode finds it
    assert imf.decode_problem(tmp_path / "garbled.jpg") is not None
    # garbage between two header segments: Pillow decodes it, the header walk finds it
    dali_images.flat_image(tmp_path / "junk.jpg", 70)
    dali_images.garbage_between_markers(tmp_path / "junk.jpg")
    assert "garbage where a marker must start" in imf.marker_problem(tmp_path / "junk.jpg")


def test_list_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(DataError, match="image directory not found"):
        imf.list_images(tmp_path / "missing")
    with pytest.raises(DataError, match="no class folders"):
        imf.list_images(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dali_images.flat_image(tmp_path / "a" / "1.jpg", 10)
    with pytest.raises(DataError, match=r"/b: empty class folder"):
        imf.list_images(tmp_path)
    (tmp_path / "b" / "x.jpg").write_text("no")
    with pytest.raises(DataError, match=r"b/x.jpg: not a readable image"):
        imf.list_images(tmp_path)
    listing = imf.list_images(tmp_path, skip_corrupt=True)
    assert len(listing) == 1 and listing.skipped[0][0].endswith("b/x.jpg")
    with pytest.raises(DataError, match="no 'val' folder"):
        imf.split_dir(tmp_path, "val")


def test_write_fashion_mnist_as_jpegs(tmp_path):
    from hvdscale.data.fashion_mnist import load_fashion_mnist
    x_train, y_train, _, _ = load_fashion_mnist()
    counts = imf.write_fashion_mnist(tmp_path / "fm", train_limit=50, val_limit=20)
    assert counts == {"train": 50, "val": 20}
    train = imf.list_images(tmp_path / "fm" / "train", check="decode")
    assert len(train.classes) == 10 and train.classes[0] == "0_t-shirt"
    # every class gets images, five each here
    assert np.bincount(train.labels, minlength=10).tolist() == [5] * 10
    # the JPEG holds the same picture under its class: compare one image to its source pixels
    first = train.files[0]
    pixels = np.asarray(Image.open(first), dtype=np.float32)
    index = int(first.rsplit("/", 1)[-1].split(".")[0])
    assert pixels.shape == (28, 28) and y_train[index] == 0
    assert np.abs(pixels - x_train[index]).mean() < 6.0
    val = imf.list_images(tmp_path / "fm" / "val")
    assert len(val) == 20 and val.classes == train.classes
    with pytest.raises(DataError, match="cannot fill 10 class folders"):
        imf.write_fashion_mnist(tmp_path / "fm2", train_limit=9)
    with pytest.raises(DataError, match="exists and is not empty"):
        imf.write_fashion_mnist(tmp_path / "fm", train_limit=5, val_limit=5)


def test_cli_imagefolder_then_check(tmp_path):
    out = tmp_path / "jpeg"
    proc = hvdscale("data", "imagefolder", "--from", "fashion-mnist", out, "--size", "40",
                    "--train-limit", "30", "--val-limit", "10")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 30 training and 10 validation JPEGs (40x40)" in proc.stdout
    (out / "train" / "3_dress" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    proc = hvdscale("data", "check", out, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["train"]["images"] == 30 and report["val"]["images"] == 10
    assert sum(report["train"]["class_counts"].values()) == 30
    assert report["train"]["width"] == {"min": 40, "median": 40.0, "mean": 40.0, "max": 40}
    assert [b["file"].split("/")[-1] for b in report["train"]["unreadable"]] == ["broken.jpg"]
    text = hvdscale("data", "check", out)
    assert "train: 30 images in 10 classes" in text.stdout and "broken.jpg" in text.stdout
    assert hvdscale("data", "check", out, "--strict").returncode == 1


@pytest.mark.parametrize("args,message", [
    (["data", "check", "/nonexistent/dir"], "image directory not found: /nonexistent/dir"),
    (["data", "imagefolder", "OUT", "--train-limit", "0"], "--train-limit must be >= 1"),
    (["data", "imagefolder", "OUT", "--size", "4"], "image size 4 is too small"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, message):
    args = [str(tmp_path / a) if a == "OUT" else a for a in args]
    proc = hvdscale(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert proc.stderr.startswith("hvdscale data: error: ")
