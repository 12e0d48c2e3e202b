"""Datasets as tensors on the training device, through torchvision's own loaders.

Fashion-MNIST and CIFAR-10 fit in memory many times over, so each split is
decoded by torchvision, normalized with the training split's statistics
and kept as one tensor on the device: batches are index lookups, with no
DataLoader workers to become the bottleneck (airbench's discipline).
`normbench data` keeps torchvision's decoded tensors in a cache beside the
files (<root>/normbench/<name>.pt, its SHA-256 beside it): a cell checks and maps them in a fraction of a
second and never imports torchvision, whose import alone costs more than a second.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from normbench.results import write_atomic

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetSpec:
    torchvision_class: str  # the class's name in torchvision.datasets, imported only to read files
    input_shape: tuple[int, int, int]
    num_classes: int
    how_to_get: str


DATASETS = {
    "fashion_mnist": DatasetSpec(
        "FashionMNIST", (1, 28, 28), 10,
        "install Debian's package dataset-fashion-mnist (as root: apt-get install -y "
        "dataset-fashion-mnist; `make setup` does this) and run `normbench data fashion_mnist`, "
        "or run `normbench data fashion_mnist --download` where the internet is reachable",
    ),
    "cifar10": DatasetSpec(
        "CIFAR10", (3, 32, 32), 10,
        "run `normbench data cifar10 --download` where the internet is reachable, or put "
        "cifar-10-batches-py/ (the python version of CIFAR-10) under the data root",
    ),
}


class DatasetMissing(FileNotFoundError):
    """The dataset is not under the data root; the message says how to get it."""


@dataclass
class Split:
    inputs: torch.Tensor  # normalized images (N, C, H, W), or token ids (N, T)
    labels: torch.Tensor  # int64 classes (N,), or next tokens (N, T)

    def __len__(self) -> int:
        return len(self.labels)


def torchvision_dataset(name: str) -> type:
    """torchvision's dataset class for `name`, imported on first use: `import torchvision` costs a second or two
    (its models pull in torch._dynamo), which planning and commands that read no images should not pay."""
    from torchvision import datasets

    return getattr(datasets, DATASETS[name].torchvision_class)


def _load_raw(name: str, root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) and int64 labels from torchvision's dataset class."""
    spec = DATASETS[name]
    if not Path(root).is_dir():
        raise DatasetMissing(f"the data folder {str(root)!r} does not exist (relative paths count from the current "
                             f"directory, {Path.cwd()}); run from the folder that holds it, or point to it with "
                             f"--set data_root=/absolute/path (setting 'data_root')")
    try:
        dataset = torchvision_dataset(name)(str(root), train=train, download=False)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted..."
        raise DatasetMissing(f"{name} not found under {Path(root).resolve()} ({error}); {spec.how_to_get}") from None
    images = torch.as_tensor(dataset.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # CIFAR is NHWC
    return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64)


def tensor_cache(name: str, root: str | Path) -> Path:
    return Path(root) / "normbench" / f"{name}.pt"


def cache_checksum(name: str, root: str | Path) -> Path:
    """The SHA-256 of the tensor cache, written beside it: a damaged cache is never trained on."""
    return Path(root) / "normbench" / f"{name}.pt.sha256"


def _decode(name: str, root: str | Path) -> dict[str, torch.Tensor]:
    """Both splits of `name` as torchvision's loader reads them from `root`, with the per-channel mean and std of
    the full training split (computed here once, not in every cell)."""
    train_images, train_labels = _load_raw(name, root, train=True)
    test_images, test_labels = _load_raw(name, root, train=False)
    scaled = train_images.double().div_(255)  # float64 sums: the same float32 statistics at any thread count
    return {"train_images": train_images, "train_labels": train_labels,
            "test_images": test_images, "test_labels": test_labels,
            "mean": scaled.mean(dim=(0, 2, 3), keepdim=True).float(),
            "std": scaled.std(dim=(0, 2, 3), keepdim=True).float()}


