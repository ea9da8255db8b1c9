"""Scale benchmark: does `lmeval run` stay flat in memory as the corpus grows, and is planning fast?

What it measures, side by side in one invocation:

1. Peak RSS of `lmeval run` against corpus size. A tiny GPT-2 (built here, see 3) scores
   corpora of 0.3M, 5M and 50M tokens, each with ``output.per_token: false`` and ``true``,
   every measurement in a fresh ``python -m lmeval run cfg.yaml ... -q`` subprocess.
   A streaming run should hold one part at a time, so its memory should not grow with the
   corpus: the printed target is RSS at the largest size <= 1.1x RSS at the smallest (same
   per_token). Peak RSS is the kernel's high-water mark of the child itself, read with
   ``os.wait4(pid)`` when it exits (``ru_maxrss``): exact, with no sampling gaps, and never a
   sum over processes (a descendant the child reaped counts only if it alone was larger).
   Each row: tokens scored (summary.csv ``n_tokens``), per_token, peak RSS MB, wall seconds
   (process start to exit: imports, model load, scoring, merge, figures), tokens per wall
   second, scoring tokens/s as summary.csv reports it, and the ratio to the smallest size's RSS.
   ``scoring.compile`` is ``false`` by default (``--compile auto`` for the user default): on
   CPU, ``auto`` turns the fused reductions on only above ~5M tokens for this vocabulary, and
   compiling's own memory would then be mistaken for the corpus's.

   ``--executor`` measures the same corpora through each way of running (issue 33): ``process``
   (the default, one process with torch's threads), ``shards`` (``--workers`` ``lmeval run
   --shard I/N`` processes at once, then ``lmeval merge``), ``torchrun`` (``--workers`` ranks)
   and ``ray`` (``--ray-actors`` ``--workers``). Their workers get one thread each
   (``OMP_NUM_THREADS=1``). Two per-core baselines are measured beside them: ``process-1t``
   (one process, one thread, pinned to one core with its background threads) alone, and
   ``process-1t-each``: ``--workers`` such processes at once, each pinned to a core of its own
   and scoring the whole corpus into its own folder. The second is what the cores deliver
   together when they share only the hardware (memory bandwidth, the last-level cache), so it
   is the printed throughput target's baseline: an executor's tokens per wall second (start to
   exit, the merge included) >= 0.9x process-1t-each's; ``x per core`` beside it is against
   ``workers`` times process-1t alone. Peak RSS there is
   the largest single process of the command's tree (driver, ranks, actors, merge): each live
   process's VmHWM polled every 0.25 s, and ``wait4``'s ``ru_maxrss`` at exit; the log lists
   every process's own peak. The RSS target
   holds per executor. ``after last`` is run.json's ``seconds_after_last_part``.

2. Planning time for many short documents: 1M documents of ~50 characters (``--plan-docs``).
   Planning is internal, so this is the one place that imports below the public API: the
   planner and its ``load_documents`` from ``lmeval.engine``. Loading the corpus and
   ``plan_parts(corpus, "independent", "\\n\\n", part_chars)`` are timed separately (the load
   is a cold read: `datasets` converts the JSONL to Arrow); the target printed is planning < 5 s.

3. The tiny model is built once per invocation in a temp dir, as tests/conftest.py does: a
   byte-level BPE tokenizer (vocabulary 512) trained on generated text, wrapped in
   ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as bos/eos, and
   ``GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=256))`` (37k
   parameters: the embeddings are tied, and a 512-token vocabulary is small), saved as
   safetensors. Corpora are JSONL documents of a few thousand characters of pseudo-random
   words (fixed seed), sized to the token target from the tokenizer's characters per token
   on a sample. Config: ``max_length: 256``, ``batch_tokens: 16384``, ``documents:
   independent``, one model (so no comparison), a fresh ``output.dir`` per measurement.

    python scripts/bench_scale.py                    # 0.3M, 5M, 50M tokens x per_token both; 1M plan docs
    python scripts/bench_scale.py --quick            # 0.05M, 0.2M tokens; 100k plan docs (smoke check)
    python scripts/bench_scale.py --tokens 300000 5000000 --per-token false --plan-docs 0
    python scripts/bench_scale.py --json scale.json --keep   # rows as JSON; keep the temp dir
    python scripts/bench_scale.py --tokens 300000 50000000 --per-token false --plan-docs 0 \
        --executor process shards torchrun ray          # each executor (and process-1t)

Progress goes to the log (stderr); the table goes to stdout. A run holds a whole part
(``output.part_chars``, 262,144 characters: ~105k tokens of this text) however small the corpus,
so the RSS ratio means something only when the smallest corpus fills a part: --quick's 0.05M
tokens does not (its ratio reads ~1.15; 0.2M -> 1M tokens measured 1.00-1.04). Timings on a
shared machine vary by 2x or more between identical runs; RSS does not.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_scale")

EOT = "<|endoftext|>"
SEED = 0
VOCAB = 512
N_WORDS = 4000  # distinct pseudo-words in the generated text
DOC_CHARS = (2000, 6000)  # document lengths of the scale corpora
PLAN_DOC_CHARS = 50
RSS_TARGET = 1.1
PLAN_TARGET_S = 5.0
DEFAULT_TOKENS = [300_000, 5_000_000, 50_000_000]
QUICK_TOKENS = [50_000, 200_000]


# ---- generated text -------------------------------------------------------------------------


class Words:
    """Pseudo-random words with Zipf-like frequencies, drawn from one seeded generator."""

    def __init__(self, seed: int = SEED):
        self.rng = np.random.default_rng(seed)
        # Words of 1-3 consonant-vowel syllables, so that BPE merges find something to merge
        # (random letters give ~1.3 characters a token at this vocabulary; English gives ~3).
        syllables = np.array([c + v for c in "bdfgklmnprstvz" for v in "aeiou"])
        lengths = self.rng.integers(1, 4, size=N_WORDS)
        self.words = np.array(["".join(self.rng.choice(syllables, size=k)) for k in lengths])
        weights = 1.0 / np.arange(1, N_WORDS + 1)
        self.p = weights / weights.sum()
        self.mean_chars = float(self.p @ (np.char.str_len(self.words) + 1))  # a word and its space

    def text(self, n_chars: int) -> str:
        """About ``n_chars`` characters of words (never fewer than one word)."""
        n_words = max(1, round(n_chars / self.mean_chars))
        words = self.words[self.rng.choice(N_WORDS, size=n_words, p=self.p)]
        return " ".join(words.tolist())


def write_jsonl(path: Path, texts) -> tuple[int, int]:
    """Write ``texts`` as ``{"id", "text"}`` lines; returns (documents, characters)."""
    n_docs = n_chars = 0
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
            n_docs += 1
            n_chars += len(text)
    return n_docs, n_chars


def scale_texts(n_chars: int, seed: int = SEED):
    """Documents of a few thousand characters until ``n_chars`` characters in all (the same
    prefix for every size)."""
    words, total = Words(seed), 0
    while total < n_chars:
        text = words.text(int(words.rng.integers(*DOC_CHARS)))
        total += len(text)
        yield text


# ---- the tiny model -------------------------------------------------------------------------


def train_tokenizer(folder: Path):
    """A byte-level BPE (GPT-2 style) trained on generated text, as tests/conftest.py builds one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sample = folder / "tokenizer_corpus.txt"
    sample.write_text("\n".join(scale_texts(400_000, seed=SEED + 1)), encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(sample)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT)


