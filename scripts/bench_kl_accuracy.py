"""How accurate is the per-token KL for a good quantization? Float64 oracle against the
float32 E_p[r] sum lmeval used before 0.4 and the term-wise sum of `lmeval.core.divergence`.

    python scripts/bench_kl_accuracy.py [--vocab V] [--rows N] [--noise S] [--offset O]

Synthetic logits: a base with a peaked head (std 2.5, 50 tokens raised by 6) and a copy
with Gaussian noise of std ``--noise`` on every logit (0.004: int8-like, mean KL ~1e-5 nats)
plus a constant ``--offset`` (which changes no probability). Reports, per token, the largest
and mean absolute error of KL(P || Q) and of the acceptance rate, and ns per logit.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmeval.core.divergence import divergence_statistics


def float32_e_p_sum(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The pre-0.4 arithmetic: E_p[w - z] - c, each summed in float32."""
    z_max, w_max = z.max(1).values, w.max(1).values
    d = w - z
    e_z, e_w = (z - z_max[:, None]).exp(), (w - w_max[:, None]).exp()
    s_z, s_w = e_z.sum(1), e_w.sum(1)
    c = (w_max - z_max) + torch.log(s_w / s_z)
    return ((e_w * d).sum(1) / s_w - c).clamp_min(0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.004)
    parser.add_argument("--offset", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.vocab, generator=g) * 2.5  # base
    w[:, :50] += 6.0
    z = w + torch.randn(args.rows, args.vocab, generator=g) * args.noise + args.offset  # quantized
    y = torch.randint(0, args.vocab, (args.rows,), generator=g)
    log_q, log_p = torch.log_softmax(z.double(), 1), torch.log_softmax(w.double(), 1)
    kl64 = (log_p.exp() * (log_p - log_q)).sum(1)
    acc64 = torch.minimum(log_p.exp(), log_q.exp()).sum(1)
    print(
        f"V = {args.vocab}, {args.rows} tokens, mean KL {kl64.mean():.3e} nats, mean 1 - acceptance {1 - acc64.mean():.3e}"
    )
    for name, run in (
        ("float32 E_p[r]", lambda: (float32_e_p_sum(z, w), None)),
        ("term-wise (lmeval)", lambda: (lambda s: (s.kl, s.acceptance))(divergence_statistics(z, w, y))),
    ):
        run()
        started = time.perf_counter()
        kl, acc = run()
        ns = (time.perf_counter() - started) * 1e9 / z.numel()
        err = (kl.double() - kl64).abs()
        line = f"  {name:20s} KL error max {err.max():.2e} mean {err.mean():.2e} nats"
        if acc is not None:
            line += f"; acceptance error max {(acc.double() - acc64).abs().max():.2e}"
        print(f"{line}; {ns:.1f} ns/logit")


if __name__ == "__main__":
    main()
