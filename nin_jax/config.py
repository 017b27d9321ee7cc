"""The configuration: every field with its default, the original solver, and `ConfigError`.

`configs/*.py` start from `get_config()` here; `configs/default.py` is this config unchanged.
"""

import dataclasses
import math
import re
from typing import Callable

import ml_collections


class ConfigError(ValueError):
    """A config field, flag, file or dataset the user gave is unusable; the message names it and the fix.

    Command-line tools print these as one line; every other exception keeps its traceback.
    """


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data. Splits are TFDS split strings; slices such as 'train[:45000]' work for every dataset.
    config.dataset = "cifar10"  # digits | mnist | cifar10 | cifar100 | svhn_cropped | imagenet2012 | image_folder
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = ml_collections.config_dict.placeholder(int)  # None: the dataset's own size
    config.preprocess = "standardize"  # standardize | gcn_zca | gcn_lcn | scale
    config.zca_filter_bias = 0.1
    config.gcn_scale = 55.0
    config.augment = ml_collections.ConfigDict()
    config.augment.translate = 4  # pixels of random translation (pad + crop); 0 disables
    config.augment.pad_mode = "zero"  # translation border: zero (the mean pixel, after normalising) | reflect | edge
    config.augment.flip = True  # random horizontal flip
    config.augment.random_resized_crop = False  # Inception-style crops (ImageNet)
    config.augment.eval_resize = 256  # large-image eval: resize (see eval_resize_mode), then center-crop image_size
    # How evaluation resizes a large image before the crop (docs/evaluation.md): short_side (to eval_resize,
    # aspect kept: the NIN model zoo's 59.36% protocol) | square (warped to eval_resize x eval_resize: Caffe's).
    config.augment.eval_resize_mode = "short_side"

    # Model: the ablation switches of the paper.
    config.model = ml_collections.ConfigDict()
    config.model.arch = "nin_cifar10"  # nin_cifar10 | nin_cifar100 | nin_svhn | nin_mnist | nin_imagenet | nin_digits
    config.model.head = "gap"  # gap | fc
    config.model.fc_input = "class_maps"  # what the FC head reads: class_maps (flattened) | features (last hidden)
    config.model.fc_dropout = 0.0  # dropout before the FC layer
    config.model.mlp_layers = -1  # 1x1 layers per block; -1: the preset's (2); 0: plain conv
    config.model.batch_norm = False
    config.model.width = 1.0  # multiplier on hidden channels
    config.model.blocks = ""  # custom block list, e.g. "5:192-160-96:max, 5:192-192-192:max, 3:192-192-C"
    config.model.dropout_rate = 0.5  # after every block but the last
    config.model.pool2 = "preset"  # preset (max, cuda-convnet) | max | avg (the Caffe model-zoo gist)
    config.model.class_map_relu = True  # ReLU on the class maps, as in every original config
    config.model.init = "he"  # he | caffe (the original per-layer Gaussian stds) | pytorch (U(+-1/sqrt(fan_in)))

    # Fine-tuning (nin_jax/finetune.py): start from the weights of another run's workdir; the class-map layer
    # starts fresh when the class count differs.
    config.init_from = ml_collections.config_dict.placeholder(str)
    config.init_checkpoint = "latest"  # of init_from: latest | best | a step number

    # Optimisation. recipe='caffe' is the original solver; 'modern' is cosine + warmup + label smoothing.
    config.recipe = "modern"
    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 0.1  # base LR at batch_size (not rescaled automatically)
    config.optim.momentum = 0.9
    config.optim.nesterov = False
    config.optim.weight_decay = 5e-4  # L2 on weights only (never on biases or BN parameters)
    config.optim.bias_lr_mult = 1.0  # caffe recipe: 2.0
    config.optim.output_lr_mult = 1.0  # LR multiplier of the class-map layer (caffe: 0.1 on cccp6)
    config.optim.lr_boundaries_epochs = ()  # caffe recipe: step schedule, LR *= lr_decay at each boundary
    config.optim.lr_decay = 0.1
    config.optim.warmup_epochs = 0.0  # modern recipe: linear warmup, then cosine to 0
    config.optim.label_smoothing = 0.0
    config.optim.grad_clip_norm = 0.0  # 0 disables
    # Accumulate each step's gradient over this many micro-batches of batch_size / k (see train.train_step).
    config.optim.grad_accum_steps = 1
    # An exponential moving average of the weights (parameters and BatchNorm statistics), updated after every
    # step and checkpointed with the run; evaluation, predict, export and fine-tuning read it. 0 disables.
    config.optim.ema_decay = 0.0

    # Duration and batch.
    config.batch_size = 128  # global, over all devices and hosts
    config.num_epochs = 100.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.seed = 0

    config.half_precision = False  # bf16 compute, float32 params, loss and softmax

    # Execution: how the run executes and where its data lives, not what it computes (results are equal,
    # tested). A resumed run may change these; every field outside `run` is the experiment's identity.
    config.run = ml_collections.ConfigDict()
    config.run.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir, or the image-folder root
    config.run.cache_dir = ml_collections.config_dict.placeholder(str)  # fitted statistics (default ~/.cache/nin_jax)
    config.run.eval_batch_size = 512
    config.run.parallelism = "jit"  # jit (sharded jit) | shard_map (explicit per-device step with pmean)
    config.run.cpu_kernels = True  # on the CPU backend only: nin_jax.cpu's layers, and malloc huge pages
    config.run.num_cpu_devices = 0  # host devices on CPU (0: one per core); ignored if XLA_FLAGS sets a count
    config.run.input_workers = 0  # large images: decode worker processes (0: threads, best up to a few cores)
    config.run.log_every_steps = 50
    config.run.eval_every_steps = 1000  # also evaluates at the end
    config.run.checkpoint_every_steps = 1000  # also saves at the end and on SIGTERM
    config.run.keep_checkpoints = 2  # the latest N, plus the best by run.best_metric
    # More evaluations besides eval_split's: "name=split[@every_steps], ..." (default cadence: eval_every_steps),
    # each logged as eval/<name>/{loss,top1,top5}; e.g. "test=test,clean=train[45000:]@500". See `evaluations`.
    config.run.evals = ""
    config.run.best_metric = "eval/top1"  # ranks the kept best checkpoint and --checkpoint=best (a loss: lowest)
    config.run.profile = False  # a TensorBoard profile of a few steps after warm-up
    return config


