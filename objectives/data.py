"""Fashion-MNIST: find the genuine files, verify them, load them once as uint8 tensors.

Sources, first hit wins: an explicit directory (argument or FASHION_MNIST_DIR),
the project's cache directory, Debian's `dataset-fashion-mnist` package, and
last torchvision's downloader into the cache. Gzipped and plain IDX files are
both accepted; content is checked by the md5 of the decompressed bytes, since
mirrors wrap the same data in different gzip headers.

    python -m objectives locate     # print where the data is, or fail with how to get it
    python -m objectives download   # torchvision's downloader into the cache (needs internet)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

# md5 of the decompressed content of each genuine file.
FILES = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (
    f"install Debian's {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}), "
    "run `python -m objectives download`, or point FASHION_MNIST_DIR at the four IDX files"
)
VAL_SIZE = 5000  # held out of the 60,000 training images; Optuna optimises accuracy on these
TRAIN_SIZE = 60000 - VAL_SIZE
TEST_SIZE = 10000
SPLIT_SEED = 0   # the train/validation split never changes between trials or studies


class DataError(RuntimeError):
    """Fashion-MNIST is missing, truncated or not the genuine data."""


@dataclass(frozen=True)
class FashionMNIST:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,), already split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str  # the directory the files came from
    digest: str  # md5 over the four verified files, for lineage

    def subset(self, n_train: int | None = None, n_val: int | None = None, n_test: int | None = None) -> FashionMNIST:
        """The first n of each split; the split is shuffled once already, so these are random samples."""
        for name, n, full in (("n_train", n_train, self.train_labels), ("n_val", n_val, self.val_labels), ("n_test", n_test, self.test_labels)):
            if n is not None and not 1 <= n <= len(full):
                raise ValueError(f"{name} must be between 1 and {len(full)}; got {n}")
        return FashionMNIST(
            self.train_images[:n_train], self.train_labels[:n_train],
            self.val_images[:n_val], self.val_labels[:n_val],
            self.test_images[:n_test], self.test_labels[:n_test],
            self.source, self.digest,
        )

    def with_validation_in_train(self, n_train: int | None = None, n_val: int | None = None) -> FashionMNIST:
        """Train and validation merged into one training split, with no validation split left: the final model's data.
        The first n_train and n_val of each (None: all of it, 60,000 images in all); the test split as it is."""
        part = self.subset(n_train, n_val)
        return FashionMNIST(
            torch.cat([part.train_images, part.val_images]), torch.cat([part.train_labels, part.val_labels]),
            self.val_images[:0], self.val_labels[:0],
            self.test_images, self.test_labels,
            self.source, self.digest,
        )


def cache_root() -> Path:
    """The project's folder in the user's cache: the downloaded data, and what else is built once per machine."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnn-study"


def cache_dir() -> Path:
    return cache_root() / "fashion-mnist"


def _debian_dir() -> Path | None:
    """Where the Debian package put the files, asking dpkg when the usual place is empty."""
    if DEBIAN_DIR.is_dir():
        return DEBIAN_DIR
    try:
        listing = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in listing.splitlines():
        if line.endswith("train-images-idx3-ubyte.gz"):
            return Path(line).parent
    return None


def _file_in(directory: Path, name: str) -> Path | None:
    # torchvision's downloader keeps the files under FashionMNIST/raw/.
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _has_all_files(directory: Path) -> bool:
    return all(_file_in(directory, name) for name in FILES)


def locate(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory to load from. An explicit directory is used as given, even if files are missing there."""
    explicit = data_dir or os.environ.get("FASHION_MNIST_DIR")
    if explicit:
        directory = Path(explicit).expanduser()
        if not directory.is_dir():
            raise DataError(f"data directory {directory} does not exist; {HOW_TO_GET}")
        return directory
    for directory in (cache_dir(), _debian_dir()):
        if directory is not None and _has_all_files(directory):
            return directory
    raise DataError(f"Fashion-MNIST not found in {cache_dir()} or {DEBIAN_DIR}; {HOW_TO_GET}")


def verify(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory, with every file present and genuine (a DataError naming the first that is not). The data
    read stays loaded for this process's load_fashion_mnist: a launch verifies before it writes, then trains on it."""
    return Path(load_fashion_mnist(data_dir).source)


def _read_verified(directory: Path, name: str) -> bytes:
    path = _file_in(directory, name)
    if path is None:
        raise DataError(f"{name} (or {name}.gz) is missing from {directory}; {HOW_TO_GET}")
    try:
        content = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is truncated or not gzip ({error}); replace it: {HOW_TO_GET}") from None
    digest = hashlib.md5(content).hexdigest()
    if digest != FILES[name]:
        raise DataError(
            f"{path} is not the genuine Fashion-MNIST file: md5 of its content is {digest}, expected {FILES[name]}; "
            f"replace it: {HOW_TO_GET}"
        )
    return content


def _parse_idx(content: bytes, dims: int) -> torch.Tensor:
    # IDX header: 0x00 0x00, type code 0x08 (ubyte), number of dims, then one big-endian uint32 per dim.
    shape = [int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    offset = 4 + 4 * dims
    return torch.frombuffer(bytearray(content[offset:]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> FashionMNIST:
    """All 70,000 images, verified, with the training set split once into train and validation. Read once per process
    while the files stay as they are: a file replaced or rewritten since is read and verified again. The tensors are
    shared between callers, which only read them."""
    directory = locate(data_dir)
    return _load(directory, _on_disk(directory))


def _on_disk(directory: Path) -> tuple:
    """What tells the files as they are now from any earlier version: path, inode, size and modification time."""
    paths = [_file_in(directory, name) or name for name in FILES]  # a missing file: its name, which _load reports
    return tuple((path, (s := path.stat()).st_ino, s.st_size, s.st_mtime_ns) if isinstance(path, Path) else (path,) for path in paths)


@functools.lru_cache(maxsize=1)
def _load(directory: Path, on_disk: tuple) -> FashionMNIST:
    contents = {name: _read_verified(directory, name) for name in FILES}
    images = _parse_idx(contents["train-images-idx3-ubyte"], 3)
    labels = _parse_idx(contents["train-labels-idx1-ubyte"], 1).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val, train = order[:VAL_SIZE], order[VAL_SIZE:]
    digest = hashlib.md5("".join(FILES.values()).encode()).hexdigest()
    return FashionMNIST(
        train_images=images[train], train_labels=labels[train],
        val_images=images[val], val_labels=labels[val],
        test_images=_parse_idx(contents["t10k-images-idx3-ubyte"], 3),
        test_labels=_parse_idx(contents["t10k-labels-idx1-ubyte"], 1).long(),
        source=str(directory), digest=digest,
    )


def download() -> Path:
    """torchvision's downloader into the cache; for machines with internet and no Debian package."""
    try:
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST
    except Exception as error:  # noqa: BLE001 -- torchvision missing, or built for another torch (RuntimeError at import)
        raise DataError(f"torchvision is needed to download Fashion-MNIST ({error}); pip install 'cnn-study[download]' or {HOW_TO_GET}") from None
    TorchvisionFashionMNIST(root=str(cache_dir()), train=True, download=True)
    TorchvisionFashionMNIST(root=str(cache_dir()), train=False, download=True)
    return cache_dir()


def main(argv: list[str]) -> int:
    if argv not in (["locate"], ["download"]):
        print("usage: python -m objectives locate|download", file=sys.stderr)
        return 2
    try:
        directory = download() if argv == ["download"] else locate()
        for name in FILES:
            _read_verified(directory, name)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
