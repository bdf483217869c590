"""One training function: `train(config, data, on_epoch=None, checkpoint=None, resume=None) -> TrainResult`.

The whole split lives on the device as uint8; each batch is picked by a
device-side permutation, converted to float and resized on the device. No
DataLoader, no per-batch host-to-device copy, one host sync per epoch.

Example:
    >>> from objectives import TrainConfig, load_fashion_mnist, train
    >>> result = train(TrainConfig(arch="lenet", lr=0.9, epochs=3, batch_size=256), load_fashion_mnist())
    >>> result.val_accuracy > 0.5  # the notes' LeNet leaves its initial plateau during epoch 2
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import statistics
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from objectives.checkpoint import Checkpoint, write_checkpoint
from objectives.data import TEST_SIZE, TRAIN_SIZE, VAL_SIZE, FashionMNIST
from objectives.inspect import training_bytes
from objectives.memory import PeakMemory
from objectives.models import build_model, check_init, check_resize, get_architecture, parameter_count


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory; the trial's memory has been released."""


SPLIT_SIZES = {"n_train": TRAIN_SIZE, "n_val": VAL_SIZE, "n_test": TEST_SIZE}
TIMING_STEPS = 16  # training steps cpu_bf16_pays takes to time a shape: 8 in each precision
STEPS_TIMED = 4    # training steps in each of the three epochs time_training runs: the later two are timed warm
TIMING_LR = 1e-6   # time_training's learning rate: the speed does not depend on it, and a loss that diverged would end the timing


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    arch: str = "vgg11"
    resize: int | None = None  # input side in pixels; None: the architecture's default (224 for AlexNet and VGG)
    ratio: int = 1             # divides every conv layer's channels (the d2l VGG exercise uses 4)
    init: str = "xavier"       # weight init: "xavier" as in the notes, or "kaiming" (objectives.models.build_model)
    # optimisation (d2l: plain SGD, no momentum, no weight decay)
    lr: float = 0.05
    epochs: int = 10
    batch_size: int = 128
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    # data subsets (a preset's compute budget, tests); None: the whole split
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    # speed
    device: str = "auto"                 # "auto": cuda when available, else cpu
    precision: str = "auto"              # "auto": bf16 autocast on CUDA, and on CPUs with bf16 arithmetic (AVX512-BF16, AMX) for the shapes it speeds up (cpu_bf16_pays); else fp32
    channels_last: bool | None = None    # None: on (NHWC convolutions are faster with cuDNN and with oneDNN); False for NCHW
    compile: bool = False                # torch.compile; pays off only for long runs
    cuda_graph: bool | None = None       # None: on CUDA without compile, each full-batch training step replays one CUDA graph
    eval_batch_size: int = 1024          # evaluation has no backward pass, so bigger batches fit

    def __post_init__(self) -> None:
        # Checked against the annotations: a TOML file or a user may hand over a float epochs or a string resize.
        for name, hint in typing.get_type_hints(TrainConfig).items():
            kinds = typing.get_args(hint) or (hint,)
            kinds += (int,) if float in kinds else ()
            value = getattr(self, name)
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                wanted = " or ".join("None" if kind is type(None) else kind.__name__ for kind in kinds)
                raise ValueError(f"{name} must be {wanted}; got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value}")
        get_architecture(self.arch)
        if self.resize is not None:
            check_resize(self.arch, self.resize)
        for name in ("epochs", "batch_size", "ratio", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name, split_size in SPLIT_SIZES.items():
            if getattr(self, name) is not None and not 1 <= getattr(self, name) <= split_size:
                raise ValueError(f"{name} must be between 1 and the split's {split_size} images; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0; got {self.momentum} and {self.weight_decay}")
        check_init(self.init)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32; got {self.precision!r}")
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                kind = None
            if kind not in ("cpu", "cuda"):  # torch also names meta, mps, xla...: devices the trainer does not run on
                raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.cuda_graph and self.compile:
            raise ValueError("cuda_graph = true and compile = true exclude each other: compile's mode reduce-overhead records CUDA graphs itself")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from plain settings (a TOML table, Optuna params); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


def metric(label: str, unit: str, curve: bool = False, column: bool = False):
    """An EpochMetrics field: `label (unit)` names it on a figure's axis; `curve`: the report draws it per epoch;
    `column`: the report's table of trials shows its last value."""
    return field(metadata={"label": label, "unit": unit, "curve": curve, "column": column})


@dataclass
class EpochMetrics:
    """What one epoch measured. A new field is the whole change for a new metric: MLflow (trials, their retries,
    finalize, reconcile), the trial record, `export` and the report read the fields. A field named `val_*` measures
    the validation split, which finalize trains without, so it logs the others."""
    epoch: int  # 1-based
    train_loss: float = metric("training loss", "cross-entropy", curve=True)
    train_accuracy: float = metric("training accuracy", "fraction")
    val_accuracy: float = metric("validation accuracy", "fraction", curve=True, column=True)
    examples_per_second: float = metric("training speed", "examples/s")
    epoch_seconds: float = metric("epoch time", "s")  # training part of the epoch only


@dataclass
class TrainResult:
    val_accuracy: float
    test_accuracy: float         # fp32 on NCHW inputs, as objectives.predict scores the saved network
    train_loss: float
    train_accuracy: float
    history: list[EpochMetrics]
    epochs_run: int
    stopped_early: bool          # on_epoch asked to stop (pruning)
    train_seconds: float         # sum of the training parts of all epochs
    wall_seconds: float          # everything: model build, training, evaluation
    examples_per_second: float   # training examples / train_seconds
    flops_per_example: int       # forward FLOPs, torch.utils.flop_counter
    train_flops: int             # forward + backward FLOPs of every training example seen
    param_count: int
    peak_memory_bytes: int
    peak_memory_source: str      # what peak_memory_bytes measured: objectives.memory.SOURCES
    device_name: str
    precision: str               # as resolved from config.precision: "bf16" (autocast) or "fp32"
    channels_last: bool          # as resolved from config.channels_last
    cuda_graph: bool             # as resolved from config.cuda_graph
    config: TrainConfig = field(repr=False)
    model: torch.nn.Module | None = field(default=None, repr=False)  # the trained network, in eval mode, on its device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_machine(config: TrainConfig) -> None:
    """What this machine must offer `config`, a ValueError naming the setting when it does not: the device, and CUDA
    for the settings that need it. A launch checks every config it can run with this before anything is written;
    `train` checks again, for callers that did not."""
    device = resolve_device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device = {config.device!r} needs CUDA, and this machine has no CUDA device (torch.cuda.is_available() is False); "
                             "use device = \"auto\" or \"cpu\"")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device = {config.device!r}: GPU {device.index} is not there; this machine has GPUs 0..{count - 1} "
                             f"(torch.cuda.device_count() is {count})")
        if config.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision = \"bf16\": {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic; use precision = \"auto\" or \"fp32\"")
    elif config.cuda_graph:
        raise ValueError(f"cuda_graph needs a CUDA device, and this trial runs on the {device}; leave cuda_graph out (it is on by default on CUDA) or set it false")


