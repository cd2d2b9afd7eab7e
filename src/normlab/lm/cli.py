"""The ``normlab`` command: argument parsing and dispatch.

    normlab train [--preset P] [flags]     train, or continue with --out DIR --resume
    normlab sample --run DIR [-n 20]       generate from a trained run
    normlab eval --run DIR [--calibrate]   loss with running vs calibrated BatchNorm statistics
    normlab bench --preset P ...           training steps per second, as one JSON line
    normlab diagnose [--preset P | --run DIR] per-layer health of one step, with verdicts
    normlab lr-find [--preset P]           the learning-rate range test, and its suggestion
    normlab coordcheck [--preset P]        each layer's activation size against the width
    normlab export --run DIR --format F    the model as ONNX or safetensors, for use elsewhere
    normlab propagate                      the signal-propagation table of four inits
    normlab experiment NAME [--quick]      the measurements behind docs/RESULTS.md

The model and training flags are generated from the config fields
(``normlab.lm.config``): ``--n-layer`` sets ``ModelConfig.n_layer``, with the
field's help and valid values. Every problem with the input is one line on
stderr and exit code 2.
"""

import argparse
import json
import os
import signal
import sys
import typing
from dataclasses import Field, fields, replace
from datetime import datetime
from pathlib import Path

from normlab.errors import NormlabError
from normlab.lm.config import ModelConfig, TrainConfig, check_configs, preset_configs

BENCH_STEPS = 500  # normlab bench without --steps
METAVARS = {int: "N", float: "X", str: "PATH"}  # the config fields' types; str: the data file
DESCRIPTION = """\
normlab trains deep networks that stay healthy: principled initialization, BatchNorm done
right, and per-layer diagnostics with verdicts and fixes, for any PyTorch model
(normlab.audit, normlab.fold, normlab.lsuv, ...). This command trains, samples, evaluates,
diagnoses and exports character-level language models on the bundled names data set.

example:
  normlab train --preset lecture-deep --steps 20000 --out runs/demo
  normlab sample --run runs/demo -n 10
  normlab diagnose --run runs/demo --html diagnose.html
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other usage error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    """The flag of the config field ``name``: ``--n-layer`` for ``n_layer``."""
    return "--" + name.replace("_", "-")


def _add_flag(parser, field: Field, default=None) -> None:
    """The flag of one config field: its type, choices and help from the field itself."""
    types = [t for t in typing.get_args(field.type) if t is not type(None)] or [field.type]
    kwargs: dict = {"default": default, "help": field.metadata["help"]}
    if types[0] is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = types[0]
    choices = field.metadata["choices"]
    if choices is not None:  # argparse lists them, as {a,b,c}, in the usage and the help
        kwargs["choices"] = [c for c in choices if c is not None]
    elif types[0] is not bool:
        kwargs["metavar"] = METAVARS[types[0]]
    parser.add_argument(_flag(field.name), **kwargs)


def _config_fields(runtime: bool) -> list[Field]:
    """The fields that have a flag: what a run computes, or where it runs."""
    return [
        f
        for config in (ModelConfig, TrainConfig)
        for f in fields(config)
        if f.metadata["flag"] and f.metadata["runtime"] == runtime and f.name != "preset"
    ]


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """``--preset`` and a flag for every config field; each overrides one field of the preset."""
    _add_flag(p, next(f for f in fields(TrainConfig) if f.name == "preset"))
    groups = {
        ModelConfig: p.add_argument_group("model (default: from the preset)"),
        TrainConfig: p.add_argument_group("training (default: from the preset)"),
    }
    names = {f.name for f in fields(ModelConfig)}
    for field in _config_fields(runtime=False):
        _add_flag(groups[ModelConfig if field.name in names else TrainConfig], field)
    where = p.add_argument_group("where it runs")
    for field in _config_fields(runtime=True):
        _add_flag(where, field)


def _add_field_flags(p: argparse.ArgumentParser, *names: str) -> None:
    """Flags of TrainConfig fields for a command without presets, with the fields' defaults."""
    for field in fields(TrainConfig):
        if field.name in names:
            _add_flag(p, field, default=field.default)


