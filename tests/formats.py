"""Small data sets written in the official formats, for the loaders of data sets that CI does not have.

Each writer puts its files where ``cbnorm data download`` would and returns the arrays it wrote.
"""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def _pickle(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)  # the official archives are protocol-2 pickles


def write_cifar10_pickles(folder: Path, per_batch: int = 4, rng=None) -> dict:
    """``folder/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``; rows are CHW-flat uint8."""
    rng = rng or np.random.default_rng(0)
    base = folder / "cifar-10-batches-py"
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        _pickle(base / name, {"batch_label": name, "labels": labels, "data": data,
                              "filenames": [f"{name}_{i}.png" for i in range(per_batch)]})
        written[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(base / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return written


def write_cifar100(folder: Path, train: int = 12, test: int = 6, rng=None) -> dict:
    """``folder/cifar-100-python/{train, test, meta}`` with fine and coarse labels (keys as bytes)."""
    rng = rng or np.random.default_rng(0)
    base = folder / "cifar-100-python"
    written = {}
    for name, n in (("train", train), ("test", test)):
        fine = rng.integers(0, 100, n)
        coarse = fine // 5  # any fixed fine -> coarse map
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch = {
            b"filenames": [b"x.png"] * n,
            b"batch_label": name.encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": coarse.tolist(),
            b"data": data,
        }
        _pickle(base / name, batch)
        written[name] = (data, fine, coarse)
    _pickle(base / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                            "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return written


def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's IDX format, gzip-compressed: 0, 0, type 0x08 (uint8), ndim, big-endian int32 dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_like(folder: Path, train: int = 10, test: int = 5, size: int = 28, rng=None) -> dict:
    rng = rng or np.random.default_rng(0)
    written = {}
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        written[prefix] = (images, labels)
    return written


def write_svhn(folder: Path, train: int = 8, test: int = 4, rng=None) -> dict:
    """``{train,test}_32x32.mat``: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1) in 1..10 (10 is the digit 0)."""
    from scipy.io import savemat

    rng = rng or np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in (("train", train), ("test", test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0] = 10
        savemat(folder / f"{name}_32x32.mat", {"X": x, "y": y})
        written[name] = (x, y)
    return written


def write_tiny_imagenet(folder: Path, wnids=("n02085620", "n01443537"), per_class: int = 3) -> dict:
    """``tiny-imagenet-200/``: wnids.txt, words.txt, train/<wnid>/images/*.JPEG (+ boxes), val/ with its
    annotations. Each class is one flat colour, so the pixels survive JPEG."""
    from PIL import Image

    base = folder / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn02085620\tChihuahua\nn09999999\tother\n")
    colours = {wnid: (40 + 80 * i, 200 - 60 * i, 90) for i, wnid in enumerate(wnids)}
    annotations = []
    for wnid in wnids:
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for i in range(per_class):
            mode = "L" if i == 0 else "RGB"  # the real training set has a few greyscale JPEGs
            colour = colours[wnid][0] if mode == "L" else colours[wnid]
            Image.new(mode, (64, 64), colour).save(images / f"{wnid}_{i}.JPEG", quality=95)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
        name = f"val_{len(annotations)}.JPEG"
        Image.new("RGB", (64, 64), colours[wnid]).save(base / "val" / "images" / name, quality=95)
        annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return colours


def write_oxford_pet(folder: Path) -> dict:
    """``images/<breed>_<n>.jpg`` of assorted sizes and modes and ``annotations/{trainval,test}.txt``
    (``IMAGE CLASS-ID SPECIES BREED-ID``, ids from 1; species 1 cat, 2 dog), as the official archives
    extract. Each image is one flat colour, so its pixels survive JPEG and resizing."""
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    (folder / "annotations").mkdir()
    # (image, class id, species, breed id within the species, size, mode)
    rows = {
        "trainval": [("Abyssinian_1", 1, 1, 1, (120, 90), "RGB"), ("american_bulldog_10", 2, 2, 1, (64, 64), "L"),
                     ("pug_3", 26, 2, 20, (200, 300), "RGB"), ("Sphynx_7", 34, 1, 12, (50, 70), "RGBA")],
        "test": [("Abyssinian_2", 1, 1, 1, (80, 80), "RGB"), ("pug_4", 26, 2, 20, (33, 65), "CMYK")],
    }
    colours = {}
    for split, entries in rows.items():
        lines = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", "#SPECIES: 1:Cat 2:Dog"]
        for name, class_id, species, breed, size, mode in entries:
            colour = (30 + 6 * class_id, 200 - 5 * class_id, 60 + 40 * species)
            image = Image.new("RGB", size, colour).convert(mode)
            image.save(folder / "images" / f"{name}.jpg", format="JPEG" if mode != "RGBA" else "PNG", quality=95)
            colours[name] = np.asarray(image.convert("RGB"))[0, 0].tolist()
            lines.append(f"{name} {class_id} {species} {breed}")
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(lines[3:] if split == "test" else lines) + "\n")
    return {"rows": rows, "colours": colours}
