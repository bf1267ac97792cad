"""``python -m training {train,evaluate,export,calibrate,quantize,pipeline,datasets,
shipped}``: the training job's command
line.

Imports no torch until a command needs it: ``shipped`` runs with only the ``serve`` extra installed."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from training.config import CONFIG_DIR, DEFAULT_DATA_DIR, MIN_AGREEMENT, config_names, parse_override
from training.shipped import SHIPPED, SHIPPED_NAMES

DEFAULT_RUNS = Path(os.environ.get("CNNSERVE_RUNS", "runs"))
DEFAULT_REPO = Path(os.environ.get("CNNSERVE_MODEL_DIR", "exports"))


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.lower() in ("1", "true", "yes")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="dataset root: MNIST/raw/ and medmnist/<flag>.npz (env CNNSERVE_DATA; default %(default)s)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=_env_flag("CNNSERVE_DOWNLOAD", True),
                   help="download missing dataset files (env CNNSERVE_DOWNLOAD; default on)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--batch-size", type=int, help="override the config's batch size")
    p.add_argument("--lr", type=float, help="override the config's learning rate")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--ensemble", type=int, metavar="N",
                   help="train N members (seeds seed .. seed+N-1, taking the config's ensemble_variants in turn) "
                        "and export the mean of their probabilities; N times the inference cost")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (YAML value), e.g. --set augment.hflip=true; repeatable")
    p.add_argument("--device", default=os.environ.get("CNNSERVE_TRAIN_DEVICE", "auto"),
                   help="auto (CUDA if present), cpu or cuda[:N] (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they are off anyway when not a TTY)")


def _add_min_agreement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-agreement", type=_share, default=MIN_AGREEMENT, metavar="SHARE",
                   help="the share of test images an int8 network must decide as its float source does (per label "
                        "for multi-label models) to be published (default: %(default)s)")


def _share(text: str) -> float:
    """A command-line share between 0 and 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1 (0.99 is 99 %)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model: any dataset flag, or a YAML config",
                       description="Train one model; writes checkpoint, history, metrics and plots to the run dir. "
                                   "A dataset flag without a YAML of its name trains the generic 2D or 3D recipe "
                                   "derived from the dataset's metadata (see `python -m training datasets`).")
    p.add_argument("config", help=f"a dataset flag (mnist or any MedMNIST flag: `python -m training datasets`), "
                                  f"a config in {CONFIG_DIR} ({', '.join(config_names())}), or a YAML file")
    p.add_argument("--size", type=int, help="image size, among those the dataset offers (default: the config's, 28)")
    p.add_argument("--recipe", action="store_true",
                   help="train the generic recipe of the dataset flag even where a tuned YAML of that name exists "
                        "(named <flag>-cnn-recipe)")
    p.add_argument("--run-dir", type=Path, help="output directory (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run dir that holds a run already, removing its checkpoints and metrics "
                        "(without it, or --resume, such a run dir is refused: its checkpoint would be replaced "
                        "after one epoch)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="leave after N epochs of this invocation (time-sliced jobs); continue later with --resume")
    p.add_argument("--backbone-checkpoint", help="transfer models: the backbone's weights, from a checkpoint of "
                   "this project's training (runs/<name>/checkpoint.pt: its features are reused) or a torchvision "
                   "state dict for the config's torchvision backbone (no download)")
    p.add_argument("--freeze", action="store_true", help="transfer models: train the head only (linear probe)")
    p.add_argument("--export", action="store_true", help="export the trained model to the model repository")
    p.add_argument("--model-dir", type=Path, help=f"model repository for --export (default {DEFAULT_REPO}, env "
                   "CNNSERVE_MODEL_DIR)")
    _add_train_args(p)
    _add_data_args(p)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint or an exported ONNX model on a split",
                       description="Evaluate a checkpoint (.pt) or an exported model (.onnx, or its version dir).")
    p.add_argument("model", type=Path, help="checkpoint.pt, model.onnx, or exports/<name>/<version>")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--dataset", help="dataset flag (default: from the checkpoint or model card)")
    _add_data_args(p)

    p = sub.add_parser("export", help="export a checkpoint to ONNX in the model repository",
                       description="Export to <model-dir>/<name>/<next version>/ after an ONNX-vs-PyTorch "
                                   "parity check.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--name", help="model name (default: the config's name)")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_REPO, help="model repository (env CNNSERVE_MODEL_DIR)")
    p.add_argument("--quantize", choices=["int8"], help="publish a static int8 model; the card reports the change")
    _add_min_agreement(p)
    _add_data_args(p)

    p = sub.add_parser("calibrate", help="publish the next version of an exported model with calibrated probs",
                       description="Fit a temperature on the val split's logits of an exported version and publish "
                                   "the same network with probs = softmax(logits / T) (sigmoid per label for "
                                   "multi-label models) as the next version; the source version is left untouched.")
    p.add_argument("version_dir", type=Path, help="an exported version, e.g. exports/mnist-cnn/1")
    p.add_argument("--report-dir", type=Path, help="also write the test split's reliability diagram here")
    _add_data_args(p)

    p = sub.add_parser("quantize", help="publish the next version of an exported model as a static int8 network",
                       description="Quantise an exported version to int8 (onnxruntime static QDQ, per channel, "
                                   "calibrated on 512 training images; the classifier layer and the head after it "
                                   "stay in float, so probabilities keep their calibration) and publish it as the "
                                   "next version. The card re-measures the test metrics, the calibration and the "
                                   "CPU speed-up; the source version is left untouched.")
    p.add_argument("version_dir", type=Path, help="an exported version, e.g. exports/mnist-cnn/2")
    p.add_argument("--allow-slower", action="store_true",
                   help="publish the int8 network even when it runs slower than the source at batch 1 and 64")
    _add_min_agreement(p)
    _add_data_args(p)

    p = sub.add_parser("datasets", help="list the dataset flags: task, shape, split sizes, sizes, local files",
                       description="Every flag `train` accepts, from the packages' metadata: task, image shape, "
                                   "labels, official split sizes, the sizes offered, which of them are in "
                                   "--data-dir, and the config `train FLAG` uses.")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="dataset root to look for files in (env CNNSERVE_DATA; default %(default)s)")

    p = sub.add_parser("pipeline", help="train, evaluate and export the shipped models",
                       description=", then ".join(m.name + (f" (its backbone is the {m.backbone_from} just trained "
                                                           "unless --backbone is given)" if m.backbone_from else "")
                                                  + (f" (published {m.quantize})" if m.quantize else "")
                                                  for m in SHIPPED) + ".")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS,
                   help=f"where the run directories go (default {DEFAULT_RUNS})")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_REPO, help="model repository (env CNNSERVE_MODEL_DIR)")
    p.add_argument("--only", nargs="+", choices=SHIPPED_NAMES)
    p.add_argument("--resume", action="store_true", help="continue each model from its run's checkpoint")
    p.add_argument("--backbone", default="checkpoint",
                   help="transfer backbone: checkpoint (our mnist-cnn), resnet18, mobilenet_v3_small, efficientnet_b0")
    _add_train_args(p)
    _add_data_args(p)

    sub.add_parser("shipped", help="list the shipped models' names, one a line (the Makefile reads them)",
                   description="The models the pipeline trains and exports/ ships, in training order.")
    return parser


