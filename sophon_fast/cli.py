"""Command line: ``sophon-fast demo | protect | show | backends``.

    sophon-fast demo [--mode classification|generation] [--out DIR] [--device cpu|cuda] [--seed N] [--quick]
    sophon-fast protect --config FILE.toml [--out DIR] [--device D] [--resume | --overwrite]
                        [--nproc N] [--timeout SECONDS]
    sophon-fast show DIR [--data builtin:NAME]
    sophon-fast evaluate --model CKPT [--normal CKPT] [--config grid.toml | --quick] --out DIR
                         [--restricted SPEC] [--original SPEC] [--workers N] [--epochs E]
    sophon-fast backends

A protect config (TOML):

    [model]
    name = "small_cnn"                          # a sophon_fast.models zoo name
    kwargs = { num_classes = 10, in_channels = 1, image_size = 28 }
    weights = "demo_out/pretrained"             # a saved result directory (required)
    [data]
    original = "builtin:mnist5k"                # or a table, see sophon_fast.data.specs
    restricted = "builtin:sklearn_digits"
    [protect]                                   # any ProtectConfig field, or preset = "robust"
    outer_steps = 100                           #   (ProtectConfig.preset) with fields overriding it
    inner_steps = 10
    [output]
    dir = "protected"                           # --out overrides it

Only these tables and keys are read; any other table or key (a ``[protekt]`` typo) is an error
that names it. Every bad file or path (missing, a file where a folder is expected and back, not
UTF-8, not TOML/JSON/safetensors of the expected shape) and an unusable ``--device`` end the
command with one line naming it and exit status 2 (or 1), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from . import _backend
from .api import ProtectConfig, ProtectResult, protect
from .attacks.evaluate import evaluate
from .data.specs import load_spec
from .demo import run_demo
from .demo_generation import format_generation_report, run_generation_demo
from .distributed import DistributedError, init_from_env, is_main_process, launch
from .engine.checkpoint import ensure_writable_dir, nonfinite_tensors
from .models.classifiers import build_model
from .training import accuracy

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib


def _load_toml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise SystemExit(f"sophon-fast: config file {path} is a folder; expected a TOML file")
    if not path.is_file():
        raise SystemExit(f"sophon-fast: config file {path} does not exist")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise SystemExit(
            f"sophon-fast: {path} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise SystemExit(f"sophon-fast: {path} is not valid TOML: {error}") from None
    except OSError as error:
        raise SystemExit(f"sophon-fast: cannot read {path}: {error.strerror}") from None


def _section(config: dict, name: str, path: Path) -> dict:
    section = config.get(name)
    if not isinstance(section, dict):
        raise SystemExit(f"sophon-fast: {path} needs a [{name}] table")
    return section


# The protect TOML's tables and keys; [protect] takes ProtectConfig's fields. Anything else is a
# typo: a misspelt [protect] table ran the official 1000 x 50-step default silently.
_PROTECT_TOML = {"model": {"name", "kwargs", "weights"}, "data": {"original", "restricted"},
                 "protect": None, "output": {"dir"}}  # fmt: skip


def _check_protect_toml(raw: dict, path: Path) -> None:
    """Unknown tables and keys of a protect config are errors that name them."""
    unknown = sorted(set(raw) - set(_PROTECT_TOML))
    if unknown:
        raise SystemExit(
            f"sophon-fast: {path}: unknown table(s) or key(s) {unknown}; expected the tables "
            f"{sorted(_PROTECT_TOML)}"
        )
    for table, keys in _PROTECT_TOML.items():
        if table not in raw:
            continue
        if not isinstance(raw[table], dict):
            raise SystemExit(f"sophon-fast: {path}: '{table}' must be a [{table}] table")
        if keys is None:
            keys = {f.name for f in dataclasses.fields(ProtectConfig)} | {"preset"}
        unknown = sorted(set(raw[table]) - keys)
        if unknown:
            raise SystemExit(
                f"sophon-fast: {path}: unknown key(s) {unknown} in [{table}]; expected some of "
                f"{sorted(keys)}"
            )


def _device(value: str | None, flag: str = "--device"):
    """``--device`` as a torch.device, or one line saying why it cannot be used here."""
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise SystemExit(
            f"sophon-fast: {flag} {value}: not a device; expected cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "torch was built without CUDA"
                if torch.version.cuda is None
                else "no GPU is visible"
            )
            raise SystemExit(f"sophon-fast: {flag} {value}: CUDA is not available ({why})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(
                f"sophon-fast: {flag} {value}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    elif device.type != "cpu":
        raise SystemExit(f"sophon-fast: {flag} {value}: expected cpu, cuda or cuda:N")
    return device


def _folder_arg(path: Path, what: str) -> Path:
    """An output folder argument that must not be an existing file."""
    if path.exists() and not path.is_dir():
        raise SystemExit(f"sophon-fast: {what} {path} is a file; expected a folder (or a new path)")
    return path


def cmd_demo(args) -> int:
    _device(args.device)
    if args.out is not None:
        _folder_arg(Path(args.out), "--out")
    if getattr(args, "mode", "classification") == "generation":
        out = args.out if args.out is not None else "demo_generation_out"
        report = run_generation_demo(
            out, device=args.device, seed=args.seed, quick=args.quick, progress=not args.no_progress
        )
        print(format_generation_report(report))
        print(
            f"wrote {Path(out) / 'report.json'} and the sample grids {Path(out) / 'samples_*.png'}"
        )
        return 0
    args.out = "demo_out" if args.out is None else args.out
    run_demo(
        args.out,
        device=args.device,
        seed=args.seed,
        quick=args.quick,
        progress=not args.no_progress,
    )
    print(
        f"wrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'restricted_accuracy.png'}"
    )
    return 0


def _protect_rank(args) -> None:
    """One rank of ``protect --nproc N`` (the process group is already initialised)."""
    cmd_protect(args)


def _launch_protect(args) -> int:
    """``protect --nproc N``: N local processes (gloo on CPU, NCCL with one GPU each)."""
    child = argparse.Namespace(**{**vars(args), "nproc": 1})
    try:
        launch(_protect_rank, args.nproc, (child,), device=args.device, timeout_s=args.timeout)
    except DistributedError as error:
        print(f"sophon-fast protect: error: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_protect(args) -> int:
    if getattr(args, "nproc", 1) != 1:
        if args.nproc < 1:
            raise SystemExit(f"sophon-fast protect: --nproc expects an int >= 1, got {args.nproc}")
        return _launch_protect(args)
    config_path = Path(args.config)
    raw = _load_toml(config_path)
    _check_protect_toml(raw, config_path)
    model_section = _section(raw, "model", config_path)
    data_section = _section(raw, "data", config_path)
    for key in ("original", "restricted"):
        if key not in data_section:
            raise SystemExit(f"sophon-fast: {config_path} [data] needs '{key}'")
    if "weights" not in model_section:
        raise SystemExit(
            f"sophon-fast: {config_path} [model] needs 'weights' (a directory written by "
            "ProtectResult.save or `sophon-fast demo`): protecting an untrained model makes no sense"
        )
    try:
        fields = dict(raw.get("protect", {}))
        preset = fields.pop("preset", None)
        if preset is None:
            config = ProtectConfig.from_dict(fields)
        elif not isinstance(preset, str):
            raise ValueError(f"preset: expected a preset name such as 'robust', got {preset!r}")
        else:  # the named configuration, the table's other keys override its fields
            config = ProtectConfig.preset(preset, **fields)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"sophon-fast: {config_path} [protect]: {error}") from None
    device = _device(args.device)  # before _check_output creates the folder
    out = _folder_arg(Path(args.out or raw.get("output", {}).get("dir", "protected")), "output")
    _check_output(out, resume=args.resume, overwrite=getattr(args, "overwrite", False))
    model = None
    if "name" in model_section:
        model = build_model(model_section["name"], model_section.get("kwargs"))
    model = ProtectResult.load(model_section["weights"], model=model).model
    original, original_eval = load_spec(data_section["original"], what="[data] original")
    restricted, _ = load_spec(data_section["restricted"], what="[data] restricted")
    # under torchrun (WORLD_SIZE > 1): join its process group, with a timeout
    started_group = init_from_env(device=device, timeout_s=getattr(args, "timeout", None))
    try:
        result = protect(
            model,
            original,
            restricted,
            config,
            original_eval=original_eval,
            device=device,
            progress=not args.no_progress,
            checkpoint_dir=out / "checkpoints",
            resume=args.resume,
            overwrite=getattr(args, "overwrite", False),
        )
        main_rank = is_main_process()
        if started_group:
            # every rank done with every collective before any tears its group down (a gloo
            # peer whose sockets close mid-exchange can abort the other rank at exit)
            torch.distributed.barrier()
    finally:
        if started_group:
            torch.distributed.destroy_process_group()
    if not main_rank:
        return 0  # rank 0 writes the result
    result.save(out)
    last = result.history[-1] if result.history else {}
    print(
        f"protected model written to {out} ({len(result.history)} outer steps, stopped by "
        f"{result.outcome}; last original accuracy {last.get('original_accuracy')})"
    )
    return 0


def _check_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Before any step: ``out`` can be created and written, and holds no earlier result or
    checkpoint unless ``--resume`` or ``--overwrite`` (an unwritable folder failed after the
    whole run; a second run silently replaced the first one's checkpoint)."""
    try:
        ensure_writable_dir(out)
    except OSError as error:
        raise SystemExit(
            f"sophon-fast protect: cannot write to the output folder {out} ({error}); "
            "choose a writable --out before the run starts"
        ) from None
    if resume or overwrite:
        return
    held = [name for name in ("model.safetensors", "result.json") if (out / name).exists()]
    held += [
        f"checkpoints/{name}"
        for name in ("checkpoint.safetensors", "checkpoint.json")
        if (out / "checkpoints" / name).exists()
    ]
    if held:
        raise SystemExit(
            f"sophon-fast protect: {out} already holds {', '.join(held)}; pass --resume to "
            "continue its checkpoint or --overwrite to replace it (or choose another --out)"
        )


