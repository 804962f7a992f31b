"""The ``fed-userllm`` command line. Building the parser imports no torch (each subcommand imports what it needs
when it runs), so ``--help`` is instant; third-party warnings and log noise are shown only with ``-v``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

import fed_userllm
from fed_userllm.extras import MissingExtra, require
from fed_userllm.runtime import QUIET_NATIVE_ENV
from fed_userllm.serving.config import ServingConfig
from fed_userllm.settings import choices_of, help_of
from fed_userllm.train.contextualize_config import ContextualizeConfig
from fed_userllm.train.pretrain_config import PretrainConfig

T = TypeVar("T")
DATASET_HELP = ("ml-latest-small (embedded, the default), a GroupLens name (ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, "
                "ml-32m, ml-latest: downloaded), 'synthetic:users=N,items=M', or a folder path")
THREADS_HELP = "torch intra-op threads"
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"
RUN_HELP = ("a run directory (pretrain, contextualize or Flower; e.g. runs/latest) or one of its model folders")
QUIET_ENV = {"TORCH_LOGS": "-torch", "TRANSFORMERS_VERBOSITY": "error",  # their loggers: errors only
             "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # e.g. transformers' "Loading weights" bars
             QUIET_NATIVE_ENV: "1"}  # native libraries' diagnostics (fed_userllm.runtime.quiet_native_stderr)


def _data_describe(args: argparse.Namespace) -> None:
    from fed_userllm.data import describe

    info = describe(args.dataset, max_len=args.max_len)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"dataset        {info['dataset']}")
    print(f"users          {info['users']:,}")
    print(f"events         {info['events']:,}")
    print(f"known items    {info['known_items']:,} (in the item catalog; {info['rated_items']:,} rated)")
    print(f"item vocab     {info['item_vocab']:,} item ids (incl. 3 reserved), from the public catalog")
    for reason, n in info["skipped"].items():
        print(f"skipped        {n:,} {reason}")
    pct = "  ".join(f"{k}={v:g}" for k, v in info["sequence_length_percentiles"].items())
    print(f"events/user    {pct}")
    print("genres (events, all genres of each rated item):")
    total = sum(info["genre_event_counts"].values())
    for genre, n in info["genre_event_counts"].items():
        print(f"  {genre:<20} {n:>9,}  {100 * n / total:5.1f}%")


def _data_prepare(args: argparse.Namespace) -> None:
    from fed_userllm.data import prepare

    seq, folder = prepare(args.dataset, max_len=args.max_len, min_events=args.min_events, out=args.out)
    print(f"prepared {seq.num_users:,} users / {seq.num_events:,} events -> {folder}")
    print(f"manifest: {folder / 'manifest.json'}")


def _pretrain(args: argparse.Namespace) -> None:
    from fed_userllm.runtime import set_threads
    from fed_userllm.train.centralized import pretrain

    config = settings_from_args(PretrainConfig, args)
    set_threads(args.threads)
    print(json.dumps(pretrain(config, args.out, resume=args.resume), indent=2))
    print(f"run directory: {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    from fed_userllm.runtime import set_threads
    from fed_userllm.train.centralized import evaluate_run

    set_threads(args.threads)
    print(json.dumps(evaluate_run(args.run_dir, args.split, args.mask_seen, args.device), indent=2))


def _audit(args: argparse.Namespace) -> int:
    from fed_userllm.privacy.audit import audit
    from fed_userllm.rundir import RunDir

    report = audit(args.run_dir, expected_head_hash=args.head)
    text, as_json = report.to_text(), report.to_json()
    failed = not report.ok
    if args.empirical:
        from fed_userllm.privacy.canaries import empirical_audit

        phases = empirical_audit(args.run_dir)
        failed |= any(p.exceeds_bound for p in phases)
        text += "\nEmpirical privacy (one-shot canary audit; an estimate for the final model, not a bound):\n"
        text += "\n".join(p.to_text() for p in phases)
        as_json = json.dumps({**json.loads(as_json), "empirical": [p.to_dict() for p in phases]}, indent=2)
    print(as_json if args.json else text)
    if Path(args.run_dir).is_dir():
        RunDir(args.run_dir).write_audit(as_json, text)
    return 1 if failed else 0


def _runs(args: argparse.Namespace) -> None:
    from fed_userllm.rundir import LATEST, list_runs

    listed = list_runs(args.root)
    if not listed:
        print(f"no runs in {args.root}")
    for run, kind in listed:
        print(f"{kind:<14} {run.path}")
    latest = Path(args.root) / LATEST
    if latest.is_symlink():
        print(f"{LATEST}: {latest.resolve()}")


def _release(args: argparse.Namespace) -> None:
    from fed_userllm.server.release import release

    print(f"released {args.run_dir} -> {release(args.run_dir, args.out)}")


def _contextualize(args: argparse.Namespace) -> None:
    from fed_userllm.runtime import set_threads
    from fed_userllm.train.contextualize import contextualize

    config = settings_from_args(ContextualizeConfig, args)
    set_threads(args.threads)
    print(json.dumps(contextualize(config, args.out, resume=args.resume), indent=2))
    print(f"run directory: {args.out}")


def _evaluate_llm(args: argparse.Namespace) -> None:
    from fed_userllm.runtime import set_threads
    from fed_userllm.train.contextualize import evaluate_llm

    set_threads(args.threads)
    print(json.dumps(evaluate_llm(args.run_dir, args.split, args.num_users, args.device), indent=2))


def _export(args: argparse.Namespace) -> None:
    require("export")
    from fed_userllm.export.build import ParityError, export_encoder

    try:
        manifest = export_encoder(args.run_dir, args.out, args.quantize, dataset=args.dataset, max_len=args.max_len,
                                  dynamic=not args.fixed_length, parity_users=args.parity_users)
    except ParityError as err:
        raise ValueError(f"export refused, parity check failed: {err}") from err
    print(json.dumps({k: manifest[k] for k in manifest if k in ("pte", "parity", "delegation", "dtype")},
                     indent=2, default=str))
    print(f"artifact: {args.out}")


def _embed(args: argparse.Namespace) -> None:
    require("export")
    from fed_userllm.export.device import embed

    result = embed(args.artifact, args.history, out=args.out)
    print(json.dumps({k: result[k] for k in ("shape", "dtype", "encoder_hash", "events_in_file", "events_used",
                                             "unknown_items")}, indent=2, default=str))
    if args.out:
        print(f"embedding written to {args.out}")


def _serve(args: argparse.Namespace) -> None:
    require("serve")
    from fed_userllm.runtime import set_threads
    from fed_userllm.serving.server import serve

    config = settings_from_args(ServingConfig, args)
    set_threads(args.threads)
    serve(args.model, config, args.host, args.port, args.api_key, args.device)


def _deploy(args: argparse.Namespace) -> int:
    import signal
    import time

    from fed_userllm.deploy import APP, LocalDeployment

    workdir = Path(args.workdir or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill PID` stops the federation like Ctrl-C
    try:
        with LocalDeployment(args.supernodes, workdir, tls=args.tls or args.auth, auth=args.auth,
                             app=args.app or APP) as fed:
            if args.run_config or not args.keep_running:
                print(f"run directory: {fed.run(args.run_config)}")
            if args.keep_running:
                print("\nThe federation keeps running. Submit runs from another terminal with\n  "
                      f"{fed.submit_command()}\nStop it (every process, by PID): Ctrl-C here, or "
                      f"`kill {os.getpid()}`.", flush=True)
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- the parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where X is a real value: a default of None means "see the help text"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


_VALUE_TYPES = {"int": int, "float": float, "str": str}


def _add_settings(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """One flag per field of a settings dataclass, with its help text, default, type and choices."""
    for f in fields(settings_class):
        flag, kind = f"--{f.name.replace('_', '-')}", str(f.type).split("|")[0].strip()
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_of(f))
        elif kind == "list[int]":
            parser.add_argument(flag, type=int, nargs="+", default=f.default, metavar="N", help=help_of(f))
        elif kind in _VALUE_TYPES:
            parser.add_argument(flag, type=_VALUE_TYPES[kind], default=f.default, choices=choices_of(f),
                                help=help_of(f))
        else:
            raise TypeError(f"{settings_class.__name__}.{f.name}: no command-line type for {f.type!r}")


def settings_from_args(settings_class: type[T], args: argparse.Namespace) -> T:
    """The settings dataclass the parsed flags describe (its own checks run here)."""
    return settings_class(**{f.name: getattr(args, f.name) for f in fields(settings_class)})


def _add_command(commands, name: str, func, help: str, verbose: argparse.ArgumentParser) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                  formatter_class=_HelpFormatter, parents=[verbose])
    command.set_defaults(func=func, command_parser=command)
    return command


def _add_trainer_options(sub: argparse.ArgumentParser, config, example: str) -> None:
    """A centralized trainer's options: its run directory, resume, threads and every setting of ``config``."""
    sub.add_argument("--out", required=True, help=f"run directory (e.g. {example})")
    sub.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                     help="continue the run in --out from its last checkpoint")
    sub.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    _add_settings(sub, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fed-userllm", description=fed_userllm.__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {fed_userllm.__version__}")
    verbose_help = "also show third-party warnings and log messages"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    verbose = argparse.ArgumentParser(add_help=False)  # -v after the command too, without resetting a -v before it
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="inspect and prepare datasets", formatter_class=_HelpFormatter)
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    for name, func, help in (("describe", _data_describe, "print users, items, events, lengths and genres"),
                             ("prepare", _data_prepare, "write the processed splits to the cache with a manifest")):
        sub = _add_command(data_commands, name, func, help, verbose)
        sub.add_argument("--dataset", default=None, help=DATASET_HELP)
        sub.add_argument("--max-len", type=int, default=50, help="history window length in events")
        if name == "describe":
            sub.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                             help="print JSON instead of a table")
        else:
            sub.add_argument("--min-events", type=int, default=3, help="skip users with fewer events")
            sub.add_argument("--out", default=None, help="output folder (default: the user cache)")

    pre = _add_command(commands, "pretrain", _pretrain, "train a user encoder (or baseline) centrally", verbose)
    _add_trainer_options(pre, PretrainConfig, "runs/ar")

    ev = _add_command(commands, "evaluate", _evaluate, "full-ranking metrics of a run's user encoder on its own "
                                                       "dataset", verbose)
    ev.add_argument("run_dir", help=RUN_HELP)
    ev.add_argument("--split", choices=("val", "test"), default="test", help="the split evaluated")
    ev.add_argument("--mask-seen", action=argparse.BooleanOptionalAction, default=False,
                    help="exclude items already in the history from the ranking")
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    ev.add_argument("--threads", type=int, default=1, help=THREADS_HELP)

    au = _add_command(commands, "audit", _audit, "recompute a DP run's epsilon with Opacus RDP and PRV and check "
                                                 "its ledger", verbose)
    au.add_argument("run_dir", help="run directory (or its privacy_ledger.jsonl)")
    au.add_argument("--json", action=argparse.BooleanOptionalAction, default=False, help="print JSON instead of text")
    au.add_argument("--head", default=None, help="expected ledger head hash, kept outside the run directory "
                                                 "(default: not checked)")
    au.add_argument("--empirical", action=argparse.BooleanOptionalAction, default=False,
                    help="also estimate epsilon from the run's canaries (one-shot audit) beside the bound")

    lst = _add_command(commands, "runs", _runs, "list the runs in a folder, newest first, and what latest points "
                                                "at", verbose)
    lst.add_argument("root", nargs="?", default="runs", help="folder holding run directories")

    rel = _add_command(commands, "release", _release, "copy out of a finished DP run only what its (epsilon, "
                                                      "delta) covers", verbose)
    rel.add_argument("run_dir", help="Flower run directory")
    rel.add_argument("--out", required=True, help="new folder for the public release")

    ctx = _add_command(commands, "contextualize", _contextualize, "train User-LLM (frozen LLM + encoder + "
                                                                  "projection) on a task", verbose)
    _add_trainer_options(ctx, ContextualizeConfig, "runs/userllm")

    evl = _add_command(commands, "evaluate-llm", _evaluate_llm, "task metrics of a contextualize or Flower run's "
                                                                "User-LLM", verbose)
    evl.add_argument("run_dir", help=RUN_HELP)
    evl.add_argument("--split", choices=("val", "test"), default="test", help="the split evaluated")
    evl.add_argument("--num-users", type=int, default=None, help="users evaluated (default: the run's eval_users)")
    evl.add_argument("--device", default="auto", help=DEVICE_HELP)
    evl.add_argument("--threads", type=int, default=1, help=THREADS_HELP)

    exp = _add_command(commands, "export", _export, "export a trained AR encoder to an ExecuTorch .pte + manifest",
                       verbose)
    exp.add_argument("run_dir", help=RUN_HELP)
    exp.add_argument("--out", required=True, help="artifact folder (e.g. artifacts/ar)")
    exp.add_argument("--quantize", choices=("int8",), default=None, help="int8 weights (default: float32)")
    exp.add_argument("--dataset", default=None, help="dataset of a model folder outside any run (default: the "
                                                     "run's)")
    exp.add_argument("--max-len", type=int, default=None,
                     help="longest on-device history in events (default: the run's)")
    exp.add_argument("--fixed-length", action=argparse.BooleanOptionalAction, default=False,
                     help="lower for exactly --max-len events instead of any length up to it")
    exp.add_argument("--parity-users", type=int, default=1000,
                     help="validation histories compared between the .pte and the eager model")

    emb = _add_command(commands, "embed", _embed, "on-device path: a user embedding from a history CSV with the "
                                                  ".pte only", verbose)
    emb.add_argument("--artifact", required=True, help="artifact folder written by `export`")
    emb.add_argument("--history", required=True, help="CSV with movieId,rating,timestamp")
    emb.add_argument("--out", default=None, help="output .json (the serving API's user object) or .npy "
                                                 "(default: print the summary only)")

    srv = _add_command(commands, "serve", _serve, "serve a contextualize or Flower run's User-LLM over HTTP "
                                                  "(OpenAI-compatible chat completions, Prometheus metrics)", verbose)
    srv.add_argument("--model", required=True, help=RUN_HELP)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    srv.add_argument("--api-key", default=None, help="bearer token required on every endpoint but /healthz "
                                                     "(default: env FED_USERLLM_API_KEY, else none)")
    srv.add_argument("--device", default="auto", help=DEVICE_HELP)
    srv.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    _add_settings(srv, ServingConfig)

    dep = _add_command(commands, "deploy", _deploy, "run the Flower app on a local SuperLink + N SuperNodes "
                                                    "(Deployment Engine, loopback), then stop every process started",
                       verbose)
    dep.add_argument("--supernodes", type=int, required=True,
                     help="SuperNodes, one per partition: dataset users / users-per-client")
    dep.add_argument("--run-config", default="", help="run config overrides, e.g. \"dataset='synthetic:users=3' "
                                                      "num-rounds=2\" (max-in-flight=0 unless given)")
    dep.add_argument("--workdir", default=None, help="logs, FLWR_HOME, certificates, keys and runs "
                                                     "(default: runs/deploy-<timestamp>)")
    dep.add_argument("--tls", action=argparse.BooleanOptionalAction, default=False,
                     help="generate a CA + certificate, serve the SuperLink over TLS")
    dep.add_argument("--auth", action=argparse.BooleanOptionalAction, default=False,
                     help="SuperNode authentication (implies --tls): one key pair per SuperNode, registered with "
                          "the SuperLink")
    dep.add_argument("--keep-running", action=argparse.BooleanOptionalAction, default=False,
                     help="keep the federation up for `flwr run` from other terminals until Ctrl-C / SIGTERM")
    dep.add_argument("--app", default=None, help="Flower app folder (default: simulations/movielens)")
    return parser