def build_model(folder: Path) -> tuple[Path, object, int]:
    """The tiny GPT-2 and its tokenizer saved (safetensors) under ``folder/model``; returns
    the folder, the tokenizer and the number of parameters."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(folder)
    torch.manual_seed(SEED)
    eot = tokenizer.eos_token_id
    config = GPT2Config(
        n_embd=32, n_layer=1, n_head=2, n_positions=256, vocab_size=len(tokenizer), bos_token_id=eot, eos_token_id=eot
    )
    model = GPT2LMHeadModel(config).eval()
    target = folder / "model"
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target, tokenizer, sum(p.numel() for p in model.parameters())


def chars_per_token(tokenizer) -> float:
    """Characters per token of the scale corpora, from a sample drawn with another seed."""
    sample = list(scale_texts(200_000, seed=SEED + 2))
    n_tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
    return sum(map(len, sample)) / n_tokens


# ---- 1. peak RSS of `lmeval run` against corpus size ----------------------------------------


def write_config(folder: Path, model_dir: Path, data: Path, compile_: str) -> Path:
    config = folder / "cfg.yaml"
    config.write_text(
        f"models: [{{name: tiny, path: {model_dir}, dtype: float32}}]\n"
        f"data: {{path: {data}, id_field: id}}\n"
        f"scoring: {{max_length: 256, batch_tokens: 16384, documents: independent, compile: {compile_}}}\n"
        f"output: {{dir: {folder / 'out'}}}\n",
        encoding="utf-8",
    )
    return config


EXECUTORS = ("process", "shards", "torchrun", "ray")
# One process pinned to one core (sched_setaffinity: its tokenizer, writer and reduction threads
# too): the per-core rate the executors' throughput is measured against. Unpinned, a one-thread
# process also runs its background threads on the other cores, and would overstate a core's rate.
PER_CORE = "process-1t"
# ``workers`` copies of PER_CORE at once, each pinned to a core of its own, each scoring the whole
# corpus into its own folder: what the machine's cores deliver together when nothing is shared but
# the hardware (memory bandwidth, the last-level cache), the ceiling of any executor.
PER_CORES = "process-1t-each"
THROUGHPUT_TARGET = 0.9
LMEVAL = [sys.executable, "-m", "lmeval"]
TEARDOWN_ABORT = "terminate called without an active exception"  # gloo's exit, after the run finished


def executor_commands(
    executor: str, config: Path, per_token: bool, out_dir: Path, workers: int
) -> list[list[list[str]]]:
    """The steps of one measurement, one after another; each step's commands run at once
    (the shards' step has several)."""
    run = [*LMEVAL, "run", str(config)]

    def options_into(folder: Path) -> list[str]:
        return [f"output.per_token={str(per_token).lower()}", f"output.dir={folder}", "-q"]

    options = options_into(out_dir)
    if executor in ("process", PER_CORE):
        return [[[*run, *options, "--overwrite"]]]
    if executor == PER_CORES:
        return [[[*run, *options_into(copy_dir(out_dir, i)), "--overwrite"] for i in range(workers)]]
    if executor == "shards":  # every share at once (a Slurm array), then the merge
        return [
            [[*run, *options, "--shard", f"{i}/{workers}"] for i in range(workers)],
            [[*LMEVAL, "merge", str(out_dir)]],
        ]
    if executor == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers)]
        rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        return [[[*launch, *rendezvous, "-m", "lmeval", "run", str(config), *options, "--overwrite"]]]
    if executor == "ray":
        return [[[*run, *options, "--overwrite", "--executor", "ray", "--ray-actors", str(workers)]]]
    raise ValueError(executor)