def cmd_show(args) -> int:
    result = ProtectResult.load(args.directory)
    model = result.model
    n_params = sum(p.numel() for p in model.parameters())
    spec = getattr(model, "model_spec", None)
    print(f"{args.directory}: {type(model).__name__} {spec or ''}, {n_params:,} parameters")
    print(f"outer steps run: {len(result.history)}; stopped by: {result.outcome}")
    bad = nonfinite_tensors(dict(model.state_dict()))
    if bad:
        print(
            f"WARNING: the weights hold NaN or infinite values in {bad[:4]}"
            f"{' ...' if len(bad) > 4 else ''}: this model is broken, whatever its accuracy",
            file=sys.stderr,
        )
    if result.history:
        last = result.history[-1]
        print("last step: " + ", ".join(f"{k}={v}" for k, v in last.items()))
    if args.data:
        _, test = load_spec(args.data, what="--data")
        if test is None:
            raise SystemExit(f"sophon-fast: {args.data} has no test part to evaluate on")
        print(f"accuracy on {test.name}: {accuracy(model, test):.2f} %")
    return 0


def _demo_pair(checkpoint: Path) -> dict[str, str]:
    """The demo's domain pair, read from the report.json next to a demo checkpoint folder."""
    report = checkpoint.parent / "report.json"
    try:
        pair = json.loads(report.read_text(encoding="utf-8")).get("pair", {})
    except (OSError, ValueError, AttributeError):  # absent, unreadable, or not a JSON object
        return {}
    if not isinstance(pair, dict):
        return {}
    return {
        k: f"builtin:{pair[k]}" for k in ("original", "restricted") if isinstance(pair.get(k), str)
    }