def build_parser() -> argparse.ArgumentParser:
    from normlab import __version__
    from normlab.lm.experiments import EXPERIMENTS

    parser = _Parser(
        prog="normlab",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="train a model (the main job)",
        description="Train a character-level language model (an MLP or a WaveNet); everything "
        "goes into a run folder.",
    )
    _add_config_flags(p)
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="run folder (default: a new folder under runs/)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, with its stored config; with "
        "--steps N, train on to N steps in all",
    )
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N local processes (torchrun); --batch-size stays the global batch",
    )

    _add_run_commands(sub)

    p = sub.add_parser("propagate", help="signal propagation through a deep tanh stack, four inits")
    p.add_argument("--n-layer", type=int, default=50, metavar="N")
    p.add_argument("--width", type=int, default=100, metavar="N")
    p.add_argument("--seed", type=int, default=0, metavar="N")

    p = sub.add_parser(
        "experiment",
        help="run one of the experiments behind docs/RESULTS.md",
        description="Run an experiment: a table as it goes, results.json and figures in --out.",
    )
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder (default: runs/experiment-NAME-<time>)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a small version that runs in seconds (eager)"
    )
    _add_field_flags(p, "seed", "device", "threads", "compile")
    return parser


def _add_run_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", type=Path, required=True, metavar="DIR", help="run folder (or checkpoint file)"
    )


def _add_data_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="PATH", help="the run's data file, if it has moved")


def _add_run_commands(sub) -> None:
    """The commands that read a run, or build a model as a run would: sample, eval, bench,
    diagnose, export, lr-find and coordcheck."""
    _add_sample_and_eval(sub)
    _add_bench_diagnose_and_export(sub)
    _add_scaling_commands(sub)


def _add_scaling_commands(sub) -> None:
    """The commands that say how to scale a run: lr-find and coordcheck."""
    p = sub.add_parser(
        "lr-find",
        help="the learning-rate range test: sweep the rate, suggest one",
        description="Train a new run's model for --sweep-steps batches with a learning rate "
        "growing exponentially from --start-lr to --end-lr, then suggest the rate where the "
        "smoothed loss falls fastest. The model and optimizer are as the preset and flags "
        "make them; nothing is written but --plot.",
    )
    _add_config_flags(p)
    p.add_argument("--sweep-steps", type=int, default=100, metavar="N", help="default: 100")
    p.add_argument("--start-lr", type=float, default=1e-7, metavar="X", help="default: 1e-7")
    p.add_argument("--end-lr", type=float, default=10.0, metavar="X", help="default: 10")
    p.add_argument("--plot", type=Path, metavar="FILE", help="draw the curve to this PNG file")
    p.add_argument("--json", action="store_true", help="print the sweep as one JSON object")

    p = sub.add_parser(
        "coordcheck",
        help="the coord check: each layer's activation size against the width, first steps",
        description="Build the model at each of --widths hidden units (or --depths hidden "
        "blocks), train each for --check-steps steps on the same batches (once per seed), and "
        "fit each layer's mean |activation| against the width: a slope near 0 means the "
        "layer's size does not depend on the width. --param mup should keep every layer flat; "
        "the standard parametrization lets them drift once training moves them. Along the "
        "depth, --residual --residual-scale depth keeps the logits flat.",
    )
    _add_config_flags(p)
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument(
        "--widths",
        type=_shape,
        default=[64, 128, 256, 512, 1024],
        metavar="W,...",
        help="hidden widths (default: 64,128,256,512,1024)",
    )
    sizes.add_argument(
        "--depths",
        type=_shape,
        metavar="L,...",
        help="check along the depth instead: these numbers of hidden blocks, at the preset's "
        "width; the layers every depth has are compared",
    )
    p.add_argument("--check-steps", type=int, default=4, metavar="N", help="default: 4")
    p.add_argument("--seeds", type=int, default=2, metavar="N", help="default: 2")
    p.add_argument("--plot", type=Path, metavar="FILE", help="draw mup's figure to this PNG file")
    p.add_argument("--json", action="store_true", help="print the slopes as one JSON object")
    p.add_argument("--strict", action="store_true", help="exit with code 1 when a layer drifts")


def _add_sample_and_eval(sub) -> None:
    p = sub.add_parser("sample", help="generate items from a trained run")
    _add_run_flag(p)
    p.add_argument(
        "-n", "--num", type=int, default=20, metavar="N", help="how many (default: %(default)s)"
    )
    p.add_argument("--temperature", type=float, default=1.0, metavar="X")
    p.add_argument(
        "--top-k", type=int, metavar="K", help="sample among the k most likely characters"
    )
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.add_argument("--prefix", default="", metavar="TEXT", help="start every sample with this text")
    _add_data_flag(p)
    _add_field_flags(p, "device")

    p = sub.add_parser("eval", help="loss of a trained run on a split")
    _add_run_flag(p)
    p.add_argument("--split", choices=("train", "val", "test"), default="val")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="also with BatchNorm statistics calibrated over the whole training set",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line")
    _add_data_flag(p)
    _add_field_flags(p, "device")