def memory_shortfall(config: TrainConfig, have: int | None, kind: str) -> str | None:
    """Why `config` cannot train with `have` bytes of its device's memory (`kind`: "free" or "in all"); None when its
    estimate (objectives.inspect.training_bytes, a lower bound) fits, or `have` is unknown."""
    resize = config.resize or get_architecture(config.arch).default_resize
    needed = training_bytes(config.arch, resize, config.ratio, config.batch_size)
    if have is None or needed <= have:
        return None
    return (f"{config.arch} at resize {resize}, ratio {config.ratio}, batch {config.batch_size} needs at least {needed / 2**30:.1f} GiB to train; "
            f"{resolve_device(config.device)} has {have / 2**30:.1f} GiB {kind}")


def _meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes; None where there is none."""
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    values = [line.split()[1] for line in meminfo if line.startswith(f"{field}:")]
    return int(values[0]) * 1024 if values else None


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory the device can still give: CUDA's free memory, or the host's MemAvailable; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _meminfo("MemAvailable")


def total_memory_bytes(device: torch.device) -> int | None:
    """All the memory the device has: the GPU's, or the host's MemTotal; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory  # no CUDA context needed, unlike mem_get_info
    return _meminfo("MemTotal")


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware, so autocast to bf16 is a speed-up rather than an emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()  # from Ampere on; torch.autocast refuses bf16 on older GPUs
    # Without these instructions oneDNN emulates bf16 and is slower than fp32. Linux lists them in cpuinfo;
    # elsewhere we stay with fp32.
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def cpu_bf16_pays(arch: str, resize: int, ratio: int, batch_size: int, channels_last: bool) -> bool:
    """Whether bf16 autocast trains this shape faster than fp32 on this CPU: timed once per shape and process.

    On a CPU with bf16 arithmetic neither precision always wins. Autocast casts every weight to bf16 each
    step and every gradient back, which costs more than it saves where a step is small matrix products over
    large weights: VGG-11 at 32 px (two 4096-wide linear layers) trains 1.2x faster in fp32 at batch 32,
    ResNet-18 at 32 px and a quarter width 1.3x, while AlexNet at 65 px and NiN train 1.15-1.4x faster
    in bf16 (benchmarks/RESULTS.md). Three warm-up steps (oneDNN builds its kernels for a new shape), then
    the fastest of five steps in each precision, on random inputs; the caller's random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        inputs = torch.rand(batch_size, 1, resize, resize)
        inputs = inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs
        labels = torch.randint(0, 10, (batch_size,))
        seconds = {}
        for bf16 in (True, False):
            model = build_model(arch, resize, ratio)
            model = model.to(memory_format=torch.channels_last) if channels_last else model
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            step_seconds = []
            for _ in range(TIMING_STEPS // 2):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = F.cross_entropy(model(inputs), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step_seconds.append(time.perf_counter() - start)
            seconds[bf16] = min(step_seconds[3:])  # the fastest step: what the shape costs, less the noise of a busy machine
    return seconds[True] < seconds[False]


def bf16_autocast(config: TrainConfig) -> bool:
    """Whether `train(config)` runs under bf16 autocast: as asked, or for "auto" on CUDA and, on a CPU with
    bf16 arithmetic, where this shape trains faster in it (cpu_bf16_pays, timed on the first call). A run of
    no more training steps than that timing takes stays in fp32: timing it would cost more than bf16 could save."""
    device = resolve_device(config.device)
    if config.precision != "auto":
        return config.precision == "bf16"
    if not native_bf16(device):
        return False
    if device.type == "cuda":
        return True
    steps = config.epochs * math.ceil((config.n_train or TRAIN_SIZE) / config.batch_size)
    resize = config.resize or get_architecture(config.arch).default_resize
    return steps > TIMING_STEPS and cpu_bf16_pays(config.arch, resize, config.ratio, config.batch_size, config.channels_last is not False)


def _prepare(images: torch.Tensor, resize: int, channels_last: bool) -> torch.Tensor:
    # uint8 (B, 28, 28) on the device -> float (B, 1, R, R) in [0, 1], as ToTensor + Resize would give.
    x = images.unsqueeze(1).float().div_(255)
    if resize != x.shape[-1]:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _count_flops(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) for one example, from torch's own counter."""
    # Eval mode: batch norm leaves its running statistics alone and takes a batch of one;
    # the counter counts matmuls and convolutions, which are the same in both modes.
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(x[:1])
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x[:1]), torch.zeros(1, dtype=torch.long, device=x.device)).backward()
    model.zero_grad(set_to_none=True)
    model.train()
    return forward, counter.get_total_flops()


