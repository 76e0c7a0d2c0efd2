"""Shared parts of the word-count job scripts: the map and reduce functions,
the command line, and the timed run loop with its JSON output."""
import argparse
import json
import time
import zlib
from collections import Counter

from wordcount_text import chunks, digest, generate


def map_chunk(chunk: bytes, reducers: int) -> list:
    """Count the words of one chunk; split the counts into `reducers`
    partition dicts by crc32(word) % reducers (never hash(): it differs
    between processes)."""
    parts = [{} for _ in range(reducers)]
    for word, n in Counter(chunk.split()).items():
        parts[zlib.crc32(word) % reducers][word] = n
    return parts


def merge(*dicts) -> dict:
    """Reduce: add up partition dicts (all from the same partition)."""
    total = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def parse_args(extra=None):
    """The common options; extra(parser) may add script-specific ones."""
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=1000,
                   help="text size: target_bytes = MB * 1_000_000")
    p.add_argument("--mappers", type=int, default=32)
    p.add_argument("--reducers", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeat", type=int, default=3)
    if extra:
        extra(p)
    return p.parse_args()


def run(system: str, args, job, extra_fields=None) -> bool:
    """Generate the text (not timed), then `args.repeat` times: split it into
    chunks and call job(pieces) -> list of R disjoint dicts, merged here into
    the final dict; that whole span is timed. Prints one JSON line per run and
    returns False if any run's counts differ from the first run's.
    extra_fields (a dict) is added to each JSON line."""
    text = generate(args.mb * 1_000_000, args.seed)
    first, ok = None, True
    for i in range(1, args.repeat + 1):
        t0 = time.perf_counter()
        pieces = chunks(text, args.mappers)
        final = {}
        for d in job(pieces):
            final.update(d)   # partitions have disjoint keys
        seconds = time.perf_counter() - t0
        del pieces
        line = {
            "system": system, "mb": args.mb, "mappers": args.mappers,
            "reducers": args.reducers, "run": i,
            "seconds": round(seconds, 3),
            "mb_per_s": round(len(text) / 1e6 / seconds, 2),
            "words": sum(final.values()), "distinct": len(final),
            "digest": digest(final), **(extra_fields or {})}
        print(json.dumps(line), flush=True)
        if first is None:
            first = final
        elif final != first:
            ok = False
            print(f"ERROR: run {i} counts differ from run 1", flush=True)
    return ok
