"""``foundation``: argument parsing only; every command dispatches to a function of the package."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from foundation import threads
from foundation.batch.launch import should_spawn, spawn_local
from foundation.errors import FoundationError

log = logging.getLogger("foundation")

EPILOG_PRETRAIN = """\
examples:
  foundation pretrain                                   # images domain, embedded sample, tiny CPU recipe
  foundation pretrain --domain images --data photos/ --out runs/photos train.steps=500 train.batch_size=32
  foundation pretrain --data photos/ --nproc 2          # spawns 2 local workers (torchrun)
  torchrun --nproc-per-node 8 -m foundation pretrain --data photos/ --config images/vit_small_dinov2
  # several nodes: torchrun --nnodes 4 --node-rank $RANK --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
  #   --nproc-per-node 8 -m foundation pretrain ...   (same command on every node)

Re-running the same command with the same --out resumes from the last checkpoint.
"""


def _setup_logging(quiet: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if (quiet or rank != 0) else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def default_config_path(domain: str) -> Path | None:
    """The domain's shipped tiny recipe (said in the log), or None for a domain that ships none."""
    from foundation.config import RECIPES

    path = RECIPES / domain / "tiny.yaml"
    if not path.is_file():
        log.info("no --config and the %s domain ships no tiny recipe: the built-in defaults", domain)
        return None
    log.info(
        "recipe: %s/tiny (the domain's tiny CPU recipe; --config NAME or a YAML file for another)", domain
    )
    return path


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument(
        "--threads",
        metavar="N",
        help="CPU threads for the model (any command; default: the CPUs this process may use, less one per "
        "data-loader worker; 'off' leaves the libraries' own settings). Also FOUNDATION_THREADS=N",
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: CUDA when available"
    )