def _add_bench_diagnose_and_export(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time training steps; prints one JSON line",
        description=f"Time --steps (default {BENCH_STEPS}) steps of the training loop after a "
        "warm-up; the model and training flags as for train.",
    )
    _add_config_flags(p)

    p = sub.add_parser(
        "diagnose",
        help="per-layer health of one training step, with verdicts",
        description="One forward and backward pass and one optimizer step on a real batch, at "
        "initialization (a preset and model flags) or from a run's checkpoint; then the "
        "per-layer table and the verdicts.",
    )
    _add_config_flags(p)
    p.add_argument("--run", type=Path, metavar="DIR", help="diagnose this run's checkpoint instead")
    p.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="diagnose your own model: FACTORY() in MODULE (a module or a .py file) builds it",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        metavar="N,...",
        help="--model: its input, a batch of random normal values of this shape",
    )
    p.add_argument(
        "--batch",
        metavar="MODULE:FACTORY",
        help="--model: its input, from FACTORY() (a tensor, a tuple of arguments or a dict)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument(
        "--html", type=Path, metavar="FILE", help="also write the report as a page to this file"
    )
    p.add_argument("--strict", action="store_true", help="exit with code 1 when a verdict fires")

    p = sub.add_parser(
        "export",
        help="write a trained run's model as ONNX or safetensors",
        description="Export a run's model for use outside normlab (needs normlab[export]).",
    )
    _add_run_flag(p)
    p.add_argument("--format", choices=("onnx", "safetensors"), required=True)
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="the file (default: model.FORMAT in the run folder)",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="first set the BatchNorm statistics to the whole training set's",
    )
    p.add_argument(
        "--no-fold",
        action="store_true",
        help="ONNX: keep each BatchNorm as a BatchNormalization node instead of folding it",
    )
    _add_data_flag(p)


def config_flags_given(args: argparse.Namespace) -> list[str]:
    """The model and training flags on the command line (for commands that must not take them)."""
    given = [f for f in fields(TrainConfig) if f.name == "preset"] + _config_fields(runtime=False)
    return [_flag(f.name) for f in given if getattr(args, f.name) is not None]


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The preset's configs with every given flag applied."""
    model, train = preset_configs(args.preset)
    for config in (model, train):
        for f in fields(config):
            value = getattr(args, f.name, None)
            if f.name != "preset" and value is not None:
                setattr(config, f.name, value)
    return model, train


def configs_and_data_from_args(args: argparse.Namespace):
    """Validated configs from the preset and flags, with the data they name loaded."""
    from normlab.lm.data import load_dataset

    model_config, train_config = configs_from_args(args)
    check_configs(model_config, train_config)
    data = load_dataset(train_config.data, model_config.block_size)
    model_config.vocab_size = data.vocab.size
    return model_config, train_config, data


def new_run_folder(prefix: str = "") -> Path:
    """``runs/<prefix><date-time>``, with a suffix when a run started in the same second."""
    base = Path("runs") / (prefix + datetime.now().strftime("%Y%m%d-%H%M%S"))
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def cmd_train(args) -> int:
    import torch.distributed

    from normlab.lm import distributed
    from normlab.lm.train import train

    if args.resume:
        if args.out is None:
            raise NormlabError("--resume needs --out DIR, the run folder to continue")
        given = [flag for flag in config_flags_given(args) if flag != "--steps"]
        if given:
            raise NormlabError(
                f"--resume continues the run's stored config (--steps N excepted, to train on "
                f"to N steps); drop {', '.join(given)}"
            )
    if args.nproc is not None and args.nproc < 1:
        raise NormlabError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc is not None and args.nproc > 1 and not distributed.launched_by_torchrun():
        # every process must write to the same folder: choose it once, here
        out = ["--out", str(new_run_folder())] if args.out is None else []
        return distributed.launch(args.nproc, [*args.argv, *out])
    ranks = distributed.SINGLE
    if distributed.launched_by_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        if args.nproc not in (None, world_size):
            raise NormlabError(f"--nproc {args.nproc} under torchrun with {world_size} processes")
        ranks = distributed.init_process_group(args.device or "auto")
    try:
        out = args.out or Path(distributed.gather_objects(str(new_run_folder()), ranks)[0])
        model_config, train_config = configs_from_args(args)
        steps = args.steps if args.resume else None
        train(model_config, train_config, out, resume=args.resume, steps=steps)
        if ranks.distributed:  # rank 0 writes the report: leave together, none mid-conversation
            torch.distributed.barrier()
    finally:
        distributed.shutdown()
    return 0


