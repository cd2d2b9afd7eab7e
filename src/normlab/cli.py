"""The ``normlab`` command: argument parsing and dispatch only.

    normlab train [--preset P] [flags]     train, or continue with --out DIR --resume
    normlab sample --run DIR [-n 20]       generate from a trained run
    normlab eval --run DIR [--calibrate]   loss with running vs calibrated BatchNorm statistics
    normlab bench --preset P ...           training steps per second, as one JSON line
    normlab diagnose [--preset P | --run DIR] per-layer health of one step, with verdicts
    normlab propagate                      the signal-propagation table of four inits
    normlab experiment NAME [--quick]      lecture | depth | batchnorm: see docs/RESULTS.md

Every problem with the input is one line on stderr and exit code 2.
"""

import argparse
import copy
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from normlab.errors import NormlabError
from normlab.presets import PRESETS

# flags → config fields; default None means "from the preset"
MODEL_FLAGS = (
    "dropout",
    "embed_dropout",
    "n_layer",
    "n_hidden",
    "n_embd",
    "block_size",
    "norm",
    "init",
    "nonlinearity",
    "residual",
    "output_bn",
    "bias",
    "n_groups",
    "bn_momentum",
    "gain",
)
TRAIN_FLAGS = (
    "steps",
    "batch_size",
    "lr",
    "optimizer",
    "schedule",
    "decay_step",
    "warmup_steps",
    "weight_decay",
    "ema",
    "eval_every",
    "eval_train_examples",
    "checkpoint_every",
    "target_val_loss",
    "diagnose_every",
    "tensorboard",
    "sync_batchnorm",
    "compile",
    "seed",
    "data",
)
RUN_FLAGS = ("device", "threads")  # may change on --resume: where it runs, not what it computes


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other usage error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_and_train_flags(p: argparse.ArgumentParser) -> None:
    from normlab.model import INITS, NONLINEARITIES, NORMS
    from normlab.train import DEVICES, OPTIMIZERS, SCHEDULES

    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named configuration; every flag below overrides one field (default: default)",
    )
    m = p.add_argument_group("model (default: from the preset)")
    m.add_argument("--n-layer", type=int, help="hidden blocks Linear → norm → nonlinearity")
    m.add_argument("--n-hidden", type=int, help="width of each hidden layer")
    m.add_argument("--n-embd", type=int, help="embedding dimensions per character")
    m.add_argument("--block-size", type=int, help="context length in characters")
    m.add_argument("--norm", choices=NORMS, help="normalization after each hidden Linear")
    m.add_argument("--init", choices=INITS, help="weight initialization scheme")
    m.add_argument("--gain", type=float, help="--init kaiming: the hidden weights' gain")
    m.add_argument("--nonlinearity", choices=NONLINEARITIES)
    m.add_argument(
        "--residual",
        action=argparse.BooleanOptionalAction,
        help="skip connections around hidden blocks of equal width",
    )
    m.add_argument(
        "--output-bn",
        action=argparse.BooleanOptionalAction,
        help="BatchNorm after the output Linear (the lecture's deep net)",
    )
    m.add_argument(
        "--bias",
        action=argparse.BooleanOptionalAction,
        help="biases on hidden Linears (default: only where no BatchNorm follows)",
    )
    m.add_argument("--n-groups", type=int, help="groups for --norm group")
    m.add_argument("--bn-momentum", type=float, help="running-statistics momentum")
    m.add_argument("--dropout", type=float, help="dropout after each hidden nonlinearity")
    m.add_argument("--embed-dropout", type=float, help="dropout on the context's embeddings")
    t = p.add_argument_group("training (default: from the preset)")
    t.add_argument("--steps", type=int, help="optimizer steps")
    t.add_argument("--batch-size", type=int, help="examples per step")
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--optimizer", choices=OPTIMIZERS)
    t.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="step: lr × 0.1 from --decay-step; cosine: warmup, then cosine decay",
    )
    t.add_argument("--decay-step", type=int, help="step schedule: where the lr drops ×0.1")
    t.add_argument("--warmup-steps", type=int, help="cosine schedule: linear warmup steps")
    t.add_argument("--weight-decay", type=float, help="on embeddings and Linear weights")
    t.add_argument(
        "--ema",
        type=float,
        help="evaluate a moving average of the weights with this decay, e.g. 0.999; 0: off",
    )
    t.add_argument("--eval-every", type=int, help="steps between evaluations on the whole splits")
    t.add_argument(
        "--eval-train-examples",
        type=int,
        help="the evaluations' train loss on this many fixed training examples, 0 for all",
    )
    t.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    t.add_argument("--target-val-loss", type=float, help="stop at the first eval at or below this")
    t.add_argument("--seed", type=int, help="model init and batch order")
    t.add_argument(
        "--diagnose-every",
        type=int,
        help="record per-layer diagnostics every N steps, 0 for never (default: 100)",
    )
    t.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        help="also write TensorBoard event files to the run folder (needs tensorboard)",
    )
    t.add_argument("--data", help="UTF-8 text file, one item per line (default: bundled names)")
    t.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="the hand-written training step (SGD or AdamW) compiled as one graph (default: off)",
    )
    t.add_argument(
        "--sync-batchnorm",
        action=argparse.BooleanOptionalAction,
        help="several processes: BatchNorm statistics over the whole global batch (default: on)",
    )
    r = p.add_argument_group("where it runs")
    r.add_argument("--device", choices=DEVICES, default="auto")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    from normlab.train import DEVICES

    parser = _Parser(prog="normlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="train a model (the main job)",
        description="Train an MLP language model; everything goes into a run folder.",
    )
    _add_model_and_train_flags(p)
    p.add_argument("--out", type=Path, help="run folder (default: a new folder under runs/)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, with its stored config",
    )
    p.add_argument(
        "--nproc",
        type=int,
        help="train on N local processes (torchrun); --batch-size stays the global batch",
    )

    p = sub.add_parser("sample", help="generate items from a trained run")
    p.add_argument("--run", type=Path, required=True, help="run folder (or checkpoint file)")
    p.add_argument("-n", "--num", type=int, default=20, help="how many (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, help="sample among the k most likely characters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="", help="start every sample with this text")
    p.add_argument("--data", help="the run's data file, if it has moved")
    p.add_argument("--device", choices=DEVICES, default="auto")

    p = sub.add_parser("eval", help="loss of a trained run on a split")
    p.add_argument("--run", type=Path, required=True, help="run folder (or checkpoint file)")
    p.add_argument("--split", choices=("train", "val", "test"), default="val")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="also with BatchNorm statistics calibrated over the whole training set",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--data", help="the run's data file, if it has moved")
    p.add_argument("--device", choices=DEVICES, default="auto")

    p = sub.add_parser("bench", help="time training steps; prints one JSON line")
    _add_model_and_train_flags(p)

    p = sub.add_parser(
        "diagnose",
        help="per-layer health of one training step, with verdicts",
        description="One forward and backward pass and one optimizer step on a real batch, at "
        "initialization (a preset and model flags) or from a run's checkpoint; then the "
        "per-layer table and the verdicts.",
    )
    _add_model_and_train_flags(p)
    p.add_argument("--run", type=Path, help="diagnose this run's checkpoint instead")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--strict", action="store_true", help="exit with code 1 when a verdict fires")

    p = sub.add_parser("propagate", help="signal propagation through a deep tanh stack, four inits")
    p.add_argument("--n-layer", type=int, default=50)
    p.add_argument("--width", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)

    from normlab.experiments import EXPERIMENTS

    p = sub.add_parser(
        "experiment",
        help="run one of the experiments behind docs/RESULTS.md",
        description="Run an experiment: a table as it goes, results.json and figures in --out.",
    )
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--out", type=Path, help="output folder (default: runs/experiment-NAME-<time>)")
    p.add_argument("--quick", action="store_true", help="a small version that runs in seconds")
    p.add_argument("--seed", type=int, default=42, help="model init and batch order")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def config_flags_given(args: argparse.Namespace) -> list[str]:
    """The model and training flags on the command line (for commands that must not take them)."""
    given = [n for n in (*MODEL_FLAGS, *TRAIN_FLAGS) if getattr(args, n) is not None]
    if args.preset is not None:
        given.append("preset")
    return ["--" + n.replace("_", "-") for n in given]


