"""The `rewardkit` command line.

Exit codes: 0 success; 2 bad input (recipe, arguments, missing weights) with
a short message and no traceback; 1 a failure that is not the input's: a
refused write (a full disk) or a diverged run with a message, a bug with a
traceback. Only the standard
library is imported at start-up: each command imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def at_least(minimum: int, below: int | None = None):
    """An argparse type: a whole number >= minimum (and < below); argparse reports a bad one: exit 2, the argument named."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"must be at least {minimum}" + (f" and below {below}" if below else "") + f", got {value}")
        return value

    return parse


SEED = at_least(0, 2**62)


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def above(minimum: float):
    """An argparse type: a finite number > minimum."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > minimum and value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number above {minimum:g}, got {text}")
        return value

    return parse


def build_parser(commands: dict | None = None) -> argparse.ArgumentParser:
    """The parser of the core commands, plus `commands` registered by plugins (name -> plugins.Command)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plugin", action="append", default=[], metavar="PATH", help="register a local plugin file (repeatable)")

    parser = argparse.ArgumentParser(
        prog="rewardkit",
        description="Reward-driven post-training of text-to-image generators (R0 / R0+).",
        epilog="Run 'rewardkit COMMAND --help' for a command's options. Installed plugin packages may add commands: "
        "'rewardkit plugins' lists them. Docs: docs/ in the repository.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="train with a recipe", description="Train with a recipe. With no RECIPE, runs the embedded default.")
    p.add_argument("recipe", nargs="?", help="a recipe file, or the name of an embedded recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys, e.g. run.steps=100 rewards.color.weight=2")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in the run directory")
    p.add_argument(
        "--num-processes", type=at_least(1), default=1, metavar="N",
        help="data-parallel processes on this machine (GPUs; CPU processes with gloo where there are none); the accelerate "
        "configuration is run.accelerate_config",
    )
    p.add_argument("--num-machines", type=at_least(1), default=1, metavar="M", help="machines taking part (multi-node; run the same command on each)")
    p.add_argument("--machine-rank", type=at_least(0), default=0, metavar="R", help="this machine's rank, 0..M-1 (machine 0 writes the run directory)")
    p.add_argument("--main-process-ip", metavar="IP", help="the address of machine 0 (needed with --num-machines > 1)")
    p.add_argument("--main-process-port", type=at_least(1, 65536), default=29500, metavar="PORT", help="a free port on machine 0 (default 29500)")

    p = sub.add_parser("validate", parents=[common], help="check a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = sub.add_parser("plugins", parents=[common], help="list registered plugins")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--markdown", action="store_true", help="a markdown table with each plugin's summary (docs/plugins.md is made with it)")

    p = sub.add_parser("sample", parents=[common], help="generate images with a trained generator")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", type=at_least(1), default=4, help="number of images (default 4)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--ema", action="store_true", help="use the moving average of the weights (runs with optimizer.ema_decay)")
    p.add_argument("--init-image", metavar="IMG", help="edit this image toward the prompt (img2img): it is noised to --strength, then the remaining steps run")
    p.add_argument("--strength", type=fraction, metavar="S", help="with --init-image: how much of the sampler runs, 0..1 (0: the image back, 1: plain sampling; default 0.75)")
    p.add_argument("--controlnet", metavar="MODEL", help="a diffusers ControlNet for the base model (folder, .safetensors or hub id); sd and sdxl generators")
    p.add_argument("--control-image", metavar="IMG", help="the ControlNet's conditioning image (edges, depth, ...)")
    p.add_argument("--control-scale", type=above(0), default=1.0, metavar="S", help="the ControlNet residuals' weight (default 1)")

    p = sub.add_parser(
        "export", parents=[common], help="export a trained generator to diffusers formats",
        description="Write the trained generator of a run as a diffusers pipeline folder (full weights, LoRA merged) "
        "or as LoRA weights that diffusers' load_lora_weights reads (or, in kohya's layout, ComfyUI and A1111), with a "
        "model card (README.md: licence inherited from the base, recipe, sampling settings, sample grid).",
    )
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--format", required=True, choices=["diffusers", "lora"])
    p.add_argument(
        "--lora-layout", choices=["diffusers", "kohya"], default=None,
        help="with --format lora: 'diffusers' (default; pytorch_lora_weights.safetensors) or 'kohya' (OUT_NAME.safetensors "
        "with lora_unet_... keys, for ComfyUI / A1111 / kohya-ss; sd and sdxl generators)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    p.add_argument("--ema", action="store_true", help="use the moving average of the weights (runs with optimizer.ema_decay)")

    p = sub.add_parser(
        "eval", parents=[common], help="score generators on a prompt set (the paper's table)",
        description="Score one or more generators on a prompt set; writes OUT/results.md and OUT/results.json. "
        "A generator is a run directory, a checkpoint folder, or TYPE:MODEL[,key=value,...] for a base model "
        "(e.g. sd:runwayml/stable-diffusion-v1-5,num_steps=25,guidance_scale=7.5).",
    )
    p.add_argument("generators", nargs="*", metavar="GENERATOR_SPEC")
    p.add_argument("--prompts", help="prompt file (.txt, .json, .csv) or a folder of per-style .json files")
    p.add_argument("--metrics", default=None, help="comma list of reward plugins and 'fid' (default: hps,aesthetic,clip,imagereward, plus fid with --reference); "
                   "LABEL=NAME names a column, so one plugin can fill several (e.g. hps,hps_remote=remote)")
    p.add_argument("--reference", help="real images for FID: a folder, or a .safetensors file from --save-reference-stats")
    p.add_argument("--save-reference-stats", metavar="PATH", help="compute FID statistics of --reference and save them to PATH (.safetensors)")
    p.add_argument("--fid-weights", metavar="PATH", help="InceptionV3 weights file for FID (default: torch-fidelity's file in the torch hub cache)")
    p.add_argument("--fid-dims", type=int, choices=[64, 192, 768, 2048], default=2048, help="Inception features for FID: 2048 (standard) or 64/192/768 (quick checks only)")
    p.add_argument("--steps", type=at_least(1), help="sampler steps for every generator (default: each generator's own)")
    p.add_argument("-n", type=at_least(1), default=1, help="images per prompt (default 1)")
    p.add_argument("--out", default="eval", help="output folder (default ./eval); generated images are cached under OUT/images/")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--metric-option", action="append", default=[], metavar="METRIC.KEY=VALUE", help="an option of a metric's reward plugin, METRIC its label (repeatable)")
    p.add_argument("--ema", action="store_true", help="run-directory generators use the moving average of their weights (runs with optimizer.ema_decay)")

    p = sub.add_parser(
        "train-hires", help="train the high-resolution classifier of R0+ on your images",
        description="Train the classifier of the `high_resolution` reward (R0+'s high-resolution guidance): real crops of "
        "FOLDER's images versus the same crops down-sampled and up-sampled back. Writes one .safetensors file.",
    )
    p.add_argument("folder", help="a folder of real high-resolution images (searched recursively)")
    p.add_argument("--out", required=True, help="the .safetensors file to write (the `weights` of [rewards.high_resolution])")
    p.add_argument("--resolution", type=at_least(8), default=1024, help="short side images are resized down to: the generator's output size (default 1024)")
    p.add_argument("--crop", type=at_least(8), default=256, help="training crop size in px (default 256)")
    p.add_argument("--steps", type=at_least(1), default=2000)
    p.add_argument("--batch-size", type=at_least(1), default=16, help="real crops per step; as many degraded copies are added (default 16)")
    p.add_argument("--lr", type=above(0), default=1e-3)
    p.add_argument("--min-factor", type=above(1), default=2.0, help="smallest down-sampling factor of the negatives (default 2)")
    p.add_argument("--max-factor", type=above(1), default=4.0, help="largest down-sampling factor of the negatives (default 4)")
    p.add_argument("--width", type=at_least(1), default=32, help="channels of the classifier's first layer (default 32)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--workers", type=at_least(0), default=min(4, os.cpu_count() or 1), help="data-loading processes decoding images (default: up to 4)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    p = sub.add_parser(
        "serve-reward", parents=[common], help="serve a reward over HTTP for the `remote` reward",
        description="Serve the registered reward NAME over HTTP (FastAPI + uvicorn) for `type = \"remote\"` rewards to call: "
        "GET /info, POST /score (images and scores as safetensors; image gradients of differentiable rewards). Needs the "
        "`serve` extra: pip install 'rewardkit[serve]'. There is no authentication: listen on 127.0.0.1 or a private "
        "network, or put an authenticating proxy in front.",
    )
    p.add_argument("name", help="a reward plugin, e.g. hps (see `rewardkit plugins`)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="an option of the reward (repeatable; values read as TOML)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for other machines)")
    p.add_argument("--port", type=at_least(1, 65536), default=8100, help="default 8100")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max-batch", type=at_least(1), default=256, help="most images one request may hold (default 256)")
    p.add_argument("--max-queue", type=at_least(1), default=32, help="requests in the server at once (being received, waiting "
                   "or scored) before more are told 503, retry later or elsewhere (default 32)")
    p.add_argument("--max-request-mb", type=at_least(1), default=1024, help="largest request body in MB (default 1024)")

    p = sub.add_parser(
        "report", help="one self-contained HTML page of runs: curves, sample grids, tables, hacking warnings",
        description="Write one HTML file that opens offline: the curves of every reward, held-out metric (eval/*), penalty "
        "and gradient norm over steps (several runs overlaid, named by the recipe keys they differ in), the sample grids "
        "over training, the end-of-run tables, and a warning where a held-out metric falls while the trained reward rises. "
        "PNG copies of the curves go to FILE_files/ beside it.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE.html", help="the page to write (default RUN_DIR/report.html for one run; needed for several)")

    for name, command in sorted((commands or {}).items()):
        p = sub.add_parser(name, parents=[common], help=f"{command.help} [{command.package}]", description=command.help)
        if command.arguments is not None:
            command.arguments(p)
        p.set_defaults(plugin_command=command)
    return parser


def _plugin_commands(argv: list[str]) -> dict:
    """The plugins' commands the parser needs: the default plugin modules' (cheap to import, so `--help` lists
    them without loading torch); installed packages' only when the command named is none of those."""
    from rewardkit.plugins import load_commands

    commands = load_commands(installed=False)
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is not None and word not in COMMANDS and word not in commands:
        local = [b for a, b in zip(argv, argv[1:]) if a == "--plugin"] + [a.split("=", 1)[1] for a in argv if a.startswith("--plugin=")]
        commands = load_commands(installed=True, local_files=local)
    return commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_plugin_commands(argv))
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # KEY=VALUE after an option (`run r.toml --resume run.steps=10`): argparse stops at the option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from rewardkit import __version__

        print(f"rewardkit {__version__}")
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    _setup_logging()

    from rewardkit.errors import TrainingDiverged, UserError, WriteFailed

    try:
        command = getattr(args, "plugin_command", None)
        if command is not None:
            from rewardkit.plugins import load_registry

            return command.run(args, load_registry(args.plugin))
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"rewardkit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as exc:
        print(f"rewardkit: training diverged: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except WriteFailed as exc:
        print(f"rewardkit: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("rewardkit: interrupted; resume with --resume", file=sys.stderr)
        return 130


def _setup_logging() -> None:
    # In a multi-process run only rank 0 speaks, except for errors.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.ERROR
    logging.basicConfig(level=level, format="rewardkit: %(levelname)s: %(message)s", stream=sys.stderr)
    for noisy in ("accelerate", "torch", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _split_recipe_args(recipe: str | None, overrides: list[str]):
    """`rewardkit run a.b=1` means the default recipe with an override."""
    if recipe is not None and "=" in recipe:
        return None, [recipe, *overrides]
    return recipe, overrides


def cmd_run(args) -> int:
    from rewardkit import distributed
    from rewardkit.optimizer import Optimizer
    from rewardkit.plugins import load_registry
    from rewardkit.recipe import load_recipe

    recipe_path, overrides = _split_recipe_args(args.recipe, args.overrides)
    registry = load_registry(args.plugin)
    recipe = load_recipe(recipe_path, overrides, registry=registry)
    launching = (args.num_processes != 1 or args.num_machines != 1) and not distributed.launched()
    if launching:
        machines = distributed.Machines.check(args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port)
        config = distributed.check(recipe.run.batch_size, args.num_processes * machines.count, recipe.run.accelerate_config,
                                   recipe.run.gradient_accumulation_steps, local_processes=args.num_processes)
    if distributed.is_main_process() and (not launching or machines.rank == 0):
        # before any model loads (a reward may load its model when built), and here rather than in N processes:
        # one message, exit 2. Machine 0 writes the run directory; the training process takes the lock for good.
        from pathlib import Path

        from rewardkit.rundir import check_run_dir, claim_run_dir

        check_run_dir(Path(recipe.run.dir), args.resume)
        claim_run_dir(Path(recipe.run.dir)).release()
    if launching:
        child = ["run", *([args.recipe] if args.recipe else []), *args.overrides, *(["--resume"] if args.resume else [])]
        for path in args.plugin:
            child += ["--plugin", os.path.abspath(path)]
        return distributed.launch(child, args.num_processes, config, machines)
    try:
        result = Optimizer.from_recipe(recipe).fit(resume=args.resume)
    finally:
        distributed.end_process_group()
    if not distributed.is_main_process():
        return EXIT_OK
    rewards = ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in result.metrics.items() if k.startswith("reward/"))
    reports = [result.report, *registry.hook.run_finished(run_dir=result.run_dir, recipe=recipe, registry=registry)]
    for report in reports:
        if report:
            print(report)
    print(f"done: step {result.step}, {rewards}")
    print(f"run directory: {result.run_dir}  (checkpoint: {result.checkpoint})")
    return EXIT_OK


def cmd_validate(args) -> int:
    from rewardkit.plugins import load_registry
    from rewardkit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, registry=load_registry(args.plugin))
    names = ", ".join(f"{s.label} ({s.cls.name})" for s in recipe.rewards)
    print(f"{recipe.source}: ok - generator {recipe.generator.cls.name}, rewards {names}, {recipe.run.steps} steps")
    return EXIT_OK


def cmd_plugins(args) -> int:
    from rewardkit.plugins import load_registry

    registry = load_registry(args.plugin)
    rows = [{"kind": i.kind, "name": i.name, "package": i.package, "version": i.version} for i in registry.all()]
    commands = sorted(registry.commands.values(), key=lambda c: c.name)
    rows += [{"kind": "command", "name": c.name, "package": c.package, "version": c.version} for c in commands]
    failed = [{"plugin": f.plugin, "package": f.package, "error": f.error} for f in registry.failures]
    if args.json:
        print(json.dumps({"plugins": rows, "failed": failed}, indent=2))
        return EXIT_OK
    if args.markdown:
        print("| kind | name | what it is | module |\n|---|---|---|---|")
        for i in registry.all():
            print(f"| {i.kind} | `{i.name}` | {i.summary.replace('|', '&#124;')} | `{i.cls.__module__}` |")
        for c in commands:
            print(f"| command | `rewardkit {c.name}` | {c.help} | `{c.run.__module__}` |")
        return EXIT_OK
    widths = {k: max([len(k)] + [len(r[k]) for r in rows]) for k in ("kind", "name", "package", "version")}
    print("  ".join(k.upper().ljust(w) for k, w in widths.items()))
    for r in rows:
        print("  ".join(r[k].ljust(w) for k, w in widths.items()))
    for f in failed:
        print(f"FAILED  {f['plugin']} ({f['package']}): {f['error']}")
    return EXIT_OK


def cmd_sample(args) -> int:
    from pathlib import Path

    from rewardkit.durable import writable_dir
    from rewardkit.errors import UserError
    from rewardkit.plugins import load_registry
    from rewardkit.images import edit, fixed_noise, generate, load_image, save_grid, save_pngs
    from rewardkit.rundir import load_generator

    if args.strength is not None and not args.init_image:
        raise UserError("--strength needs --init-image IMG, the image to edit")
    if bool(args.controlnet) != bool(args.control_image):
        raise UserError("--controlnet MODEL and --control-image IMG go together: the ControlNet and its conditioning image")
    for flag, path in (("--init-image", args.init_image), ("--control-image", args.control_image)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    out = writable_dir(Path(args.out), "--out")  # before the model loads
    generator, _, checkpoint = load_generator(args.path, registry=load_registry(args.plugin), ema=args.ema)
    prompts, noise = [args.prompt] * args.n, fixed_noise(generator, args.n, args.seed)
    if args.controlnet:
        from rewardkit.controlnet import Control, check_matches, load_controlnet
        from rewardkit.generators.sd import StableDiffusion

        if not isinstance(generator, StableDiffusion):
            raise UserError(f"--controlnet: the '{generator.name}' generator has no ControlNet support; sd and sdxl generators do")
        image = load_image(args.control_image, generator.height, generator.width, "--control-image")
        net = load_controlnet(args.controlnet, generator.denoiser_dtype)
        check_matches(net, generator.unet)
        generator.control = Control(net.to(next(generator.parameters()).device), image, args.control_scale)
    if args.init_image:
        if not hasattr(generator, "edit"):
            raise UserError(f"--init-image: the '{generator.name}' generator cannot edit images; the diffusion generators can")
        image = load_image(args.init_image, generator.height, generator.width, "--init-image")
        images = edit(generator, prompts, image, noise, 0.75 if args.strength is None else args.strength)
    else:
        images = generate(generator, prompts, noise)
    paths = save_pngs(images, out)
    save_grid(images, out / "grid.png")
    print(f"wrote {len(paths)} images and grid.png to {out} (from {checkpoint})")
    return EXIT_OK


def cmd_export(args) -> int:
    from rewardkit.export import export
    from rewardkit.plugins import load_registry

    out = export(args.path, args.format, args.out, registry=load_registry(args.plugin), ema=args.ema, lora_layout=args.lora_layout)
    what = f"lora ({args.lora_layout} layout)" if args.lora_layout else args.format
    print(f"exported {what} to {out}, with a model card: {out / 'README.md'}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from pathlib import Path

    from rewardkit.durable import writable_dir, writable_file
    from rewardkit.errors import UserError
    from rewardkit.evaluation import FID, evaluate
    from rewardkit.plugins import load_registry

    if args.save_reference_stats:
        if not args.reference:
            raise UserError("--save-reference-stats needs --reference DIR, the folder of real images")
        writable_file(Path(args.save_reference_stats), "--save-reference-stats")
        fid = FID(args.fid_weights, args.fid_dims)
        fid.add_reference(Path(args.reference), args.batch_size)
        fid.save_reference(Path(args.save_reference_stats))
        print(f"saved FID statistics of {args.reference} to {args.save_reference_stats}")
        if not args.generators:
            return EXIT_OK
    if not args.generators or not args.prompts:
        raise UserError("rewardkit eval needs at least one GENERATOR_SPEC and --prompts FILE")
    writable_dir(Path(args.out), "--out")
    metrics = args.metrics or ("hps,aesthetic,clip,imagereward" + (",fid" if args.reference else ""))
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    evaluate(
        args.generators, args.prompts, names, args.out, load_registry(args.plugin), reference=args.reference,
        steps=args.steps, n=args.n, seed=args.seed, batch_size=args.batch_size,
        metric_options=args.metric_option, fid_weights=args.fid_weights, fid_dims=args.fid_dims, ema=args.ema,
    )
    print((Path(args.out) / "results.md").read_text(), end="")
    print(f"written: {Path(args.out) / 'results.md'} and results.json")
    return EXIT_OK


def cmd_train_hires(args) -> int:
    from pathlib import Path

    from rewardkit.durable import writable_file
    from rewardkit.hires_training import train

    writable_file(Path(args.out), "--out")
    info = train(
        Path(args.folder), Path(args.out), resolution=args.resolution, crop=args.crop, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, min_factor=args.min_factor, max_factor=args.max_factor, width=args.width, seed=args.seed, workers=args.workers,
        device=args.device,
    )
    print(
        f"wrote {args.out}: held-out accuracy {info['heldout_accuracy']:.3f} (real crops scored above their down-then-up-sampled copies, "
        f"{info['heldout_images']} held-out image(s); chance is 0.5); trained on {info['train_images']} image(s) in {info['seconds']} s"
    )
    return EXIT_OK


def cmd_serve_reward(args) -> int:
    from rewardkit.plugins import load_registry
    from rewardkit.reward_server import build_reward, require_server_packages, serve

    require_server_packages()
    reward = build_reward(args.name, args.option, load_registry(args.plugin), args.device)
    serve(reward, args.host, args.port, args.max_batch, args.max_queue, args.max_request_mb)
    return EXIT_OK


def cmd_report(args) -> int:
    from rewardkit.report import build_report

    out = build_report(args.run_dirs, args.out)
    print(f"wrote {out} (PNG curves in {out.with_name(out.stem + '_files')})")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plugins": cmd_plugins, "sample": cmd_sample, "export": cmd_export, "eval": cmd_eval, "train-hires": cmd_train_hires, "serve-reward": cmd_serve_reward, "report": cmd_report}

if __name__ == "__main__":
    sys.exit(main())