@torch.inference_mode()
def _accuracy(model, images, labels, resize, channels_last, batch_size, autocast) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    for start in range(0, len(labels), batch_size):
        with autocast():
            logits = model(_prepare(images[start:start + batch_size], resize, channels_last))
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum()
    if not len(labels):
        return math.nan  # no validation split: the final model trains on train and validation together
    return correct.item() / len(labels)  # host sync, once per evaluation


def _graphed(train_step: Callable[[torch.Tensor], None], batch_size: int, device: torch.device) -> Callable[[torch.Tensor], None]:
    """`train_step(index)` with its full batches replayed from one CUDA graph, recorded after three warm-up steps.

    A small network's step is bound by launching its hundreds of kernels from Python, not by arithmetic (VGG-11
    at 32 px: 90-190 steps/s on an H200 whatever its width, benchmarks/RESULTS.md); a replay launches them all at
    once. The warm-up steps (on a side stream, as torch.cuda.graph asks) create the optimiser's state and let
    cuDNN choose its kernels; they and a short last batch train eagerly. Parameters, gradients and optimiser state
    are updated in place, so eager steps and replays see the same tensors.
    """
    static_index = torch.zeros(batch_size, dtype=torch.long, device=device)
    graph = None
    warm_up_steps = 3

    def step(index: torch.Tensor) -> None:
        nonlocal graph, warm_up_steps
        if len(index) != batch_size:
            train_step(index)
        elif warm_up_steps:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                train_step(index)
            torch.cuda.current_stream(device).wait_stream(side)
            warm_up_steps -= 1
        else:
            static_index.copy_(index)
            if graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # records the step; nothing runs until the replay below
                    train_step(static_index)
            graph.replay()

    return step


