"""Word count on Ray (tasks + object refs).

Each chunk is ray.put into the object store; M map tasks each return R
partition dicts as R separate object refs (num_returns=R); R reduce tasks
each receive the M refs of their partition and merge them.

    /tmp/benchvenv/bin/python bench/wordcount_ray.py --mb 50 --repeat 2
"""
import sys

import ray

from wordcount_common import map_chunk, merge, parse_args, run


@ray.remote
def map_task(chunk, reducers):
    parts = map_chunk(chunk, reducers)
    # With num_returns=R a task returns R values; for R == 1 just the one.
    return tuple(parts) if reducers > 1 else parts[0]


@ray.remote
def reduce_task(*parts):
    return merge(*parts)   # Ray resolves the ref arguments to dicts


def job(pieces, reducers):
    chunk_refs = [ray.put(c) for c in pieces]
    map_refs = []
    for ref in chunk_refs:
        out = map_task.options(num_returns=reducers).remote(ref, reducers)
        map_refs.append(out if reducers > 1 else [out])
    reduce_refs = [reduce_task.remote(*[m[j] for m in map_refs])
                   for j in range(reducers)]
    return ray.get(reduce_refs)


def main():
    args = parse_args()
    # Started before the text is generated; the dashboard is left off so it
    # does not compete for the 2 cores.
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        ok = run("ray", args, lambda pieces: job(pieces, args.reducers))
    finally:
        ray.shutdown()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
