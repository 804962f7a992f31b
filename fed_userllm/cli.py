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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        args.func(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
