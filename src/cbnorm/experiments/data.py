"""Image datasets in their official formats, read into memory as uint8 tensors; never downloaded here.

    >>> from cbnorm.experiments.data import load_dataset
    >>> data = load_dataset("cifar10", "/path/to/data")   # the root, or $CBNORM_DATA when None
    >>> data.train.images.shape, data.train.labels.shape  # uint8 (50000, 3, 32, 32), int64 (50000,)

What each dataset's folder under the data root holds (``cbnorm data download NAME`` writes it):

==============  ==============  ===================================================================
name            folder          files
==============  ==============  ===================================================================
cifar10         cifar10/        ``cifar10.npz``, or ``cifar-10-batches-py/`` (official pickles)
cifar100        cifar100/       ``cifar-100-python/{train,test,meta}`` (fine and coarse labels)
mnist           mnist/          ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``
fashion-mnist   fashion-mnist/  the same four IDX files
svhn            svhn/           ``{train,test}_32x32.mat``
tiny-imagenet   tiny-imagenet/  ``tiny-imagenet-200/`` (the official zip, extracted); test = ``val/``
digits          (none)          bundled with scikit-learn; a fixed stratified 80/20 split
==============  ==============  ===================================================================

``oxford-pet`` (Oxford-IIIT Pet) lives in ``oxford-iiit-pet/``: ``images/*.jpg`` and
``annotations/{trainval,test}.txt``, the two official archives extracted; its 37 breeds fall in the
superclasses cat and dog, and every image is resized to 64 x 64. CIFAR-10's superclasses are ours:
vehicle (airplane, automobile, ship, truck) and animal (the other six).

A missing file or one that does not parse raises :class:`DataError`, which names the files expected
and the checksum of the official file they come from. The CIFAR pickles are read by an unpickler
that admits only the plain data of the official files, so no data file can run code.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from cbnorm._files import atomic_write

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "Loader",
    "Split",
    "atomic_write",
    "available",
    "crop_flip",
    "data_root",
    "download",
    "load_dataset",
    "random_crop_flip",
    "verify",
]

PathLike = Union[str, os.PathLike]


class DataError(RuntimeError):
    """A dataset is missing, incomplete or corrupt; the message says what was expected."""


# -- containers ----------------------------------------------------------------------------------


@dataclass
class Split:
    """One split in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``, and for
    datasets with superclasses (CIFAR-100, CIFAR-10, Oxford-IIIT Pet) ``coarse_labels`` int64 ``(N,)``."""

    images: Tensor
    labels: Tensor
    coarse_labels: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        for name in ("labels", "coarse_labels"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (len(self.images),):
                raise ValueError(f"expected {name} of shape ({len(self.images)},), got {tuple(value.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> "Split":
        coarse = None if self.coarse_labels is None else self.coarse_labels[indices]
        return Split(self.images[indices], self.labels[indices], coarse)


@dataclass
class Dataset:
    """Train and test splits with their class names (``coarse_classes``: superclasses, if any)."""

    name: str
    train: Split
    test: Split
    classes: list[str]
    coarse_classes: Optional[list[str]] = None
    _stats: Optional[tuple[Tensor, Tensor]] = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    def channel_stats(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std of the training images in ``[0, 1]``, ``(C,)`` each (computed
        once, exactly, from each channel's histogram of the 256 pixel values)."""
        if self._stats is None:
            images = self.train.images
            counts = torch.stack(
                [torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])]
            )
            levels = torch.arange(256, dtype=torch.float64) / 255
            total = counts.sum(1, keepdim=True).double()
            mean = (counts * levels).sum(1, keepdim=True) / total
            std = ((counts * (levels - mean).square()).sum(1) / total.squeeze(1)).sqrt()
            self._stats = (mean.squeeze(1).float(), std.float())
        return self._stats


