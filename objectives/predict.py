"""Predictions of a trained network: the inputs it takes, its classes, a confusion matrix.

A trained network takes what the trainer feeds it: float images (N, 1, R, R) in [0, 1], resized
on the fly from Fashion-MNIST's 28×28 uint8 images. `model_inputs` builds exactly that, so a
network saved after training can be checked against the one that was trained.

Example:
    >>> from objectives import TrainConfig, load_fashion_mnist, train
    >>> data = load_fashion_mnist().subset(256, 64, 64)
    >>> result = train(TrainConfig(arch="lenet_bn", lr=0.1, epochs=1, batch_size=32), data)
    >>> predict(result.model, data.test_images, resize=28).shape
    torch.Size([64])
"""

from __future__ import annotations

import torch

from objectives.models import NUM_CLASSES
from objectives.train import _prepare

# Fashion-MNIST's label names, by label.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def model_inputs(images: torch.Tensor, resize: int) -> torch.Tensor:
    """uint8 images (N, 28, 28) -> the float (N, 1, resize, resize) batch the network was trained on."""
    return _prepare(images, resize, channels_last=False)


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, resize: int, batch_size: int = 1024) -> torch.Tensor:
    """The predicted class of each uint8 image, as int64 (N,) on the CPU; fp32, model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    classes = [model(model_inputs(images[start:start + batch_size].to(device), resize)).argmax(1).cpu()
               for start in range(0, len(images), batch_size)]
    return torch.cat(classes)


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Counts (num_classes, num_classes): row = true class, column = predicted class."""
    index = labels.cpu() * num_classes + predicted.cpu()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
