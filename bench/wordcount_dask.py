"""Word count on Dask distributed (futures).

A LocalCluster of 2 worker processes with one thread each. The chunks are
scattered to the workers; client.map runs one map task per chunk (returning
a list of R partitions); a small getitem task per (map, partition) picks
partition j out on the worker that holds the map output; R reduce tasks
merge their partition; the driver gathers the R results.

Partitions travel as pickled bytes by default. Dask serializes a plain dict
that moves between processes one entry at a time (each value with its own
header and frame), which makes moving ~16 dicts of ~12 000 words take
seconds; Ray and multiprocessing pickle each dict whole. --plain-dicts runs
the same job with plain dicts to show that cost.

    /tmp/benchvenv/bin/python bench/wordcount_dask.py --mb 50 --repeat 2
"""
import operator
import pickle
import sys

from dask.distributed import Client, LocalCluster

from wordcount_common import map_chunk, merge, parse_args, run


def map_pickled(chunk, reducers):
    return [pickle.dumps(p, protocol=5) for p in map_chunk(chunk, reducers)]


def merge_pickled(*blobs):
    return pickle.dumps(merge(*(pickle.loads(b) for b in blobs)), protocol=5)


def job(client, pieces, reducers, plain):
    map_fn, reduce_fn = (map_chunk, merge) if plain else (map_pickled,
                                                           merge_pickled)
    # hash=False / pure=False: fresh keys every run, so nothing is reused
    # from an earlier run (and the 1 GB is not hashed to make keys).
    chunk_futs = client.scatter(pieces, hash=False)
    map_futs = client.map(map_fn, chunk_futs, reducers=reducers, pure=False)
    parts = [[client.submit(operator.getitem, m, j, pure=False)
              for j in range(reducers)] for m in map_futs]
    reduce_futs = [client.submit(reduce_fn, *[p[j] for p in parts],
                                 pure=False) for j in range(reducers)]
    results = client.gather(reduce_futs)
    return results if plain else [pickle.loads(b) for b in results]


def main():
    args = parse_args(lambda p: p.add_argument(
        "--plain-dicts", action="store_true",
        help="send partitions as plain dicts instead of pickled bytes"))
    # Started before the text is generated; no dashboard (as for Ray).
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    try:
        ok = run("dask", args,
                 lambda pieces: job(client, pieces, args.reducers,
                                    args.plain_dicts),
                 {"variant": "plain-dicts"} if args.plain_dicts else None)
    finally:
        client.close()
        cluster.close()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
