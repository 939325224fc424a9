"""The `modelworks` command: verbs train / calibrate / evaluate / export / predict / serve / retrain / debug /
generate / caption / sample / recipes.

    modelworks train classification --recipe fashion-mnist --set optim.lr=0.002
    modelworks train --resume runs/classification/NAME
    modelworks calibrate runs/classification/NAME     # train does this itself; for runs trained before it did
    modelworks evaluate runs/classification/NAME
    modelworks export runs/classification/NAME --quantize int8
    modelworks predict runs/classification/NAME/package images/ --out predictions.jsonl
    modelworks predict runs/detection/NAME/package photos/ --out boxes.jsonl --save-images annotated/
    modelworks serve runs/classification/NAME/package --port 8000
    modelworks debug classification --recipe fashion-mnist overfit    # also: augment, gradients
    modelworks generate runs/language_model/NAME --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8
    modelworks caption runs/captioning/NAME photo.png --beam 5
    modelworks sample runs/diffusion/NAME --n 64 --class Sneaker --steps 20 --guidance 2.0 --out grid.png
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import config as config_mod
from .errors import ConfigError, ModelworksError
from .registry import TASKS, get_task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelworks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a model (or resume a run)")
    train.add_argument("task", nargs="?", help=f"one of: {', '.join(TASKS)}")
    train.add_argument("--recipe", help="a shipped recipe name (see `modelworks recipes`) or a YAML file")
    train.add_argument("--data", help="data source, e.g. fashion-mnist, cifar10, imagefolder:PATH")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set optim.lr=0.002 (repeatable)")
    train.add_argument("--name", help="run directory name, and the exported model's (default: <recipe>-<time>, "
                                      "<recipe>-<data>-<time> with other data than the recipe's)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoints/last.pt")

    calibrate = verbs.add_parser(
        "calibrate", help="fit the probability calibration on the validation split (train does it at the end)",
        description="Fit a finished run's post-hoc calibration on its validation split (classification: one "
                    "temperature dividing the logits, Guo et al. 2017) and keep it in RUN_DIR/calibration.json; "
                    "`evaluate` reports calibrated metrics with it and `export` puts it inside the graph. "
                    "`train` calibrates at its end; run this for a run trained before that, or for other "
                    "--checkpoint/--set choices.")
    calibrate.add_argument("run_dir")
    calibrate.add_argument("--checkpoint", default="best", choices=["best", "last"])
    calibrate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="change an inference setting first, e.g. --set model.tta=flip or train.device=cpu")

    evaluate = verbs.add_parser("evaluate", help="test metrics and plots for a finished run")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--split", choices=["test", "val", "train"],
                          help="default: test, or val for a data source without a test split")
    evaluate.add_argument("--checkpoint", default="best", choices=["best", "last"])
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="change an evaluation setting, e.g. --set model.tta=flip or train.device=cpu")

    export = verbs.add_parser("export", help="write a verified model package (safetensors, TorchScript, ONNX, int8)")
    export.add_argument("run_dir")
    export.add_argument("--out", help="package directory (default: RUN_DIR/package)")
    export.add_argument("--format", default="all", choices=["all", "onnx", "torchscript"],
                        help="graph formats besides the safetensors weights (default: all)")
    export.add_argument("--quantize", choices=["int8"], help="also write an int8 ONNX model (static PTQ)")
    export.add_argument("--name", help="model name in the API (default: the run's name without its time stamp)")
    export.add_argument("--version", help="model version (default: the run directory's name)")
    export.add_argument("--checkpoint", default="best", choices=["best", "last"])
    export.add_argument("--atol", type=float, default=1e-3,
                        help="largest output difference a float format may show vs eager PyTorch (default 1e-3)")
    export.add_argument("--min-agreement", type=float, default=0.999,
                        help="smallest fraction of validation samples answered as eager PyTorch does")
    export.add_argument("--calibration-samples", type=int, default=512, help="training samples for int8 ranges")
    export.add_argument("--force", action="store_true", help="replace an existing package directory")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change an inference setting before export, e.g. --set model.tta=none")

    predict = verbs.add_parser("predict", help="batch inference over files with a model package")
    predict.add_argument("package")
    predict.add_argument("inputs", nargs="+", help="files, folders (searched recursively) or quoted globs")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--runtime", default="onnx", choices=["eager", "torchscript", "onnx", "int8"])
    predict.add_argument("--out", help="predictions.jsonl or predictions.csv (default: JSONL on stdout)")
    predict.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                         help="a request field for every input, e.g. --option top_k=3 --option resize=true")
    predict.add_argument("--threads", type=int, help="CPU threads for the runtime (default: all)")
    predict.add_argument("--save-images", metavar="DIR",
                         help="also write each input with its prediction drawn on it (detection: boxes) as PNG")
    predict.add_argument("--max-image-pixels", type=int, metavar="N",
                         help="largest image (width x height) to decode, read from its header first; larger files "
                              "are skipped (default: 64x the model's input, at least 16 megapixels)")

    serve = verbs.add_parser("serve", help="HTTP API, demo page and metrics for one or two packages (A/B)",
                             description="Serve model packages over HTTP. Two packages are two versions of one "
                                         "model, split by --split and sticky per caller (header X-Caller-Id).")
    serve.add_argument("packages", nargs="+", metavar="PACKAGE")
    serve.add_argument("--split", help="traffic per package in percent, e.g. 90/10 (default: all to the first)")
    serve.add_argument("--name", help="model name in the API (default: the first package's name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--runtime", default="onnx", choices=["eager", "torchscript", "onnx", "int8"])
    serve.add_argument("--threads", type=int, help="CPU threads per runtime (default: every core but one, which "
                       "the event loop keeps busy under load)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="largest dynamic batch; 1 turns batching off")
    serve.add_argument("--max-wait-ms", type=float, default=2.0,
                       help="longest a batch waits for requests still being read (counted from its oldest "
                            "request); a lone request does not wait")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests waiting per model version; more are answered 503 with Retry-After")
    serve.add_argument("--timeout-s", type=float, default=10.0,
                       help="per-request deadline from arrival (reading the body and decoding included); past it "
                            "504, or 408 while the body is still arriving. Text generation: arrival to the first "
                            "token, then the longest wait for each next token")
    serve.add_argument("--max-running", type=int, default=32,
                       help="text generation: sequences decoded together (continuous batching); more wait in the "
                            "queue (--max-queue sequences)")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get 413")
    serve.add_argument("--max-header-bytes", type=int, default=32 * 1024,
                       help="request line and headers together; larger get 431 and the connection is closed")
    serve.add_argument("--max-image-pixels", type=int, metavar="N",
                       help="largest image (width x height) a request may declare, read from the file's header "
                            "before decoding; larger get 413 (default: 64x the model's input, at least 16 "
                            "megapixels)")
    serve.add_argument("--decode-threads", type=int, default=2,
                       help="threads decoding request files off the event loop (bounds decoding memory too)")
    serve.add_argument("--drain-s", type=float, default=15.0,
                       help="on SIGTERM/Ctrl-C, how long in-flight requests may take to finish")
    serve.add_argument("--events", metavar="URL", help="event store, sqlite:PATH or postgresql://USER@HOST/DB: "
                       "enables POST /v1/events, and models that read a user's history read it there live")
    serve.add_argument("--hit-window-s", type=float, default=1800.0,
                       help="A/B online metrics: an event for an item a version showed that user at most this long "
                            "before is a hit for that version (modelworks_online_hit_rate in /metrics)")
    serve.add_argument("--no-hot-routes", dest="hot_routes", action="store_false",
                       help="answer GET query routes (e.g. /recommend) through the framework's whole middleware "
                            "stack, not the fast path in front of it (same answers; for comparison)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    debug = verbs.add_parser(
        "debug", help="check a model before a long run: overfit one batch, see augmentations, gradient flow",
        description="Checks to run before training, for any task and recipe (docs/debugging.md). Each writes a "
                    "picture and a JSON file (default: <output_dir>/<task>/debug/<command>.png) and exits 1 when "
                    "it finds a problem: `overfit` trains on one fixed batch and fails unless the loss falls to "
                    "--target of its start; `augment` draws samples and their augmented views (an image-free task "
                    "says it has nothing to draw and exits 0); `gradients` tables every parameter's gradient over "
                    "the first --steps of the run and flags no, zero, non-finite, vanishing or exploding ones.")
    debug.add_argument("task", help=f"one of: {', '.join(TASKS)}")
    debug.add_argument("command", choices=DEBUG_COMMANDS)
    debug.add_argument("--recipe", help="a shipped recipe name or a YAML file, as for train")
    debug.add_argument("--data", help="data source, as for train")
    debug.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, as for train (repeatable)")
    debug.add_argument("--out", help="the picture to write; its JSON goes beside it")
    debug.add_argument("--steps", type=int, help="overfit: steps on the batch (default 200); gradients: training "
                                                 "steps (default 50)")
    debug.add_argument("--batch-size", type=int, help="overfit: samples in the fixed batch (default 16)")
    debug.add_argument("--target", type=float, help="overfit: pass when the last loss is at most this fraction "
                                                    "of the first (default: the task's, 0.05 for most)")
    debug.add_argument("--samples", type=int, help="augment: samples, one per row (default 8)")
    debug.add_argument("--views", type=int, help="augment: augmented views of each (default 3)")
    debug.add_argument("--progress", type=float, help="augment: the fraction of training done, for augmentation "
                                                      "that changes over a run (default 0: the start)")

    generate = verbs.add_parser("generate", help="sample text from a language model run or package, streamed",
                                description="Continue a prompt with a run's best checkpoint (eager PyTorch) or a "
                                            "model package (any runtime), printing the text as it is sampled.")
    generate.add_argument("model", metavar="RUN_OR_PACKAGE")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--min-p", type=float, default=0.0)
    generate.add_argument("--repetition-penalty", type=float, default=1.0)
    generate.add_argument("--presence-penalty", type=float, default=0.0)
    generate.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--n", type=int, default=1, help="independent samples (seeds seed, seed+1, ...)")
    add_model_source_arguments(generate)

    caption = verbs.add_parser("caption", help="caption an image with a captioning run or package",
                               description="Describe an image with a run's best checkpoint (eager PyTorch) or a "
                                           "model package (any runtime): beam search by default, sampling with "
                                           "--temperature, or the greedy caption streamed word by word (--stream).")
    caption.add_argument("model", metavar="RUN_OR_PACKAGE")
    caption.add_argument("image", help="an image file (PNG, JPEG, GIF or WebP)")
    caption.add_argument("--beam", type=int, help="beam width (default: the model's)")
    caption.add_argument("--n", type=int, default=1, help="captions to print: the n best of the beam, or n samples")
    caption.add_argument("--max-length", type=int, help="most tokens (default: the model's)")
    caption.add_argument("--length-penalty", type=float, help="GNMT's alpha (default: the model's)")
    caption.add_argument("--temperature", type=float, default=0.0, help="> 0: sample instead of beam search")
    caption.add_argument("--top-k", type=int, default=0)
    caption.add_argument("--top-p", type=float, default=1.0)
    caption.add_argument("--seed", type=int)
    caption.add_argument("--prompt", default="", help="the caption's beginning, to be continued")
    caption.add_argument("--stream", action="store_true", help="print the greedy (or sampled) caption as it is "
                                                               "decoded, token by token")
    add_model_source_arguments(caption)

    retrain = verbs.add_parser("retrain", help="train a new version on the event store's events; promote it into a "
                               "running server if it is not worse")
    retrain.add_argument("package", metavar="PACKAGE", help="the serving version's package: its config is the recipe")
    retrain.add_argument("--events", required=True, metavar="URL", help="sqlite:PATH or postgresql://USER@HOST/DB")
    retrain.add_argument("--out", help="runs folder for the new run (default: the package's recorded output_dir)")
    retrain.add_argument("--version", help="the new version's name (default: r<UTC time>)")
    retrain.add_argument("--promote", action="store_true", help="load and promote it through the admin API of "
                         "--server (MODELWORKS_ADMIN_TOKEN) when it is not worse on the newest events")
    retrain.add_argument("--server", default="http://127.0.0.1:8000", help="the running server (with --promote)")
    retrain.add_argument("--name", help="the model's name on the server (default: the package's)")
    retrain.add_argument("--runtime", default="onnx", choices=["eager", "torchscript", "onnx"],
                         help="runtime that scores both versions on the events")

    add_sample_parser(verbs)

    recipes = verbs.add_parser("recipes", help="list the shipped recipes")
    recipes.add_argument("task", nargs="?")
    return parser


def add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    """generate, caption and sample: a run directory (eager) or a package (any runtime)."""
    parser.add_argument("--runtime", default="onnx", choices=["eager", "torchscript", "onnx", "int8"],
                        help="for a package (a run directory always runs eager PyTorch)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument("--threads", type=int,
                        help="CPU threads for the runtime (1 is fastest for one stream of a small model)")


def add_sample_parser(verbs) -> None:
    sample = verbs.add_parser("sample", help="generate images from an image-generating run or package, to a grid",
                              description="Sample images with a run's best checkpoint (eager PyTorch) or a model "
                                          "package (any runtime) and write them as one grid PNG, with a progress "
                                          "bar over the denoising steps. For models whose predictor generates "
                                          "images.")
    sample.add_argument("model", metavar="RUN_OR_PACKAGE")
    sample.add_argument("--n", type=int, default=64, help="images (default 64)")
    sample.add_argument("--class", dest="label", help="class to generate (default: unconditional)")
    sample.add_argument("--sampler", help="ddpm, ddim or dpm-solver (default: the model's)")
    sample.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance weight (default: the model's)")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM's eta")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default="samples.png", help="the grid PNG (default samples.png)")
    add_model_source_arguments(sample)


def print_table(title: str, metrics: dict[str, float]) -> None:
    width = max(len(k) for k in metrics) if metrics else 10
    print(f"\n{title}")
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


def load_run_config(run_dir: Path, overrides: list[str]):
    """A run's saved config (with any overrides) and its task class."""
    from .engine import rundir

    raw = rundir.read_config_dict(run_dir)
    for assignment in overrides:
        config_mod.apply_override(raw, assignment)
    task_cls = get_task(raw.get("task", ""))
    return task_cls, config_mod.load_config(task_cls, raw)


