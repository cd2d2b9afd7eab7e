"""The model's and the training's configuration: every field declared once.

Each field carries its default, its help and its valid values in one place,
``option(...)``; ``validate`` checks them, and the CLI generates a flag per
field from the same metadata (``--n-layer`` for ``n_layer``), as nanoGPT's
configurator turns its globals into overrides. Both configs are printed at
the start of a run and stored in every checkpoint.
"""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from normlab.errors import ConfigError
from normlab.lm.presets import PRESETS

ARCHS = ("mlp", "wavenet")
NORMS = ("batch", "layer", "group", "none")
BLOCK_NONLINEARITIES = ("tanh", "relu")  # what a hidden block of the model can apply
INITS = ("naive", "lecture", "kaiming", "lsuv")
PARAMS = ("standard", "mup")
RESIDUAL_SCALES = ("one", "depth")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
DEVICES = ("auto", "cpu", "cuda")


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    flag: bool = True,
    runtime: bool = False,
) -> Any:
    """A config field: its default, its help, and the values it may take.

    Args:
        default: the value when neither a preset nor a flag sets it.
        help: one line for ``--help`` and for readers of the dataclass.
        choices: the only valid values.
        low, high: bounds of a number (``None``: unbounded); a bounded float must be finite.
        open_low, open_high: exclude the bound itself.
        flag: generate a command-line flag for it.
        runtime: where a run computes, not what: it may change on ``--resume``.
    """
    metadata = {
        "help": help,
        "choices": choices,
        "bounds": (low, high, open_low, open_high),
        "flag": flag,
        "runtime": runtime,
    }
    return field(default=default, metadata=metadata)


def _interval(low, high, open_low: bool, open_high: bool) -> str:
    if high is None:
        if open_low and low == 0:
            return "a positive number"
        return f"greater than {low}" if open_low else f"at least {low}"
    return f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def validate_fields(config) -> None:
    """Raise ConfigError for a field outside its choices or bounds, naming what is valid."""
    for f in fields(config):
        value = getattr(config, f.name)
        choices = f.metadata["choices"]
        if choices is not None and value not in choices:
            valid = ", ".join(map(str, choices))
            raise ConfigError(f"unknown {f.name} {value!r}; valid choices: {valid}")
        low, high, open_low, open_high = f.metadata["bounds"]
        if value is None or (low is None and high is None):
            continue
        finite = not isinstance(value, float) or math.isfinite(value)
        above = low is None or (value > low if open_low else value >= low)
        below = high is None or (value < high if open_high else value <= high)
        if not (finite and above and below):
            wanted = _interval(low, high, open_low, open_high)
            raise ConfigError(f"{f.name} must be {wanted}, got {value}")


