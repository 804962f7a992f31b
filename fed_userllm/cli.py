"""The ``fed-userllm`` command line. Each subcommand imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from fed_userllm.data.movielens import DataError


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
    print(f"train vocab    {info['train_item_vocab']:,} item ids (incl. 3 reserved), from training events only")
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
    from fed_userllm.train.centralized import PretrainConfig, pretrain

    set_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k in PretrainConfig.__dataclass_fields__ and v is not None}
    results = pretrain(PretrainConfig(**settings), args.out, resume=args.resume)
    print(json.dumps(results, indent=2))
    print(f"run directory: {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    from fed_userllm.runtime import set_threads
    from fed_userllm.train.centralized import evaluate_run

    set_threads(args.threads)
    print(json.dumps(evaluate_run(args.run_dir, args.split, args.mask_seen, args.device), indent=2))


def _audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fed_userllm.privacy.audit import audit
    from fed_userllm.runtime import atomic_write_bytes

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
        atomic_write_bytes(Path(args.run_dir) / "privacy_audit.json", as_json.encode())
        atomic_write_bytes(Path(args.run_dir) / "privacy_audit.txt", text.encode())
    return 1 if failed else 0


def _release(args: argparse.Namespace) -> None:
    from fed_userllm.server.release import release

    print(f"released {args.run_dir} -> {release(args.run_dir, args.out)}")


def _contextualize(args: argparse.Namespace) -> None:
    from fed_userllm.runtime import set_threads
    from fed_userllm.train.contextualize import ContextualizeConfig, contextualize

    set_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k in ContextualizeConfig.__dataclass_fields__}
    print(json.dumps(contextualize(ContextualizeConfig(**settings), args.out, resume=args.resume), indent=2))
    print(f"run directory: {args.out}")


def _evaluate_llm(args: argparse.Namespace) -> None:
    from fed_userllm.runtime import set_threads
    from fed_userllm.train.contextualize import evaluate_llm

    set_threads(args.threads)
    print(json.dumps(evaluate_llm(args.run_dir, args.split, args.num_users, args.device), indent=2))


def _export(args: argparse.Namespace) -> None:
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
    from fed_userllm.export.device import embed

    result = embed(args.artifact, args.history, out=args.out)
    print(json.dumps({k: result[k] for k in ("shape", "dtype", "encoder_hash", "events_in_file", "events_used",
                                             "unknown_items")}, indent=2, default=str))
    if args.out:
        print(f"embedding written to {args.out}")


def _serve(args: argparse.Namespace) -> None:
    from fed_userllm.runtime import set_threads
    from fed_userllm.server.serving import serve

    set_threads(args.threads)
    serve(args.model, args.host, args.port, args.api_key, args.device, max_batch_size=args.max_batch_size,
          max_wait_ms=args.max_wait_ms, max_new_tokens=args.max_new_tokens)


def _deploy(args: argparse.Namespace) -> int:
    import os
    import signal
    import time
    from pathlib import Path

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


def _add_dataclass_options(parser: argparse.ArgumentParser, config_class, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of a settings dataclass, typed by its default."""
    for name, field in config_class.__dataclass_fields__.items():
        if name in skip:
            continue
        default = field.default
        flag = f"--{name.replace('_', '-')}"
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=default,
                                help="true/false")
        elif "list[int]" in str(field.type):
            parser.add_argument(flag, type=int, nargs="+", default=default, help="integers")
        else:
            kind = type(default) if default is not None else next(
                (t for t in (float, int) if t.__name__ in str(field.type)), str)
            parser.add_argument(flag, type=kind, default=default)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fed-userllm", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect and prepare datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    dataset_help = ("ml-latest-small (embedded, default), a GroupLens name (ml-100k, ml-1m, ml-10m, ml-20m, "
                    "ml-25m, ml-32m, ml-latest: downloaded), 'synthetic:users=N,items=M', or a folder path")
    describe = data_commands.add_parser("describe", help="print users, items, events, lengths and genres")
    describe.add_argument("--dataset", default=None, help=dataset_help)
    describe.add_argument("--max-len", type=int, default=50, help="history window length (default 50)")
    describe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    describe.set_defaults(func=_data_describe)
    prep = data_commands.add_parser("prepare", help="write the processed splits to the cache with a manifest")
    prep.add_argument("--dataset", default=None, help=dataset_help)
    prep.add_argument("--max-len", type=int, default=50, help="history window length (default 50)")
    prep.add_argument("--min-events", type=int, default=3, help="skip users with fewer events (default 3)")
    prep.add_argument("--out", default=None, help="output folder (default: the user cache)")
    prep.set_defaults(func=_data_prepare)

    from fed_userllm.train.centralized import MODEL_NAMES, PretrainConfig

    defaults = PretrainConfig()
    pre = commands.add_parser("pretrain", help="train a user encoder (or baseline) centrally",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pre.add_argument("--dataset", default=defaults.dataset, help=dataset_help)
    pre.add_argument("--model", choices=MODEL_NAMES, default=defaults.model)
    pre.add_argument("--out", required=True, help="run directory (e.g. runs/ar)")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    for name in ("max_len", "d_model", "n_layers", "n_heads", "item_dim", "epochs", "batch_size", "patience", "seed"):
        pre.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("dropout", "lr", "weight_decay", "warmup_frac"):
        pre.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    pre.add_argument("--device", default=defaults.device, help="auto (CUDA when present), cpu or cuda")
    pre.add_argument("--threads", type=int, default=1, help="torch threads")
    pre.set_defaults(func=_pretrain)

    ev = commands.add_parser("evaluate", help="full-ranking metrics of a pretraining run's best model")
    ev.add_argument("run_dir")
    ev.add_argument("--split", choices=("val", "test"), default="test")
    ev.add_argument("--mask-seen", action="store_true", help="exclude items already in the history from ranking")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--threads", type=int, default=1)
    ev.set_defaults(func=_evaluate)

    au = commands.add_parser("audit", help="recompute a DP run's epsilon with Opacus RDP and PRV and check its ledger")
    au.add_argument("run_dir", help="run directory (or its privacy_ledger.jsonl)")
    au.add_argument("--json", action="store_true", help="print JSON instead of text")
    au.add_argument("--head", default=None, help="expected ledger head hash, kept outside the run directory")
    au.add_argument("--empirical", action="store_true",
                    help="also estimate epsilon from the run's canaries (one-shot audit) beside the bound")
    au.set_defaults(func=_audit)

    rel = commands.add_parser("release", help="copy out of a finished DP run only what its (epsilon, delta) covers")
    rel.add_argument("run_dir", help="Flower run directory")
    rel.add_argument("--out", required=True, help="new folder for the public release")
    rel.set_defaults(func=_release)

    from fed_userllm.train.contextualize import ContextualizeConfig

    ctx = commands.add_parser("contextualize", help="train User-LLM (frozen LLM + encoder + projection) on a task",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ctx.add_argument("--out", required=True, help="run directory (e.g. runs/userllm)")
    ctx.add_argument("--resume", action="store_true")
    ctx.add_argument("--threads", type=int, default=1)
    _add_dataclass_options(ctx, ContextualizeConfig)
    ctx.set_defaults(func=_contextualize)

    evl = commands.add_parser("evaluate-llm", help="task metrics of a contextualization run or a Flower run's userllm/")
    evl.add_argument("run_dir")
    evl.add_argument("--split", choices=("val", "test"), default="test")
    evl.add_argument("--num-users", type=int, default=None, help="default: the run's eval_users")
    evl.add_argument("--device", default="auto")
    evl.add_argument("--threads", type=int, default=1)
    evl.set_defaults(func=_evaluate_llm)

    exp = commands.add_parser("export", help="export a trained AR encoder to an ExecuTorch .pte + manifest")
    exp.add_argument("run_dir", help="pretraining/federated run dir (best/ or final/) or a model folder")
    exp.add_argument("--out", required=True, help="artifact folder (e.g. artifacts/ar)")
    exp.add_argument("--quantize", choices=("int8",), default=None)
    exp.add_argument("--dataset", default=None, help="dataset of a bare model folder")
    exp.add_argument("--max-len", type=int, default=None)
    exp.add_argument("--fixed-length", action="store_true", help="static max_len instead of a dynamic length")
    exp.add_argument("--parity-users", type=int, default=1000)
    exp.set_defaults(func=_export)

    emb = commands.add_parser("embed", help="on-device path: user embedding from a history CSV with the .pte only")
    emb.add_argument("--artifact", required=True)
    emb.add_argument("--history", required=True, help="CSV with movieId,rating,timestamp")
    emb.add_argument("--out", default=None, help="output .json (the serving API's request body) or .npy")
    emb.set_defaults(func=_embed)

    srv = commands.add_parser("serve", help="serve a contextualization run over HTTP (FastAPI)")
    srv.add_argument("--model", required=True, help="contextualization run directory")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="bearer token (or env FED_USERLLM_API_KEY)")
    srv.add_argument("--device", default="auto")
    srv.add_argument("--max-batch-size", type=int, default=16, help="1 disables batching")
    srv.add_argument("--max-wait-ms", type=float, default=20)
    srv.add_argument("--max-new-tokens", type=int, default=64)
    srv.add_argument("--threads", type=int, default=1)
    srv.set_defaults(func=_serve)

    dep = commands.add_parser("deploy", help="run the Flower app on a local SuperLink + N SuperNodes (Deployment "
                                             "Engine, loopback), then stop every process started")
    dep.add_argument("--supernodes", type=int, required=True,
                     help="SuperNodes, one per partition: dataset users / users-per-client")
    dep.add_argument("--run-config", default="", help="run config overrides, e.g. \"dataset='synthetic:users=3' "
                                                      "num-rounds=2\" (max-in-flight=0 unless given)")
    dep.add_argument("--workdir", default=None, help="logs, FLWR_HOME, certificates, keys and runs "
                                                     "(default runs/deploy-<timestamp>)")
    dep.add_argument("--tls", action="store_true", help="generate a CA + certificate, serve the SuperLink over TLS")
    dep.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls): one key pair "
                                                         "per SuperNode, registered with the SuperLink")
    dep.add_argument("--keep-running", action="store_true",
                     help="keep the federation up for `flwr run` from other terminals until Ctrl-C / SIGTERM")
    dep.add_argument("--app", default=None, help="Flower app folder (default simulations/movielens)")
    dep.set_defaults(func=_deploy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        return args.func(args) or 0
    except (DataError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
