import dataclasses
import functools
import hashlib
import http.server
import io
import os
import pickle
import stat
import tarfile
import threading

import numpy as np
import pytest
import torch

from cbnorm.experiments import clusters, data
from cbnorm.experiments.cli import main
from cbnorm.experiments.data import DATASETS, DataError, Loader, Split, load_dataset
from tests.formats import write_cifar10_pickles, write_cifar100, write_mnist_like, write_svhn, write_tiny_imagenet


@pytest.fixture(scope="session")
def cifar10(data_root):
    return load_dataset("cifar10", data_root)


class TestRealData:
    def test_cifar10_npz(self, cifar10, data_root):
        assert cifar10.train.images.shape == (50000, 3, 32, 32) and cifar10.test.images.shape == (10000, 3, 32, 32)
        assert cifar10.train.images.dtype == torch.uint8 and cifar10.train.labels.dtype == torch.int64
        assert cifar10.train.labels.bincount().tolist() == [5000] * 10
        assert cifar10.classes[0] == "airplane" and cifar10.classes[9] == "truck"
        with np.load(data_root / "cifar10" / "cifar10.npz") as z:  # NHWC in the file, NCHW here
            np.testing.assert_array_equal(cifar10.test.images[7].permute(1, 2, 0).numpy(), z["x_test"][7])
        mean, std = cifar10.channel_stats()  # the published values (MANIFEST.md)
        torch.testing.assert_close(mean, torch.tensor([0.49139968, 0.48215841, 0.44653091]), atol=1e-6, rtol=0)
        torch.testing.assert_close(std, torch.tensor([0.24703223, 0.24348513, 0.26158784]), atol=1e-6, rtol=0)

    def test_mnist_idx(self, data_root):
        mnist = load_dataset("mnist", data_root)
        assert mnist.train.images.shape == (60000, 1, 28, 28) and len(mnist.test) == 10000
        assert mnist.train.labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
        mean, std = mnist.channel_stats()
        assert abs(float(mean) - 0.1307) < 1e-4 and abs(float(std) - 0.3081) < 1e-4

    def test_digits_split_is_fixed_and_stratified(self):
        a, b = load_dataset("digits"), load_dataset("digits")
        assert len(a.train) == 1437 and len(a.test) == 360 and a.train.images.shape[1:] == (1, 8, 8)
        assert torch.equal(a.test.images, b.test.images) and int(a.train.images.max()) == 255
        assert (a.test.labels.bincount() - 36).abs().max() <= 1  # 20% of each class

    def test_digits_needs_no_data_root(self, monkeypatch):
        monkeypatch.delenv("CBNORM_DATA", raising=False)
        assert load_dataset("digits").num_classes == 10
        with pytest.raises(DataError, match="no data directory: pass --data-dir DIR or set CBNORM_DATA"):
            load_dataset("mnist")