def run_train(args: argparse.Namespace, argv: list[str]) -> int:
    from .engine import distributed, rundir
    from .engine.loop import calibrate_run, evaluate_run, fit
    from .engine.precision import resolve_device

    if args.resume:
        run_dir = Path(args.resume)
        task_cls, cfg = load_run_config(run_dir, args.overrides)
    else:
        if not args.task:
            raise ConfigError("train: name a task (e.g. `modelworks train classification`) or --resume RUN_DIR")
        task_cls = get_task(args.task)
        cfg = config_mod.resolve(task_cls, args.recipe, args.overrides, args.data)
        if args.name:
            cfg.name = args.name

    distributed.init(resolve_device(cfg.train.device, distributed.local_device_index()).type)
    created = False  # whether this command made the run folder, and so may remove it again
    if not args.resume:
        # Rank 0 names the run (it holds a timestamp) and every rank uses that name.
        run_dir = Path(distributed.broadcast_object(str(rundir.new_run_dir(cfg))))
        cfg.name = run_dir.name
        if run_dir.exists() and (run_dir / "checkpoints").exists():
            raise ConfigError(f"--name: run directory {run_dir} already holds a run; choose another "
                                         f"name or continue it with --resume {run_dir}")
        if distributed.is_main():
            created = not run_dir.exists()
            rundir.write_run_files(run_dir, cfg, ["modelworks", *argv])
        distributed.barrier()

    task = task_cls(cfg)
    try:
        result = fit(task, cfg, run_dir, resume=bool(args.resume))
    except BaseException:
        # A run that fails before its first step (bad data, a short budget, Ctrl-C while loading) should not
        # leave a folder that looks like a run; one that trained keeps its files and says where they are.
        if created:
            print(rundir.discard_if_untrained(run_dir), file=sys.stderr)
        raise
    is_main = distributed.is_main()
    distributed.shutdown()  # the test report runs on rank 0 alone, over the whole test split
    if not is_main:
        return 0
    print(f"\nrun {result.status} at step {result.step}: {run_dir}")
    if result.best:
        print_table("best validation", result.best)
    if result.status == "interrupted":
        return 130
    record = calibrate_run(task, cfg, run_dir)
    if record is not None:
        print_table(f"calibration ({run_dir / 'calibration.json'})", record["fitted"])
    if cfg.train.test_at_end:
        metrics = evaluate_run(task, cfg, run_dir, "test", fallback_to_val=True)
        print_table(f"report ({run_dir / 'evaluation'})", metrics)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from .engine.loop import calibrate_run

    run_dir = Path(args.run_dir)
    task_cls, cfg = load_run_config(run_dir, args.overrides)
    record = calibrate_run(task_cls(cfg), cfg, run_dir, args.checkpoint)
    if record is None:
        print(f"{task_cls.name}: nothing to calibrate (the task has no post-hoc calibration)")
        return 0
    print_table(f"calibration of {record['checkpoint']} on the validation split ({run_dir / 'calibration.json'})",
                record["fitted"])
    print(f"next: modelworks evaluate {run_dir}, then modelworks export {run_dir} --force")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .engine.loop import evaluate_run

    run_dir = Path(args.run_dir)
    task_cls, cfg = load_run_config(run_dir, args.overrides)
    metrics = evaluate_run(task_cls(cfg), cfg, run_dir, args.split or "test", args.checkpoint,
                           fallback_to_val=args.split is None)
    print_table(f"{args.split or 'evaluation'} ({run_dir / 'evaluation'})", metrics)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .inference import export_run

    formats = {"all": ("torchscript", "onnx"), "onnx": ("onnx",), "torchscript": ("torchscript",)}[args.format]
    options = {"formats": formats, "quantize": args.quantize, "atol": args.atol, "min_agreement": args.min_agreement,
               "calibration_samples": args.calibration_samples, "overwrite": args.force}
    if args.name:
        options["name"] = args.name
    if args.version:
        options["version"] = args.version
    out, manifest = export_run(Path(args.run_dir), Path(args.out) if args.out else None, options, args.checkpoint,
                               args.overrides)
    files = ", ".join(f"{name} ({entry['bytes'] / 1e6:.2f} MB)" for name, entry in manifest["files"].items())
    print(f"\npackage {out}: {manifest['name']} version {manifest['version']}\n  {files}")
    if manifest.get("int8"):
        int8 = manifest["int8"]
        drops = ", ".join(f"{k} {v * 100:+.2f} points" for k, v in int8["drop"].items())
        print(f"  int8: drop vs fp32 ONNX {drops}; speed-up " +
              ", ".join(f"{b if ' ' in b else 'batch ' + b}: {s:.2f}x" for b, s in int8["speedup"].items()))
    return 0