class _Config:
    """What both configs share: checks and a tolerant ``from_dict``."""

    def validate(self) -> None:
        validate_fields(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The config stored in a checkpoint; fields it lacks keep their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ModelConfig(_Config):
    """The language model: ``normlab.lm.model.LanguageModel`` builds exactly this."""

    vocab_size: int = option(
        27, "filled in from the data: characters + the boundary token", low=1, flag=False
    )
    arch: str = option(
        "mlp",
        "mlp: hidden blocks over the whole flattened context; wavenet: makemore part 5's "
        "hierarchy, each block fusing pairs of positions (block_size = 2 ** n_layer)",
        choices=ARCHS,
    )
    block_size: int = option(8, "context length: how many characters predict the next one", low=1)
    n_embd: int = option(24, "embedding dimensions per character", low=1)
    n_hidden: int = option(256, "width of each hidden layer", low=1)
    n_layer: int = option(2, "hidden blocks Linear → norm → nonlinearity", low=0)
    norm: str = option("batch", "normalization after each hidden Linear", choices=NORMS)
    nonlinearity: str = option(
        "tanh", "the hidden blocks' nonlinearity", choices=BLOCK_NONLINEARITIES
    )
    residual: bool = option(False, "skip connections around hidden blocks of equal width")
    residual_scale: str = option(
        "one",
        "--residual: what each block's output is multiplied by before its input is added: one, "
        "or depth: 1/sqrt(2 n_layer), so that the sum's size does not grow with the depth",
        choices=RESIDUAL_SCALES,
    )
    init: str = option(
        "kaiming",
        "weight initialization: naive (plain randn), lecture (hand-tuned scales), kaiming, lsuv",
        choices=INITS,
    )
    gain: float | None = option(
        None,
        "init kaiming and lsuv's start: the hidden weights' gain (default: the nonlinearity's)",
    )
    output_bn: bool = option(False, "BatchNorm after the output Linear (the lecture's deep net)")
    bias: bool | None = option(
        None, "biases on hidden Linears (default: only where no BatchNorm follows)"
    )
    n_groups: int = option(4, "groups for norm group; must divide n_hidden", low=1)
    bn_over_positions: bool = option(
        True,
        "arch wavenet: BatchNorm statistics over the batch and the positions; false: over the "
        "batch alone, one per position (makemore part 5's bug)",
    )
    bn_momentum: float = option(
        0.1, "running-statistics momentum of every BatchNorm", low=0, high=1
    )
    dropout: float = option(
        0.0, "dropout after each hidden nonlinearity (training only)", low=0, high=1, open_high=True
    )
    embed_dropout: float = option(
        0.0, "dropout on the context's embeddings (training only)", low=0, high=1, open_high=True
    )
    param: str = option(
        "standard",
        "standard, or mup: the Maximal Update Parametrization, whose learning rates and init "
        "carry over from --base-width to wider models (normlab.lm.mup)",
        choices=PARAMS,
    )
    base_width: int | None = option(
        None, "param mup: the width it keeps as is (default: n_hidden itself)", low=1
    )

    def validate(self) -> None:
        """Raise ConfigError for a field, or a combination of fields, that cannot work."""
        validate_fields(self)
        if self.norm == "batch" and self.bias:
            raise ConfigError(
                "a Linear that feeds a BatchNorm needs no bias: the BatchNorm subtracts the batch "
                "mean, which cancels it (the BatchNorm's own bias takes its place); drop --bias"
            )
        if self.gain is not None and not self.gain > 0:
            raise ConfigError(f"gain must be a positive number, got {self.gain}")
        if self.gain is not None and self.init in ("naive", "lecture"):
            raise ConfigError(
                f"gain scales the weights of init kaiming (and lsuv's start); init {self.init} "
                "has its own scales: choose --init kaiming or lsuv, or a preset without a gain"
            )
        if self.residual_scale != "one" and not self.residual:
            raise ConfigError(
                f"--residual-scale {self.residual_scale} scales the skip connections' blocks; "
                "add --residual, or drop --residual-scale"
            )
        if self.arch == "wavenet":
            self._validate_wavenet()
        if self.param == "mup":
            self._validate_mup()
        if self.norm == "group" and self.n_hidden % self.n_groups != 0:
            raise ConfigError(
                f"n_hidden ({self.n_hidden}) must be divisible by n_groups ({self.n_groups})"
            )

    def _validate_mup(self) -> None:
        uncovered = {
            "--arch wavenet": self.arch == "wavenet",
            "--output-bn": self.output_bn,
            f"--init {self.init}": self.init != "kaiming",
        }
        for option_, given in uncovered.items():
            if given:
                raise ConfigError(
                    f"--param mup does not cover {option_} (see normlab.lm.mup); drop it, or "
                    "train with --param standard"
                )
        if self.base_width is not None and self.base_width > self.n_hidden:
            raise ConfigError(
                f"--base-width ({self.base_width}) is larger than the width --n-hidden "
                f"({self.n_hidden}); μP scales up from its base width"
            )

    def _validate_wavenet(self) -> None:
        levels = self.n_layer
        if levels < 1 or self.block_size != 2**levels:
            raise ConfigError(
                "arch wavenet fuses pairs of positions once per hidden block: block_size must be "
                f"2 ** n_layer (n_layer 3: block_size 8), got block_size {self.block_size} and "
                f"n_layer {levels}"
            )
        if self.norm == "group":
            raise ConfigError("arch wavenet takes norm batch, layer or none, not group")
        if self.residual:
            raise ConfigError(
                "arch wavenet's blocks halve the positions, so no block can add its input; "
                "drop --residual"
            )

    @property
    def uses_batchnorm(self) -> bool:
        return self.norm == "batch" or self.output_bn


@dataclass
class TrainConfig(_Config):
    """The optimization, the cadences of a run, and where it runs."""

    steps: int = option(8000, "optimizer steps", low=1)
    batch_size: int = option(
        256, "examples per step (on several processes: the global batch)", low=1
    )
    optimizer: str = option("adamw", "sgd (plain, as in the lecture) or adamw", choices=OPTIMIZERS)
    lr: float = option(3e-3, "peak learning rate", low=0, open_low=True)
    schedule: str = option(
        "cosine",
        "step: lr × 0.1 from decay_step; cosine: warmup, then cosine decay to the floor",
        choices=SCHEDULES,
    )
    decay_step: int | None = option(
        None, "step schedule: where the lr drops × 0.1 (default: never)", low=0
    )
    warmup_steps: int = option(200, "cosine schedule: linear warmup steps from 0", low=0)
    min_lr_ratio: float = option(
        0.05, "cosine schedule: the floor, as a fraction of lr", low=0, high=1
    )
    weight_decay: float = option(
        0.1, "decoupled (AdamW) or L2 (SGD), on embeddings and Linear weights only", low=0
    )
    ema: float = option(
        0.0,
        "evaluate and save a moving average of the weights with this decay, e.g. 0.999; 0: off",
        low=0,
        high=1,
        open_high=True,
    )
    eval_every: int = option(1000, "steps between evaluations on the whole splits", low=1)
    eval_train_examples: int = option(
        0, "the evaluations' train loss on this many fixed training examples; 0: all", low=0
    )
    checkpoint_every: int = option(1000, "steps between checkpoints", low=1)
    diagnose_every: int = option(100, "record per-layer diagnostics every N steps; 0: never", low=0)
    second_order_every: int = option(
        5000,
        "also measure the sharpness, Hessian trace and gradient noise scale every N steps, "
        "into that step's diagnostics (one process, --diagnose-every > 0); 0: never",
        low=0,
    )
    tensorboard: bool = option(
        False, "also write TensorBoard event files to the run folder (needs tensorboard)"
    )
    sync_batchnorm: bool = option(
        True, "several processes: BatchNorm statistics over the whole global batch"
    )
    # eager by default: the default model's step is mostly matrix products, so compiling
    # saves about 0.8 ms of 4.3 per step, less over 8,000 steps than a first compile costs
    # (docs/PERFORMANCE.md)
    compile: bool = option(
        False, "the whole training step compiled as one graph (one process); off: eager autograd"
    )
    target_val_loss: float | None = option(None, "stop at the first evaluation at or below this")
    seed: int = option(42, "model init and batch order (the split always uses 42, as the lectures)")
    data: str | None = option(
        None, "UTF-8 text file, one item per line (default: the bundled names)"
    )
    device: str = option("auto", "auto: CUDA where there is one", choices=DEVICES, runtime=True)
    threads: int | None = option(
        None, "torch CPU threads (default: torch's choice)", low=1, runtime=True
    )
    preset: str | None = option(
        None,
        "the named configuration that every other flag overrides (default: default)",
        choices=(None, *sorted(PRESETS)),
    )


def check_configs(model_config: ModelConfig, train_config: TrainConfig) -> None:
    """Validate both configs and what they ask of each other."""
    train_config.validate()
    model_config.validate()
    if model_config.uses_batchnorm and train_config.batch_size < 2:
        raise ConfigError(
            f"BatchNorm normalizes over the batch and needs at least 2 examples in it, got "
            f"--batch-size {train_config.batch_size}"
        )


def preset_configs(name: str | None) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a preset (``None``: ``default``); fields it leaves out keep their defaults.

    Example:
        >>> model_config, train_config = preset_configs("lecture-deep")
        >>> model_config.n_layer, train_config.optimizer, train_config.preset
        (5, 'sgd', 'lecture-deep')
    """
    name = name or "default"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid choices: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    return ModelConfig(**preset["model"]), TrainConfig(**preset["train"], preset=name)


def config_dict(model_config: ModelConfig, train_config: TrainConfig) -> dict:
    """Both configs as one dict, as printed at start and saved in ``config.json``."""
    return {"model": asdict(model_config), "train": asdict(train_config)}
