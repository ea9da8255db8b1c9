"""A CPU kernel for the per-token reductions: every statistic of a chunk of logits, the
temperature grid included, in two reads of each row.

Why: eager ATen runs each reduction as its own pass over the (N, V) chunk (about ten
without a temperature grid, and four more per temperature other than 1.0), and a chunk is
larger than the caches, so each pass streams it from memory. This kernel reads a row once
for its max, the target's rank and the row sum, and once more for everything built on
``d = z - max z``: ``sum e^d``, ``sum e^2d``, ``sum e^d d`` and ``sum e^(d / T)`` at each
temperature, one cache-resident block of the row at a time. Each loop over a block is one
reduction, written so that the compiler vectorises it: the exponential is inlined (Cephes'
``expf``, within 2 ulp of float32's), and the block's max is taken as if no NaN were there.
Sums are taken in float32 within a block of 512 logits and in float64 across blocks.

It is C, compiled once per machine with the system's C compiler and cached (a file named by
the hash of the source, the compiler's version and the CPU's flags, since it is built for
the CPU it runs on), then loaded with ctypes; rows are split over ``torch.get_num_threads()``
threads (ctypes releases the GIL). Where there is no compiler, or the build or
its self-check against float64 fails, `library` returns None and the reductions run in ATen,
as before. ``LMEVAL_KERNELS=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Columns of the kernel's (N, 7 + K) float64 output, per row.
COLUMNS = ("max", "above", "sum_z", "s", "s2", "sd", "var")
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#define BLK 512

/* e^x for x <= 0 (d = z - max z, times 1 / T > 0): Cephes' expf (within 2 ulp), inlined so
   that the loops around it vectorise with no call; below -87.3, under float32's normal range,
   it is 0. A NaN stays NaN. */
static inline float exp_le0(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  const float n = __builtin_rintf(xc * 1.44269504088896341f);
  const float f = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * f + 1.3981999507E-3f;
  p = p * f + 8.3334519073E-3f;
  p = p * f + 4.1665795894E-2f;
  p = p * f + 1.6666665459E-1f;
  p = p * f + 5.0000001201E-1f;
  const float y = p * f * f + f + 1.0f;
  /* 2^n built in the exponent's bits; a NaN's n is replaced so that no NaN is cast to int (y is NaN) */
  union { uint32_t i; float f; } scale = { .i = (uint32_t)((int32_t)(n == n ? n : 0.0f) + 127) << 23 };
  return x < -87.3f ? 0.0f : y * scale.f;
}

/* The largest of x[0, n) and m, compiled as if no NaN were there so that it vectorises (without
   that, GCC keeps a max reduction scalar). A NaN logit still makes the sums below NaN, which is
   what the scorer's finite check reads. */
__attribute__((noinline, optimize("finite-math-only"))) static float block_max(const float *x, int64_t n, float m) {
  for (int64_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
  return m;
}

/* Rows [0, n) of z (n, V) row-major; zy[i] is row i's target logit; inv_t[k] = 1 / T_k.
   out (n, 7 + K): max, #(z > zy), sum z, s = sum e^d, sum e^2d, sum e^d d, sum e^d (d - mu)^2
   (moments only; mu = sum e^d d / s), then sum e^(d inv_t[k]) for each k, with d = z - max.
   Each loop below is a single reduction over a block in L1, so that each vectorises. */
void lmeval_reduce_rows(const float *z, int64_t n, int64_t V, const float *zy, const float *inv_t,
                        int64_t K, int32_t moments, double *out) {
  float d[BLK], e[BLK];
  const int64_t width = 7 + K;
  for (int64_t i = 0; i < n; i++) {
    const float *r = z + i * V;
    double *o = out + i * width;
    const float y = zy[i];
    float m = r[0];
    int64_t above = 0;
    double sz = 0.0;
    for (int64_t b = 0; b < V; b += BLK) {
      const int64_t nb = V - b < BLK ? V - b : BLK;
      const float *x = r + b;
      float bs = 0.0f, ba = 0.0f; /* the count in float: exact below 2^24, and it vectorises */
      m = block_max(x, nb, m);
      for (int64_t j = 0; j < nb; j++) bs += x[j];
      for (int64_t j = 0; j < nb; j++) ba += x[j] > y ? 1.0f : 0.0f;
      above += (int64_t)ba; sz += bs;
    }
    double s = 0.0, s2 = 0.0, sd = 0.0;
    for (int64_t k = 0; k < K; k++) o[7 + k] = 0.0;
    for (int64_t b = 0; b < V; b += BLK) {
      const int64_t nb = V - b < BLK ? V - b : BLK;
      float bs = 0.0f, bs2 = 0.0f, bsd = 0.0f;
      for (int64_t j = 0; j < nb; j++) d[j] = r[b + j] - m;
      for (int64_t j = 0; j < nb; j++) e[j] = exp_le0(d[j]);
      /* e > 0: a logit of -inf has probability 0 and adds 0 * log 0 = 0, not NaN */
      for (int64_t j = 0; j < nb; j++) { bs += e[j]; bs2 += e[j] * e[j]; bsd += e[j] > 0.0f ? e[j] * d[j] : 0.0f; }
      s += bs; s2 += bs2; sd += bsd;
      for (int64_t k = 0; k < K; k++) {
        const float a = inv_t[k];
        float bt = 0.0f;
        for (int64_t j = 0; j < nb; j++) e[j] = exp_le0(d[j] * a);
        for (int64_t j = 0; j < nb; j++) bt += e[j];
        o[7 + k] += bt;
      }
    }
    double var = 0.0;
    if (moments) {
      const float mu = (float)(sd / s);
      for (int64_t b = 0; b < V; b += BLK) {
        const int64_t nb = V - b < BLK ? V - b : BLK;
        float bv = 0.0f;
        for (int64_t j = 0; j < nb; j++) d[j] = r[b + j] - m;
        for (int64_t j = 0; j < nb; j++) e[j] = exp_le0(d[j]);
        for (int64_t j = 0; j < nb; j++) { const float c = d[j] - mu; bv += e[j] > 0.0f ? e[j] * c * c : 0.0f; }
        var += bv;
      }
    }
    o[0] = m; o[1] = (double)above; o[2] = sz; o[3] = s; o[4] = s2; o[5] = sd; o[6] = var;
  }
}
"""
# -ffast-math lets the float sums be reordered into vectors; -fno-finite-math-only keeps inf
# and NaN meaning what they mean (a NaN logit must reach the scorer's finite check).
# Compiled and linked in two steps: linking with -ffast-math would add crtfastmath.o, whose
# constructor turns on flush-to-zero for the whole process (every torch op in it) on load.
# On x86, vectors as wide as the CPU has: GCC stops at 256 bits by default, and 512 bits
# halve the exponentials' time where AVX-512 is there (an option x86 compilers alone know).
_WIDE = ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()
_FLAGS = ("-O3", "-march=native", *_WIDE, "-ffast-math", "-fno-finite-math-only", "-fPIC")
_LINK = ("-shared",)
_LIBS = ("-lm",)