def _read_cache(name: str, root: str | Path) -> dict[str, torch.Tensor] | None:
    """The tensor cache when its bytes match their checksum; None when there is no cache; DatasetMissing when
    there is one that does not match (cut short, overwritten, or written by a normbench without checksums)."""
    cached, checksum = tensor_cache(name, root), cache_checksum(name, root)
    if not cached.exists():
        return None
    expected = _recorded_checksum(checksum)
    if _sha256(cached) != expected:
        found = f"does not match its checksum {checksum}" if expected else f"has no valid checksum file {checksum}"
        raise DatasetMissing(f"the tensor cache {cached} {found}: it is damaged or incomplete; rebuild it with "
                             f"`normbench data {name} --root {root}` (`make setup` does this)")
    return torch.load(cached, weights_only=True, mmap=True)  # mapped: subsets copy only what they keep


def _recorded_checksum(checksum: Path) -> str | None:
    """The digest a checksum file holds; None where there is none or it is no digest (empty, damaged)."""
    try:
        digest = checksum.read_bytes().decode("ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _decoded(name: str, root: str | Path) -> dict[str, torch.Tensor]:
    """Both splits from the tensor cache that `normbench data` writes (checked), or else decoded by torchvision."""
    cached = _read_cache(name, root)
    return _decode(name, root) if cached is None else cached


def load_splits(name: str, root: str | Path, train_subset: int | None, test_subset: int | None,
                device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[Split, Split]:
    """Train and test splits on `device`, normalized per channel by the full training split's statistics.

    Subsets are the first images of a fixed permutation (seed 0), so every cell of a
    study, whatever its training seed, sees the same images.
    """
    decoded = _decoded(name, root)
    mean, std = decoded["mean"], decoded["std"]

    def prepare(images: torch.Tensor, labels: torch.Tensor, subset: int | None) -> Split:
        if subset is not None:
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:subset]
            images, labels = images[keep], labels[keep]
        normalized = (images.float().div_(255) - mean) / std
        return Split(normalized.to(device, dtype), labels.to(device))

    return (prepare(decoded["train_images"], decoded["train_labels"], train_subset),
            prepare(decoded["test_images"], decoded["test_labels"], test_subset))


@cache
def _read_text(path: str) -> str:
    """The text of a language-model cell, read once per process (validation, model and data all need it)."""
    return Path(path).read_text(encoding="utf-8")


def text_vocabulary(text: str) -> list[str]:
    return sorted(set(text))


def load_text_splits(path: str | Path, context: int, train_subset: int | None, test_subset: int | None,
                     device: torch.device) -> tuple[Split, Split]:
    """Character-level language modelling: the first 90% of the text trains, the rest validates.

    Each split is cut into non-overlapping windows of `context` characters; a window's
    labels are the same characters shifted by one (the next character to predict).
    """
    text = _read_text(str(path))
    vocabulary = {char: index for index, char in enumerate(text_vocabulary(text))}
    ids = torch.tensor([vocabulary[char] for char in text], dtype=torch.int64)
    cut = int(len(ids) * 0.9)

    def windows(part: torch.Tensor, subset: int | None) -> Split:
        count = (len(part) - 1) // context
        if count < 1:
            raise DatasetMissing(f"{path}: too short for one window of {context} characters in each split")
        inputs = part[:count * context].view(count, context)
        targets = part[1:count * context + 1].view(count, context)
        return Split(inputs[:subset].to(device), targets[:subset].to(device))

    return windows(ids[:cut], train_subset), windows(ids[cut:], test_subset)


def model_io(settings) -> tuple[tuple[int, ...], int]:
    """The model's input shape and number of outputs (classes, or the text's vocabulary)."""
    if settings.dataset == "text":
        return (settings.context,), len(text_vocabulary(_read_text(settings.text_path)))
    spec = DATASETS[settings.dataset]
    return spec.input_shape, spec.num_classes


def load_data(settings, device: torch.device, dtype: torch.dtype) -> tuple[Split, Split]:
    """A cell's train and test splits on the device, images in `dtype`."""
    if settings.dataset == "text":
        return load_text_splits(settings.text_path, settings.context, settings.train_subset, settings.test_subset, device)
    return load_splits(settings.dataset, settings.data_root, settings.train_subset, settings.test_subset, device, dtype)


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, for a whole batch at once."""
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    flip = torch.rand(n, generator=generator).to(images.device) < 0.5
    rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
    cols = torch.arange(width, device=images.device).expand(n, width)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    batch_index = torch.arange(n, device=images.device)[:, None, None, None]
    channel_index = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows, cols[:, None, None, :]]


def dataset_files(name: str) -> list[str]:
    """The files, relative to the data root, that `normbench data` makes: those torchvision's loader reads for
    `name`, and the tensor cache."""
    cache_file = str(tensor_cache(name, "."))  # its checksum file comes with it (not a workflow input)
    if name == "fashion_mnist":
        return [*(f"FashionMNIST/raw/{file}" for file in FASHION_MNIST_MD5), cache_file]
    return [*(f"cifar-10-batches-py/{file}" for file in CIFAR10_FILES), cache_file]


# What torchvision's CIFAR10 reads (its base_folder, train_list and test_list; a test checks they agree), named here
# so that planning the workflow needs no torchvision import.
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# MD5s of the uncompressed idx files. Debian recompressed the .gz files, so the MD5s
# of the original archives (torchvision's FashionMNIST.resources) cannot match them;
# these are the checksums of the decompressed originals as published alongside them.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


def prepare_fashion_mnist(root: str | Path, source: Path = DEBIAN_FASHION_MNIST) -> Path:
    """Decompress Debian's Fashion-MNIST where torchvision looks, checking each file's MD5.

    torchvision's FashionMNIST(download=False) accepts only the uncompressed idx
    files in <root>/FashionMNIST/raw/.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, md5 in FASHION_MNIST_MD5.items():
        target = raw / name
        if target.exists() and _md5(target) == md5:
            continue
        archive = source / f"{name}.gz"
        if not archive.exists():
            raise DatasetMissing(f"{archive} is missing; {DATASETS['fashion_mnist'].how_to_get}")
        partial = raw / f".{name}.partial"
        with gzip.open(archive, "rb") as compressed, open(partial, "wb") as out:
            shutil.copyfileobj(compressed, out)
        if _md5(partial) != md5:
            partial.unlink()
            raise DatasetMissing(f"{archive} decompresses to data with MD5 other than {md5}: "
                                 "the file is corrupted; reinstall dataset-fashion-mnist")
        partial.replace(target)
    return raw


def fetch(name: str, root: str | Path, download: bool) -> bool:
    """Make `name` loadable from `root` (already there, from Debian's package, or, if allowed, downloaded), then
    write the tensor cache of what torchvision's loader reads, with its SHA-256 beside it. The cache is an input
    of every cell, so it is rewritten only when its tensors change: a repeated set-up (or a torch that serializes
    the same tensors to other bytes) leaves finished cells up to date. True when the cache was (re)written."""
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        decoded = _decode(name, root)
    except DatasetMissing:
        if name == "fashion_mnist" and DEBIAN_FASHION_MNIST.exists():
            prepare_fashion_mnist(root)
        elif download:
            try:
                for train in (True, False):
                    torchvision_dataset(name)(str(root), train=train, download=True)
            except Exception as error:  # no network, a mirror down, a bad archive: all end the same way
                raise DatasetMissing(f"downloading {name} failed ({error}); {DATASETS[name].how_to_get}") from None
        decoded = _decode(name, root)
    cached, checksum = tensor_cache(name, root), cache_checksum(name, root)
    try:  # unchecked: a cache without a checksum (an older normbench) is still compared tensor by tensor
        existing = torch.load(cached, weights_only=True) if cached.exists() else None
    except (RuntimeError, EOFError, pickle.UnpicklingError):  # cut short or damaged: rewritten below
        existing = None
    unchanged = existing is not None and existing.keys() == decoded.keys() and all(
        torch.equal(existing[key], decoded[key]) for key in decoded)
    if not unchanged:
        write_atomic(cached, lambda f: torch.save(decoded, f), mode="wb")
    digest = _sha256(cached)
    if _recorded_checksum(checksum) != digest:  # not an input of the cells: no rerun
        write_atomic(checksum, lambda f: f.write(digest + "\n"))
    return not unchanged