# -- commands ------------------------------------------------------------------------------------------------------
def cmd_pretrain(args: argparse.Namespace) -> int:
    from foundation.config import load_config
    from foundation.train.distributed import destroy_distributed, init_distributed
    from foundation.train.engine import pretrain

    if should_spawn(args.nproc):
        return spawn_local(args.nproc, sys.argv[1:])
    config_path = args.config or default_config_path(args.domain or "images")
    overrides = list(args.overrides)
    if args.domain:  # the flag wins over a recipe's `domain:`
        overrides.append(f"domain={args.domain}")
    if args.data:
        overrides.append(f"data.path={args.data}")
    cfg = load_config(config_path, overrides)
    if args.out:
        out = Path(args.out)
    else:  # the default location is ours to create
        out = Path("runs") / f"{cfg.domain}-{cfg._name}"
        out.parent.mkdir(exist_ok=True)
    dist_info = init_distributed(args.device, group_of_one=cfg.train.parallel == "fsdp")
    try:
        export_dir = pretrain(cfg, out, dist_info, quiet=args.quiet)
    finally:
        destroy_distributed()
    if dist_info.is_main:
        log.info("run folder: %s", out)
        print(json.dumps({"run": str(out), "export": str(export_dir)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from foundation.export import export_backbone, load_backbone

    backbone, meta = load_backbone(args.run)
    out = export_backbone(
        backbone,
        meta["backbone_args"],
        Path(args.out),
        mean=meta.get("mean", ()),
        std=meta.get("std", ()),
        overwrite=args.overwrite,
        inputs=[Path(args.run), Path(meta["source"])],
    )
    log.info("exported %s -> %s", meta["source"], out)
    print(json.dumps({"export": str(out), "source": meta["source"]}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from foundation.eval.commands import evaluate

    result = evaluate(args)
    print(json.dumps(result))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from foundation.batch import EXIT_DONE
    from foundation.batch.launch import spawn_batch, worker_status
    from foundation.eval.commands import check_nproc, embed

    if should_spawn(args.nproc):
        check_nproc(args)  # one error, not one per worker
        return spawn_batch(args.nproc, sys.argv[1:])
    result = embed(args)
    error = result.pop("error", None)  # a batch that did nothing ends with its error after its result
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:  # a batch under torchrun: rank 0 prints the result of every rank
        print(json.dumps(result))
    if error is not None:
        raise error
    return worker_status(int(result.get("exit_status", EXIT_DONE)), is_main=is_main)


def cmd_visualize(args: argparse.Namespace) -> int:
    from foundation.visualize.command import visualize

    print(json.dumps(visualize(args)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from foundation.report.command import report

    print(json.dumps(report(args)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from foundation.info import environment_info

    print(json.dumps(environment_info(), indent=2))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from foundation.config import load_config
    from foundation.tasks.base import config_flag_values
    from foundation.train.distributed import destroy_distributed, init_distributed
    from foundation.train.finetune import finetune

    if should_spawn(args.nproc):
        return spawn_local(args.nproc, sys.argv[1:])
    task = args.task_object
    values = config_flag_values(args)
    if args.backbone:  # the flags fill the config (task.backbone / task.random_init), as the task's own flags
        values.setdefault("task", {}).update(backbone=args.backbone, random_init=False)
    elif args.random_init:
        values.setdefault("task", {}).update(backbone=None, random_init=True)
    cfg = load_config(
        args.config or task.default_config,
        list(args.overrides),
        pretraining=False,
        task=task,
        values=values,
        domain=task.domain,
    )
    if args.out:
        out = Path(args.out)
    else:
        out = Path("runs") / f"{task.name}-{cfg._name}"
        out.parent.mkdir(exist_ok=True)
    dist_info = init_distributed(args.device)
    try:
        model = finetune(task, cfg, out, dist_info, quiet=args.quiet)
    finally:
        destroy_distributed()
    if dist_info.is_main:
        log.info("run folder: %s", out)
        print(json.dumps({"run": str(out), "model": str(model)}))
    return 0


COMMANDS_GROUP = "foundation.commands"
CORE_COMMANDS = ("pretrain", "export", "evaluate", "finetune", "embed", "info", "visualize", "report")


def _add_probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", help="run folder, export folder or checkpoint")
    p.add_argument(
        "--random-init", action="store_true", help="evaluate an untrained backbone of the same architecture"
    )
    p.add_argument("--domain", default="images")
    p.add_argument("--data", required=True, help="labelled training images (class sub-folders)")
    p.add_argument("--val-data", required=True, help="labelled validation images (same classes)")
    p.add_argument(
        "--pooling", default="cls", choices=["cls", "cls+mean"], help="feature: CLS or CLS + mean patch"
    )
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--img-size", type=int, help="evaluation image size; default: the backbone's")
    p.add_argument("--cache-dir", help="feature cache folder (linear probe); default: none for knn")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init and the probe")
    p.add_argument(
        "--shots",
        type=int,
        help="low-shot: fit the probe on N labelled images a class (seeded draws; mean, std and every draw)",
    )
    p.add_argument("--draws", type=int, default=5, help="draws of --shots, seeded --seed + d (5)")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)


def _add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone", help="pretrained backbone: run folder, export folder or checkpoint (task.backbone)"
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="start from an untrained backbone (a baseline; uses model.*; task.random_init)",
    )
    p.add_argument(
        "--config",
        help="YAML recipe, or a fine-tuning run's RUN/config.yaml to repeat that run (its inputs and backbone "
        "are in it); default: the task's tiny recipe",
    )
    p.add_argument("--out", help="run folder (its parent must exist); default: runs/<task>-<recipe>")
    p.add_argument(
        "--nproc", type=int, default=0, help="spawn this many local workers (torchrun --standalone)"
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.steps=200")
    _add_common(p)
    p.set_defaults(func=cmd_finetune)


EPILOG_VISUALIZE = """\
examples:
  foundation visualize --backbone runs/photos photos/ --out vis/
  foundation visualize --backbone runs/path --domain pathology --slide s.svs --region 2000,3000,1024,1024 \\
      --mpp 0.5 --out vis/                                 # one slide region at 0.5 um/px
  foundation visualize --backbone runs/path --domain pathology feats/s.h5 --max-tiles 16 --out vis/
  foundation visualize --backbone runs/rs --domain remote_sensing scene.tif --region 0,0,512,512 \\
      --bands 4,3,2,8 --rgb 4,3,2 --out vis/
  foundation visualize --backbone runs/ct --domain medical ct/case1.nii.gz --out vis/   # 3 planes

Per input, OUT/<name>.png shows the input as the model saw it (normalised with the backbone's statistics,
shown de-normalised), the first three PCA components of its patch tokens as RGB (fitted over every input of
the call; background, by the first component's threshold, in black) and the last block's CLS attention,
averaged and per head. An existing OUT is replaced only if it is an earlier visualize output of ours and
--overwrite is given.
"""


def _add_visualize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="PCA of patch features and CLS attention maps of a backbone on your inputs (PNGs)",
        epilog=EPILOG_VISUALIZE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", help="images or folders; slides or embed HDF5s; rasters; volumes")
    p.add_argument("--backbone", required=True, help="run folder, export folder, timm folder or checkpoint")
    p.add_argument("--out", required=True, help="a new or empty folder for the PNGs (and summary.json)")
    p.add_argument("--domain", default="images", help="whose reader opens the inputs (default: images)")
    p.add_argument(
        "--img-size", type=int, help="model input side in px (tile, window); default: the backbone's"
    )
    p.add_argument("--slide", help="pathology: a slide to read --region of (or its tissue tiles)")
    p.add_argument("--region", help="x,y,w,h: slide region in level-0 px, or raster pixel window")
    p.add_argument("--mpp", type=float, help="pathology: microns per pixel to read at (default 0.5)")
    p.add_argument("--bands", help="remote sensing: 1-based bands fed to the model, e.g. 4,3,2,8")
    p.add_argument("--rgb", help="remote sensing: 1-based bands of the colour composite shown, e.g. 4,3,2")
    p.add_argument("--max-tiles", type=int, default=8, help="tiles per slide or feature file (default 8)")
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="a reading option of the domain, as its data.options (repeatable): medical modality=mr, "
        "spacing=[1,1,1], window=[-160,240]; pathology slide_mpp=0.25; remote sensing scale=10000, nodata=0",
    )
    p.add_argument(
        "--keep-background", action="store_true", help="PCA over every patch (no background removal)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier visualize output of ours")
    _add_common(p)
    p.set_defaults(func=cmd_visualize)


def _add_task_parsers(sub: argparse._SubParsersAction, argv: list[str], command: str) -> None:
    """One sub-command per registered task; only the task named on the command line is imported."""
    from foundation.tasks.registry import get_task, list_tasks

    argv = argv or []
    chosen = argv[1] if len(argv) > 1 and argv[0] == command else None
    for name in list_tasks():
        p = sub.add_parser(name, help=f"the {name} task")
        if name != chosen:
            continue
        task = get_task(name)
        if command == "finetune":
            _add_finetune_arguments(p)
            task.add_finetune_arguments(p)
        else:
            task.add_evaluate_arguments(p)
            _add_common(p)
            p.set_defaults(func=lambda args, task=task: _print_json(task.evaluate(args)))
        p.set_defaults(task_object=task)


def _print_json(result: dict) -> int:
    """Print a task's result; the batch exit rule over its inputs (``done``: how many were evaluated,
    ``skipped``: the list of inputs that could not be)."""
    from foundation.batch import exit_status

    print(json.dumps(result))
    return exit_status(int(result.get("done", 1)), len(result.get("skipped") or []))


class _Parser(argparse.ArgumentParser):
    """A usage error exits 1 (nothing done), like every other refusal; 2 means some inputs were skipped."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _os_error_text(e: OSError) -> str:
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on device"
    return f"{where}: {reason.lower()}" if where else reason


def build_parser(with_domain_commands: bool = True, argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="foundation",
        description="Domain-specialist foundation models: DINOv2/MAE pretraining, evaluation and export.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="pretrain a ViT with DINOv2 or MAE (resumes when --out has checkpoints)",
        epilog=EPILOG_PRETRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--domain", help="registered domain (see `foundation info`); default: the recipe's, else images"
    )
    p.add_argument("--data", help="data folder; default: the domain's embedded sample")
    p.add_argument(
        "--config",
        help="recipe: a YAML file or a shipped name such as images/vit_small_dinov2 (foundation/recipes/); "
        "default: <domain>/tiny",
    )
    p.add_argument("--out", help="run folder (its parent must exist); default: runs/<domain>-<recipe>")
    p.add_argument(
        "--nproc", type=int, default=0, help="spawn this many local workers (torchrun --standalone)"
    )
    p.add_argument(
        "overrides", nargs="*", help="config overrides key=value, e.g. train.steps=50 train.batch_size=32"
    )
    _add_common(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="write a run's backbone as model.safetensors + timm config.json")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument(
        "--out",
        required=True,
        help="a new or empty export folder (loads with timm.create_model('local-dir:OUT'))",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export of ours in --out (nothing else)"
    )
    _add_common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "evaluate", help="kNN / linear probe on frozen features, or a task's metrics (JSON line)"
    )
    protocols = p.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    for name, text in (
        ("knn", "weighted kNN on frozen features (DINO protocol: k=20, T=0.07)"),
        ("linear", "linear probe (L-BFGS logistic regression) on frozen features"),
    ):
        _add_probe_arguments(protocols.add_parser(name, help=text, description=text))
    _add_task_parsers(protocols, argv, "evaluate")

    p = sub.add_parser(
        "finetune",
        help="train a downstream task head on a pretrained backbone (same engine: resume, DDP, AMP)",
    )
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    _add_task_parsers(tasks, argv, "finetune")

    p = sub.add_parser(
        "embed",
        help="features to HDF5 (resumable, atomic): one file for a labelled folder, or per-domain layout",
    )
    p.add_argument("--domain", default="images")
    p.add_argument("--data", required=True, help="images to embed (class sub-folders give labels)")
    p.add_argument("--backbone", required=True, help="run folder, export folder or checkpoint")
    p.add_argument("--out", required=True, help="HDF5 file: features (N x D), ids (paths), labels")
    p.add_argument("--pooling", default="cls", choices=["cls", "cls+mean"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--img-size", type=int, help="input size; default: the backbone's")
    p.add_argument(
        "--bags", choices=["pt"], help="pathology: also OUT/pt_files/<slide>.pt (N x D float32, CLAM's bags)"
    )
    p.add_argument(
        "--slides-csv",
        help="pathology: embed only the slides this CSV names (CLAM's process_list: a slide_id, slide or path "
        "column); same as data.options.slides_csv",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace earlier outputs of ours made with other weights or settings (never other files)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=0,
        help="domains with per-input outputs (pathology): spawn this many local workers (torchrun), inputs "
        "sharded by rank",
    )
    p.add_argument(
        "overrides", nargs="*", help="domain options key=value, e.g. data.options.mpp=0.5 (pathology)"
    )
    _add_common(p)
    p.set_defaults(func=cmd_embed)

    _add_visualize_parser(sub)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML page of a run (plots, crops, PCA, config, environment) + PNGs",
        description="Write RUN/report.html (opens offline: images inlined, no scripts) and the same plots as "
        "RUN/report/*.png: loss components; lr, weight decay, teacher momentum and temperature; throughput; "
        "kNN over steps; collapse indicators; validation metrics of task runs; the augmented crops and the "
        "PCA / CLS attention of the run's backbone on them; PNGs the run wrote; the last value of every "
        "metric; the resolved config; the environment. A section without data says so.",
    )
    p.add_argument("run", help="a run folder of `foundation pretrain` or `foundation finetune`")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier report of ours (atomically; never other files)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("info", help="versions, devices and registered domains")
    p.set_defaults(func=cmd_info, quiet=False)

    if with_domain_commands:
        add_domain_commands(sub)
    return parser


def add_domain_commands(subparsers: argparse._SubParsersAction) -> None:
    """Parsers of the commands registered under the entry-point group ``foundation.commands`` (light modules:
    a command's code is imported when it runs). A package whose parsers fail to load is named and skipped."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            ep.load()(subparsers)
        except Exception as e:  # a broken plug-in must not take the whole CLI down
            log.warning("commands of %r (%s) not available: %s", ep.name, ep.value, e)


def _take_threads_option(argv: list[str]) -> list[str]:
    """``--threads N`` works with every command, domain commands included: it goes to the environment (which
    torchrun's workers inherit too) and is removed before parsing."""
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--threads" and i + 1 < len(argv):
            os.environ[threads.ENV] = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--threads="):
            os.environ[threads.ENV] = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return rest


def main(argv: list[str] | None = None) -> int:
    argv = _take_threads_option(sys.argv[1:] if argv is None else list(argv))
    # Domain commands need the domains imported (torch and friends); a core command does not wait for that.
    parser = build_parser(with_domain_commands=not (argv and argv[0] in CORE_COMMANDS), argv=argv)
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        threads.configure_threads(getattr(args, "num_workers", 0) or 0)
        return args.func(args)
    except FoundationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the OS refused (read-only folder, no space, permissions): its words, no traceback
        print(f"error: {_os_error_text(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