@dataclass(frozen=True)
class StepTiming:
    """What a training of one shape (arch, resize, ratio, batch size, precision) costs on this machine, in three parts:
    a training's wall seconds = fixed + steps × step + evaluated examples × per example (time_training)."""
    step_seconds: float         # one training step of a full batch, warm
    eval_seconds: float         # one example of the validation or test split evaluated
    fixed_seconds: float        # once per training: data subset, model build, FLOP count, the first epoch's warm-up
    precision: str              # the precision it trained in: "bf16" or "fp32"


def time_training(config: TrainConfig, data: FashionMNIST, steps: int = STEPS_TIMED, threads: int | None = None) -> StepTiming:
    """Time `config`'s shape with train() itself: three epochs of `steps` full batches, each evaluated on one evaluation
    batch, in the precision `config` trains in. The later epochs' steps are timed warm (oneDNN and cuDNN choose their
    kernels, a CUDA graph is recorded, in the first); an evaluation is the time from its epoch's training to on_epoch.
    The warm epochs' mean counts, not the fastest: the trials pay the machine's noise too, and the fastest epoch
    predicted them about a tenth short on a 2-core machine. With `threads`, torch runs it on that many CPU threads, as
    a worker process given its share of the cores trains."""
    evaluated = min(config.eval_batch_size, config.n_val or VAL_SIZE)
    timed = dataclasses.replace(config, epochs=3, n_train=steps * config.batch_size, n_val=evaluated, n_test=evaluated, lr=TIMING_LR,
                                precision="bf16" if bf16_autocast(config) else "fp32")
    epoch_ends: list[float] = []
    own_threads = torch.get_num_threads()
    torch.set_num_threads(threads or own_threads)
    try:
        result = train(timed, data, on_epoch=lambda metrics: epoch_ends.append(time.perf_counter()))
    finally:
        torch.set_num_threads(own_threads)
    epochs = [metrics.epoch_seconds for metrics in result.history]
    validations = [end - start - seconds for start, end, seconds in zip(epoch_ends, epoch_ends[1:], epochs[1:])]
    warm, per_example = statistics.fmean(epochs[1:]), max(statistics.fmean(validations), 0.0) / evaluated
    # Once per training: all but the epochs and their validations, the first validation and the test, plus the first epoch's warm-up.
    fixed = result.wall_seconds - sum(epochs) - sum(validations) - 2 * evaluated * per_example + epochs[0] - warm
    return StepTiming(warm / steps, per_example, max(fixed, 0.0), result.precision)