EXECUTION_SECTION = "run"
EVAL_METRICS = ("loss", "top1", "top5")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation of a run: every example of `split`, every `every_steps` steps and at the end."""

    name: str  # "" for config.eval_split's
    split: str
    every_steps: int

    @property
    def prefix(self) -> str:
        """Of its metric names: eval/ for config.eval_split's, eval/<name>/ for another."""
        return f"eval/{self.name}/" if self.name else "eval/"


def evaluations(config: ml_collections.ConfigDict) -> tuple[Evaluation, ...]:
    """config.eval_split's evaluation, then those of `config.run.evals`; `ConfigError` for a malformed entry."""
    out = [Evaluation("", config.eval_split, config.run.eval_every_steps)]
    example = "--config.run.evals='test=test,val=train[45000:]@500'"
    for item in (part.strip() for part in str(config.run.evals or "").split(",")):
        if not item:
            continue
        name, has_split, rest = (part.strip() for part in item.partition("="))
        split, has_every, every = (part.strip() for part in rest.partition("@"))
        if not has_split or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or not split or (
                has_every and not (every.isdigit() and int(every) >= 1)):
            raise ConfigError(f"config.run.evals: {item!r} is not name=split[@every_steps] (a lower-case name, a "
                              f"split, steps >= 1); e.g. {example}.")
        if name in {e.name for e in out}:
            raise ConfigError(f"config.run.evals names {name!r} twice; give each evaluation its own name.")
        out.append(Evaluation(name, split, int(every) if has_every else config.run.eval_every_steps))
    return tuple(out)
# Execution fields were top-level fields before they moved into `config.run`: a config.json written then
# still loads (`from_json`), and an override by the old name is answered with the new one.
MOVED_TO_RUN = ("data_dir", "cache_dir", "eval_batch_size", "parallelism", "cpu_kernels", "num_cpu_devices",
                "input_workers", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "profile")


