"""Deterministic word-count benchmark text, shared by the Python job scripts.

The text definition is fixed to the bit so that the Rust side can produce a
byte-identical text; see bench/README.md for the definition in words.

    python3 bench/wordcount_text.py --check
prints the first 200 bytes, the length and the sha256 of generate(10_000_000)
and checks the vectorized generator against a plain per-word loop.
"""
import hashlib
import sys

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
VOCAB = 50_000        # word index k is in [0, VOCAB)
MAX_WORD = 4          # 50000 in bijective base 26 has 4 letters
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def word_of(k: int) -> bytes:
    """Word for index k: k+1 in bijective base 26 (1 -> a, 26 -> z, 27 -> aa)."""
    n, out = k + 1, []
    while n > 0:
        n -= 1
        out.append(97 + n % 26)
        n //= 26
    return bytes(reversed(out))


# ---------------------------------------------------------------- reference
def mix_scalar(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def generate_reference(target_bytes: int, seed: int = 42) -> bytes:
    """Plain per-word loop; slow, used only to check generate()."""
    out, total, i = bytearray(), 0, 0
    while True:
        h = mix_scalar((seed + (i + 1) * GOLDEN) & MASK64)
        u = (h >> 11) * 2.0 ** -53
        k = min(int(u * u * u * 50000.0), VOCAB - 1)
        out += word_of(k)
        out += b"\n" if (h >> 4) & 15 == 0 else b" "
        i += 1
        if len(out) >= target_bytes:
            return bytes(out)


# --------------------------------------------------------------- vectorized
def _token_table():
    """(2*VOCAB, MAX_WORD+1) uint8 rows: word k then its separator; row
    k is the space variant, row VOCAB+k the newline variant. Also lengths."""
    table = np.zeros((2 * VOCAB, MAX_WORD + 1), dtype=np.uint8)
    lens = np.zeros(2 * VOCAB, dtype=np.int64)
    for k in range(VOCAB):
        w = word_of(k)
        for variant, sep in ((0, 32), (1, 10)):
            row = variant * VOCAB + k
            table[row, :len(w)] = np.frombuffer(w, dtype=np.uint8)
            table[row, len(w)] = sep
            lens[row] = len(w) + 1
    return table, lens


_TABLE = None


def _mix(z):
    """mix() on a uint64 array, in place (numpy uint64 arithmetic wraps)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def generate(target_bytes: int, seed: int = 42) -> bytes:
    global _TABLE
    if _TABLE is None:
        _TABLE = _token_table()
    table, lens_of = _TABLE
    # Every token is 2..5 bytes, so the result is shorter than target + 5.
    out = np.empty(max(target_bytes, 0) + MAX_WORD + 1, dtype=np.uint8)
    pos, i = 0, 0
    seed64 = np.uint64(seed & MASK64)
    while True:
        # Enough words to reach the target (tokens are >= 2 bytes), capped.
        n = min(1 << 22, max(target_bytes - pos, 0) // 2 + 1)
        idx = np.arange(i + 1, i + n + 1, dtype=np.uint64)   # i + 1
        h = _mix(idx * np.uint64(GOLDEN) + seed64)
        u = (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        k = np.minimum((u * u * u * 50000.0).astype(np.int64), VOCAB - 1)
        newline = ((h >> np.uint64(4)) & np.uint64(15)) == 0
        rows = k + newline * VOCAB
        tlen = lens_of[rows]
        ends = pos + np.cumsum(tlen)
        # Keep tokens up to and including the first one ending at >= target.
        stop = int(np.searchsorted(ends, target_bytes))  # first end >= target
        last = stop < n
        if last:
            rows, tlen, n = rows[:stop + 1], tlen[:stop + 1], stop + 1
        tok = table[rows]                                  # (n, 5)
        keep = np.arange(MAX_WORD + 1) < tlen[:, None]     # drop padding
        flat = tok[keep]                                   # row-major order
        out[pos:pos + flat.size] = flat
        pos += flat.size
        i += n
        if last:
            return out[:pos].tobytes()


# ------------------------------------------------------------------ helpers
def fnv1a64(b: bytes) -> int:
    h = FNV_OFFSET
    for c in b:
        h = ((h ^ c) * FNV_PRIME) & MASK64
    return h


def digest(counts) -> int:
    """sum of fnv1a64(word) * count mod 2^64; keys may be str or bytes."""
    total = 0
    for w, c in counts.items():
        if isinstance(w, str):
            w = w.encode()
        total = (total + fnv1a64(w) * c) & MASK64
    return total


def chunks(text: bytes, n: int) -> list:
    """About n pieces of size ceil(len/n), each end moved forward to the next
    whitespace byte so no word is cut."""
    size = max(1, -(-len(text) // max(n, 1)))
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        while end < len(text) and text[end] not in (32, 10):
            end += 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _check():
    import time
    t0 = time.perf_counter()
    text = generate(10_000_000)
    dt = time.perf_counter() - t0
    print("first 200 bytes:", repr(text[:200]))
    print("length:", len(text))
    print("sha256:", hashlib.sha256(text).hexdigest())
    print(f"generate(10_000_000) took {dt:.2f} s")
    ok = True
    for target in (0, 1, 2, 3, 4, 5, 6, 7, 1000, 200_000):
        ref = generate_reference(target)
        ok &= generate(target) == ref
    ok &= text[:len(ref)] == ref   # the 10 MB text starts with the same words
    for seed in (0, 1, 2**64 - 1):
        ok &= generate(50_000, seed) == generate_reference(50_000, seed)
    assert [word_of(k) for k in (0, 25, 26, 27, 701, 702)] == \
        [b"a", b"z", b"aa", b"ab", b"zz", b"aaa"]
    print("vectorized == reference loop:", ok)
    return ok


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(0 if _check() else 1)
    print(__doc__)
