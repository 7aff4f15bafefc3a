"""``python -m benchmarks run --suite small|full`` — see :mod:`benchmarks.suite`."""

import argparse

from .suite import SUITES, markdown, run, screening_markdown


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="PLOT vs guided DAS vs Full DAS benchmarks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a suite and write benchmarks/results/<suite>.{json,md,png}")
    r.add_argument("--suite", choices=sorted(SUITES), default="small")
    r.add_argument("--seeds", type=int, default=None, help="override the suite's number of seeds")
    r.add_argument("--tasks", nargs="+", default=None)
    r.add_argument("--device", default="auto")
    r.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    payload = run(args.suite, args.seeds, args.tasks, args.device, args.out)
    print(markdown(payload["rows"]))
    print(screening_markdown(payload["screening"]))
    print(f"wall {payload['wall_s']:.0f}s on {payload['device']}")


main()
