"""A cached load of a dataset that renders SVGs: what the render cache's checks cost per load.

    python -m bench.svg_cache [--dataset emoji] [--repeat 3]

One warm load (imports, the page cache, renders of anything not yet cached), then `--repeat` timed
loads, printed with the machine's load average. To compare two versions, run it from each checkout in
turn, alternating, on the same machine (docs/datasets.md, "The render cache").
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from m3jepa.data import get_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="emoji", help="a dataset that renders SVGs: emoji or tuxpaint-all")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    get_dataset(args.dataset)  # warm
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        get_dataset(args.dataset)
        times.append(time.perf_counter() - start)
    print(f"{args.dataset}: cached load {statistics.median(times):.2f} s median of "
          f"{' '.join(f'{t:.2f}' for t in times)}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