def parse_options(assignments: list[str]) -> dict:
    import yaml

    options = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {assignment}: expected KEY=VALUE, e.g. --option top_k=3")
        options[key] = yaml.safe_load(value)
    return options


def run_predict(args: argparse.Namespace) -> int:
    from .export.batch import predict_files
    from .inference import open_model

    if args.max_image_pixels is not None and args.max_image_pixels <= 0:
        raise ConfigError(f"--max-image-pixels: must be > 0 (got {args.max_image_pixels})")
    model = open_model(args.package, args.runtime, args.threads)
    model.predictor.limit_inputs(max_image_pixels=args.max_image_pixels)
    out = Path(args.out) if args.out else None
    save_images = Path(args.save_images) if args.save_images else None
    result = predict_files(model, args.inputs, out, args.batch_size, parse_options(args.options),
                           progress=sys.stderr.isatty(), save_images=save_images)
    where = f" -> {out}" if out else ""
    if result.saved:
        where += f", {result.saved} images -> {save_images}"
    print(f"{result.predicted} predicted, {result.skipped} skipped ({args.runtime}){where}", file=sys.stderr)
    # Non-zero when an input was skipped, so a script notices; the other predictions are written all the same.
    return 1 if result.skipped else 0


def run_serve(args: argparse.Namespace) -> int:
    from .engine.memory import limit_malloc_arenas
    from .inference import open_model
    from .serve.app import ServeSettings, run_server

    limit_malloc_arenas(os.cpu_count() or 1)  # before any runtime thread starts
    weights = parse_split(args.split, len(args.packages))
    settings = ServeSettings(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, timeout_s=args.timeout_s, max_body_bytes=args.max_body_bytes,
                             max_header_bytes=args.max_header_bytes, max_image_pixels=args.max_image_pixels,
                             decode_threads=args.decode_threads, drain_s=args.drain_s, max_running=args.max_running,
                             events=args.events, hit_window_s=args.hit_window_s, hot_routes=args.hot_routes)
    threads = args.threads or serving_threads()
    models = [open_model(p, args.runtime, threads) for p in args.packages]
    loader = lambda path: open_model(path, args.runtime, threads)  # noqa: E731  the admin API's loads
    try:
        stopped_by = run_server(models, weights, settings, loader, host=args.host, port=args.port, name=args.name,
                                log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it caught once the drain is done: the usual 130
        return 130
    return 130 if stopped_by == signal.SIGINT else 0


def serving_threads() -> int:
    """The runtime's threads in a server: every core this process may use but one. The event loop (HTTP, validation,
    the answers) keeps a core busy under load, and a runtime thread sharing it slows both. Measured on 2 cores at 32
    clients, in one run of alternating rounds: the SASRec recommender served 1,845 against 1,644 requests/s with 1
    thread rather than 2 (bench/recommendation_serve.py); the image classifier without batching, 749 against 624
    (bench/serve.py on a 2-core Xeon, docs/benchmarks.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def parse_split(split: str | None, n: int) -> list[float]:
    if split is None:
        return [100.0] + [0.0] * (n - 1)
    try:
        weights = [float(part) for part in split.split("/")]
    except ValueError:
        raise ConfigError(f"--split: {split!r} is not a split; write percentages such as 90/10") from None
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--split: {split!r} must give one non-negative share per package ({n}), not all zero; "
                          "e.g. 90/10")
    return weights


DEBUG_COMMANDS = ("overfit", "augment", "gradients")
DEBUG_OPTIONS = {"overfit": ("steps", "batch_size", "target"), "augment": ("samples", "views", "progress"),
                 "gradients": ("steps",)}


def run_debug(args: argparse.Namespace) -> int:
    import json

    from .engine import debug
    from .engine import debug_plots as plots

    for command, options in DEBUG_OPTIONS.items():
        for option in options:
            if getattr(args, option) is not None and option not in DEBUG_OPTIONS[args.command]:
                raise ConfigError(f"--{option.replace('_', '-')}: an option of `debug {command}`, not of "
                                  f"`debug {args.command}`")
    task_cls = get_task(args.task)
    # The task's overrides first, so a user's --set of the same key wins.
    task_overrides = list(task_cls.overfit_overrides) if args.command == "overfit" else []
    cfg = config_mod.resolve(task_cls, args.recipe, [*task_overrides, *args.overrides], args.data)
    if task_overrides:
        print(f"overfit: with {', '.join(task_overrides)} (the task's setting for a loss that can reach zero)")
    task = task_cls(cfg)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / task_cls.name / "debug" / f"{args.command}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{task_cls.name} {cfg.recipe or '(defaults)'}"
    given = {k: v for k, v in vars(args).items() if k in DEBUG_OPTIONS[args.command] and v is not None}

    if args.command == "overfit":
        result = debug.overfit_batch(task, cfg, **given)
        plots.plot_overfit(result, out, title)
        record = {"passed": result.passed, "verdict": result.verdict(), "losses": result.losses,
                  "batch_size": result.batch_size, "target_ratio": result.target_ratio, "lr": result.lr,
                  "logs": result.logs}
        message, failed = result.verdict(), not result.passed
    elif args.command == "augment":
        rows = debug.augmented_views(task, cfg, **given)
        if rows is None:
            print(f"{task_cls.name}: nothing to draw (its batches hold no images); augment shows image tasks")
            return 0
        views = len(rows[0]) - 1
        plots.save_view_grid(rows, out, ["original"] + [f"augmented (step {i})" for i in range(views)])
        record = {"samples": len(rows), "views": views, "progress": given.get("progress", 0.0)}
        message, failed = f"{len(rows)} samples, each as prepared and in {views} augmented views", False
    else:
        report = debug.gradient_flow(task, cfg, **given)
        print(debug.gradient_table(report))
        plots.plot_gradient_flow(report, out, title)
        record = {"steps": report.steps, "median_grad_rms": report.median_grad_rms,
                  "parameters": [{"name": p.name, "shape": list(p.shape), "requires_grad": p.requires_grad,
                                  "flags": p.flags, "grad_norms": p.grad_norms, "weight_norms": p.weight_norms}
                                 for p in report.parameters]}
        flagged = report.flagged
        failed = bool(flagged)
        message = (f"{len(flagged)} of {len(report.parameters)} parameters flagged over {report.steps} steps:\n  "
                   + "\n  ".join(f"{p.name}: {'; '.join(p.flags)}" for p in flagged) if flagged else
                   f"no parameter flagged over {report.steps} steps: every one gets a finite gradient within "
                   f"{debug.SPREAD_LIMIT:.0e}x of the median parameter's")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(message)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 1 if failed else 0

def open_generator(path: Path, runtime: str, checkpoint: str, threads: int | None = None):
    """The predictor and graph runner of a package, or of a run's checkpoint in eager PyTorch."""
    import torch

    from .export.runtime import GraphSet, TorchRunner

    if (path / "manifest.json").is_file():
        from .inference import open_model

        model = open_model(path, runtime, threads)
        return model.predictor, model.runner
    from .engine.loop import load_for_evaluation

    if threads:
        torch.set_num_threads(threads)
    task_cls, cfg = load_run_config(path, ["train.device=cpu"])
    task = task_cls(cfg)
    task.datasets(torch.device("cpu"))  # what the data decides: the vocabulary
    model = load_for_evaluation(task, path, torch.device("cpu"), cfg, checkpoint)
    graphs = task.export_graphs(model)
    return task.predictor(), GraphSet({name: TorchRunner(g.module, g.input_names) for name, g in graphs.items()})


def open_model_source(args: argparse.Namespace):
    """generate and caption: the predictor and runner of the run or package `args.model`, checked."""
    path = Path(args.model)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such run directory or package")
    if args.n < 1:
        raise ConfigError(f"--n: must be >= 1 (got {args.n})")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: must be >= 1 (got {args.threads})")
    return path, *open_generator(path, args.runtime, args.checkpoint, args.threads)


def stream_sequence(predictor, sequence, run) -> None:
    """Print a step-wise predictor's text as it is decoded."""
    while not sequence.finished:
        (delta,) = predictor.step([sequence], run)
        sys.stdout.write(delta.text)
        sys.stdout.flush()


def run_generate(args: argparse.Namespace) -> int:
    path, predictor, run = open_model_source(args)
    if not hasattr(predictor, "step"):
        raise ConfigError(f"{path}: a {type(predictor).__name__} does not generate text; use `modelworks predict`")
    fields = {"prompt": args.prompt, "max_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
              "repetition_penalty": args.repetition_penalty, "presence_penalty": args.presence_penalty,
              "stop": args.stop}
    try:
        requests = [predictor.Request(**fields, seed=None if args.seed is None else args.seed + i)
                    for i in range(args.n)]
    except ValueError as exc:  # pydantic's ValidationError: a value out of its range
        raise ConfigError(f"generate: {exc}") from None
    for i, request in enumerate(requests):
        sequence = predictor.start(predictor.parse(request))
        if args.n > 1:
            print(f"--- sample {i + 1}")
        sys.stdout.write(args.prompt)
        stream_sequence(predictor, sequence, run)
        response = predictor.respond(sequence)
        sys.stdout.write("\n")
        print(f"[{response.completion_tokens} tokens, finish_reason {response.finish_reason}]", file=sys.stderr)
    return 0


def run_caption(args: argparse.Namespace) -> int:
    path, predictor, run = open_model_source(args)
    if "beam" not in predictor.Request.model_fields or predictor.file_field is None:
        raise ConfigError(f"{path}: a {type(predictor).__name__} does not caption images; use `modelworks predict`")
    image = Path(args.image)
    if not image.is_file():
        raise ConfigError(f"{image}: no such image file")
    fields = {"beam": args.beam, "n": args.n, "max_length": args.max_length, "length_penalty": args.length_penalty,
              "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
              "prompt": args.prompt}
    try:
        request = predictor.Request(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as exc:  # pydantic's ValidationError: a value out of its range
        raise ConfigError(f"caption: {exc}") from None
    item = predictor.parse(request, image.read_bytes())  # InputError names the option (beam, n, max_length)
    if args.stream:
        sequence = predictor.start(item)
        sys.stdout.write(predictor.tokenizer.decode(item.prompt_ids))
        stream_sequence(predictor, sequence, run)
        sys.stdout.write("\n")
        return 0
    (response,) = predictor.predict([item], run)
    for caption in response.captions:
        print(f"{caption.text}\t(log p {caption.log_prob:.3f}, score {caption.score:.3f}, {caption.finish_reason})")
    return 0


def run_recipes(args: argparse.Namespace) -> int:
    for name in [args.task] if args.task else TASKS:
        get_task(name)
        print(f"{name}: {', '.join(config_mod.list_recipes(name))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "train":
            return run_train(args, argv)
        if args.verb == "calibrate":
            return run_calibrate(args)
        if args.verb == "evaluate":
            return run_evaluate(args)
        if args.verb == "export":
            return run_export(args)
        if args.verb == "predict":
            return run_predict(args)
        if args.verb == "serve":
            return run_serve(args)
        if args.verb == "retrain":
            from .retrain import run_retrain

            return run_retrain(Path(args.package), args.events, Path(args.out) if args.out else None, args.version,
                               args.server if args.promote else None, args.runtime, args.name)
        if args.verb == "debug":
            return run_debug(args)
        if args.verb == "generate":
            return run_generate(args)
        if args.verb == "caption":
            return run_caption(args)
        if args.verb == "sample":
            from .sample_cli import run_sample

            return run_sample(args)
        return run_recipes(args)
    except ModelworksError as exc:
        print(f"modelworks: error: {exc}", file=sys.stderr)
        return 2