# ---------------------------------------------------------------------------------------------- running


@contextmanager
def console(verbose: bool) -> Iterator[None]:
    """While a command runs, the project's warnings and log records (``fed_userllm.*``) reach stderr, other
    libraries' only with ``verbose``. Torch and transformers read their verbosity from the environment when
    imported; the other libraries' loggers inherit the root logger's level (torchao's "Failed to load ... .so"
    lines are such records). Everything is restored afterwards (``main`` also runs inside tests)."""
    root, project = logging.getLogger(), logging.getLogger("fed_userllm")
    saved = root.level, project.level, {name: os.environ.get(name) for name in QUIET_ENV}
    handler = logging.StreamHandler()  # a root handler of our own also makes Opacus's logging.basicConfig a no-op
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    project.setLevel(logging.INFO)
    with warnings.catch_warnings():
        if verbose:
            warnings.simplefilter("default")
        else:
            root.setLevel(logging.ERROR)
            for name, value in QUIET_ENV.items():
                os.environ.setdefault(name, value)
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=r"fed_userllm\b")
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(saved[0])
            project.setLevel(saved[1])
            for name, value in saved[2].items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` with each setting written as the user typed it: ``encoder_lr=-1`` -> ``--encoder-lr=-1``,
    ``perceiver=False`` -> ``--no-perceiver``."""
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    if not flags:
        return message
    pattern = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))

    def rename(match: re.Match) -> str:
        action, value = flags[match.group(1)], match.group(2)
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction) and value:
            return flag if value == "True" else f"--no-{flag.removeprefix('--')}"
        return f"{flag}={value or ''}"

    return re.sub(rf"(?<![\w./-])({pattern})=(?:(True|False)\b)?", rename, message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with console(args.verbose):
            return args.func(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError, MissingExtra) as err:  # incl. DataError, a ValueError
        print(f"error: {flag_names(str(err), args.command_parser)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
