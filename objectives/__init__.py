"""What a trial runs: data, models, training and cost measurement. Imports no Optuna or MLflow."""

from objectives.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from objectives.data import DataError, FashionMNIST, load_fashion_mnist
from objectives.models import ARCHITECTURES, InputTooSmallError, build_model, check_resize, get_architecture
from objectives.train import DeviceOutOfMemoryError, DivergedError, EpochMetrics, TrainConfig, TrainResult, train

__all__ = [
    "ARCHITECTURES", "Checkpoint", "CheckpointError", "DataError", "DeviceOutOfMemoryError", "DivergedError", "EpochMetrics", "FashionMNIST",
    "InputTooSmallError", "TrainConfig", "TrainResult", "build_model", "check_resize", "get_architecture",
    "load_fashion_mnist", "read_checkpoint", "train",
]