def cmd_evaluate(args) -> int:
    if args.config and args.quick:
        raise SystemExit("sophon-fast evaluate: give --config or --quick, not both")
    _device(args.device)
    _folder_arg(Path(args.out), "--out")
    model_dir = Path(args.model)
    pair = _demo_pair(model_dir)
    restricted_spec = args.restricted or pair.get("restricted", "builtin:sklearn_digits")
    original_spec = args.original or pair.get("original", "builtin:mnist5k")
    model = ProtectResult.load(model_dir).model
    normal = ProtectResult.load(args.normal).model if args.normal else None
    restricted = load_spec(restricted_spec, what="--restricted")
    if restricted[1] is None:
        raise SystemExit(f"sophon-fast evaluate: {restricted_spec} has no test split")
    original = None
    if original_spec != "none":
        original = load_spec(original_spec, what="--original")[1]
    benign = (
        None
        if args.benign is None
        else (False if args.benign == "none" else load_spec(args.benign, what="--benign"))
    )
    if args.device == "cpu" or (args.device is None and not torch.cuda.is_available()):
        torch.set_flush_denormal(True)  # CPU fine-tuning slowed 2.6x on denormals otherwise
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    print(
        f"evaluate: model {model_dir}, normal {args.normal or '-'}, restricted {restricted_spec}, "
        f"original {original_spec}, grid {args.config or ('quick' if args.quick else 'default')}",
        flush=True,
    )
    report = evaluate(
        model,
        restricted,
        original=original,
        normal=normal,
        attacks=args.config or ("quick" if args.quick else None),
        seeds=seeds,
        epochs=args.epochs,
        device=args.device,
        workers=args.workers,
        report_dir=args.out,
        benign=benign,
        search_trials=args.search_trials,
        scratch=not args.no_scratch,
        progress=not args.no_progress,
    )
    print(report.markdown())
    print(
        f"wrote {Path(args.out) / 'report.json'}, report.md, curves.png, worst_case.png ({report.data['seconds']:.0f} s)"
    )
    return 0


