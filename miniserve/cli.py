"""`miniserve generate` and `miniserve serve`: the command line around LLM and the server."""

from __future__ import annotations

import argparse
import sys

from miniserve.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded demo model)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-stop-strings", type=int, default=32, help="stop strings per request")
    p.add_argument("--max-stop-string-length", type=int, default=256, help="characters per stop string")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative-model", default=None, help="draft model directory, or 'demo' for the demo draft")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--served-model-name", default=None)
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of prompt prefixes computed before (--no-enable-prefix-caching: recompute)",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_stop_strings=args.max_stop_strings,
        max_stop_string_length=args.max_stop_string_length,
        seed=args.seed,
        speculative_model=args.speculative_model,
        num_speculative_tokens=args.num_speculative_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
    )


def generate_main(args: argparse.Namespace) -> int:
    from miniserve.engine.llm_engine import LLMEngine
    from miniserve.sampling_params import SamplingParams

    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sampling_seed,
        max_tokens=args.max_tokens,
        stop=args.stop or None,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        ignore_eos=args.ignore_eos,
    )
    engine = LLMEngine(engine_config(args))
    engine.add_request("cli", args.prompt, params)
    sent = [0] * params.n
    while engine.has_unfinished_requests():
        for out in engine.step():
            if params.n == 1:  # stream the single choice as it grows
                text = out.outputs[0].text
                sys.stdout.write(text[sent[0] :])
                sys.stdout.flush()
                sent[0] = len(text)
            elif out.finished:
                for c in out.outputs:
                    print(f"--- choice {c.index} ({c.finish_reason})\n{c.text}")
    if params.n == 1:
        print()
    stats = engine.stats()
    if stats["prefix_cache_queries"]:
        hits, queries = stats["prefix_cache_hits"], stats["prefix_cache_queries"]
        print(f"[prefix cache] hit rate {hits / queries:.1%} ({hits} of {queries} tokens)", file=sys.stderr)
    if stats["spec_num_drafts"]:
        mean = 1 + stats["spec_num_accepted_tokens"] / stats["spec_num_drafts"]
        print(f"[speculative decoding] mean acceptance length {mean:.2f}", file=sys.stderr)
    return 0


def serve_main(args: argparse.Namespace) -> int:
    from miniserve.server.app import serve_main as run

    return run(args, engine_config(args))


def _missing_server_deps(error: ImportError) -> int:
    print(
        f"miniserve: error: the server needs fastapi and uvicorn ({error}); pip install fastapi uvicorn",
        file=sys.stderr,
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miniserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=generate_main)
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    add_engine_args(srv)
    try:
        from miniserve.server.app import add_server_args

        add_server_args(srv)
    except ImportError as e:  # fastapi/uvicorn not installed: `generate` still works, `serve` says why
        srv.set_defaults(func=lambda _args, err=e: _missing_server_deps(err))
        return parser
    srv.set_defaults(func=serve_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"miniserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
