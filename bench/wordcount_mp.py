"""Word count on multiprocessing.Pool(2).

The pool is created (fork) before the text is generated, so the workers do
not inherit it; every chunk is pickled to a worker. Map: pool.imap_unordered
over the chunks (chunksize 1), each returning R partition dicts to the
parent. Reduce: R pool tasks (starmap), each sent the M dicts of its
partition, merge them; the parent joins the R disjoint results.

    /tmp/benchvenv/bin/python bench/wordcount_mp.py --mb 50 --repeat 2
"""
import functools
import multiprocessing as mp
import sys

from wordcount_common import map_chunk, merge, parse_args, run


def job(pool, pieces, reducers):
    mapper = functools.partial(map_chunk, reducers=reducers)
    maps = list(pool.imap_unordered(mapper, pieces, chunksize=1))
    groups = [[m[j] for m in maps] for j in range(reducers)]
    return pool.starmap(merge, groups, chunksize=1)


def main():
    args = parse_args()
    with mp.get_context("fork").Pool(2) as pool:
        ok = run("multiprocessing", args,
                 lambda pieces: job(pool, pieces, args.reducers))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
