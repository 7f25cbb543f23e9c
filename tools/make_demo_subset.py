"""Cut the bundled demo subset out of a full corpus build (``lass-sparse corpus build``):
the first N training pairs of each language pair (the files are already shuffled) and the first
lines of the multi-way valid/test sets, gzip-compressed deterministically.

    python tools/make_demo_subset.py ../shared/corpus lass_sparse/data/demo --train 3000
"""

from __future__ import annotations

import argparse
import gzip
import os


def _copy_head(src: str, dst: str, n: int) -> int:
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(n), f)]
    with open(dst, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as g:
        g.write("".join(lines).encode("utf-8"))
    return len(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--valid", type=int, default=200)
    ap.add_argument("--test", type=int, default=300)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for name in sorted(os.listdir(a.corpus)):
        if name.startswith("train.") and name.endswith(".tsv.gz"):
            n = _copy_head(os.path.join(a.corpus, name), os.path.join(a.out, name), a.train)
            print(name, n)
    for split, n in (("valid", a.valid), ("test", a.test)):
        name = f"{split}.tsv.gz"
        print(name, _copy_head(os.path.join(a.corpus, name), os.path.join(a.out, name), n + 1))


if __name__ == "__main__":
    main()