def copy_dir(out_dir: Path, i: int) -> Path:
    """The output folder of PER_CORES's copy ``i`` (copy 0 writes where the tables are read)."""
    return out_dir if i == 0 else out_dir.with_name(f"{out_dir.name}-copy{i}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TreeWatch:
    """The peak RSS of the largest process among a command and its descendants (ranks, Ray's
    actors): each live process's own high-water mark (VmHWM) polled every ``interval`` s, and
    ``os.wait4``'s ``ru_maxrss`` of the command (it covers the descendants it reaped) at its
    exit. A process's VmHWM only rises, so polling misses at most its last ``interval``."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.seen = interval, set()
        self.each: dict[int, tuple[int, str]] = {}  # pid -> (its own peak KiB, its label)

    def _record(self, kib: int, label: str, pid: int) -> None:
        if kib > self.each.get(pid, (0, ""))[0]:
            self.each[pid] = (kib, label)

    @property
    def peak_kib(self) -> int:
        return max((kib for kib, _ in self.each.values()), default=0)

    @property
    def largest(self) -> str:
        """Which process the peak is (a rank, a Ray actor, the driver, a merge)."""
        return max(self.each.values(), default=(0, ""))[1]

    def peaks(self) -> str:
        """Every watched process's own peak, largest first: the ranks or actors side by side."""
        ranked = sorted(self.each.items(), key=lambda item: -item[1][0])
        return "; ".join(f"{kib / 1024:.0f} MB {label} (pid {pid})" for pid, (kib, label) in ranked if kib > 50 * 1024)

    def poll(self, pid: int) -> None:
        import psutil

        try:
            tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in tree:
            try:
                with open(f"/proc/{proc.pid}/status", encoding="ascii") as status:
                    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
            except (OSError, StopIteration, ValueError):
                continue
            self._record(hwm, _label(proc), proc.pid)
            self.seen.add(proc.pid)

    def run(self, commands: list[list[str]], env: dict, log_path: Path, cpus: list[set[int]] | None = None) -> None:
        """Start every command at once (command i on ``cpus[i]`` only, when given); wait for all,
        polling their trees."""
        pins = [(lambda c=c: os.sched_setaffinity(0, c)) for c in cpus] if cpus else [None] * len(commands)
        with open(log_path, "a") as output:
            procs = [
                subprocess.Popen(c, stdout=output, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)
                for c, pin in zip(commands, pins, strict=True)
            ]
            pending = {p.pid: p for p in procs}
            while pending:
                for pid in list(pending):
                    self.poll(pid)
                    done, status, usage = os.wait4(pid, os.WNOHANG)
                    if done:
                        proc = pending.pop(pid)
                        proc.returncode = os.waitstatus_to_exitcode(status)
                        self._record(usage.ru_maxrss, "at exit: " + _words(proc.args), pid)  # KiB on Linux
                time.sleep(self.interval)
        for proc, command in zip(procs, commands):
            if proc.returncode:
                tail = log_path.read_text(errors="replace")[-3000:]
                if TEARDOWN_ABORT in tail and "torch.distributed.run" in command:
                    continue  # the ranks finished and wrote run.json; gloo aborted on the way out
                raise RuntimeError(f"exited {proc.returncode}: {' '.join(command)}\n{tail}")


def _label(proc) -> str:
    """A short name of a watched process: Ray's worker title, else its command's last words."""
    try:
        words = proc.cmdline()
    except Exception:  # it exited meanwhile
        return "?"
    title = " ".join(words).strip()  # Ray pads its workers' titles with spaces
    return title if title.startswith("ray::") else _words(words)


def _words(command: list[str]) -> str:
    return " ".join(w.rsplit("/", 1)[-1] if w.startswith("/") else w for w in command[-4:])  # paths: their last part


def run_child(executor: str, config: Path, per_token: bool, out_dir: Path, env: dict, workers: int) -> dict:
    """One measurement: (peak RSS MB of the largest process, wall seconds, processes seen)."""
    log_path = out_dir.with_suffix(".log")
    log_path.write_text("")
    if executor != "process":  # one thread per worker: the workers share the cores
        env = {**env, "OMP_NUM_THREADS": "1"}
    if executor == "shards":
        shutil.rmtree(out_dir, ignore_errors=True)  # shards resume; a measurement starts afresh
    watch = TreeWatch()
    started = time.perf_counter()
    cores = sorted(os.sched_getaffinity(0))
    cpus = {PER_CORE: [{cores[0]}], PER_CORES: [{cores[i % len(cores)]} for i in range(workers)]}.get(executor)
    for step in executor_commands(executor, config, per_token, out_dir, workers):
        watch.run(step, env, log_path, cpus)
    log.info("%s peaks: %s", executor, watch.peaks())
    return {
        "peak_rss_mb": watch.peak_kib / 1024,
        "wall_s": time.perf_counter() - started,
        "processes": len(watch.seen),
        "largest": watch.largest,
    }


def measure(
    folder: Path, config: Path, per_token: bool, env: dict, executor: str = "process", workers: int = 2
) -> dict:
    import pandas as pd

    out_dir = folder / f"out-{executor}-per_token-{str(per_token).lower()}"
    child = run_child(executor, config, per_token, out_dir, env, workers)
    summary = pd.read_csv(out_dir / "summary.csv").iloc[0]
    record = json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
    n_tokens = int(summary.n_tokens)
    copies = workers if executor == PER_CORES else 1  # each copy scored every token
    for i in range(1, copies):
        shutil.rmtree(copy_dir(out_dir, i))
    return {
        "executor": executor,
        "workers": 1 if executor in ("process", PER_CORE) else workers,
        "tokens": n_tokens,
        "per_token": per_token,
        **child,
        "tokens_per_s": copies * n_tokens / child["wall_s"],
        "scoring_tokens_per_s": float(summary.get("tokens_per_second", float("nan"))),
        "after_last_part_s": float(record.get("seconds_after_last_part", float("nan"))),
    }


def rss_rows(root: Path, model_dir: Path, cpt: float, args, env: dict) -> list[dict]:
    rows = []
    for target in args.tokens:
        folder = root / f"tokens-{target}"
        folder.mkdir()
        started = time.perf_counter()
        n_docs, n_chars = write_jsonl(folder / "docs.jsonl", scale_texts(int(target * cpt)))
        log.info(
            "corpus for %d tokens: %d documents, %.1f M characters (%.1f s)",
            target,
            n_docs,
            n_chars / 1e6,
            time.perf_counter() - started,
        )
        config = write_config(folder, model_dir, folder / "docs.jsonl", args.compile)
        for executor in args.executor:
            for per_token in args.per_token_values:
                row = {
                    "target_tokens": target,
                    "documents": n_docs,
                    **measure(folder, config, per_token, env, executor, args.workers),
                }
                log.info(
                    "%s, %d tokens, per_token=%s: peak RSS %.0f MB (%s), %.1f s",
                    executor,
                    row["tokens"],
                    per_token,
                    row["peak_rss_mb"],
                    row["largest"],
                    row["wall_s"],
                )
                rows.append(row)
        if not args.keep:  # the corpus and the tables of a 50M-token run are large
            shutil.rmtree(folder)
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's RSS over the smallest size's RSS with the same executor and per_token, and a
    multi-worker executor's throughput over ``workers`` one-thread processes: PER_CORE's rate
    times ``workers`` (``per_core_ratio``: cores alone), and PER_CORES's (``cores_ratio``: the
    cores at once, the target's baseline)."""
    for row in rows:
        same = [r for r in rows if (r["executor"], r["per_token"]) == (row["executor"], row["per_token"])]
        row["rss_ratio"] = row["peak_rss_mb"] / min(same, key=lambda r: r["target_tokens"])["peak_rss_mb"]
        scaled = row["executor"] in EXECUTORS and row["executor"] != "process"
        for key, baseline, times in (("per_core_ratio", PER_CORE, row["workers"]), ("cores_ratio", PER_CORES, 1)):
            base = [r for r in rows if r["executor"] == baseline and _size(r) == _size(row)]
            row[key] = row["tokens_per_s"] / (times * base[0]["tokens_per_s"]) if base and scaled else float("nan")
    return rows


def _size(row: dict) -> tuple:
    return row["target_tokens"], row["per_token"]


# ---- 2. planning time for many short documents ----------------------------------------------


def import_planner():
    """``(plan_parts, load_documents)`` wherever the restructuring has put them."""
    try:
        from lmeval.engine.data import load_documents
        from lmeval.engine.plan import plan_parts
    except ImportError:
        from lmeval.engine.data import load_documents
        from lmeval.engine.plan import plan_parts
    return plan_parts, load_documents


def call_plan_parts(plan_parts, corpus, part_chars: int):
    """``plan_parts(corpus, "independent", "\\n\\n", part_chars)``, by parameter name so that a
    reordered signature still works; an unknown required parameter fails with the signature."""
    signature = inspect.signature(plan_parts)
    known = {
        "corpus": corpus,
        "documents_mode": "independent",
        "documents": "independent",
        "mode": "independent",
        "separator": "\n\n",
        "part_chars": part_chars,
    }
    params = signature.parameters
    unknown = [
        n
        for n, p in params.items()
        if n not in known and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if unknown:
        raise TypeError(f"plan_parts{signature}: no value for {unknown}; adapt call_plan_parts")
    return plan_parts(**{n: known[n] for n in params if n in known})


def plan_row(root: Path, model_dir: Path, n_docs: int) -> dict:
    import lmeval

    folder = root / "plan"
    folder.mkdir()
    words = Words(SEED + 3)
    write_jsonl(folder / "docs.jsonl", (words.text(PLAN_DOC_CHARS) for _ in range(n_docs)))
    config = write_config(folder, model_dir, folder / "docs.jsonl", "false")
    loaded = lmeval.load_config(config)
    plan_parts, load_documents = import_planner()
    log.info("planning with %s.%s%s", plan_parts.__module__, plan_parts.__name__, inspect.signature(plan_parts))
    started = time.perf_counter()
    corpus = load_documents(loaded.data)
    load_s = time.perf_counter() - started
    log.info("loaded %d documents in %.1f s; planning", len(corpus.documents), load_s)
    started = time.perf_counter()
    plans = call_plan_parts(plan_parts, corpus, loaded.output.part_chars)
    plan_s = time.perf_counter() - started
    chars = sum(len(d.text) for d in corpus.documents)
    return {
        "documents": len(corpus.documents),
        "mean_chars": chars / len(corpus.documents),
        "parts": len(plans),
        "part_chars": loaded.output.part_chars,
        "load_s": load_s,
        "plan_s": plan_s,
    }


# ---- report ---------------------------------------------------------------------------------


def format_rss(rows: list[dict]) -> list[str]:
    lines = [
        (
            f"{'executor':>15} {'tokens':>10} {'per_token':>9} {'docs':>7} {'procs':>5} {'peak RSS MB':>11} "
            f"{'wall s':>8} {'tok/s (wall)':>12} {'scoring tok/s':>13} {'after last':>10} {'RSS ratio':>9} "
            f"{'x per core':>10} {'x cores':>7}"
        )
    ]
    for r in rows:
        lines.append(
            f"{r['executor']:>15} {r['tokens']:>10} {str(r['per_token']).lower():>9} {r['documents']:>7} "
            f"{r['processes']:>5} {r['peak_rss_mb']:>11.0f} {r['wall_s']:>8.1f} {r['tokens_per_s']:>12.0f} "
            f"{r['scoring_tokens_per_s']:>13.0f} {r['after_last_part_s']:>10.2f} {r['rss_ratio']:>9.2f} "
            f"{r['per_core_ratio']:>10.2f} {r['cores_ratio']:>7.2f}"
        )
    for executor, per_token in dict.fromkeys((r["executor"], r["per_token"]) for r in rows):
        same = sorted(
            (r for r in rows if (r["executor"], r["per_token"]) == (executor, per_token)),
            key=lambda r: r["target_tokens"],
        )
        ratio = same[-1]["peak_rss_mb"] / same[0]["peak_rss_mb"]
        lines.append(
            f"target ({executor}, per_token={str(per_token).lower()}): RSS at {same[-1]['tokens']} tokens <= "
            f"{RSS_TARGET}x RSS at {same[0]['tokens']}: {ratio:.2f}x {'PASS' if ratio <= RSS_TARGET else 'FAIL'}"
        )
        r = same[-1]
        if r["cores_ratio"] == r["cores_ratio"]:  # not NaN: a multi-worker executor, PER_CORES measured
            lines.append(
                f"target ({executor}, per_token={str(per_token).lower()}): throughput at {r['tokens']} tokens >= "
                f"{THROUGHPUT_TARGET}x {r['workers']} one-thread processes side by side: {r['cores_ratio']:.2f}x "
                f"{'PASS' if r['cores_ratio'] >= THROUGHPUT_TARGET else 'FAIL'} (against one such process alone, "
                f"times {r['workers']}: {r['per_core_ratio']:.2f}x)"
            )
    return lines


def format_plan(plan: dict) -> list[str]:
    verdict = "PASS" if plan["plan_s"] < PLAN_TARGET_S else "FAIL"
    return [
        (
            f"planning {plan['documents']} documents of ~{plan['mean_chars']:.0f} characters "
            f"(part_chars {plan['part_chars']}, {plan['parts']} parts): load {plan['load_s']:.2f} s, "
            f"plan_parts {plan['plan_s']:.2f} s; target plan < {PLAN_TARGET_S:.0f} s: {verdict}"
        )
    ]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS, help="corpus sizes in tokens")
    parser.add_argument("--per-token", choices=("both", "true", "false"), default="both", help="output.per_token")
    parser.add_argument("--plan-docs", type=int, default=1_000_000, help="short documents to plan (0: skip)")
    parser.add_argument("--compile", choices=("false", "auto", "true"), default="false", help="scoring.compile")
    parser.add_argument("--quick", action="store_true", help="0.05M and 0.2M tokens, 100k plan documents")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (its path is logged)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument(
        "--executor",
        nargs="+",
        choices=(PER_CORE, PER_CORES, *EXECUTORS),
        default=["process"],
        help="how `lmeval run` runs: one process (torch's threads), --shard I/N processes then `lmeval merge`, "
        "torchrun ranks, or Ray actors (one thread per worker); with any of the last three, process-1t (one "
        "process, one thread, pinned to a core) and process-1t-each (--workers of them at once, a core each) are "
        "measured too, as the per-core baselines of their throughput",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="shards, ranks or actors")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.plan_docs = QUICK_TOKENS, 100_000
    args.tokens = sorted(args.tokens)
    if set(args.executor) - {"process", PER_CORE, PER_CORES}:  # the per-core baselines first
        args.executor = [PER_CORE, PER_CORES, *(e for e in args.executor if e not in (PER_CORE, PER_CORES))]
    args.per_token_values = {"both": [False, True], "true": [True], "false": [False]}[args.per_token]
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_scale-"))
    # `datasets` caches every corpus it reads as Arrow; keep those copies in the temp dir.
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf_datasets")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        model_dir, tokenizer, n_params = build_model(root)
        cpt = chars_per_token(tokenizer)
        log.info(
            "tiny model in %s: %d parameters, vocabulary %d, %.2f characters per token",
            model_dir,
            n_params,
            len(tokenizer),
            cpt,
        )
        rows = rss_rows(root, model_dir, cpt, args, env) if args.tokens and args.per_token_values else []
        plan = plan_row(root, model_dir, args.plan_docs) if args.plan_docs else None
    finally:
        if args.keep:
            log.info("kept %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    setup = {
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "chars_per_token": cpt,
        "compile": args.compile,
        "seconds": time.perf_counter() - started,
    }
    print("\n".join((format_rss(rows) if rows else []) + (format_plan(plan) if plan else [])))
    print(f"tiny GPT-2: {n_params} parameters, vocabulary {len(tokenizer)}; whole benchmark {setup['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "plan": plan, "setup": setup}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
