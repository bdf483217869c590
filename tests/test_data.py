import gzip
import shutil

import pytest
import torch

from objectives.data import FILES, DataError, _parse_idx, _read_verified, load_fashion_mnist, locate


def test_real_files_parse_into_the_documented_splits(fashion):
    assert fashion.train_images.shape == (55000, 28, 28) and fashion.train_images.dtype == torch.uint8
    assert fashion.val_images.shape == (5000, 28, 28)
    assert fashion.test_images.shape == (10000, 28, 28)
    for labels in (fashion.train_labels, fashion.val_labels, fashion.test_labels):
        assert labels.min() == 0 and labels.max() == 9
    # Fashion-MNIST is balanced: 6000 training images per class across train + validation.
    counts = torch.bincount(torch.cat([fashion.train_labels, fashion.val_labels]), minlength=10)
    assert counts.tolist() == [6000] * 10
    assert torch.bincount(fashion.test_labels, minlength=10).tolist() == [1000] * 10


def test_split_is_fixed_and_covers_the_training_file_once(fashion):
    again = load_fashion_mnist()
    assert torch.equal(again.val_labels, fashion.val_labels) and torch.equal(again.val_images, fashion.val_images)
    # Train and validation together are the 60,000 training images, each exactly once (compared by pixel sums).
    split = torch.cat([fashion.train_images, fashion.val_images]).flatten(1).long().sum(1).sort().values
    raw = _parse_idx(_read_verified(locate(), "train-images-idx3-ubyte"), 3)
    assert torch.equal(split, raw.flatten(1).long().sum(1).sort().values)


def test_subsets_take_the_first_rows(fashion):
    small = fashion.subset(100, 50, 20)
    assert len(small.train_labels) == 100 and len(small.val_labels) == 50 and len(small.test_labels) == 20
    assert torch.equal(small.train_images, fashion.train_images[:100])
    with pytest.raises(ValueError, match="n_train must be between 1 and 55000"):
        fashion.subset(n_train=0)


def _copy_data(tmp_path, fashion):
    target = tmp_path / "data"
    target.mkdir()
    for name in FILES:
        source = locate() / f"{name}.gz"
        if source.exists():
            shutil.copy(source, target / f"{name}.gz")
        else:
            shutil.copy(locate() / name, target / name)
    return target


def test_plain_and_gzipped_files_are_both_accepted(tmp_path, fashion):
    directory = _copy_data(tmp_path, fashion)
    name = "t10k-labels-idx1-ubyte"
    gz = directory / f"{name}.gz"
    if gz.exists():
        (directory / name).write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    data = load_fashion_mnist(directory)
    assert torch.equal(data.test_labels, fashion.test_labels)


def test_digest_mismatch_names_the_file(tmp_path, fashion):
    directory = _copy_data(tmp_path, fashion)
    path = next(directory.glob("train-labels-idx1-ubyte*"))
    content = bytearray(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    content[100] = (content[100] + 1) % 10  # one wrong label
    path.unlink()
    (directory / "train-labels-idx1-ubyte").write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte is not the genuine Fashion-MNIST file: md5 .* expected 9018921c"):
        load_fashion_mnist(directory)


def test_truncated_gzip_names_the_file(tmp_path, fashion):
    directory = _copy_data(tmp_path, fashion)
    path = directory / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        path.write_bytes(gzip.compress((directory / "t10k-images-idx3-ubyte").read_bytes()))
        (directory / "t10k-images-idx3-ubyte").unlink()
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is truncated or not gzip"):
        load_fashion_mnist(directory)


def test_missing_file_and_missing_directory(tmp_path, fashion):
    directory = _copy_data(tmp_path, fashion)
    next(directory.glob("t10k-labels-idx1-ubyte*")).unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte .* is missing"):
        load_fashion_mnist(directory)
    with pytest.raises(DataError, match="does not exist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_data_is_read_once_until_a_file_changes(tmp_path, fashion):
    directory = _copy_data(tmp_path, fashion)
    first = load_fashion_mnist(directory)
    assert load_fashion_mnist(directory) is first  # a launch verifies the data, then trains on what it read
    path = next(directory.glob("train-labels-idx1-ubyte*"))
    content = bytearray(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    content[100] = (content[100] + 1) % 10
    path.write_bytes(gzip.compress(bytes(content)) if path.suffix == ".gz" else bytes(content))  # rewritten in place
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.* is not the genuine Fashion-MNIST file"):
        load_fashion_mnist(directory)