def overrides_from(args: argparse.Namespace) -> dict:
    overrides = dict(parse_override(s) for s in args.set)
    for key in ("epochs", "batch_size", "lr", "seed", "ensemble", "size"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    return overrides


def command_line() -> str:
    return shlex.join(["python", "-m", "training", *sys.argv[1:]])


class Stopped(Exception):
    """SIGTERM (Kubernetes stopping the Job's pod) or Ctrl-C: unwound like an error, so that what is half-written
    (an export's staging directory) is removed on the way out."""


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _stop)  # its default would end the process where it stands
    try:
        run(args)
        sys.stdout.flush()  # here, where a reader gone is caught, not at exit
    except (Stopped, KeyboardInterrupt) as exc:
        why = str(exc) if isinstance(exc, Stopped) else "SIGINT"
        print(f"stopped by {why}: nothing half-written is left; a training run continues with --resume",
              file=sys.stderr)
        return 128 + signal.Signals[why].value
    except BrokenPipeError:  # the reader went away (`datasets | head`): what it wanted it has
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
    except (OSError, ValueError) as exc:  # missing or unwritable files, a bad config, a model not fit to publish
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        _end_distributed()
    return 0


def _end_distributed() -> None:
    """Destroy torchrun's process group if a command made one (torch is not imported for the others): a rank that
    left with gloo's threads still alive could abort at exit ("terminate called without an active exception",
    SIGABRT; seen once in CI), and torchrun then stopped the other ranks."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_run_dir(checkpoint: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start afresh over a run (its ``checkpoint``, or an ensemble's members' in ``member-K/``), unless
    asked to: ``overwrite`` removes the run's checkpoints and metrics first, which a resume would otherwise pick up.
    Say so when a resume finds none."""
    run_dir = checkpoint.parent
    found = [path for path in (checkpoint, *sorted(run_dir.glob(f"member-*/{checkpoint.name}"))) if path.exists()]
    if found and not (resume or overwrite):
        raise ValueError(f"{run_dir} holds a training run already ({found[0].relative_to(run_dir)}): --resume "
                         "continues it, --run-dir DIR trains into another directory, --overwrite starts this one "
                         "afresh")
    if overwrite and not resume:
        for path in (checkpoint, run_dir / "metrics.json"):
            path.unlink(missing_ok=True)
        for member in run_dir.glob("member-*"):
            shutil.rmtree(member)
    elif resume and not found:
        print(f"note: no {checkpoint.name} in {run_dir} to resume from: starting from scratch", file=sys.stderr)


