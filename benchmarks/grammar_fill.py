"""Host time of xgrammar's token-mask fill for a batch, by strategy: structured_outputs.py's workload without a model.

    python benchmarks/grammar_fill.py --batch 32 --steps 256 --threads 2 4 8 16

`--batch` matchers of structured_outputs.py's JSON schemas (compiled as the engine compiles them) walk random paths
through their grammar (each step every row's mask is filled, then the row takes a random allowed token, as sampling
from a random-weight model does) over that script's synthetic byte-level BPE vocabulary of the shape's size
(`--vocab-like NAME`: its tokens with a quote, a newline or a backslash, the ones xgrammar checks one by one inside
a JSON string, as common as in that measured real vocabulary of benchmarks/results/vocab_shares.json; default:
JSON-heavy, ~7% each). At every step each strategy fills the same states: one row after another on this thread,
xgrammar's BatchGrammarMatcher with `max_threads` set (and with its default, half of what
std::thread::hardware_concurrency reports; it holds the GIL), n groups of rows on n threads (`groups n`, the calling
thread one of them; one call per row, which releases the GIL), and a Python thread pool of one task per row. Prints
and writes (`--out`) the median and mean milliseconds per step of each, and of the step's slowest row alone (no
strategy fills a step faster than that).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.checkpoints import SHAPES  # noqa: E402
from benchmarks.provenance import write_result  # noqa: E402
from benchmarks.structured_outputs import SCHEMAS, write_bpe_tokenizer  # noqa: E402
from benchmarks.vocab_shares import measured_shares  # noqa: E402
from miniserve.engine.structured_output import MAX_CHAINED_RULES, MAX_JSON_WHITESPACE, json_schema_grammar  # noqa: E402


def compile_schema(
    schema: dict, vocab_size: int, directory: Path, like: str | None = None, chained_rules: int = MAX_CHAINED_RULES
):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    # bos and eos are the vocabulary's last ids, as in real ones (the first ids are single bytes: id 1 is the quote,
    # which as a stop token would leave a string no way to close in a vocabulary with few quoted words)
    eos = vocab_size - 1
    write_bpe_tokenizer(directory, vocab_size, bos=eos - 1, eos=eos, like=like and measured_shares(like))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=[eos])
    # the engine's grammar for the schema (its bounded strings as chains), with the whitespace it allows
    whitespace = {"any_whitespace": True, "max_whitespace_cnt": MAX_JSON_WHITESPACE}
    return xgr.GrammarCompiler(info).compile_grammar(json_schema_grammar(json.dumps(schema), whitespace, chained_rules))


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> list[np.ndarray]:
    """Each row's allowed token ids, in numpy: a CPU torch op this size starts torch's OpenMP workers, which then
    spin on every core for a while and starve the fill threads timed next (engine/structured_output.py:
    MaskFiller)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return [np.flatnonzero(row) for row in bits]