# -- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One official file: where it comes from and its checksum (``"md5:..."`` or ``"sha256:..."``)."""

    url: str
    checksum: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str
    expects: str  # the files the folder must hold, as the error messages name them
    sources: tuple[Source, ...]
    read: Callable[["DatasetSpec", Path], Dataset]
    flip: bool  # horizontal flips preserve the classes (natural images, not digits)
    crop_padding: int  # random-crop padding of the standard augmentation; 0 for none


def _checksum(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{algorithm}:{digest.hexdigest()}"


def _missing(spec: DatasetSpec, folder: Path, path: Path) -> DataError:
    sources = ", ".join(f"{s.filename} ({s.checksum})" for s in spec.sources) or "none: it ships with its package"
    return DataError(
        f"{spec.name}: {path} is missing. Expected in {folder}: {spec.expects}. "
        f"Official files: {sources}. Fetch them with `cbnorm data download {spec.name} --data-dir DIR`, "
        f"or point --data-dir / CBNORM_DATA at a folder that holds {spec.folder}/."
    )


def _corrupt(spec: DatasetSpec, path: Path, error: Exception) -> DataError:
    own = [s for s in spec.sources if s.filename == path.name]
    if own:
        algorithm = own[0].checksum.split(":")[0]
        found = f"expected {own[0].checksum}, the file has {_checksum(path, algorithm)}"
    elif path.name == "cifar10.npz":
        found = f"expected {CIFAR10_NPZ_SHA256}, the file has {_checksum(path, 'sha256')}"
    else:
        archives = ", ".join(f"{s.filename} ({s.checksum})" for s in spec.sources)
        found = f"it comes from {archives}; re-extract a copy whose checksum matches"
    return DataError(f"{spec.name}: {path} is corrupt or not in the official format ({error}); {found}")


@contextlib.contextmanager
def _reading(spec: DatasetSpec, folder: Path, path: Path) -> Iterator[Path]:
    """Turn a missing ``path`` or any failure to parse it into a :class:`DataError` naming what was expected."""
    if not path.exists():
        raise _missing(spec, folder, path)
    try:
        yield path
    except DataError:
        raise
    except Exception as error:  # any parse failure of a file in an official format means a bad file
        raise _corrupt(spec, path, error) from error


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# -- readers --------------------------------------------------------------------------------------

CIFAR10_NPZ_SHA256 = "sha256:a44cc18e4ad961b5158c7da062a6232fb65938b615bf013046199b823b75c43d"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# CIFAR-10 has no official superclasses. These two, machines and living things, stand in for
# CIFAR-100's 20 in the superclass experiment (paper IV-F) where CIFAR-100 is absent.
CIFAR10_SUPERCLASSES = {
    "vehicle": ["airplane", "automobile", "ship", "truck"],
    "animal": ["bird", "cat", "deer", "dog", "frog", "horse"],
}
CIFAR10_COARSE = torch.tensor([
    next(i for i, members in enumerate(CIFAR10_SUPERCLASSES.values()) if name in members) for name in CIFAR10_CLASSES
])  # class -> superclass: 0 vehicle, 1 animal


def _cifar10_dataset(spec: DatasetSpec, train: Split, test: Split, classes: list[str]) -> Dataset:
    """CIFAR-10 with its two superclasses as the splits' ``coarse_labels``."""
    _expect(classes == CIFAR10_CLASSES, f"expected the CIFAR-10 classes {CIFAR10_CLASSES}, got {classes}")
    for split in (train, test):
        split.coarse_labels = CIFAR10_COARSE[split.labels]
    return Dataset(spec.name, train, test, classes, list(CIFAR10_SUPERCLASSES))


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only what the official CIFAR files hold: dicts, lists, strings, bytes, numbers and numpy
    arrays. Any other global (a function a crafted file would call) is refused before it is looked up."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the official files hold only plain data")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        content = _PlainUnpickler(f, encoding="latin1").load()
    _expect(isinstance(content, dict), f"expected a pickled dict, got {type(content).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _cifar_images(rows) -> Tensor:
    """The official CHW-flat uint8 rows ``(N, 3072)`` as ``(N, 3, 32, 32)``."""
    rows = np.asarray(rows, dtype=np.uint8)
    _expect(rows.ndim == 2 and rows.shape[1] == 3072, f"expected data of shape (N, 3072), got {rows.shape}")
    return torch.from_numpy(rows.reshape(-1, 3, 32, 32).copy())


def _labels(values, num_classes: int) -> Tensor:
    labels = torch.as_tensor(np.asarray(values, dtype=np.int64).reshape(-1))
    _expect(len(labels) == 0 or 0 <= int(labels.min()) <= int(labels.max()) < num_classes,
            f"expected labels in [0, {num_classes})")
    return labels


def _read_cifar10(spec: DatasetSpec, folder: Path) -> Dataset:
    npz = folder / "cifar10.npz"
    if npz.exists() or not (folder / "cifar-10-batches-py").exists():
        with _reading(spec, folder, npz):
            with np.load(npz, allow_pickle=False) as z:
                splits = [
                    Split(torch.from_numpy(z[f"x_{s}"]).permute(0, 3, 1, 2).contiguous(), _labels(z[f"y_{s}"], 10))
                    for s in ("train", "test")
                ]
                _expect(all(split.images.shape[1:] == (3, 32, 32) for split in splits), "expected 32x32 RGB images")
        return _cifar10_dataset(spec, *splits, CIFAR10_CLASSES)
    base = folder / "cifar-10-batches-py"
    parts = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        with _reading(spec, folder, base / name):
            parts[name] = _unpickle(base / name)
            if name != "batches.meta":
                parts[name] = Split(_cifar_images(parts[name]["data"]), _labels(parts[name]["labels"], 10))
    train = [parts[f"data_batch_{i}"] for i in range(1, 6)]
    train = Split(torch.cat([s.images for s in train]), torch.cat([s.labels for s in train]))
    with _reading(spec, folder, base / "batches.meta"):
        return _cifar10_dataset(spec, train, parts["test_batch"], _names(parts["batches.meta"]["label_names"]))


def _read_cifar100(spec: DatasetSpec, folder: Path) -> Dataset:
    base = folder / "cifar-100-python"
    splits = {}
    for name in ("train", "test", "meta"):
        with _reading(spec, folder, base / name):
            content = _unpickle(base / name)
            if name == "meta":
                classes, coarse = _names(content["fine_label_names"]), _names(content["coarse_label_names"])
            else:
                splits[name] = Split(
                    _cifar_images(content["data"]),
                    _labels(content["fine_labels"], 100),
                    _labels(content["coarse_labels"], 20),
                )
    return Dataset(spec.name, splits["train"], splits["test"], classes, coarse)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzip-compressed: magic ``0 0 8 ndim``, big-endian dims, uint8 data."""
    with gzip.open(path, "rb") as f:
        content = f.read()
    _expect(len(content) >= 4 and content[:3] == b"\x00\x00\x08", "expected the IDX magic 0x00 0x00 0x08 (uint8)")
    ndim = content[3]
    dims = np.frombuffer(content, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(dims))
    _expect(data.size == expected, f"expected {expected} values for dims {dims.tolist()}, got {data.size}")
    return data.reshape(dims)


def _read_idx_dataset(classes: list[str]) -> Callable[[DatasetSpec, Path], Dataset]:
    def read(spec: DatasetSpec, folder: Path) -> Dataset:
        splits = []
        for prefix in ("train", "t10k"):
            with _reading(spec, folder, folder / f"{prefix}-images-idx3-ubyte.gz") as path:
                images = _read_idx(path)
                _expect(images.ndim == 3, f"expected images (N, H, W), got dims {images.shape}")
            with _reading(spec, folder, folder / f"{prefix}-labels-idx1-ubyte.gz") as path:
                labels = _labels(_read_idx(path), len(classes))
                _expect(len(labels) == len(images), f"expected {len(images)} labels, got {len(labels)}")
            splits.append(Split(torch.from_numpy(images.copy()).unsqueeze(1), labels))
        return Dataset(spec.name, *splits, classes)

    return read


def _read_svhn(spec: DatasetSpec, folder: Path) -> Dataset:
    from scipy.io import loadmat

    splits = []
    for name in ("train", "test"):
        with _reading(spec, folder, folder / f"{name}_32x32.mat") as path:
            content = loadmat(path)
            images, labels = np.asarray(content["X"], dtype=np.uint8), np.asarray(content["y"]).reshape(-1)
            _expect(
                images.ndim == 4 and images.shape[:3] == (32, 32, 3),
                f"expected X of shape (32, 32, 3, N), got {images.shape}",
            )
            _expect(set(np.unique(labels)) <= set(range(1, 11)), "expected labels y in 1..10 (10 is the digit 0)")
            splits.append(Split(torch.from_numpy(images.transpose(3, 2, 0, 1).copy()), _labels(labels % 10, 10)))
    return Dataset(spec.name, *splits, [str(d) for d in range(10)])


def _read_jpegs(paths: list[Path], spec: DatasetSpec, folder: Path, size: int = 64, resize: bool = False) -> Tensor:
    """RGB images ``(N, 3, size, size)``; with ``resize``, each is first resized (bilinear) to ``size x size``."""
    from PIL import Image

    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with _reading(spec, folder, path):
            with Image.open(path) as image:
                image = image.convert("RGB")  # a few images are greyscale, RGBA or CMYK
                images[i] = np.asarray(image.resize((size, size), Image.BILINEAR) if resize else image)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _read_tiny_imagenet(spec: DatasetSpec, folder: Path) -> Dataset:
    base = folder / "tiny-imagenet-200"
    with _reading(spec, folder, base / "wnids.txt") as path:
        wnids = sorted(path.read_text().split())
        _expect(len(wnids) > 0, "expected one WordNet id per line")
    names = {}
    with _reading(spec, folder, base / "words.txt") as path:
        for line in path.read_text().splitlines():
            wnid, _, words = line.partition("\t")
            names[wnid] = words.split(",")[0].strip()
    cache = base / "cbnorm-cache.npz"  # decoding 110,000 JPEGs takes minutes; their pixels are cached once
    if cache.exists():
        with _reading(spec, folder, cache), np.load(cache, allow_pickle=False) as z:
            splits = [Split(torch.from_numpy(z[f"x_{s}"]), torch.from_numpy(z[f"y_{s}"])) for s in ("train", "test")]
        return Dataset(spec.name, *splits, [names.get(w, w) for w in wnids])
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train_paths, train_labels = [], []
    for wnid in wnids:
        found = sorted((base / "train" / wnid / "images").glob("*.JPEG"))
        if not found:
            raise _missing(spec, folder, base / "train" / wnid / "images" / f"{wnid}_0.JPEG")
        train_paths += found
        train_labels += [index[wnid]] * len(found)
    test_paths, test_labels = [], []
    with _reading(spec, folder, base / "val" / "val_annotations.txt") as path:
        for line in path.read_text().splitlines():
            filename, wnid = line.split("\t")[:2]
            test_paths.append(base / "val" / "images" / filename)
            test_labels.append(index[wnid])
    train = Split(_read_jpegs(train_paths, spec, folder), torch.tensor(train_labels))
    test = Split(_read_jpegs(test_paths, spec, folder), torch.tensor(test_labels))
    with contextlib.suppress(OSError):  # a read-only copy is simply not cached
        atomic_write(cache, lambda f: np.savez(f, x_train=train.images.numpy(), y_train=train.labels.numpy(),
                                                x_test=test.images.numpy(), y_test=test.labels.numpy()))
    return Dataset(spec.name, train, test, [names.get(w, w) for w in wnids])


PET_SIZE = 64  # Oxford-IIIT Pet images come in all sizes; each is resized (squashed) to PET_SIZE x PET_SIZE
PET_CLASSES = 37


def _read_pet_list(spec: DatasetSpec, folder: Path, name: str) -> tuple[list[str], Tensor, Tensor]:
    """``annotations/NAME``: one ``IMAGE CLASS-ID SPECIES BREED-ID`` line per image, ids from 1, species
    1 (cat) or 2 (dog). Returns the image names, the 37-breed labels and the species, from 0."""
    with _reading(spec, folder, folder / "annotations" / name) as path:
        rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        _expect(len(rows) > 0 and all(len(row) == 4 for row in rows),
                "expected lines 'IMAGE CLASS-ID SPECIES BREED-ID' (e.g. 'Abyssinian_100 1 1 1')")
        labels = _labels([int(row[1]) - 1 for row in rows], PET_CLASSES)
        species = _labels([int(row[2]) - 1 for row in rows], 2)
    return [row[0] for row in rows], labels, species


def _read_oxford_pet(spec: DatasetSpec, folder: Path) -> Dataset:
    lists = {
        split: _read_pet_list(spec, folder, f"{name}.txt") for split, name in (("train", "trainval"), ("test", "test"))
    }
    breeds = {}
    for names, labels, _ in lists.values():
        for name, label in zip(names, labels.tolist()):
            breeds.setdefault(label, name.rsplit("_", 1)[0])  # "Abyssinian_100": cats capitalised, "pug_12": dogs not
    classes = [breeds.get(i, f"breed {i + 1}") for i in range(PET_CLASSES)]
    cache = folder / f"cbnorm-cache-{PET_SIZE}.npz"  # decoding and resizing 7,349 JPEGs takes a minute: cached once
    pixels = {}
    if cache.exists():
        with _reading(spec, folder, cache), np.load(cache, allow_pickle=False) as z:
            if all(z[f"names_{s}"].tolist() == lists[s][0] for s in lists):  # else the lists changed: decode again
                pixels = {s: torch.from_numpy(z[f"x_{s}"]) for s in lists}
    if not pixels:
        pixels = {s: _read_jpegs([folder / "images" / f"{name}.jpg" for name in lists[s][0]], spec, folder, PET_SIZE,
                                 resize=True) for s in lists}
        with contextlib.suppress(OSError):  # a read-only copy is simply not cached
            atomic_write(cache, lambda f: np.savez(f, **{f"x_{s}": pixels[s].numpy() for s in lists},
                                                    **{f"names_{s}": np.array(lists[s][0]) for s in lists}))
    train, test = (Split(pixels[s], lists[s][1], lists[s][2]) for s in ("train", "test"))
    return Dataset(spec.name, train, test, classes, ["cat", "dog"])


def _read_digits(spec: DatasetSpec, folder: Path) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    return Dataset(
        spec.name,
        Split(torch.from_numpy(x_train), torch.from_numpy(y_train).long()),
        Split(torch.from_numpy(x_test), torch.from_numpy(y_test).long()),
        [str(d) for d in range(10)],
    )


_IDX = "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"


def _idx_sources(base_url: str, *checksums: str) -> tuple[Source, ...]:
    """The four IDX files under ``base_url``: train images, train labels, test images, test labels."""
    names = [f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
    return tuple(Source(base_url + name, checksum) for name, checksum in zip(names, checksums))


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "cifar10", "cifar10", "cifar10.npz, or cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
            (
                Source(
                    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a"
                ),
            ),
            _read_cifar10, flip=True, crop_padding=4,
        ),
        DatasetSpec(
            "cifar100", "cifar100", "cifar-100-python/{train,test,meta}",
            (Source("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                    "sha256:85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),),
            _read_cifar100, flip=True, crop_padding=4,
        ),
        DatasetSpec(
            "mnist", "mnist", _IDX,
            _idx_sources(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
            _read_idx_dataset([str(d) for d in range(10)]), flip=False, crop_padding=0,
        ),
        DatasetSpec(
            "fashion-mnist", "fashion-mnist", _IDX,
            _idx_sources(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "md5:25c81989df183df01b3e8a0aad5dffbe",
                "md5:bef4ecab320f06d8554ea6380940ec79",
                "md5:bb300cfdad3c16e7a12a480ee83cd310",
            ),
            _read_idx_dataset(["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                               "Bag", "Ankle boot"]),
            flip=True, crop_padding=0,
        ),
        DatasetSpec(
            "svhn", "svhn", "train_32x32.mat, test_32x32.mat",
            (
                Source(
                    "http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "md5:e26dedcc434d2e4c54c9b2d4a06d8373"
                ),
                Source("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "md5:eb5a983be6a315427106f1b164d9cef3"),
            ),
            _read_svhn, flip=False, crop_padding=4,
        ),
        DatasetSpec(
            "tiny-imagenet", "tiny-imagenet",
            "tiny-imagenet-200/{wnids.txt,words.txt,train/<wnid>/images/*.JPEG,val/val_annotations.txt,val/images/}",
            (Source("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "md5:90528d7ca1a48142e341f4ef8d21d0de"),),
            _read_tiny_imagenet, flip=True, crop_padding=8,
        ),
        DatasetSpec(
            "oxford-pet", "oxford-iiit-pet", "images/<breed>_<n>.jpg, annotations/{trainval,test}.txt",
            (
                Source(
                    "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
                    "md5:5c4f3ee8e5d25df40f4fd59a7f44e54c",
                ),
                Source("https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
                       "md5:95a8c909bbe2e81eed6a22bccdf3f68f"),
            ),
            _read_oxford_pet, flip=True, crop_padding=8,
        ),
        DatasetSpec("digits", "", "nothing: it ships with scikit-learn", (), _read_digits, flip=False, crop_padding=0),
    ]
}


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def data_root(data_dir: Optional[PathLike] = None) -> Path:
    """``data_dir``, else ``$CBNORM_DATA``; an error says how to give one when neither is set."""
    root = data_dir or os.environ.get("CBNORM_DATA")
    if not root:
        raise DataError("no data directory: pass --data-dir DIR or set CBNORM_DATA to the folder holding the datasets")
    return Path(root).expanduser()


def load_dataset(name: str, data_dir: Optional[PathLike] = None) -> Dataset:
    """Read dataset ``name`` (a key of :data:`DATASETS`) from ``data_dir`` (default ``$CBNORM_DATA``)."""
    spec = _spec(name)
    folder = Path() if spec.name == "digits" else data_root(data_dir) / spec.folder
    return spec.read(spec, folder)


def available(name: str, data_dir: Optional[PathLike] = None) -> bool:
    """Whether the data root holds a non-empty folder for ``name`` (reading it may still fail if it is
    incomplete: :func:`verify` reads it)."""
    spec = _spec(name)
    folder = data_root(data_dir) / spec.folder
    return spec.name == "digits" or (folder.is_dir() and any(folder.iterdir()))


# -- downloads ------------------------------------------------------------------------------------


def _fetch(source: Source, path: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    def write(f) -> None:
        with urllib.request.urlopen(source.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=source.filename, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))

    try:
        atomic_write(path, write)
    except OSError as error:
        raise DataError(f"could not download {source.url}: {error}") from error


def _extract(archive: Path, folder: Path) -> None:
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuses links and paths outside the folder
                tar.extractall(folder, filter="data")
            else:
                for member in tar.getmembers():
                    unsafe_path = member.name.startswith("/") or ".." in Path(member.name).parts
                    if not (member.isfile() or member.isdir()) or unsafe_path:
                        raise DataError(f"{archive}: refusing to extract {member.name!r}")
                tar.extractall(folder)
    elif archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():  # refuse paths that would land outside the folder
                if member.startswith("/") or ".." in Path(member).parts:
                    raise DataError(f"{archive}: refusing to extract {member!r} outside {folder}")
            z.extractall(folder)


def download(name: str, data_dir: Optional[PathLike] = None, *, progress: bool = True) -> Path:
    """Fetch the official files of ``name``, verify their checksums, extract archives, then move them
    into its folder.

    Everything is fetched and extracted in a temporary folder beside it (``.<folder>.*.part``) and
    moved into place only once every file has verified, so a failed download (no network, a wrong
    checksum) leaves nothing behind, not even an empty folder. Files already present with the right
    checksum are kept. A checksum mismatch raises :class:`DataError` naming both checksums.
    Returns the folder.
    """
    spec = _spec(name)
    if not spec.sources:
        raise DataError(f"{name}: nothing to download ({spec.expects})")
    root = data_root(data_dir)
    folder = root / spec.folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec.folder}.", suffix=".part"))
    try:
        for source in spec.sources:
            algorithm = source.checksum.split(":")[0]
            kept = folder / source.filename
            if kept.exists() and _checksum(kept, algorithm) == source.checksum:
                continue
            path = staging / source.filename
            _fetch(source, path, progress)
            found = _checksum(path, algorithm)
            if found != source.checksum:
                raise DataError(f"{name}: {source.url} has checksum {found}, expected {source.checksum}; deleted it")
            if path.name.endswith((".tar.gz", ".tgz", ".zip")):
                _extract(path, staging)
        folder.mkdir(exist_ok=True)
        for entry in staging.iterdir():  # a re-download replaces what it fetched before
            target = folder / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def verify(name: str, data_dir: Optional[PathLike] = None) -> list[str]:
    """Check the official files present against their checksums and read the dataset.

    Returns one line per check; raises :class:`DataError` at the first failure.
    """
    spec = _spec(name)
    folder = Path() if spec.name == "digits" else data_root(data_dir) / spec.folder
    lines = []
    checked = [(folder / s.filename, s.checksum) for s in spec.sources]
    if spec.name == "cifar10":
        checked.append((folder / "cifar10.npz", CIFAR10_NPZ_SHA256))
    for path, expected in checked:
        if not path.exists():
            continue  # an archive may be deleted once extracted; reading the data below still checks it
        found = _checksum(path, expected.split(":")[0])
        if found != expected:
            raise DataError(f"{name}: {path} has checksum {found}, expected {expected}")
        lines.append(f"{path}: {found} ok")
    data = load_dataset(name, data_dir)
    lines.append(f"{name}: {len(data.train)} train / {len(data.test)} test images of shape "
                 f"{tuple(data.train.images.shape[1:])}, {data.num_classes} classes")
    return lines


# -- mini-batches ---------------------------------------------------------------------------------


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator that depends only on ``(seed, epoch)``: a resumed run redraws the same epoch."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def random_crop_flip(images: Tensor, padding: int, flip: bool, generator: torch.Generator,
                     part_of: Optional[tuple[int, int]] = None) -> Tensor:
    """Standard augmentation of a uint8 batch ``(B, C, H, W)``: a random ``H x W`` crop of the
    zero-padded image (offsets in ``[0, 2 * padding]``), then a horizontal flip with probability 1/2.

    ``part_of=(start, total)``: ``images`` are images ``start .. start + B - 1`` of a batch of
    ``total``, and get the draws those images would get in the whole batch (one rank's share of a
    global batch is augmented as the whole batch would be in one process).
    """
    start, total = part_of or (0, len(images))
    mine = slice(start, start + len(images))
    dy = dx = mirror = None
    if padding:
        dy, dx = torch.randint(0, 2 * padding + 1, (2, total, 1), generator=generator)[:, mine, 0].to(images.device)
    if flip:
        mirror = (torch.rand(total, generator=generator)[mine] < 0.5).to(images.device)
    return crop_flip(images, padding, dy, dx, mirror)


def crop_flip(images: Tensor, padding: int, dy: Optional[Tensor], dx: Optional[Tensor],
              mirror: Optional[Tensor]) -> Tensor:
    """Crop image ``i`` of ``(B, C, H, W)`` at offsets ``(dy[i], dx[i])`` of its zero-padded copy, then
    mirror it where ``mirror[i]``; ``padding`` 0 skips the crop and ``mirror`` ``None`` the flip. The
    offsets and flags are ``(B,)`` tensors on the images' device: nothing here leaves it."""
    batch, channels, height, width = images.shape
    if padding:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
        images = padded[torch.arange(batch, device=images.device)[:, None, None, None],
                        torch.arange(channels, device=images.device)[None, :, None, None], rows, cols]
    if mirror is not None:
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    return images


class Loader:
    """Mini-batches ``(images, labels, cluster_ids)`` of one split held in memory.

    Images are normalised with the training set's per-channel ``mean``/``std``; with ``train=True``
    each epoch is shuffled and augmented by a generator seeded with ``(seed, epoch)`` only, so a run
    resumed at epoch ``e`` sees exactly the batches it would have seen. ``cluster_ids`` (``(N,)`` int64
    or ``None``) travel with the samples.

    In a distributed run, ``batch_size`` is the global batch: process ``rank`` of ``world_size`` gets
    its contiguous share of each global batch (``batch_size / world_size``, the first ranks one more
    where it does not divide; a rank's share of the last batch may be empty), augmented as that
    batch would be in one process. Every rank has the same number of batches, and the ranks' shares
    of a step, concatenated in rank order, are exactly the one-process batch.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: Tensor,
        std: Tensor,
        *,
        train: bool = False,
        flip: bool = False,
        crop_padding: int = 0,
        cluster_ids: Optional[Tensor] = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"expected a positive batch_size, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size, got rank {rank} of {world_size}")
        if cluster_ids is not None and tuple(cluster_ids.shape) != (len(split),):
            raise ValueError(f"expected cluster ids of shape ({len(split)},), got {tuple(cluster_ids.shape)}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)  # a few hundred MB at most; kept on the device
        self.labels = split.labels.to(self.device)
        self.cluster_ids = None if cluster_ids is None else cluster_ids.to(self.device)
        self.mean = (mean * 255).view(1, -1, 1, 1).to(self.device)
        self.std = (std * 255).view(1, -1, 1, 1).to(self.device)
        self.batch_size, self.train, self.flip, self.crop_padding = batch_size, train, flip, crop_padding
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    @property
    def global_batch_sizes(self) -> list[int]:
        """The size of each global batch of an epoch (all ranks' shares together)."""
        return [min(self.batch_size, len(self.labels) - i * self.batch_size) for i in range(len(self))]

    def epoch(self, epoch: int = 0) -> Iterator[tuple[Tensor, Tensor, Optional[Tensor]]]:
        generator = _epoch_generator(self.seed, epoch)
        order = torch.randperm(len(self.labels), generator=generator) if self.train else torch.arange(len(self.labels))
        for batch in order.split(self.batch_size):
            shares = batch.tensor_split(self.world_size)
            index = shares[self.rank].to(self.device)
            images = self.images[index]
            if self.train:
                start = sum(len(share) for share in shares[: self.rank])
                images = random_crop_flip(images, self.crop_padding, self.flip, generator, (start, len(batch)))
            images = (images.float() - self.mean) / self.std
            ids = None if self.cluster_ids is None else self.cluster_ids[index]
            yield images, self.labels[index], ids

    __iter__ = epoch
