"""experiments/inat2018_folder.py on a hand-made iNaturalist 2018 layout: the train and val images
land in their own trees, both list the classes in the same order, a rerun adds nothing, and a
tiny dino.py run trains and evaluates on the result with --data folder (~15 s)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import koleo_proto
import dino
from experiments import inat2018_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inat(root):
    """Train: 4 images of category 3, 2 of 12, 2 of 7; val: one of each. Train and val images share
    folders, as in train_val2018/, so only the json files tell them apart."""
    for split, cats in (("train", [3, 3, 3, 3, 12, 12, 7, 7]), ("val", [3, 12, 7])):
        images = []
        for i, c in enumerate(cats):
            name = f"train_val2018/Plantae/{c}/{split}{i}.jpg"
            os.makedirs(root / os.path.dirname(name), exist_ok=True)
            Image.fromarray(np.full((28, 28, 3), 20 * c, np.uint8)).save(root / name)
            images.append(dict(id=1000 * len(split) + i, file_name=name))
        json.dump(dict(images=images, annotations=[dict(image_id=im["id"], category_id=c) for im, c in zip(images, cats)]),
                  open(root / f"{split}2018.json", "w"))


def test_train_and_val_trees(tmp_path):
    make_inat(tmp_path / "inat")
    out = tmp_path / "folder"
    inat2018_folder.main([str(tmp_path / "inat"), str(out)])
    train, val = koleo_proto.image_folder(str(out / "train"), None), koleo_proto.image_folder(str(out / "val"), None)
    assert train.classes == val.classes == ["03", "07", "12"]  # zero-padded: numeric order in both
    assert np.bincount(train.targets).tolist() == [4, 2, 2] and len(val) == 3
    sources = lambda d: {os.path.basename(os.path.realpath(p)) for p, _ in d.samples}
    assert all(s.startswith("train") for s in sources(train)) and all(s.startswith("val") for s in sources(val))
    inat2018_folder.main([str(tmp_path / "inat"), str(out)])  # a rerun keeps the links, adds none
    assert len(koleo_proto.image_folder(str(out / "train"), None)) == 8


def test_bad_layouts_one_line(tmp_path):
    with pytest.raises(SystemExit, match="train2018.json"):
        inat2018_folder.main([str(tmp_path), str(tmp_path / "out")])
    make_inat(tmp_path / "inat")
    os.remove(tmp_path / "inat" / "train_val2018" / "Plantae" / "7" / "val2.jpg")
    with pytest.raises(SystemExit, match="val2.jpg is listed in val2018.json but missing"):
        inat2018_folder.main([str(tmp_path / "inat"), str(tmp_path / "out")])


def test_dino_trains_on_the_folder(tmp_path):
    make_inat(tmp_path / "inat")
    inat2018_folder.main([str(tmp_path / "inat"), str(tmp_path / "folder")])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "dino.py"), "--data", "folder", "--data_path",
                          str(tmp_path / "folder"), "--output_dir", str(tmp_path / "run"), "--arch", "vit_nano",
                          "--patch_size", "7", "--out_dim", "32", "--global_crops_size", "28", "--local_crops_size", "14",
                          "--local_crops_number", "2", "--batch_size_per_gpu", "4", "--epochs", "1", "--warmup_epochs", "0",
                          "--num_workers", "0"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["num_prototypes"] == 32 and 0 <= summary["knn_top1"] <= 100
    assert dino.load_checkpoint(str(tmp_path / "run" / "checkpoint.pth"))["epoch"] == 1