def cmd_sample(args) -> int:
    from normlab.lm.runs import load_run
    from normlab.lm.sample import format_samples, sample_run

    model, data, _ = load_run(args.run, args.data, args.device)
    options = {"temperature": args.temperature, "top_k": args.top_k, "prefix": args.prefix}
    print(format_samples(sample_run(model, data, args.num, args.seed, **options)))
    return 0


def cmd_eval(args) -> int:
    from normlab.calibrate import calibrate_batchnorm
    from normlab.lm.evaluate import evaluate
    from normlab.lm.runs import load_run
    from normlab.nn import is_batchnorm

    model, data, ckpt = load_run(args.run, args.data, args.device)
    device = next(model.parameters()).device
    X, Y = (t.to(device) for t in data.splits[args.split])
    result = {
        "split": args.split,
        "step": ckpt["progress"]["step"],
        "running_stats_loss": evaluate(model, X, Y),
    }
    if args.calibrate:
        if not any(is_batchnorm(m) for m in model.modules()):
            raise NormlabError("this model has no BatchNorm running statistics to calibrate")
        calibrate_batchnorm(model, data.splits["train"][0].to(device))
        result["calibrated_loss"] = evaluate(model, X, Y)
    if args.json:
        print(json.dumps(result))
    else:
        line = f"{args.split} loss at step {result['step']:,}: {result['running_stats_loss']:.4f} "
        line += "with running BatchNorm statistics"
        if args.calibrate:
            line += f", {result['calibrated_loss']:.4f} with calibrated statistics"
        print(line)
    return 0


def cmd_bench(args) -> int:
    from normlab.lm.bench import bench

    model_config, train_config, data = configs_and_data_from_args(args)
    print(json.dumps(bench(model_config, train_config, data, args.steps or BENCH_STEPS)))
    return 0


def _shape(text: str) -> list[int]:
    try:
        shape = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sizes such as 8,3,32,32, got {text!r}"
        ) from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be at least 1, got {text!r}")
    return shape


def cmd_diagnose(args) -> int:
    from normlab.auditor import Audit, audit_factory
    from normlab.lm.checkpoint import load_checkpoint
    from normlab.lm.diagnose import diagnose
    from normlab.lm.runs import load_run_data

    ckpt = None
    if args.model is not None:
        given = config_flags_given(args) + (["--run"] if args.run is not None else [])
        if given:
            raise NormlabError(f"--model diagnoses your own model; drop {', '.join(given)}")
        result = audit_factory(args.model, args.input_shape, args.batch)
        return _print_diagnosis(result, args)
    if args.input_shape is not None or args.batch is not None:
        raise NormlabError("--input-shape and --batch go with --model")
    if args.run is not None:
        given = config_flags_given(args)
        if given:
            raise NormlabError(f"--run diagnoses the run's own model; drop {', '.join(given)}")
        ckpt = load_checkpoint(args.run)
        model_config = ModelConfig.from_dict(ckpt["model_config"])
        train_config = TrainConfig.from_dict(ckpt["train_config"])
        train_config.device, train_config.threads = args.device or "auto", args.threads
        data = load_run_data(ckpt)
    else:
        model_config, train_config, data = configs_and_data_from_args(args)
    report, diagnostics = diagnose(model_config, train_config, data, ckpt, quiet=args.json)
    return _print_diagnosis(Audit(report, diagnostics, "normlab diagnose"), args)


def _print_diagnosis(result, args) -> int:
    print(result.to_json() if args.json else result.table())
    if args.html is not None:
        result.to_html(args.html)
    return 1 if args.strict and result.verdicts else 0