def cmd_backends(args) -> int:
    for name, description in _backend.available_backends().items():
        print(f"{name:<10} available    {description}")
    for name, reason in _backend.unavailable_backends().items():
        print(f"{name:<10} unavailable  {reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sophon-fast", description="SOPHON non-fine-tunable learning"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pre-train, protect and attack on built-in offline domains")
    demo.add_argument(
        "--mode",
        choices=("classification", "generation"),
        default="classification",
        help="classification (default: CNN, MNIST vs digits) or generation (DDPM UNet, MNIST vs LFW faces)",
    )
    demo.add_argument(
        "--out",
        default=None,
        help="output directory (default: demo_out, or demo_generation_out with --mode generation)",
    )
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=cmd_demo)

    prot = sub.add_parser("protect", help="protect a saved model as a TOML config says")
    prot.add_argument(
        "--config", required=True, help="TOML file: [model], [data], [protect], [output]"
    )
    prot.add_argument("--out", help="output directory (default: [output] dir, else 'protected')")
    prot.add_argument("--device", help="cpu or cuda (default: where the model is)")
    prot.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    prot.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a result or checkpoint already in OUT (without it, or --resume, the run "
        "refuses to start there)",
    )
    prot.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (gloo on CPU, one GPU each with "
        "--device cuda); default 1",
    )
    prot.add_argument(
        "--timeout",
        type=float,
        help="seconds a collective waits for a dead or stuck rank before failing "
        "(default: $SOPHON_FAST_DIST_TIMEOUT, else 1800)",
    )
    prot.add_argument("--no-progress", action="store_true")
    prot.set_defaults(run=cmd_protect)

    show = sub.add_parser("show", help="load a saved result and summarise it")
    show.add_argument("directory")
    show.add_argument("--data", help="'builtin:NAME': also report test accuracy on that domain")
    show.set_defaults(run=cmd_show)

    ev = sub.add_parser(
        "evaluate",
        help="attack a protected checkpoint, the unprotected one and scratch on one grid",
    )
    ev.add_argument(
        "--model", required=True, help="protected checkpoint folder (ProtectResult.save)"
    )
    ev.add_argument("--normal", help="unprotected checkpoint folder (the normal arm)")
    ev.add_argument("--config", help="grid TOML with a [grid] table (default: the default grid)")
    ev.add_argument("--quick", action="store_true", help="the quick grid (~10 min on 2 cores)")
    ev.add_argument("--out", required=True, help="report directory; rerunning resumes from it")
    ev.add_argument(
        "--restricted",
        help="restricted domain spec (default: the demo's pair recorded beside --model, "
        "else builtin:sklearn_digits)",
    )
    ev.add_argument(
        "--original",
        help="original domain spec, or 'none' (default: as --restricted, builtin:mnist5k)",
    )
    ev.add_argument("--benign", help="trainability domain spec or 'none' (default: the grid's)")
    ev.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ev.add_argument("--epochs", type=int, help="epochs per cell (default: the grid's)")
    ev.add_argument("--seeds", help="comma-separated seeds (default: the grid's)")
    ev.add_argument(
        "--search-trials", type=int, help="search-adversary trials (default: the grid's)"
    )
    ev.add_argument("--device", help="cpu or cuda (default: where the model is)")
    ev.add_argument("--no-scratch", action="store_true", help="omit the scratch arm")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(run=cmd_evaluate)

    backends = sub.add_parser("backends", help="list the kernel backends that work here")
    backends.set_defaults(run=cmd_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as error:
        # OSError covers a missing file, a file where a folder is expected and back, and a
        # refused permission; its message names the path
        print(f"sophon-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