_STATE: dict = {}  # "lib": the loaded function or None, "pool": ((pid, threads), ThreadPoolExecutor)
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LMEVAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/lmeval``,
    else ``~/.cache/lmeval``; a file per source, compiler and CPU."""
    if os.environ.get("LMEVAL_CACHE_DIR"):
        return Path(os.environ["LMEVAL_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmeval" / "kernels"


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor()
    # x86 says "flags", ARM "Features"; the first processor's line stands for all
    return next((line for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")), "")


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = "\n".join((_SOURCE, " ".join(_FLAGS + _LINK + _LIBS), version, platform.machine(), _cpu_flags()))
    target = cache_dir() / f"reductions-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "reductions.c"
        source.write_text(_SOURCE, encoding="utf-8")
        built, obj = Path(tmp) / target.name, Path(tmp) / "reductions.o"
        for step in (
            [compiler, *_FLAGS, "-c", str(source), "-o", str(obj)],
            [compiler, *_LINK, str(obj), "-o", str(built), *_LIBS],
        ):
            done = subprocess.run(step, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise OSError(done.stderr.strip()[-500:])
        os.replace(built, target)  # atomic: a concurrent process sees no half-written file
    return target


def _load():
    if os.environ.get("LMEVAL_KERNELS", "1") == "0":
        return None
    if platform.system() != "Linux":  # built, loaded and tested on Linux only
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found; the per-token reductions run in ATen (slower with a temperature grid).")
        return None
    try:
        fn = ctypes.CDLL(str(_build(compiler))).lmeval_reduce_rows
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the reductions kernel could not be built (%s); the reductions run in ATen.", exc)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, p, p, i64, ctypes.c_int32, p]
    fn.restype = None
    if not _self_check(fn):
        log.warning("the reductions kernel disagrees with float64 on a test input; the reductions run in ATen.")
        return None
    return fn


def _self_check(fn) -> bool:
    """The built kernel against float64 on a small input (a compiler that mistranslates it
    must not change a number)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1100, generator=g) * 4
    zy = z[:, 7].contiguous()
    inv_t = torch.tensor([2.0, 0.5])
    out = torch.empty(3, len(COLUMNS) + 2, dtype=torch.float64)
    fn(z.data_ptr(), 3, 1100, zy.data_ptr(), inv_t.data_ptr(), 2, 1, out.data_ptr())
    zd = z.double()
    d = zd - zd.amax(1, keepdim=True)
    q = torch.softmax(zd, 1)
    want = torch.stack(
        [
            zd.amax(1),
            (zd > zd[:, 7:8]).sum(1).double(),
            zd.sum(1),
            d.exp().sum(1),
            (2 * d).exp().sum(1),
            (d.exp() * d).sum(1),
            d.exp().sum(1) * (q * (d - (q * d).sum(1, keepdim=True)) ** 2).sum(1),
            (2 * d).exp().sum(1),
            (0.5 * d).exp().sum(1),
        ],
        1,
    )
    return bool(torch.allclose(out, want, rtol=1e-5, atol=1e-4))


