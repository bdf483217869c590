"""The textbook pipeline, the yardstick our trainer is measured against. Not used by studies.

It is d2l's PyTorch code as the notes call it: `load_data_fashion_mnist(batch_size, resize)` (the
FashionMNIST dataset giving PIL images, `Resize` then `ToTensor` in a DataLoader with 4 worker
processes, shuffled) and `train_ch6` (Xavier-uniform init, plain SGD, fp32, per-batch copies to
the device, accuracy summed on the host after every batch, the test split evaluated after every
epoch). The networks are ours (`objectives.models`), so both sides train the same model.

torchvision's dataset and transforms are used when torchvision imports; where it does not (its
PyPI wheels need a CUDA build of torch), `_TextbookDataset` does the same work with Pillow, as
torchvision does for PIL images: `Image.fromarray(mode="L")`, `resize((R, R), BILINEAR)`, then
`ToTensor`'s float division by 255.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from objectives.models import build_model

DATALOADER_WORKERS = 4  # d2l's get_dataloader_workers()


class _TextbookDataset(Dataset):
    """torchvision.datasets.FashionMNIST with transforms.Compose([Resize(R), ToTensor()])."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, resize: int):
        self.images, self.labels, self.resize = images.numpy(), labels.numpy(), resize

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode="L")
        if self.resize != image.width:
            image = image.resize((self.resize, self.resize), Image.BILINEAR)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).unsqueeze(0).float().div(255)
        return tensor, int(self.labels[index])


def _dataset(images: torch.Tensor, labels: torch.Tensor, resize: int) -> Dataset:
    try:
        from torchvision import transforms
    except Exception:  # noqa: BLE001 -- torchvision missing, or built for another torch
        return _TextbookDataset(images, labels, resize)

    # d2l inserts Resize only when a resize is asked for; the 28-px networks get ToTensor alone.
    transform = transforms.Compose(([transforms.Resize(resize)] if resize != images.shape[-1] else []) + [transforms.ToTensor()])

    class TorchvisionDataset(Dataset):
        # torchvision.datasets.FashionMNIST.__getitem__, minus the file handling.
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, index: int):
            return transform(Image.fromarray(images[index].numpy(), mode="L")), int(labels[index])

    return TorchvisionDataset()


def load_data(images, labels, batch_size: int, resize: int, shuffle: bool) -> DataLoader:
    """d2l.load_data_fashion_mnist for one split."""
    # d2l asks for 4 workers whatever the machine; torch warns when that exceeds the cores, as it may here.
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    return DataLoader(_dataset(images, labels, resize), batch_size, shuffle=shuffle, num_workers=DATALOADER_WORKERS)


def _accuracy(y_hat: torch.Tensor, y: torch.Tensor) -> float:
    return float((y_hat.argmax(axis=1).type(y.dtype) == y).sum())  # a host sync per batch, as in d2l


def evaluate_accuracy(net: nn.Module, data_iter: DataLoader, device: torch.device) -> float:
    net.eval()
    correct, total = 0.0, 0
    with torch.no_grad():
        for X, y in data_iter:
            X, y = X.to(device), y.to(device)
            correct += _accuracy(net(X), y)
            total += y.numel()
    return correct / total


@dataclass
class ReferenceResult:
    test_accuracy: float
    train_loss: float
    train_accuracy: float
    wall_seconds: float  # model build, every epoch's training and evaluation; the dataset files are read before


def train_ch6(arch: str, resize: int, ratio: int, lr: float, epochs: int, batch_size: int,
              train_images, train_labels, test_images, test_labels, device: str = "cpu", seed: int = 0) -> ReferenceResult:
    """d2l's train_ch6 on our network for (arch, resize, ratio)."""
    start = time.perf_counter()
    device = torch.device(device)
    train_iter = load_data(train_images, train_labels, batch_size, resize, shuffle=True)
    test_iter = load_data(test_images, test_labels, batch_size, resize, shuffle=False)
    torch.manual_seed(seed)
    net = build_model(arch, resize, ratio)  # Xavier-uniform init of conv and linear weights, as train_ch6 does

    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    loss = nn.CrossEntropyLoss()
    for _ in range(epochs):
        loss_sum, correct, seen = 0.0, 0.0, 0
        net.train()
        for X, y in train_iter:
            optimizer.zero_grad()
            X, y = X.to(device), y.to(device)
            y_hat = net(X)
            batch_loss = loss(y_hat, y)
            batch_loss.backward()
            optimizer.step()
            with torch.no_grad():
                loss_sum += float(batch_loss) * X.shape[0]
                correct += _accuracy(y_hat, y)
                seen += X.shape[0]
        test_accuracy = evaluate_accuracy(net, test_iter, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ReferenceResult(test_accuracy, loss_sum / seen, correct / seen, time.perf_counter() - start)
