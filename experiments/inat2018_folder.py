r"""iNaturalist 2018 as an ImageFolder tree of links, so that dino.py and ibot.py train on it with
`--data folder`.

The released layout keeps the training and validation images side by side
(train_val2018/<supercategory>/<species>/<file>.jpg) and says which is which only in
train2018.json and val2018.json; pointing ImageFolder at train_val2018/ would train on the
validation images. This writes OUT/train/<category>/ and OUT/val/<category>/ with one symbolic
link per image, as the two json files assign them (category ids zero-padded so that both splits
list the 8,142 classes in the same order); no image is copied.
  python experiments/inat2018_folder.py /inat2018 /inat2018_folder
  torchrun --nproc_per_node 8 dino.py --data folder --data_path /inat2018_folder --koleo 0.1
  python evaluate.py --checkpoint runs/dino-folder/checkpoint.pth \
      --data inat2018 --data_path /inat2018
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402  (the repository's root is put on the path first; it reads the json)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="the iNaturalist 2018 folder "
                   "(train2018.json, val2018.json, train_val2018/)")
    p.add_argument("output", help="where the train/ and val/ trees of links go "
                   "(created; links already there are kept)")
    args = p.parse_args(argv)
    root = os.path.abspath(args.root)
    splits = {}
    for split in ("train", "val"):
        try:
            d = evaluate.INat2018(root, split, transform=None)
        except evaluate.BadInput as e:
            sys.exit(str(e))
        splits[split] = list(zip(d.files, d.targets))
    width = len(str(max(c for pairs in splits.values() for _, c in pairs)))
    for split, pairs in splits.items():
        missing = next((f for f, _ in pairs if not os.path.isfile(f)), None)
        if missing:
            sys.exit(f"{missing} is listed in {split}2018.json but missing: "
                     f"extract the images into {root}")
        for i, (src, c) in enumerate(pairs):
            folder = os.path.join(args.output, split, f"{c:0{width}d}")
            os.makedirs(folder, exist_ok=True)
            link = os.path.join(folder, f"{i}_{os.path.basename(src)}")  # i: names stay unique
            if not os.path.lexists(link):
                os.symlink(src, link)
        out = os.path.join(args.output, split)
        print(f"{split}: {len(pairs)} images of {len({c for _, c in pairs})} classes in {out}")


if __name__ == "__main__":
    main()
