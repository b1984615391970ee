"""What grammar-constrained decoding costs: decode throughput at a fixed batch, with and without a JSON schema.

    python benchmarks/structured_outputs.py --shape llama-3.2-1b --batch 32 --prompt 128 --gen 256

All runs decode the same prompts (random token ids) for exactly `--gen` tokens at temperature 1.0 (seeded). The
constrained runs follow JSON schemas that cannot be complete before `--gen` tokens (an array of at least 200
objects with a name, an integer id and a list of enum tags; `open`: the name unbounded, `bounded`: at most 24
characters), so no sequence leaves the batch early and all runs do the same model work. What differs is the
grammar: a token bitmask per sequence, filled on the host (xgrammar) every step while the GPU computes the
logits (engine/decoder.py), copied to the device and applied in the sampler.
Target: a constrained run keeps >= 90% of the unconstrained throughput at batch 32.

The checkpoint is benchmarks/checkpoints.py's random-weight model of `--shape`, with a synthetic byte-level BPE
vocabulary of the model's full size (the 256 byte symbols plus multi-character tokens drawn from JSON-friendly
characters), so xgrammar masks a realistic number of tokens; the word-level benchmark tokenizer has no `{`.
Writes JSON (`--out`, with its provenance: benchmarks/provenance.py) with the throughputs, the ratios, and the
host time spent filling masks. `--smoke` runs a one-layer model of the shape on the CPU (a check that the script
works, not a measurement).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.checkpoints import SHAPES, build_checkpoint  # noqa: E402
from benchmarks.host_split import CONSTRAINED, HostSplit  # noqa: E402
from benchmarks.provenance import write_result  # noqa: E402
from benchmarks.vocab_shares import gpt2_byte_symbols, measured_shares, shares  # noqa: E402
from miniserve import LLM, SamplingParams  # noqa: E402
from miniserve.engine import structured_output  # noqa: E402
from miniserve.sampling_params import StructuredOutputsParams  # noqa: E402

ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "maxItems": 3},
    },
    "required": ["name", "id", "tags"],
}
BOUNDED_NAME = {**ITEM, "properties": {**ITEM["properties"], "name": {"type": "string", "maxLength": 24}}}
# "open": the strings unbounded; "bounded": the name at most 24 characters, which xgrammar cannot precompute (a
# token's validity there depends on how many characters are left, so most of a large vocabulary is checked at
# every step inside the string)
SCHEMAS = {
    "open": {"type": "array", "minItems": 200, "items": ITEM},
    "bounded": {"type": "array", "minItems": 200, "items": BOUNDED_NAME},
}


def write_bpe_tokenizer(
    directory: Path, vocab_size: int, bos: int, eos: int, seed: int = 0, like: dict[str, float] | None = None
) -> dict[str, float]:
    """A byte-level BPE tokenizer.json of exactly `vocab_size` tokens (no merges: only its vocabulary matters);
    returns the shares of its tokens that hold a quote, a newline or a backslash (vocab_shares.py).

    `like` None: JSON-heavy words, their characters drawn uniformly from letters, digits and `" :,{`, space and
    newline (about 7% of the tokens hold a quote, 7% a newline): the vocabulary of the results before
    vocab_shares.json. `like` {mark: share} (vocab_shares.measured_shares): words without those marks, each mark
    put into a word with its share's probability, so the tokens xgrammar checks one by one inside a JSON string
    are as common as in that real vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    rng = random.Random(seed)
    symbols = gpt2_byte_symbols()
    marked = {"quote": '"', "newline": "Ċ", "backslash": "\\"}
    common = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + ["Ġ", "Ċ", '"', ":", ",", "{"]
    if like is not None:
        common = [c for c in common if c not in marked.values()]
    vocab = {s: i for i, s in enumerate(symbols)}
    while len(vocab) < vocab_size:
        word = "".join(rng.choice(common) for _ in range(rng.randint(2, 7)))
        for mark, share in (like or {}).items():
            if rng.random() < share:
                at = rng.randint(0, len(word))
                word = word[:at] + marked[mark] + word[at:]
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    names = {v: k for k, v in vocab.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[bos], "eos_token": names[eos]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return shares([bytes(symbols[c] for c in word) for word in vocab])


SMOKE = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip


def checkpoint(shape: str, root: str, smoke: bool, like: str | None = None) -> tuple[Path, dict[str, float]]:
    """The random-weight checkpoint of `shape` with a synthetic BPE vocabulary (`like`: drawn with the shares of
    that measured vocabulary, else JSON-heavy); returns its path and the vocabulary's shares."""
    path = build_checkpoint(shape, root, overrides=SMOKE if smoke else None)
    marker = path / ".bpe"
    recorded = json.loads(marker.read_text()) if marker.is_file() else {}
    if recorded.get("like", "json-heavy") != (like or "json-heavy") or "shares" not in recorded:
        cfg = SHAPES[shape]
        eos = cfg["eos_token_id"][0] if isinstance(cfg["eos_token_id"], list) else cfg["eos_token_id"]
        like_shares = measured_shares(like) if like else None
        drawn = write_bpe_tokenizer(path, cfg["vocab_size"], cfg["bos_token_id"], eos, like=like_shares)
        recorded = {"like": like or "json-heavy", "shares": drawn}
        marker.write_text(json.dumps(recorded))  # the byte-level BPE tokenizer written by structured_outputs.py
    return path, recorded["shares"]


class MaskTimer:
    """Wraps structured_output.fill_rows (every batch's mask fill goes through it) to add up the host time spent
    filling masks."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self._inner = structured_output.fill_rows

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    return seconds, sum(lengths)


def run_plan(configs: dict, grammar_threads: list[int], unseeded: bool, foreground: bool) -> dict:
    """name -> (params, mask-fill threads or None for the engine's own filler, fill on the engine's thread)."""
    plan = {"unconstrained": (configs["unconstrained"], None, False)}
    constrained = {name: p for name, p in configs.items() if name != "unconstrained"}
    for i, threads in enumerate(grammar_threads):
        for name, params in constrained.items():
            plan[name if i == 0 else f"{name}_threads{threads}"] = (params, threads, False)
    for name, params in constrained.items():
        if foreground:
            plan[f"{name}_fg"] = (params, grammar_threads[0], True)
    if unseeded:
        for name, params in configs.items():
            plan[f"{name}_unseeded"] = (replace(params, seed=None), grammar_threads[0], False)
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--root", default="/tmp/miniserve-ckpt", help="where random-weight checkpoints are written")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schemas", nargs="+", choices=sorted(SCHEMAS), default=["open", "bounded"])
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument(
        "--grammar-threads", type=int, nargs="+", default=[0],
        help="mask-fill threads (EngineConfig.grammar_threads; 0 = auto); each after the first adds constrained "
        "runs named constrained_<schema>_threads<n>",
    )  # fmt: skip
    ap.add_argument(
        "--unseeded", action="store_true",
        help="also run unseeded (the global RNG's noise: one draw a step, not one per row): <name>_unseeded runs",
    )  # fmt: skip
    ap.add_argument(
        "--foreground", action="store_true",
        help="also fill the masks on the engine's thread, not beside its other host work: constrained_<schema>_fg",
    )  # fmt: skip
    ap.add_argument(
        "--host-split", action="store_true",
        help="time the engine thread's phases of each step (HostSplit): host_ms_per_step in every run",
    )  # fmt: skip
    ap.add_argument(
        "--vocab-like", default=None,
        help="draw the synthetic vocabulary with the quote/newline/backslash shares of this vocabulary of "
        "benchmarks/results/vocab_shares.json (e.g. cl100k_base); default: the JSON-heavy one",
    )  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="a one-layer model of the shape (full vocabulary): CPU check")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    path, vocab_shares = checkpoint(args.shape, args.root, args.smoke, args.vocab_like)
    llm = LLM(
        model=str(path),
        max_num_seqs=max(args.batch, 1),
        max_model_len=args.prompt + args.gen + 16,
        enforce_eager=args.enforce_eager,
    )
    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [[rng.randrange(256, min(vocab, 10000)) for _ in range(args.prompt)] for _ in range(args.batch)]
    free = SamplingParams(temperature=1.0, seed=0, max_tokens=args.gen, ignore_eos=True)
    configs, compile_seconds = {"unconstrained": free}, {}
    for name in args.schemas:
        spec = StructuredOutputsParams(json=SCHEMAS[name])
        start = time.perf_counter()
        llm.engine.grammar.compile(spec)
        compile_seconds[name] = time.perf_counter() - start
        configs[f"constrained_{name}"] = SamplingParams(
            temperature=1.0, seed=0, max_tokens=args.gen, ignore_eos=True, structured_outputs=spec
        )
    for params in configs.values():  # warm-up: graphs, Triton JIT, the mask path, at the timed batch
        run(llm, prompts[:2], params)  # (on a fresh machine the first full batches ran slow: 0.82 s against 0.45
        run(llm, prompts, params)  # for the same work later in the same process, structured_outputs_masked_ab)

    timer = MaskTimer()
    structured_output.fill_rows = timer
    split = HostSplit(CONSTRAINED) if args.host_split else None
    decoder = llm.engine.decoder
    background = decoder.masks.beside
    runs_by_key = run_plan(configs, args.grammar_threads, args.unseeded, args.foreground)
    results, vocab_device = {}, (llm.engine.vocab_size, decoder.target.device)
    for name, (params, threads, fg) in runs_by_key.items():
        if threads is not None:  # a fresh filler on this many threads (the engine's is built from its config)
            decoder.masks = structured_output.MaskFiller(*vocab_device, threads)
        decoder.masks.beside = background and not fg
        timer.seconds, timer.calls = 0.0, 0
        if split:
            split.reset()
        runs = [run(llm, prompts, params) for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        tokens = runs[0][1]
        results[name] = {
            "seconds": seconds,
            "generated_tokens": tokens,
            "tokens_per_second": tokens / seconds,
            "mask_host_seconds_per_run": timer.seconds / args.repeats,
            "mask_calls_per_run": timer.calls / args.repeats,
            "grammar_threads": None if threads is None else decoder.masks.threads,
        }
        if split:
            results[name]["host_ms_per_step"] = split.per_step_ms()
        print(f"{name:>24}: {tokens} tokens in {seconds:.3f} s = {tokens / seconds:,.0f} tok/s", flush=True)
    ratios = {}
    for key in results:
        if not key.startswith("constrained_"):
            continue
        name = key.removeprefix("constrained_")
        mask, free_key = results[key], "unconstrained_unseeded" if key.endswith("_unseeded") else "unconstrained"
        ratios[name] = mask["tokens_per_second"] / results[free_key]["tokens_per_second"]
        per_step = 1e3 * mask["mask_host_seconds_per_run"] / max(mask["mask_calls_per_run"], 1)
        print(
            f"{name}: constrained / unconstrained throughput {ratios[name]:.3f} (target >= 0.90); host mask time "
            f"{per_step:.3f} ms per step (batch {args.batch})"
        )
    if args.out:
        out = {
            "xgrammar": importlib.metadata.version("xgrammar"),
            "shape": args.shape,
            "vocabulary": {"like": args.vocab_like or "json-heavy", "shares": vocab_shares},
            "smoke": args.smoke,
            "batch": args.batch,
            "prompt": args.prompt,
            "gen": args.gen,
            "schemas": {name: SCHEMAS[name] for name in args.schemas},
            "compile_seconds": compile_seconds,
            "ratios": ratios,
            **results,
        }
        write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
