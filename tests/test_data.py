"""torchvision's real loaders: Fashion-MNIST from Debian's package, CIFAR-10 from a tiny archive in its format."""

import gzip
import hashlib
import pickle
import shutil

import numpy as np
import pytest
import torch
from torchvision import datasets

from normbench.data import (DatasetMissing, _decode, augment_batch, cache_checksum, dataset_files, fetch, load_splits,
                            prepare_fashion_mnist, tensor_cache)


def test_fashion_mnist_loads_normalized(fashion_root):
    train, test = load_splits("fashion_mnist", fashion_root, None, 500, torch.device("cpu"))
    assert train.inputs.shape == (60000, 1, 28, 28) and test.inputs.shape == (500, 1, 28, 28)
    assert abs(train.inputs.mean().item()) < 1e-4 and abs(train.inputs.std().item() - 1) < 1e-3
    assert set(train.labels.unique().tolist()) == set(range(10))
    assert all((fashion_root / path).exists() for path in dataset_files("fashion_mnist"))


def test_subsets_are_fixed_across_calls(fashion_root):
    first, _ = load_splits("fashion_mnist", fashion_root, 256, 10, torch.device("cpu"))
    again, _ = load_splits("fashion_mnist", fashion_root, 256, 10, torch.device("cpu"))
    assert torch.equal(first.labels, again.labels) and len(first) == 256


def test_corrupted_archive_is_refused(tmp_path, fashion_root):
    source = tmp_path / "debian"
    source.mkdir()
    for path in (path for path in dataset_files("fashion_mnist") if "/raw/" in path):  # the idx files
        data = (fashion_root / path).read_bytes()
        if "train-labels" in path:
            data = data[:-1] + bytes([data[-1] ^ 1])  # one flipped bit
        with gzip.open(source / (path.rsplit("/", 1)[1] + ".gz"), "wb") as archive:
            archive.write(data)
    with pytest.raises(DatasetMissing, match="train-labels-idx1-ubyte.gz decompresses to data with MD5 other than"):
        prepare_fashion_mnist(tmp_path / "root", source)


def test_missing_dataset_names_both_ways_to_get_it(tmp_path):
    with pytest.raises(DatasetMissing) as error:
        fetch("cifar10", tmp_path, download=False)
    assert "--download" in str(error.value) and "cifar-10-batches-py" in str(error.value)
    with pytest.raises(DatasetMissing, match="dataset-fashion-mnist.*--download"):
        load_splits("fashion_mnist", tmp_path, None, None, torch.device("cpu"))


def write_tiny_cifar(root, monkeypatch, per_batch=4):
    """Write CIFAR-10's python-pickle layout (5 training batches, a test batch, the meta file) and point
    torchvision's expected MD5s at these files, so its own integrity check runs and passes."""
    folder = root / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name, content):
        (folder / name).write_bytes(pickle.dumps(content))
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    for listing in ("train_list", "test_list"):
        files = [write(name, {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                              "labels": rng.integers(0, 10, per_batch).tolist()})
                 for name, _ in getattr(datasets.CIFAR10, listing)]
        monkeypatch.setattr(datasets.CIFAR10, listing, files)
    _, meta_md5 = write("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    monkeypatch.setattr(datasets.CIFAR10, "meta", {**datasets.CIFAR10.meta, "md5": meta_md5})
    return folder


def test_cifar10_through_torchvision_loader(tmp_path, monkeypatch):
    folder = write_tiny_cifar(tmp_path, monkeypatch)
    train, test = load_splits("cifar10", tmp_path, None, None, torch.device("cpu"))
    assert train.inputs.shape == (20, 3, 32, 32) and test.inputs.shape == (4, 3, 32, 32)
    batches = [pickle.loads((folder / name).read_bytes()) for name, _ in datasets.CIFAR10.train_list]
    scaled = torch.cat([torch.as_tensor(b["data"]) for b in batches]).float().view(-1, 3, 32, 32) / 255
    mean, std = scaled.mean((0, 2, 3)).view(3, 1, 1), scaled.std((0, 2, 3)).view(3, 1, 1)
    torch.testing.assert_close(train.inputs * std + mean, scaled)  # planes R, G, B, in archive order
    assert train.labels.tolist() == sum((b["labels"] for b in batches), [])


def test_corrupted_cifar_batch_is_refused(tmp_path, monkeypatch):
    folder = write_tiny_cifar(tmp_path, monkeypatch)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetMissing, match="cifar10 not found .*corrupted"):
        load_splits("cifar10", tmp_path, None, None, torch.device("cpu"))


