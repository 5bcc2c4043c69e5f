"""Rebuild the bundled Fashion-MNIST sample in data/fashion-mnist-sample/ (how it was made).

Source: the full Fashion-MNIST (Zalando SE, 2017; MIT licence) as packaged by Debian
(`apt-get install dataset-fashion-mnist` -> /usr/share/datasets/fashion-mnist/*.gz).
The sample is balanced: 1,000 training and 200 test images per class, drawn with a fixed seed,
written in the original IDX format (gzipped, the same file names), so it reads like the full set.

    python data/make_fashion_mnist_sample.py [--src DIR] [--dst DIR]
"""
import argparse
import gzip
import os
import struct

import numpy as np

FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
PER_CLASS = {"train": 1000, "t10k": 200}


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # mtime=0: byte-identical rebuilds
        f.write(header + array.astype(np.uint8).tobytes())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--dst", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion-mnist-sample"))
    args = p.parse_args()
    os.makedirs(args.dst, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, (img_file, lbl_file) in FILES.items():
        images, labels = read_idx(os.path.join(args.src, img_file)), read_idx(os.path.join(args.src, lbl_file))
        keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), PER_CLASS[split], replace=False)
                               for c in range(10)])
        keep.sort()  # keep the source order: classes stay interleaved as in the original files
        write_idx(os.path.join(args.dst, img_file), images[keep])
        write_idx(os.path.join(args.dst, lbl_file), labels[keep])
        print(f"{split}: {len(keep)} images -> {args.dst}")


if __name__ == "__main__":
    main()