def configs_and_data_from_args(args: argparse.Namespace):
    """Validated configs from the preset and flags, with the data they name loaded."""
    from normlab.data import load_dataset
    from normlab.train import check_configs

    model_config, train_config = configs_from_args(args)
    check_configs(model_config, train_config)
    data = load_dataset(train_config.data, model_config.block_size)
    model_config.vocab_size = data.vocab.size
    return model_config, train_config, data


def configs_from_args(args: argparse.Namespace):
    """The preset's configs with every given flag applied."""
    from normlab.model import ModelConfig
    from normlab.train import TrainConfig

    name = args.preset or "default"
    preset = copy.deepcopy(PRESETS[name])
    model = ModelConfig(**preset["model"])
    train = TrainConfig(**preset["train"], preset=name)
    for name in MODEL_FLAGS:
        if getattr(args, name, None) is not None:
            setattr(model, name, getattr(args, name))
    for name in (*TRAIN_FLAGS, *RUN_FLAGS):
        if getattr(args, name, None) is not None:
            setattr(train, name, getattr(args, name))
    return model, train


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

    from normlab import distributed
    from normlab.train import train

    if args.resume:
        if args.out is None:
            raise NormlabError("--resume needs --out DIR, the run folder to continue")
        given = config_flags_given(args)
        if given:
            raise NormlabError(
                f"--resume continues the run's stored config; drop {', '.join(given)}"
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
        ranks = distributed.init_process_group(args.device)
    try:
        out = args.out or Path(distributed.gather_objects(str(new_run_folder()), ranks)[0])
        model_config, train_config = configs_from_args(args)
        train(model_config, train_config, out, resume=args.resume)
        if ranks.distributed:  # rank 0 writes the report: leave together, none mid-conversation
            torch.distributed.barrier()
    finally:
        distributed.shutdown()
    return 0


def _load_run(args):
    """Model (eval mode, on the device), dataset and checkpoint of a finished run."""
    from normlab.checkpoint import load_checkpoint
    from normlab.model import MLPLanguageModel, ModelConfig
    from normlab.train import load_run_data, load_state, resolve_device

    ckpt = load_checkpoint(args.run)
    data = load_run_data(ckpt, args.data)
    model = MLPLanguageModel(ModelConfig.from_dict(ckpt["model_config"]), verbose=False)
    load_state(model, None, ckpt)
    return model.to(resolve_device(args.device)).eval(), data, ckpt


def cmd_sample(args) -> int:
    from normlab.sample import format_samples, sample_run

    model, data, _ = _load_run(args)
    options = {"temperature": args.temperature, "top_k": args.top_k, "prefix": args.prefix}
    print(format_samples(sample_run(model, data, args.num, args.seed, **options)))
    return 0


def cmd_eval(args) -> int:
    from normlab.calibrate import calibrate_batchnorm
    from normlab.train import evaluate

    model, data, ckpt = _load_run(args)
    device = next(model.parameters()).device
    X, Y = (t.to(device) for t in data.splits[args.split])
    result = {
        "split": args.split,
        "step": ckpt["progress"]["step"],
        "running_stats_loss": evaluate(model, X, Y),
    }
    if args.calibrate:
        if not any(getattr(m, "running_mean", None) is not None for m in model.modules()):
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
    import torch

    from normlab.distributed import SINGLE
    from normlab.model import MLPLanguageModel
    from normlab.train import fast_step, make_optimizer, resolve_device

    model_config, tcfg, data = configs_and_data_from_args(args)
    steps = args.steps or 500
    if tcfg.threads is not None:
        torch.set_num_threads(tcfg.threads)
    device = resolve_device(tcfg.device)
    model = MLPLanguageModel(model_config, torch.Generator().manual_seed(tcfg.seed), verbose=False)
    model = model.to(device)
    optimizer = make_optimizer(model, tcfg)
    fast = fast_step(model, optimizer, tcfg, SINGLE, print)
    X, Y = (t.to(device) for t in data.splits["train"])
    g = torch.Generator().manual_seed(tcfg.seed)

    def run(n):
        for _ in range(n):
            ix = torch.randint(0, len(X), (tcfg.batch_size,), generator=g).to(device)
            if fast is not None:
                fast(X[ix], Y[ix], tcfg.lr)
                continue
            _, loss = model(X[ix], Y[ix])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    run(max(10, steps // 10))  # warm-up (and the compilation, with --compile)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    run(steps)
    elapsed = time.perf_counter() - start
    print(
        json.dumps(
            {
                "steps_per_s": round(steps / elapsed, 1),
                "warmup_s": round(warmup_s, 2),
                "compiled": fast is not None,
                "batch_size": tcfg.batch_size,
                "preset": tcfg.preset,
                "steps": steps,
                "threads": torch.get_num_threads(),
                "device": str(device),
            }
        )
    )
    return 0


def cmd_diagnose(args) -> int:
    import torch

    from normlab.checkpoint import load_checkpoint
    from normlab.diagnostics import Diagnostics, report
    from normlab.model import MLPLanguageModel, ModelConfig
    from normlab.train import (
        TrainConfig,
        data_init_,
        eval_mode_loss,
        load_run_data,
        load_state,
        lr_at,
        make_optimizer,
        resolve_device,
    )

    if args.run is not None:
        given = config_flags_given(args)
        if given:
            raise NormlabError(f"--run diagnoses the run's own model; drop {', '.join(given)}")
        ckpt = load_checkpoint(args.run)
        model_config = ModelConfig.from_dict(ckpt["model_config"])
        tcfg = TrainConfig.from_dict(ckpt["train_config"])
        tcfg.device, tcfg.threads = args.device, args.threads
        data = load_run_data(ckpt)
        step = ckpt["progress"]["step"]
    else:
        model_config, tcfg, data = configs_and_data_from_args(args)
        step = 0
    if tcfg.threads is not None:
        torch.set_num_threads(tcfg.threads)
    device = resolve_device(tcfg.device)
    torch.manual_seed(tcfg.seed)
    model = MLPLanguageModel(model_config, torch.Generator().manual_seed(tcfg.seed), verbose=False)
    optimizer = make_optimizer(model, tcfg)
    if args.run is not None:
        load_state(model, optimizer, ckpt)
    else:  # --init lsuv: the model as a run starts it
        data_init_(model, data.splits["train"][0], tcfg.seed, verbose=not args.json)
    model.to(device).train()
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, tcfg)
    X, Y = data.splits["train"]
    ix = torch.randint(0, len(X), (tcfg.batch_size,), generator=torch.Generator().manual_seed(0))
    xb, yb = X[ix].to(device), Y[ix].to(device)

    diag = Diagnostics(model)
    diag.arm()
    _, loss = model(xb, yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    eval_loss = eval_mode_loss(model, xb, yb)
    optimizer.step()
    diag.collect(step, loss.item(), eval_loss)
    result = report(diag, num_classes=data.vocab.size)
    print(result.to_json() if args.json else result.table())
    return 1 if args.strict and result.verdicts else 0


def cmd_propagate(args) -> int:
    from normlab.propagation import propagation_table

    if args.n_layer < 1 or args.width < 1:
        raise NormlabError("--n-layer and --width must be at least 1")
    print(propagation_table(args.n_layer, args.width, args.seed))
    return 0


def cmd_experiment(args) -> int:
    from normlab.experiments import run_experiment
    from normlab.experiments.common import Context, set_threads
    from normlab.train import resolve_device

    set_threads(args.threads)
    out = args.out or new_run_folder(f"experiment-{args.name}-")
    command = f"normlab experiment {args.name} --seed {args.seed} --out {out}"
    command += (" --quick" if args.quick else "") + f" --device {args.device}"
    command += f" --threads {args.threads}" if args.threads is not None else ""
    ctx = Context(args.name, out, args.quick, args.seed, resolve_device(args.device), command)
    run_experiment(ctx)
    return 0


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "diagnose": cmd_diagnose,
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
    except NormlabError as e:
        # under torchrun every process meets the same error (they agree on it): rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"normlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        from normlab.distributed import describe_failure, launched_by_torchrun

        if not launched_by_torchrun() or os.environ.get("NORMLAB_TRACEBACK") == "1":
            raise
        print(f"normlab: error: {describe_failure(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("normlab: interrupted", file=sys.stderr)
        return 130