def test_augmentation_is_a_crop_of_the_padded_image_maybe_flipped():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    out = augment_batch(images, torch.Generator().manual_seed(7), pad=2)
    generator = torch.Generator().manual_seed(7)
    dy, dx = torch.randint(0, 5, (2,), generator=generator), torch.randint(0, 5, (2,), generator=generator)
    flip = torch.rand(2, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        expected = padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 5]
        if flip[i]:
            expected = padded[i].flip(-1)[:, dy[i]:dy[i] + 5, 4 - dx[i]:9 - dx[i]]
        torch.testing.assert_close(out[i], expected)


def test_the_workflow_names_the_files_torchvision_reads():
    assert dataset_files("cifar10") == [*(f"{datasets.CIFAR10.base_folder}/{name}"
                                          for name, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list),
                                        "normbench/cifar10.pt"]


def test_the_tensor_cache_holds_what_torchvision_decodes(fashion_root, tmp_path):
    cached = torch.load(tensor_cache("fashion_mnist", fashion_root), weights_only=True)
    decoded = _decode("fashion_mnist", fashion_root)
    assert cached.keys() == decoded.keys() and all(torch.equal(cached[k], decoded[k]) for k in decoded)
    shutil.copytree(fashion_root / "FashionMNIST", tmp_path / "FashionMNIST")  # the files alone, no cache
    from_files = load_splits("fashion_mnist", tmp_path, 300, 50, torch.device("cpu"))
    from_cache = load_splits("fashion_mnist", fashion_root, 300, 50, torch.device("cpu"))
    assert all(torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
               for a, b in zip(from_files, from_cache))


def test_a_repeated_setup_leaves_the_cache_untouched(fashion_root):
    """`make setup` runs `normbench data` every time; the cache is an input of every cell, so rewriting it would
    make every finished cell out of date."""
    cache = tensor_cache("fashion_mnist", fashion_root)
    before = cache.stat().st_mtime_ns, cache_checksum("fashion_mnist", fashion_root).stat().st_mtime_ns
    assert fetch("fashion_mnist", fashion_root, download=False) is False
    assert (cache.stat().st_mtime_ns, cache_checksum("fashion_mnist", fashion_root).stat().st_mtime_ns) == before


@pytest.mark.parametrize("damage", ["truncated", "flipped bit", "no checksum", "random checksum"])
def test_a_damaged_cache_is_never_trained_on_and_setup_rebuilds_it(fashion_root, tmp_path, damage):
    root = tmp_path / "root"
    shutil.copytree(fashion_root, root)
    cache, checksum = tensor_cache("fashion_mnist", root), cache_checksum("fashion_mnist", root)
    good = cache.read_bytes()
    if damage == "truncated":
        cache.write_bytes(good[:len(good) // 2])
    elif damage == "flipped bit":
        middle = len(good) // 2  # inside the training images
        cache.write_bytes(good[:middle] + bytes([good[middle] ^ 1]) + good[middle + 1:])
    elif damage == "no checksum":
        checksum.unlink()
    else:
        checksum.write_bytes(bytes(range(128, 193)))  # not even text
    with pytest.raises(DatasetMissing, match=rf"tensor cache {cache} .*rebuild it with `normbench data fashion_mnist"):
        load_splits("fashion_mnist", root, 100, 10, torch.device("cpu"))
    assert fetch("fashion_mnist", root, download=False) is ("checksum" not in damage)  # those: checksum only
    assert cache.read_bytes() == good and len(load_splits("fashion_mnist", root, 100, 10, torch.device("cpu"))[0]) == 100