class TestOfficialFormats:
    def test_cifar10_pickles(self, tmp_path):
        written = write_cifar10_pickles(tmp_path / "cifar10", per_batch=3)
        loaded = load_dataset("cifar10", tmp_path)
        assert loaded.train.images.shape == (15, 3, 32, 32) and len(loaded.test) == 3
        data_5, labels_5 = written["data_batch_5"]
        np.testing.assert_array_equal(loaded.train.images[12:].reshape(3, -1).numpy(), data_5)
        assert loaded.train.labels[12:].tolist() == labels_5 and loaded.classes[3] == "cat"

    def test_cifar100_fine_coarse_and_superclass_clusters(self, tmp_path):
        written = write_cifar100(tmp_path / "cifar100")
        loaded = load_dataset("cifar100", tmp_path)
        data_, fine, coarse = written["test"]
        np.testing.assert_array_equal(loaded.test.images.reshape(len(fine), -1).numpy(), data_)
        assert loaded.test.labels.tolist() == fine.tolist() and loaded.test.coarse_labels.tolist() == coarse.tolist()
        assert loaded.num_classes == 100 and len(loaded.coarse_classes) == 20
        ids = clusters.prior_clusters(loaded, "superclass")
        assert ids.k == 20 and torch.equal(ids.train, loaded.train.coarse_labels)
        subset = loaded.train.subset(torch.tensor([3, 1]))
        assert subset.coarse_labels.tolist() == [written["train"][2][3], written["train"][2][1]]

    def test_superclasses_only_where_the_data_set_has_them(self):
        with pytest.raises(ValueError, match="digits has no superclasses"):
            clusters.prior_clusters(load_dataset("digits"), "superclass")

    @pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
    def test_idx(self, tmp_path, name):
        written = write_mnist_like(tmp_path / DATASETS[name].folder)
        loaded = load_dataset(name, tmp_path)
        np.testing.assert_array_equal(loaded.train.images[:, 0].numpy(), written["train"][0])
        assert loaded.test.labels.tolist() == written["t10k"][1].tolist()

    def test_svhn_mat(self, tmp_path):
        written = write_svhn(tmp_path / "svhn")
        loaded = load_dataset("svhn", tmp_path)
        x, y = written["train"]
        assert loaded.train.images.shape == (8, 3, 32, 32)
        np.testing.assert_array_equal(loaded.train.images[2].numpy(), x[:, :, :, 2].transpose(2, 0, 1))
        assert loaded.train.labels[0] == 0 and loaded.train.labels.tolist() == (y.ravel() % 10).tolist()

    def test_tiny_imagenet_folder(self, tmp_path):
        colours = write_tiny_imagenet(tmp_path / "tiny-imagenet")
        loaded = load_dataset("tiny-imagenet", tmp_path)
        assert loaded.classes == ["goldfish", "Chihuahua"]  # sorted WordNet ids, named by words.txt
        assert loaded.train.images.shape == (6, 3, 64, 64) and loaded.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
        assert loaded.test.labels.tolist() == [1, 0]  # val_annotations.txt: val_0 is n02085620
        rgb = loaded.train.images[4].float().mean((1, 2))
        assert torch.allclose(rgb, torch.tensor(colours["n02085620"], dtype=torch.float), atol=3)
        grey = loaded.train.images[0].float().mean((1, 2))  # a greyscale JPEG becomes three equal channels
        assert torch.allclose(grey, torch.full((3,), float(colours["n01443537"][0])), atol=3)
        cache = tmp_path / "tiny-imagenet" / "tiny-imagenet-200" / "cbnorm-cache.npz"
        assert cache.exists()
        assert torch.equal(load_dataset("tiny-imagenet", tmp_path).train.images, loaded.train.images)