def fill_groups(pool: ThreadPoolExecutor, n: int, matchers: list, mask: torch.Tensor) -> None:
    """n groups of rows, each on its own thread (this one included), one call per row."""

    def fill(first: int, last: int) -> None:
        for i in range(first, last):
            matchers[i].fill_next_token_bitmask(mask, i)

    size = -(-len(matchers) // n)
    done = [pool.submit(fill, k, min(k + size, len(matchers))) for k in range(size, len(matchers), size)]
    fill(0, size)
    for f in done:
        f.result()


def fill_rows_timed(matchers: list, mask: torch.Tensor, slowest: list[float]) -> None:
    """One row after another on this thread; appends the slowest row's milliseconds to `slowest`: however many
    threads fill a step's rows, none fills one row faster, so the slowest row bounds every strategy's step."""
    worst = 0.0
    for i, m in enumerate(matchers):
        start = time.perf_counter()
        m.fill_next_token_bitmask(mask, i)
        worst = max(worst, time.perf_counter() - start)
    slowest.append(1e3 * worst)


def strategies(threads: list[int], slowest: list[float]) -> dict:
    import xgrammar as xgr

    out = {"rows": lambda ms, mask: fill_rows_timed(ms, mask, slowest)}
    batch_default = xgr.BatchGrammarMatcher()
    out["batch auto"] = lambda ms, mask: batch_default.batch_fill_next_token_bitmask(ms, mask)
    for n in threads:
        batch = xgr.BatchGrammarMatcher(max_threads=n)
        out[f"batch {n}"] = lambda ms, mask, b=batch: b.batch_fill_next_token_bitmask(ms, mask)
        pool = ThreadPoolExecutor(n)
        out[f"groups {n}"] = lambda ms, mask, p=pool, n=n: fill_groups(p, n, ms, mask)
        out[f"python pool {n}"] = lambda ms, mask, p=pool: list(
            p.map(lambda im: im[1].fill_next_token_bitmask(mask, im[0]), enumerate(ms))
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the shape's)")
    ap.add_argument("--schemas", nargs="+", choices=sorted(SCHEMAS), default=["open", "bounded"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument(
        "--vocab-like", default=None,
        help="the synthetic vocabulary's quote/newline/backslash shares: those of this vocabulary of "
        "benchmarks/results/vocab_shares.json (e.g. cl100k_base); default: JSON-heavy",
    )  # fmt: skip
    ap.add_argument(
        "--chained-rules", type=int, default=MAX_CHAINED_RULES,
        help="rules the grammar may spend on chains of length-bounded strings (0: xgrammar's repetitions, the "
        "engine's grammar before the chains; the masks are the same, so the random paths are too)",
    )  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import xgrammar as xgr

    vocab = args.vocab or SHAPES[args.shape]["vocab_size"]
    cpus = {"os.cpu_count": os.cpu_count(), "sched_getaffinity": len(os.sched_getaffinity(0))}
    cpus["torch_threads"] = torch.get_num_threads()
    print(cpus, flush=True)
    slowest: list[float] = []  # the slowest row of each step (in "rows")
    fills = strategies(args.threads, slowest)
    result = {"batch": args.batch, "steps": args.steps, "vocab": vocab, "vocab_like": args.vocab_like or "json-heavy"}
    # paths: a digest of the tokens each schema's rows took (the same with and without chains: the same masks)
    result.update(chained_rules=args.chained_rules, cpus=cpus, schemas={}, paths={})
    for name in args.schemas:
        with tempfile.TemporaryDirectory() as tmp:
            compiled = compile_schema(SCHEMAS[name], vocab, Path(tmp), args.vocab_like, args.chained_rules)
        rng, path = random.Random(0), hashlib.sha256()
        slowest.clear()
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(args.batch)]
        times: dict[str, list[float]] = {k: [] for k in fills}
        masks = {k: xgr.allocate_token_bitmask(args.batch, vocab) for k in fills}
        for _ in range(args.steps):
            for key, fill in fills.items():
                masks[key].numpy().fill(-1)  # (not torch's fill_: see allowed_tokens)
                start = time.perf_counter()
                fill(matchers, masks[key])
                times[key].append(1e3 * (time.perf_counter() - start))
            ref = masks["rows"]
            same = all(np.array_equal(ref.numpy(), m.numpy()) for m in masks.values())
            assert same, "a strategy filled different masks"
            for m, allowed in zip(matchers, allowed_tokens(ref, vocab)):
                token = int(allowed[rng.randrange(len(allowed))])
                path.update(token.to_bytes(4, "little"))
                assert m.accept_token(token)
        times["slowest row"] = slowest
        rows = {k: {"median_ms": statistics.median(v), "mean_ms": statistics.fmean(v)} for k, v in times.items()}
        result["schemas"][name], result["paths"][name] = rows, path.hexdigest()
        for key, row in rows.items():
            print(f"{name:8s} {key:16s} median {row['median_ms']:7.3f} ms  mean {row['mean_ms']:7.3f} ms", flush=True)
    if args.out:
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
