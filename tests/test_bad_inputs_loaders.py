"""Data a careless or hostile user hands the loaders: each is refused with one line naming the file and the fix,
or loaded correctly with a warning that says what changed."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from robustmed_lite.data.loaders import DataError, load_images

RAMP = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64 x 64, brighter to the right


def _kaggle(root, n: int = 3, extra: dict | None = None):
    for folder in ("COVID", "non-COVID", *(extra or {})):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range((extra or {}).get(folder, n)):
            Image.fromarray(RAMP).save(root / folder / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("folders", "named"),
    [({"CAP": 4}, r"CAP/ \(4 images\)"), ({"pneumonia": 2, "docs": 0}, r"pneumonia/ \(2 images\)")],
)
def test_a_folder_that_is_no_class_is_refused_not_dropped(tmp_path, folders, named):
    root = _kaggle(tmp_path / "data", extra=folders)
    with pytest.raises(DataError, match=rf"no class of this task: {named}\. Fix: move them out"):
        load_images(root, 32, cache=False, progress=False)


def test_only_unknown_folders_beside_one_class_are_named(tmp_path):
    root = tmp_path / "data"
    for folder in ("pneumonia", "normal"):
        (root / folder).mkdir(parents=True)
        Image.fromarray(RAMP).save(root / folder / "0.png")
    with pytest.raises(DataError, match=r"class folders normal and folders that are no class .*pneumonia/"):
        load_images(root, 32, cache=False, progress=False)


def test_broken_links_and_link_loops_are_named(tmp_path):
    root = _kaggle(tmp_path / "data")
    dangling = root / "COVID" / "gone.png"
    os.symlink(tmp_path / "nowhere.png", dangling)
    with pytest.raises(DataError, match=r"gone.png is a broken symbolic link to .*nowhere.png\. Fix"):
        load_images(root, 32, cache=False, progress=False)
    dangling.unlink()
    loop = root / "COVID" / "loop.png"
    os.symlink(loop, loop)
    with pytest.raises(DataError, match=r"loop.png is a symbolic link loop\. Fix"):
        load_images(root, 32, cache=False, progress=False)
    loop.unlink()
    self_root = tmp_path / "self"
    os.symlink(self_root, self_root)
    with pytest.raises(DataError, match=r"self is a symbolic link loop"):
        load_images(self_root, 32, cache=False, progress=False)


def test_exif_orientation_is_applied(tmp_path):
    root = _kaggle(tmp_path / "data", n=1)
    turned = root / "COVID" / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are to be turned 90 degrees clockwise for display
    Image.fromarray(RAMP[:32]).save(turned, exif=exif, quality=100)  # 32 rows x 64 columns as stored
    data = load_images(root, 64, cache=False, progress=False)
    shown = data.images[data.paths.index(str(turned.resolve()))][0].numpy()
    # Displayed upright the ramp runs top to bottom: rows differ, columns do not.
    assert np.abs(np.diff(shown, axis=0)).mean() > 5 * np.abs(np.diff(shown, axis=1)).mean()


def test_an_elongated_image_is_squashed_with_a_warning(tmp_path):
    root = _kaggle(tmp_path / "data", n=2)
    Image.fromarray(np.full((10, 400), 128, np.uint8)).save(root / "COVID" / "strip.png")
    with pytest.warns(UserWarning, match=r"1 image\(s\) with sides more than 3:1 apart were squashed .*strip.png"):
        load_images(root, 32, cache=False, progress=False)


def test_a_semicolon_csv_is_named_as_such(tmp_path):
    _kaggle(tmp_path / "data", n=1)
    index = tmp_path / "data" / "index.csv"
    index.write_text("path;label\nCOVID/0.png;1\nnon-COVID/0.png;0\n")
    with pytest.raises(DataError, match=r"separated by ';', not by commas .*Fix: save it comma-separated"):
        load_images(index, 32, cache=False, progress=False)


def test_a_key_given_twice_in_a_yaml_config_is_refused(tmp_path):
    from robustmed_lite.config import load_config

    path = tmp_path / "mine.yaml"
    path.write_text("lr: 0.1\nepochs: 2\nlr: 0.2\n")
    with pytest.raises(
        ValueError, match=r"^config .*mine.yaml is not valid YAML: key 'lr' is given twice \(lines 1 and 3\)"
    ):
        load_config(path)