class TestErrors:
    def test_missing_names_the_files_and_checksum(self, tmp_path):
        with pytest.raises(DataError) as error:
            load_dataset("cifar100", tmp_path)
        message = str(error.value)
        assert "cifar-100-python/train is missing" in message and "cifar-100-python/{train,test,meta}" in message
        assert "sha256:85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7" in message
        assert "cbnorm data download cifar100" in message

    def test_missing_svhn(self, tmp_path):
        with pytest.raises(DataError, match=r"train_32x32.mat is missing.*md5:e26dedcc434d2e4c54c9b2d4a06d8373"):
            load_dataset("svhn", tmp_path)

    def test_corrupt_file_names_both_checksums(self, tmp_path, data_root):
        folder = tmp_path / "mnist"
        folder.mkdir()
        for path in (data_root / "mnist").iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        truncated = (folder / "t10k-labels-idx1-ubyte.gz").read_bytes()[:-100]
        (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(truncated)
        found = "sha256:" + hashlib.sha256(truncated).hexdigest()
        with pytest.raises(DataError) as error:
            load_dataset("mnist", tmp_path)
        message = str(error.value)
        assert "t10k-labels-idx1-ubyte.gz is corrupt" in message and found in message
        assert "expected sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6" in message

    def test_wrong_content_in_an_official_name(self, tmp_path):
        write_cifar100(tmp_path / "cifar100")
        (tmp_path / "cifar100" / "cifar-100-python" / "meta").write_bytes(b"not a pickle")
        with pytest.raises(DataError, match=r"meta is corrupt or not in the official format.*cifar-100-python.tar.gz"):
            load_dataset("cifar100", tmp_path)

    def test_unknown_name(self):
        with pytest.raises(ValueError, match=r"unknown dataset 'cifar'; expected one of \['cifar10', 'cifar100'"):
            load_dataset("cifar")

    def test_the_torch_free_dataset_names_are_the_registry(self):
        from cbnorm.experiments.config import DATASET_NAMES

        assert DATASET_NAMES == tuple(DATASETS)


class _Payload:
    """What a crafted pickle holds: unpickling it runs ``touch marker`` in a shell."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class TestNoDataFileRunsCode:
    @pytest.mark.parametrize("name,file", [("cifar10", "cifar-10-batches-py/data_batch_1"),
                                           ("cifar10", "cifar-10-batches-py/batches.meta"),
                                           ("cifar100", "cifar-100-python/train")])
    def test_crafted_pickle(self, tmp_path, name, file):
        (write_cifar10_pickles if name == "cifar10" else write_cifar100)(tmp_path / name)
        marker = tmp_path / "marker"
        with open(tmp_path / name / file, "wb") as f:
            pickle.dump({"data": _Payload(marker), "labels": [0]}, f, protocol=2)
        with pytest.raises(DataError, match=r"corrupt or not in the official format \(refusing to load posix\.system"):
            load_dataset(name, tmp_path)
        assert not marker.exists()

    def test_npz_with_objects_is_refused(self, tmp_path):
        folder = tmp_path / "cifar10"
        folder.mkdir()
        np.savez(folder / "cifar10.npz", x_train=np.array([_Payload(tmp_path / "marker")], dtype=object))
        with pytest.raises(DataError, match="cifar10.npz is corrupt.*Object arrays cannot be loaded"):
            load_dataset("cifar10", tmp_path)
        assert not (tmp_path / "marker").exists()


def split(n=10):
    images = torch.arange(n * 12, dtype=torch.uint8).reshape(n, 3, 2, 2)
    return Split(images, torch.arange(n) % 3)


class TestLoader:
    stats = (torch.zeros(3), torch.ones(3) / 255)  # normalisation leaves the pixel values

    def test_epoch_order_depends_only_on_seed_and_epoch(self):
        def labels(loader, epoch):
            return [b[1].tolist() for b in loader.epoch(epoch)]

        a = Loader(split(), 4, *self.stats, train=True, seed=3)
        b = Loader(split(), 4, *self.stats, train=True, seed=3)
        assert labels(a, 5) == labels(b, 5) and labels(a, 5) != labels(a, 6)
        images = torch.cat([x for x, _, _ in a.epoch(2)])
        assert sorted(images[:, 0, 0, 0].tolist()) == [12.0 * i for i in range(10)]  # every sample once
        assert len(a) == 3 and [len(y) for _, y, _ in a.epoch(0)] == [4, 4, 2]

    def test_ranks_share_each_global_batch(self):
        """batch_size is the global batch.

        The ranks' shares of a step, augmentation included, are the one-process batch.
        """
        def loader(rank=0, world_size=1, train=True):
            return Loader(split(), 4, *self.stats, train=train, flip=True, crop_padding=1, cluster_ids=torch.arange(10),
                          seed=2, rank=rank, world_size=world_size)

        whole = list(loader().epoch(1))
        shares = [list(loader(r, 3).epoch(1)) for r in range(3)]
        assert [len(loader(r, 3)) for r in range(3)] == [3] * 3 and loader().global_batch_sizes == [4, 4, 2]
        assert [len(b[1]) for b in shares[0]] == [2, 2, 1] and [len(b[1]) for b in shares[2]] == [1, 1, 0]
        for step, batch in enumerate(whole):
            for got, want in zip(zip(*(s[step] for s in shares)), batch):
                assert torch.equal(torch.cat(got), want)
        evaluation = [torch.cat([ids for _, _, ids in loader(r, 2, train=False).epoch()]) for r in range(2)]
        assert evaluation[0].tolist() == [0, 1, 4, 5, 8] and evaluation[1].tolist() == [2, 3, 6, 7, 9]
        with pytest.raises(ValueError, match="expected 0 <= rank < world_size, got rank 2 of 2"):
            loader(2, 2)

    def test_eval_order_and_cluster_ids(self):
        loader = Loader(split(), 4, *self.stats, cluster_ids=torch.arange(10) % 2)
        batches = list(loader.epoch())
        assert batches[0][1].tolist() == [0, 1, 2, 0] and batches[2][2].tolist() == [0, 1]
        with pytest.raises(ValueError, match=r"expected cluster ids of shape \(10,\), got \(9,\)"):
            Loader(split(), 4, *self.stats, cluster_ids=torch.zeros(9, dtype=torch.long))

    def test_normalisation(self):
        x, _, _ = next(Loader(split(), 10, torch.full((3,), 0.5), torch.full((3,), 0.25)).epoch())
        torch.testing.assert_close(x[1, 2, 1, 1], torch.tensor((12 + 8 + 3) / 255 - 0.5) / 0.25)

    def test_crop_and_flip(self):
        images = torch.arange(2 * 16, dtype=torch.uint8).reshape(2, 1, 4, 4) + 1
        out = data.random_crop_flip(images, 1, True, torch.Generator().manual_seed(0))
        padded = torch.nn.functional.pad(images, (1,) * 4)
        for i in range(2):  # each output is some 4x4 window of the padded image, maybe mirrored
            windows = [padded[i, :, y : y + 4, x : x + 4] for y in range(3) for x in range(3)]
            assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
        assert torch.equal(data.random_crop_flip(images, 0, False, torch.Generator()), images)


def serve(folder):
    """A local HTTP server for ``folder`` on 127.0.0.1; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def archive_server(tmp_path, monkeypatch):
    """A small cifar-10-python.tar.gz served on 127.0.0.1, with the registry pointing at it."""
    source = tmp_path / "source"
    written = write_cifar10_pickles(source, per_batch=2)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    served = tmp_path / "served"
    served.mkdir()
    (served / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    server = serve(served)
    url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
    checksum = "md5:" + hashlib.md5(buffer.getvalue()).hexdigest()

    def point_to(checksum):
        spec = dataclasses.replace(DATASETS["cifar10"], sources=(data.Source(url, checksum),))
        monkeypatch.setitem(DATASETS, "cifar10", spec)

    point_to(checksum)
    yield written, checksum, point_to
    server.shutdown()


class TestDownload:
    def test_download_verify_extract(self, tmp_path, archive_server, capsys):
        written, checksum, _ = archive_server
        root = tmp_path / "data"
        assert main(["data", "download", "cifar10", "--data-dir", str(root), "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert f"cifar-10-python.tar.gz: {checksum} ok" in out and "cifar10: 10 train / 2 test images" in out
        loaded = load_dataset("cifar10", root)
        np.testing.assert_array_equal(loaded.test.images.reshape(2, -1).numpy(), written["test_batch"][0])
        data.download("cifar10", root, progress=False)  # already there with the right checksum: kept

    def test_checksum_mismatch(self, tmp_path, archive_server, capsys):
        _, checksum, point_to = archive_server
        point_to("md5:" + "0" * 32)
        root = tmp_path / "data"
        assert main(["data", "download", "cifar10", "--data-dir", str(root), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"has checksum {checksum}, expected md5:{'0' * 32}; deleted it" in err
        assert list(root.iterdir()) == []  # no file, no empty folder, no temporary folder

    def test_unreachable(self, tmp_path, monkeypatch):
        unreachable = data.Source("http://127.0.0.1:9/train_32x32.mat", "md5:0")
        spec = dataclasses.replace(DATASETS["svhn"], sources=(unreachable,))
        monkeypatch.setitem(DATASETS, "svhn", spec)
        with pytest.raises(DataError, match=r"could not download http://127.0.0.1:9/train_32x32.mat"):
            data.download("svhn", tmp_path, progress=False)
        assert list(tmp_path.iterdir()) == []  # no partial file, no empty svhn/ folder

    def test_failure_midway_leaves_nothing(self, tmp_path, monkeypatch, capsys):
        """SVHN's first file arrives and verifies, the second breaks off: nothing is moved into svhn/, and
        ``data list`` does not call svhn present."""
        first = b"the first file"
        sources = (data.Source("http://example.invalid/train_32x32.mat", "md5:" + hashlib.md5(first).hexdigest()),
                   data.Source("http://example.invalid/test_32x32.mat", "md5:0"))
        monkeypatch.setitem(DATASETS, "svhn", dataclasses.replace(DATASETS["svhn"], sources=sources))

        class Response(io.BytesIO):
            headers = {}

            def read(self, size=-1):
                if self.url.startswith("http://example.invalid/test") and self.tell() > 4:
                    raise ConnectionResetError("connection reset by peer")
                return super().read(size)

        def urlopen(url, timeout):
            response = Response(first if "train" in url else b"0123456789" * 100)
            response.url = url
            return response

        monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
        with pytest.raises(DataError, match=r"could not download http://example.invalid/test_32x32.mat: .*reset"):
            data.download("svhn", tmp_path, progress=False)
        assert list(tmp_path.iterdir()) == []
        assert main(["data", "list", "--data-dir", str(tmp_path)]) == 0
        assert "svhn           missing" in capsys.readouterr().out


def test_data_list_says_present_only_for_data_that_verify(tmp_path, capsys):
    write_cifar10_pickles(tmp_path / "cifar10")
    (tmp_path / "cifar100").mkdir()  # what a failed download used to leave
    write_cifar100(tmp_path / "cifar100")
    (tmp_path / "cifar100" / "cifar-100-python" / "test").write_bytes(b"")  # truncated to nothing
    assert main(["data", "list", "--data-dir", str(tmp_path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["cifar10"].split()[1] == "present" and rows["digits"].split()[1] == "present"
    assert rows["cifar100"].split()[1] == "unusable" and "cifar-100-python/test is corrupt" in rows["cifar100"]
    assert rows["mnist"].split()[1] == "missing"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        data.atomic_write(tmp_path / "file", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == 0o666 & ~umask