def check_writable(directory: Path) -> None:
    """Raise ``ValueError`` unless ``directory``, or the nearest folder above it that exists, takes new files."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{directory} cannot be a model repository: {existing} is a file, not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise ValueError(f"{directory} cannot be written ({exc.strerror}: {existing}): exporting there would "
                         "fail after training") from None


def run(args: argparse.Namespace) -> None:
    if args.command == "train":
        if args.model_dir and not args.export:  # it was ignored: a run that was meant to publish published nothing
            raise ValueError("--model-dir is where --export publishes: add --export")
        overrides = overrides_from(args)
        if args.backbone_checkpoint:  # checked now, before any data is loaded
            from training.checkpoint import is_training_checkpoint, read_file

            overrides["backbone_checkpoint"] = args.backbone_checkpoint
            if is_training_checkpoint(read_file(Path(args.backbone_checkpoint))):
                overrides["backbone"] = "checkpoint"  # else a state dict for the config's torchvision backbone
        if args.freeze:
            overrides["freeze"] = True
        from training.recipes import resolve_config

        cfg = resolve_config(args.config, overrides, recipe=args.recipe)
        from training.train import CHECKPOINT, build_classifier, train

        run_dir = args.run_dir or DEFAULT_RUNS / cfg.name
        check_run_dir(run_dir / CHECKPOINT, args.resume, args.overwrite)
        if args.export:  # before training, not after it
            check_writable(args.model_dir or DEFAULT_REPO)
        if args.backbone_checkpoint and cfg.arch != "transfer":
            raise ValueError(f"--backbone-checkpoint is for transfer models; {cfg.name} has arch {cfg.arch!r} "
                             "(--set arch=transfer makes it one)")

        if cfg.arch == "transfer" and cfg.backbone_checkpoint:  # a backbone that cannot work fails before the data
            import torch

            from training.data import dataset_spec

            build_classifier(cfg, dataset_spec(cfg.dataset, cfg.size), torch.device("cpu"))

        result = train(cfg, run_dir, args.data_dir, args.download, args.resume, args.device, args.quiet,
                       stop_after=args.stop_after)
        if args.export and result.metrics:
            from training.export import export_checkpoint

            path = export_checkpoint(result.run_dir / CHECKPOINT, args.model_dir or DEFAULT_REPO, cfg.name,
                                     args.data_dir, args.download, command=command_line())
            print(f"exported {path}")
    elif args.command == "evaluate":
        from training.evaluate import evaluate_path

        print(json.dumps(evaluate_path(args.model, args.split, args.dataset, args.data_dir, args.download), indent=2))
    elif args.command == "export":
        from training.export import export_checkpoint

        path = export_checkpoint(args.checkpoint, args.model_dir, args.name, args.data_dir, args.download,
                                 args.quantize, command=command_line(), min_agreement=args.min_agreement)
        print(f"exported {path}")
    elif args.command == "calibrate":
        from training.export import calibrate_version

        path = calibrate_version(args.version_dir, args.data_dir, args.download, command_line(), args.report_dir)
        print(f"exported {path}")
    elif args.command == "quantize":
        from training.export import quantize_version

        path = quantize_version(args.version_dir, args.data_dir, args.download, command_line(), args.allow_slower,
                                args.min_agreement)
        print(f"exported {path}")
    elif args.command == "datasets":
        from training.recipes import dataset_table

        print(dataset_table(args.data_dir))
    elif args.command == "pipeline":
        from training.pipeline import run_pipeline

        run_pipeline(args, overrides_from(args), command_line())
    elif args.command == "shipped":
        print("\n".join(SHIPPED_NAMES))