def cmd_lr_find(args) -> int:
    from normlab.diagnostics import finite
    from normlab.lm.lr_range import lr_range_test

    if args.sweep_steps < 10:
        raise NormlabError(f"--sweep-steps must be at least 10, got {args.sweep_steps}")
    if not 0 < args.start_lr < args.end_lr:
        raise NormlabError(f"need 0 < --start-lr < --end-lr, got {args.start_lr} and {args.end_lr}")
    model_config, train_config, data = configs_and_data_from_args(args)
    sweep = lr_range_test(
        model_config, train_config, data, args.sweep_steps, args.start_lr, args.end_lr
    )
    if args.plot is not None:
        sweep.plot(args.plot)
    if args.json:
        print(json.dumps(finite(vars(sweep))))
        return 0
    suggestion = (
        "none (the loss never fell)" if sweep.suggestion is None else f"{sweep.suggestion:.3g}"
    )
    print(
        f"swept {len(sweep.lrs)} steps from {sweep.lrs[0]:.3g} to {sweep.lrs[-1]:.3g} "
        f"(stopped: {sweep.stopped}); suggested learning rate: {suggestion}"
    )
    return 0


def cmd_coordcheck(args) -> int:
    from normlab.lm.coordcheck import FIELDS, coord_check_model

    along = "depth" if args.depths is not None else "width"
    sizes = args.depths if along == "depth" else args.widths
    flag = _flag(FIELDS[along])
    if len(set(sizes)) < 2 or args.check_steps < 1 or args.seeds < 1:
        raise NormlabError(f"need two {along}s or more, --check-steps ≥ 1 and --seeds ≥ 1")
    if getattr(args, FIELDS[along]) is not None:
        raise NormlabError(f"--{along}s sets the {along}; drop {flag}")
    if along == "width" and args.base_width is not None and args.base_width > min(sizes):
        raise NormlabError(
            f"--base-width ({args.base_width}) is larger than the narrowest width "
            f"({min(sizes)}); μP scales up from its base width"
        )
    setattr(args, FIELDS[along], max(sizes))
    model_config, train_config, data = configs_and_data_from_args(args)
    for size in sizes:  # each size is a model of its own: check each one's config
        check_configs(replace(model_config, **{FIELDS[along]: size}), train_config)
    check = coord_check_model(
        model_config, train_config, data, sizes, along, args.check_steps, args.seeds
    )
    if args.plot is not None:
        check.plot(args.plot)
    if args.json:
        out = {f"{along}s": check.widths, "slopes": check.slopes, "flagged": check.flagged}
        print(json.dumps(out))
    else:
        print(check.table())
    return 1 if args.strict and check.flagged else 0


def cmd_export(args) -> int:
    from normlab.lm.export import export_run

    fold = not args.no_fold
    paths = export_run(args.run, args.format, args.out, args.calibrate, fold, args.data)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_propagate(args) -> int:
    from normlab.lm.propagation import propagation_table

    if args.n_layer < 1 or args.width < 1:
        raise NormlabError("--n-layer and --width must be at least 1")
    print(propagation_table(args.n_layer, args.width, args.seed))
    return 0


def cmd_experiment(args) -> int:
    from normlab.lm.distributed import resolve_device, set_threads
    from normlab.lm.experiments import run_experiment
    from normlab.lm.experiments.common import Context

    set_threads(args.threads)
    out = args.out or new_run_folder(f"experiment-{args.name}-")
    command = f"normlab experiment {args.name} --seed {args.seed} --out {out}"
    command += (" --quick" if args.quick else "") + f" --device {args.device}"
    command += f" --threads {args.threads}" if args.threads is not None else ""
    command += "" if args.compile else " --no-compile"
    # a --quick cell trains for seconds: compiling its step would take longer
    compiled = args.compile and not args.quick
    device = resolve_device(args.device)
    ctx = Context(args.name, out, args.quick, args.seed, device, command, compiled)
    run_experiment(ctx)
    return 0


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "diagnose": cmd_diagnose,
    "lr-find": cmd_lr_find,
    "coordcheck": cmd_coordcheck,
    "export": cmd_export,
    "propagate": cmd_propagate,
    "experiment": cmd_experiment,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for --nproc, which starts this same command in each process
    if hasattr(sys.stdout, "reconfigure"):  # live logs also when piped to a file or tee
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # stdout was closed (`normlab sample | head`): stop quietly, with the status a Unix
        # tool killed by SIGPIPE has; stdout goes to /dev/null so nothing fails on the way out
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except NormlabError as e:
        # under torchrun every process meets the same error (they agree on it): rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"normlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        from normlab.lm.distributed import describe_failure, launched_by_torchrun

        if not launched_by_torchrun() or os.environ.get("NORMLAB_TRACEBACK") == "1":
            raise
        print(f"normlab: error: {describe_failure(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("normlab: interrupted", file=sys.stderr)
        return 130