def flatten(config: ml_collections.ConfigDict) -> dict[str, object]:
    """{"model.width": 1.0, ...}: every leaf field by its dotted name."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[key] = value
    return out


def identity_diff(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict) -> list[str]:
    """The dotted fields outside `config.run` whose values differ between two configs."""
    a, b = flatten(saved), flatten(current)

    def norm(v):  # JSON turns tuples into lists
        return list(v) if isinstance(v, tuple) else v

    return sorted(k for k in set(a) | set(b)
                  if k.split(".")[0] != EXECUTION_SECTION and norm(a.get(k)) != norm(b.get(k)))


def from_json(text: str) -> ml_collections.ConfigDict:
    """A config saved as JSON (a workdir's config.json), on top of today's defaults.

    Execution fields saved under their old top-level names (`MOVED_TO_RUN`) are read into `config.run`;
    fields this version no longer has are dropped: only execution settings are ever removed.
    """
    import json  # pylint: disable=g-import-not-at-top

    config = get_config()
    known = flatten(config)
    for key, value in flatten(ml_collections.ConfigDict(json.loads(text))).items():
        if key in MOVED_TO_RUN:
            key = f"{EXECUTION_SECTION}.{key}"
        if key in known:
            node = config
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node[parent]
            node[leaf] = tuple(value) if isinstance(known[key], tuple) else value
    return config


def moved_field_hint(dotted: str) -> str | None:
    """For an override of a field by its name before `config.run` (e.g. 'log_every_steps'): the new name."""
    return f"{EXECUTION_SECTION}.{dotted}" if dotted in MOVED_TO_RUN else None


# Duration fields: a rerun that only makes the run longer extends it (see `nin_jax.workdir.save_config`).
DURATION_FIELDS = ("num_train_steps", "num_epochs")


def _is_number(value: object, integer: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if integer else math.isfinite(value)


# (dotted field, integer?, predicate, the allowed range in words, an example fix). Every numeric field a user
# sets; `validate` checks them with the enumerations of `_CHOICES`, before anything is read or written.
_RANGES: tuple[tuple[str, bool, Callable[[float], bool], str, str], ...] = (
    ("batch_size", True, lambda v: v >= 1, ">= 1", "128"),
    ("run.eval_batch_size", True, lambda v: v >= 1, ">= 1", "512"),
    ("num_train_steps", True, lambda v: True, "an integer (> 0 sets the run length, <= 0 uses num_epochs)", "-1"),
    ("num_epochs", False, lambda v: v >= 0, ">= 0", "100"),
    ("seed", True, lambda v: v >= 0, ">= 0", "0"),
    ("image_size", True, lambda v: v >= 1, ">= 1 (or unset: the dataset's own size)", "32"),
    ("zca_filter_bias", False, lambda v: v > 0, "> 0", "0.1"),
    ("gcn_scale", False, lambda v: v > 0, "> 0", "55"),
    ("augment.translate", True, lambda v: v >= 0, ">= 0 pixels (0 disables)", "4"),
    ("augment.eval_resize", True, lambda v: v >= 1, ">= 1 pixels", "256"),
    ("model.dropout_rate", False, lambda v: 0 <= v < 1, "in [0, 1) (0 disables)", "0.5"),
    ("model.fc_dropout", False, lambda v: 0 <= v < 1, "in [0, 1) (0 disables)", "0.0"),
    ("model.width", False, lambda v: v > 0, "> 0 (a multiplier on the hidden channels)", "1.0"),
    ("model.mlp_layers", True, lambda v: v >= -1, ">= 0 1x1 layers per block, or -1 for the preset's", "-1"),
    ("optim.learning_rate", False, lambda v: v > 0, "> 0", "0.1"),
    ("optim.momentum", False, lambda v: 0 <= v < 1, "in [0, 1)", "0.9"),
    ("optim.weight_decay", False, lambda v: v >= 0, ">= 0 (0 disables)", "5e-4"),
    ("optim.bias_lr_mult", False, lambda v: v >= 0, ">= 0", "1.0"),
    ("optim.output_lr_mult", False, lambda v: v >= 0, ">= 0", "1.0"),
    ("optim.lr_decay", False, lambda v: v > 0, "> 0 (the LR factor at each boundary)", "0.1"),
    ("optim.warmup_epochs", False, lambda v: v >= 0, ">= 0 (0 disables)", "0.0"),
    ("optim.label_smoothing", False, lambda v: 0 <= v < 1, "in [0, 1) (0 disables)", "0.1"),
    ("optim.grad_clip_norm", False, lambda v: v >= 0, ">= 0 (0 disables)", "0.0"),
    ("optim.ema_decay", False, lambda v: 0 <= v < 1, "in [0, 1) (0 disables; e.g. 0.999)", "0.999"),
    ("optim.grad_accum_steps", True, lambda v: v >= 1, ">= 1 micro-batches per step (1 disables)", "1"),
    ("run.num_cpu_devices", True, lambda v: v >= 0, ">= 0 (0: one per core)", "0"),
    ("run.input_workers", True, lambda v: v >= 0, ">= 0 (0: decode in threads)", "0"),
    ("run.log_every_steps", True, lambda v: v >= 1, ">= 1 steps", "50"),
    ("run.eval_every_steps", True, lambda v: v >= 1, ">= 1 steps", "1000"),
    ("run.checkpoint_every_steps", True, lambda v: v >= 1, ">= 1 steps", "1000"),
    ("run.keep_checkpoints", True, lambda v: v >= 1, ">= 1", "2"),
)


# The values of every enumerated field: what the code that reads the field dispatches on.
DATASETS = ("digits", "mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012", "image_folder")
PREPROCESS_CHOICES = ("standardize", "gcn_zca", "gcn_lcn", "scale")
PAD_MODES = ("zero", "reflect", "edge")  # numpy's constant-0, reflect (mirror without the edge) and edge modes
EVAL_RESIZE_MODES = ("short_side", "square")
RECIPES = ("caffe", "modern")
PARALLELISM = ("jit", "shard_map")

# (dotted field, its choices, what they mean), checked by `validate`; the first choice is the example fix.
_CHOICES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("dataset", DATASETS, "the TFDS datasets, an image folder at run.data_dir, or the offline digits"),
    ("preprocess", PREPROCESS_CHOICES, "per-channel statistics, the paper's GCN + ZCA (CIFAR), GCN + local contrast "
     "normalisation (SVHN), or x / 255"),
    ("augment.pad_mode", PAD_MODES, "the translation's border: the mean pixel, mirrored without the edge, the edge"),
    ("augment.eval_resize_mode", EVAL_RESIZE_MODES,
     "short_side: the short side to augment.eval_resize, aspect kept; square: warped to eval_resize x eval_resize"),
    ("model.head", ("gap", "fc"), "global average pooling of the class maps, or a dense layer"),
    ("model.fc_input", ("class_maps", "features"), "what the fc head reads: the class maps, or the last hidden layer"),
    ("model.pool2", ("preset", "max", "avg"), "the second block's pooling"),
    ("model.init", ("he", "caffe", "pytorch"),
     "caffe: the original Gaussian stds; pytorch: U(+-1/sqrt(fan_in)), PyTorch's default"),
    ("recipe", RECIPES, "caffe: the original solver; modern: cosine + warmup"),
    ("run.parallelism", PARALLELISM, "sharded jit, or an explicit per-device step under shard_map with pmean"),
)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the first field whose value is out of range, and a value that works.

    The one check of field values: the CLIs call it before anything is written, `data.Pipeline` before anything
    is read, and `models.create_model` on the model section (`validate_model`). Checks every numeric and
    enumerated field, the preset and the syntax of `model.blocks`; whether the blocks fit the images is checked
    once the dataset's image size is known (`architectures.layer_table`). Fields a config lacks are skipped.
    """
    fields = flatten(config)
    for name, integer, ok, allowed, example in _RANGES:
        if name not in fields:
            continue
        value = fields[name]
        if name == "image_size" and value is None:
            continue
        kind = "an integer" if integer else "a number"
        if not _is_number(value, integer):
            raise ConfigError(f"config.{name}={value!r} must be {kind} {allowed}; set e.g. --config.{name}={example}.")
        if not ok(value):
            raise ConfigError(f"config.{name}={value!r} must be {allowed}; set e.g. --config.{name}={example}.")
    for name, choices, meaning in _CHOICES:
        if name in fields and fields[name] not in choices:
            raise ConfigError(f"config.{name}={fields[name]!r} must be one of {', '.join(choices)} ({meaning}); set "
                              f"e.g. --config.{name}={choices[0]}.")
    if "run.evals" in fields:
        metrics = [f"{e.prefix}{m}" for e in evaluations(config) for m in EVAL_METRICS]
        if fields.get("run.best_metric") not in metrics:
            raise ConfigError(f"config.run.best_metric={fields.get('run.best_metric')!r} is not a metric of this run's "
                              f"evaluations; choose one of {', '.join(metrics)}.")
    accum, batch = fields.get("optim.grad_accum_steps", 1), fields.get("batch_size", 1)
    if batch % accum:
        fits = [k for k in range(2, min(batch, 16) + 1) if batch % k == 0]
        raise ConfigError(f"config.optim.grad_accum_steps={accum} does not divide config.batch_size={batch} into equal "
                          f"micro-batches; set e.g. --config.optim.grad_accum_steps={fits[0] if fits else 1}.")
    boundaries = fields.get("optim.lr_boundaries_epochs") or ()
    if not all(_is_number(b) and b >= 0 for b in boundaries) or list(boundaries) != sorted(boundaries):
        raise ConfigError(f"config.optim.lr_boundaries_epochs={tuple(boundaries)!r} must be increasing epochs >= 0; "
                          "set e.g. --config.optim.lr_boundaries_epochs='(100.0, 150.0)'.")
    if fields.get("num_train_steps", 1) <= 0 and not fields.get("num_epochs", 1) > 0:
        raise ConfigError(f"config.num_epochs={fields['num_epochs']!r} gives no training steps; set "
                          "config.num_epochs > 0 or config.num_train_steps > 0.")
    if "model.arch" in fields:
        from nin_jax import architectures  # pylint: disable=g-import-not-at-top  (imports this module)

        if fields["model.arch"] not in architectures.PRESETS:
            raise ConfigError(f"config.model.arch={fields['model.arch']!r} must be one of "
                              f"{', '.join(sorted(architectures.PRESETS))}; set e.g. --config.model.arch=nin_cifar10.")
        if fields.get("model.blocks"):
            architectures.parse_blocks(fields["model.blocks"], num_classes=1)


def validate_model(model_cfg: ml_collections.ConfigDict) -> None:
    """`validate` of a `config.model` section on its own."""
    validate(ml_collections.ConfigDict({"model": model_cfg}))


def use_caffe_solver(config: ml_collections.ConfigDict, *, learning_rate: float, weight_decay: float,
                     output_lr_mult: float, lr_boundaries_epochs: tuple[float, ...]) -> None:
    """The original NIN solver: Caffe SGD, momentum 0.9, bias LR x2, step schedule (LR /10 per boundary)."""
    config.recipe = "caffe"
    config.model.init = "caffe"
    config.optim.learning_rate = learning_rate
    config.optim.momentum = 0.9
    config.optim.weight_decay = weight_decay
    config.optim.bias_lr_mult = 2.0
    config.optim.output_lr_mult = output_lr_mult
    config.optim.lr_boundaries_epochs = tuple(lr_boundaries_epochs)
    config.optim.lr_decay = 0.1


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config([arg])` of a config file, as `--config=path[:arg]` would load it."""
    import importlib.util  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top

    if not os.path.isfile(path):
        raise ConfigError(f"--config={path} does not exist; pass a config file such as configs/digits.py.")
    spec = importlib.util.spec_from_file_location(f"_nin_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The run's length in steps: `num_train_steps` when > 0, else `num_epochs` of `steps_per_epoch`."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    steps = int(config.num_epochs * steps_per_epoch)
    if steps <= 0:
        raise ConfigError(
            f"config.num_epochs={config.num_epochs} gives no training steps ({steps_per_epoch} steps per epoch); "
            "set config.num_epochs > 0 or config.num_train_steps > 0."
        )
    return steps
