"""`miniserve generate` and `miniserve serve`: the command line around the engine and the server.

The settings flags are generated from EngineConfig and ServerConfig (settings.py); each also reads its
MINISERVE_* variable, which a flag overrides.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile

from miniserve.config import EngineConfig, ServerConfig
from miniserve.settings import add_arguments, from_sources, variable_warnings
from miniserve.vllm_no_ops import NO_OPS
from miniserve.vllm_no_ops import flag as no_op_flag

MAIN_HELP = (
    "Serve a Hugging Face model with an OpenAI-compatible API, or generate one completion. Each flag also reads "
    "its MINISERVE_* environment variable, which the flag overrides."
)
GENERATE_HELP = "Generate a completion for one prompt, streamed to stdout."
SERVE_HELP = "Serve the OpenAI-compatible API (the same server as `uvicorn server:app`)."


CLI_SAMPLING_DEFAULTS = {  # generate's own: greedy, 64 tokens
    "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "max_tokens": 64,
}  # fmt: skip


SAMPLING_FLAGS = {"seed": "--sampling-seed"}  # generate's sampling flags not named after their field

SERVE_NO_OPS = {name: option for name, option in NO_OPS.items() if option.serve}  # each a flag of `serve`

# engine settings a `generate` run never reads (its prompt is no chat; it asks for no logprobs, bad words or grammar;
# it is one request): taken, each with a warning
GENERATE_UNUSED = (
    "chat_template", "chat_template_content_format", "max_logprobs", "max_bad_words", "grammar_threads",
    "scheduling_policy",
)  # fmt: skip


def _check_sampling_flags(fields: dict) -> None:
    """SamplingParams' check of the sampling flags, its error naming the flag."""
    from miniserve.sampling_params import SamplingParams

    try:
        SamplingParams(**fields)
    except ValueError as e:
        name = next((k for k in fields if str(e).startswith((f"{k} ", f"{k}="))), None)
        flag = SAMPLING_FLAGS.get(name, f"--{name.replace('_', '-')}") if name else None
        raise ValueError(f"{flag}: {e}" if flag else str(e)) from None


def generate_main(args: argparse.Namespace) -> int:
    from miniserve.engine.llm_engine import LLMEngine
    from miniserve.sampling_params import SamplingParams

    config = from_sources(EngineConfig, args)
    fixed = dict(n=args.n, seed=args.sampling_seed, stop=args.stop or None, presence_penalty=args.presence_penalty,
                 frequency_penalty=args.frequency_penalty, ignore_eos=args.ignore_eos)  # fmt: skip
    given = {name: getattr(args, name) for name in CLI_SAMPLING_DEFAULTS if getattr(args, name) is not None}
    _check_sampling_flags({**fixed, **CLI_SAMPLING_DEFAULTS, **given})  # before the model loads, not after
    engine = LLMEngine(config)
    # a flag left unset takes the model's generation_config.json value (generation_config=auto), else the CLI's
    params = SamplingParams(**fixed, **{**CLI_SAMPLING_DEFAULTS, **engine.sampling_defaults, **given})
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


def take_model_tag(args: argparse.Namespace) -> None:
    """`miniserve serve MODEL`, as `vllm serve MODEL`: the positional model is --model (given both ways, the two
    must agree)."""
    if args.model_tag is None:
        for name in ("served_model_name", "api_key") if args.model is None else ():  # (several words each)
            words = getattr(args, name) or []
            if len(words) > 1:  # MODEL after the flag is one of its words: the demo model would be served unseen
                raise ValueError(
                    f"--{name.replace('_', '-')} took {len(words)} words and no model is given: if {words[-1]!r} is "
                    "the model, put it first (`miniserve serve MODEL --served-model-name NAME`), or give --model"
                )
        return
    if args.model is not None and os.path.normpath(args.model) != os.path.normpath(args.model_tag):
        raise ValueError(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model_tag


def check_model_tag(args: argparse.Namespace) -> None:
    """A positional MODEL that is no directory is often a stray word (`--enforce-eager true`: the flag takes no
    value, so argparse reads "true" as MODEL): the error says where the word was read."""
    if args.model_tag is not None and not os.path.isdir(args.model_tag):
        raise FileNotFoundError(
            f"model directory {args.model_tag!r} does not exist (read as the positional MODEL of `serve MODEL`, a "
            "local directory; a word given to a flag that takes no value lands there too)"
        )


def serve_main(args: argparse.Namespace) -> int:
    take_model_tag(args)
    check_model_tag(args)
    config, server = from_sources(EngineConfig, args), from_sources(ServerConfig, args)
    from miniserve.distributed.runner import serve_as_other_rank

    if serve_as_other_rank(config):  # under torchrun, ranks other than 0 run passes, not a server
        return 0
    shared = None
    if server.api_servers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # the API servers' metrics files (server/metrics.py); set before prometheus_client is imported
        shared = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="miniserve-metrics-")
    try:
        from miniserve.server.launcher import run_api_servers, run_server
    except ImportError as e:  # fastapi/uvicorn not installed: `generate` still works, `serve` says why
        print(
            f"miniserve: error: the server needs fastapi and uvicorn ({e}); pip install fastapi uvicorn",
            file=sys.stderr,
        )
        return 2
    try:
        return run_api_servers(config, server) if server.api_servers > 1 else run_server(config, server)
    finally:
        if shared:
            shutil.rmtree(shared, ignore_errors=True)