def library():
    """The kernel's function (built and loaded on first use, once per process), or None."""
    with _LOCK:
        if "lib" not in _STATE:
            _STATE["lib"] = _load()
        return _STATE["lib"]


def _pool(threads: int) -> ThreadPoolExecutor:
    """The worker threads, one pool per process and thread count: a forked child (a
    multiprocessing executor) inherits the pool object but not its threads, so it gets its own."""
    key = (os.getpid(), threads)
    with _LOCK:
        held = _STATE.get("pool")
        if held is None or held[0] != key:
            if held is not None and held[0][0] == key[0]:
                held[1].shutdown(wait=False)
            held = _STATE["pool"] = (key, ThreadPoolExecutor(threads, thread_name_prefix="lmeval-reduce"))
        return held[1]


# Rows per thread below which splitting a chunk costs more than it saves.
_MIN_ROWS_PER_THREAD = 2


def reduce_rows(z: torch.Tensor, z_y: torch.Tensor, inv_t: torch.Tensor, moments: bool) -> torch.Tensor:
    """(N, V) float32 logits (C-contiguous, on the CPU), their targets' logits (N,) and
    inverse temperatures (K,) -> (N, 7 + K) float64 sums (`COLUMNS`, then one per
    temperature). Call only where `library` is not None."""
    fn = library()
    n, vocab = z.shape
    width = len(COLUMNS) + len(inv_t)
    out = torch.empty((n, width), dtype=torch.float64)
    if n == 0:
        return out
    threads = max(1, min(torch.get_num_threads(), n // _MIN_ROWS_PER_THREAD))
    step = -(-n // threads)

    def run(begin: int) -> None:
        rows = min(step, n - begin)
        fn(
            z[begin].data_ptr(),
            rows,
            vocab,
            z_y[begin].data_ptr(),
            inv_t.data_ptr(),
            len(inv_t),
            int(moments),
            out[begin].data_ptr(),
        )

    # the calling thread takes the first slice: it does not sleep while work is pending
    futures = [_pool(threads - 1).submit(run, begin) for begin in range(step, n, step)] if threads > 1 else []
    run(0)
    for future in futures:
        future.result()
    return out