def train(config: TrainConfig, data: FashionMNIST, on_epoch: Callable[[EpochMetrics], bool | None] | None = None,
          checkpoint: Path | None = None, resume: Checkpoint | None = None) -> TrainResult:
    """Train `config.arch` on `data` and return its accuracy and cost.

    `on_epoch` is called after every epoch with that epoch's metrics; returning True stops training
    (pruning). With `checkpoint`, the training state is written there after every epoch but the last, before
    on_epoch sees it (objectives.checkpoint). With `resume` (objectives.checkpoint.read_checkpoint, which checked it
    against `config`), training continues after its epochs: only the remaining ones run, and on_epoch sees only
    those; the result's history, cost and accuracy are those of the whole run. Raises DivergedError when the loss
    is NaN or infinite, DeviceOutOfMemoryError when the device runs out of memory, InputTooSmallError (a
    ValueError) for a resize below the minimum.
    """
    wall_start = time.perf_counter()
    arch = get_architecture(config.arch)
    resize = config.resize or arch.default_resize
    check_resize(config.arch, resize)
    check_machine(config)
    device = resolve_device(config.device)
    on_cuda = device.type == "cuda"
    channels_last = True if config.channels_last is None else config.channels_last

    # Refused before anything is allocated: a size that cannot fit would otherwise take the host down with it.
    shortfall = memory_shortfall(config, free_memory_bytes(device), "free")
    if shortfall is not None:
        raise DeviceOutOfMemoryError(shortfall)
    # A resumed run keeps the precision its first part chose ("auto" may time both on a CPU, and timings vary).
    use_bf16 = bf16_autocast(config) if resume is None else resume.precision == "bf16"
    graphed = on_cuda and not config.compile if config.cuda_graph is None else config.cuda_graph

    def autocast():
        # A CUDA graph replays the casts it recorded, so autocast's cache of cast weights must stay out of it.
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16, cache_enabled=not graphed)

    peak_memory_meter = PeakMemory(device)  # this trial's own peak, also on a CPU (objectives/memory.py)
    model = step_model = optimizer = step = None
    out_of_memory = None
    try:
        # ---- data: whole split on the device, uint8 ----
        data = data.subset(config.n_train, config.n_val, config.n_test)
        train_images, train_labels = data.train_images.to(device), data.train_labels.to(device)
        val_images, val_labels = data.val_images.to(device), data.val_labels.to(device)
        test_images, test_labels = data.test_images.to(device), data.test_labels.to(device)
        n_train = len(train_labels)

        # ---- model and optimiser ----
        torch.manual_seed(config.seed)
        model = build_model(config.arch, resize, config.ratio, config.init).to(device)
        # NHWC lets cuDNN and oneDNN pick their fastest convolutions: on a 2-core CPU, AlexNet at 224 px
        # and VGG-11 at 224 px train 1.2x and 1.4x faster in fp32, ResNet-18 at 96 px 1.2x in bf16 (benchmarks/RESULTS.md).
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        param_count = parameter_count(model)
        probe = _prepare(train_images[:1], resize, channels_last)
        flops_per_example, step_flops_per_example = _count_flops(model, probe)
        step_model = torch.compile(model) if config.compile else model
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        generator = torch.Generator(device=device).manual_seed(config.seed)

        # Metrics accumulate on the device, in tensors a CUDA graph can write to.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)

        def train_step(index: torch.Tensor) -> None:
            x, y = _prepare(train_images[index], resize, channels_last), train_labels[index]
            with autocast():
                logits = step_model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum.add_(loss.detach().float() * len(index))
            correct.add_((logits.argmax(1) == y).sum())

        step = _graphed(train_step, config.batch_size, device) if graphed else train_step
        history: list[EpochMetrics] = []
        if resume is not None:
            # ---- resume: the state the first part of the run left after its last whole epoch ----
            model.load_state_dict(resume.model)
            optimizer.load_state_dict(resume.optimizer)
            generator.set_state(resume.generator)
            torch.set_rng_state(resume.cpu_rng)  # dropout's draws continue where they stopped
            if on_cuda and resume.cuda_rng is not None:
                torch.cuda.set_rng_state(resume.cuda_rng, device)
            history = [EpochMetrics(**metrics) for metrics in resume.history]
        train_seconds = sum(metrics.epoch_seconds for metrics in history)
        stopped_early = False
        for epoch in range(len(history) + 1, config.epochs + 1):
            model.train()
            epoch_start = time.perf_counter()
            loss_sum.zero_()
            correct.zero_()
            order = torch.randperm(n_train, device=device, generator=generator)
            for start in range(0, n_train, config.batch_size):
                step(order[start:start + config.batch_size])
            train_loss = loss_sum.item() / n_train  # host sync, once per epoch
            epoch_seconds = time.perf_counter() - epoch_start
            train_seconds += epoch_seconds
            if not math.isfinite(train_loss):
                raise DivergedError(f"training loss became {train_loss} in epoch {epoch} (lr {config.lr} is too large for {config.arch})")

            # ---- evaluation on the validation split, which steers the search ----
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=train_loss,
                train_accuracy=correct.item() / n_train,
                val_accuracy=_accuracy(step_model, val_images, val_labels, resize, channels_last, config.eval_batch_size, autocast),
                epoch_seconds=epoch_seconds,
                examples_per_second=n_train / epoch_seconds,
            )
            history.append(metrics)
            if checkpoint is not None and epoch < config.epochs:  # after the last epoch the run is whole: nothing to resume
                write_checkpoint(checkpoint, Checkpoint(
                    config=dataclasses.asdict(config), epoch=epoch, history=[dataclasses.asdict(m) for m in history],
                    precision="bf16" if use_bf16 else "fp32", model=model.state_dict(), optimizer=optimizer.state_dict(),
                    generator=generator.get_state(), cpu_rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state(device) if on_cuda else None))
            if on_epoch is not None and on_epoch(metrics):
                stopped_early = True
                break

        # ---- the test split: measured and reported, never used to choose ----
        # In fp32 on plain NCHW inputs, as objectives.predict scores the saved network, so the two agree exactly
        # (bf16 rounding flips a few close calls); the validation split steers in the training precision.
        test_accuracy = _accuracy(model, test_images, test_labels, resize, False, config.eval_batch_size, contextlib.nullcontext)
    except torch.OutOfMemoryError as error:
        out_of_memory = str(error).splitlines()[0]
    if out_of_memory is not None:
        # Outside the except block, so the traceback (and the activations its frames hold) is gone.
        del model, step_model, optimizer, step
        if on_cuda:
            torch.cuda.empty_cache()
        raise DeviceOutOfMemoryError(f"{device} ran out of memory training {config.arch} at resize {resize}, batch {config.batch_size}: {out_of_memory}")

    peak_memory, peak_source = peak_memory_meter.stop()
    last = history[-1]
    examples_seen = n_train * len(history)
    return TrainResult(
        val_accuracy=last.val_accuracy,
        test_accuracy=test_accuracy,
        train_loss=last.train_loss,
        train_accuracy=last.train_accuracy,
        history=history,
        epochs_run=len(history),
        stopped_early=stopped_early,
        train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - wall_start,
        examples_per_second=examples_seen / train_seconds,
        flops_per_example=flops_per_example,
        train_flops=step_flops_per_example * examples_seen,
        param_count=param_count,
        peak_memory_bytes=peak_memory,
        peak_memory_source=peak_source,
        device_name=torch.cuda.get_device_name(device) if on_cuda else "cpu",
        precision="bf16" if use_bf16 else "fp32",
        channels_last=channels_last,
        cuda_graph=graphed,
        config=config,
        model=model.eval(),
    )