def add_request_args(p: argparse.ArgumentParser) -> None:
    """The one request `generate` runs: its prompt and sampling parameters (SamplingParams fields)."""
    g = p.add_argument_group("request")
    g.add_argument("--prompt", required=True, help="the prompt text")
    model = "the model's generation_config.json, else"
    g.add_argument("--max-tokens", type=int, help=f"tokens to generate at most (default: {model} 64)")
    g.add_argument("--temperature", type=float, help=f"0 = greedy (default: {model} 0)")
    g.add_argument("--top-p", type=float, help=f"nucleus sampling mass, 1 = off (default: {model} 1)")
    g.add_argument("--top-k", type=int, help=f"keep the k most likely tokens, 0 = off (default: {model} 0)")
    g.add_argument("--min-p", type=float, help=f"drop tokens below min_p * the top probability (default: {model} 0)")
    g.add_argument("--n", type=int, default=1, help="completions to generate (default: 1)")
    g.add_argument("--sampling-seed", type=int, default=None, help="the request's seed (default: none)")
    g.add_argument("--stop", action="append", default=[], help="a stop string; repeat for more (default: none)")
    g.add_argument("--repetition-penalty", type=float, help=f"1 = off (default: {model} 1)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2], 0 = off (default: 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2], 0 = off (default: 0)")
    g.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens (default: off)"
    )


def dashed(argv: list[str]) -> list[str]:
    """Flags spelled with underscores (`--max_model_len 512`, `--max_model_len=512`) as with dashes, as vLLM's
    parser takes them. Only what reads as a flag's name is touched: not a value that argparse takes for one
    (`--prompt "--my_var is x"`: it has a space), nor anything after `--`."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        out.append(name.replace("_", "-") + eq + value if re.fullmatch(r"--[A-Za-z0-9_-]+", name) else arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    from miniserve import __version__

    parser = argparse.ArgumentParser(prog="miniserve", description=MAIN_HELP, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"miniserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # (a short usage line each, as vLLM's: an error is two lines, not the list of every flag before it)
    command = lambda name, about, text, usage: sub.add_parser(  # noqa: E731
        name, help=about, description=text, allow_abbrev=False, usage=f"miniserve {name} {usage}"
    )
    gen = command("generate", "generate a completion for one prompt", GENERATE_HELP, "--prompt TEXT [options]")
    add_request_args(gen)
    add_arguments(gen, EngineConfig)
    gen.set_defaults(func=generate_main)
    srv = command("serve", "serve the OpenAI-compatible API", SERVE_HELP, "[MODEL] [options]")
    srv.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        help="the model directory, as `vllm serve MODEL` takes it: the same as --model (default: --model's)",
    )
    add_arguments(srv, EngineConfig)
    add_arguments(srv, ServerConfig)
    _add_no_op_flags(srv)
    srv.set_defaults(func=serve_main)
    return parser


def _add_no_op_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM flags that change nothing here (each taken with a warning)")
    for name, option in SERVE_NO_OPS.items():
        text = f"ignored: {option.why} (default: unset)"
        if option.values is None:
            g.add_argument(no_op_flag(name), dest=_no_op_dest(name), action="store_true", default=None, help=text)
        else:
            choices = option.values or None
            g.add_argument(no_op_flag(name), dest=_no_op_dest(name), choices=choices, metavar="VALUE", help=text)


def _no_op_dest(name: str) -> str:
    return "vllm_" + name


def no_op_warnings(args: argparse.Namespace) -> list[str]:
    """A line for each flag given that changes nothing here: SERVE_NO_OPS of `serve`, GENERATE_UNUSED of
    `generate`."""
    if args.command == "generate":
        given = [name for name in GENERATE_UNUSED if getattr(args, name, None) is not None]
        return [f"--{name.replace('_', '-')} is taken but changes nothing for `generate`" for name in given]
    given = [name for name in SERVE_NO_OPS if getattr(args, _no_op_dest(name), None)]
    return [f"{no_op_flag(name)} is taken but changes nothing: {SERVE_NO_OPS[name].why}" for name in given]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(dashed(sys.argv[1:] if argv is None else argv))
    for line in [*variable_warnings(), *no_op_warnings(args)]:
        print(f"miniserve: warning: {line}", file=sys.stderr)
    if args.command == "generate":  # warned about: not read, so not checked either (a template file, a value)
        for name in GENERATE_UNUSED:
            setattr(args, name, None)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"miniserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: stopped as asked, no traceback (the shell's status for SIGINT)
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`miniserve generate ... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so the exit's flush cannot fail again)
        return 0


if __name__ == "__main__":
    sys.exit(main())
