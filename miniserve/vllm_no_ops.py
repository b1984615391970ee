"""vLLM options that would change nothing here: flags a `vllm serve` command line and keywords an `LLM(...)` call
often carry. Each is taken with a warning that says why, so the command or script runs as written; a value that
would ask for something this engine does not do (two pipeline stages) is refused."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NoOp:
    values: tuple[str, ...] | None  # None: a switch; (): any value; else the only values taken
    why: str
    serve: bool = True  # a `serve` flag
    offline: bool = True  # an `LLM(...)` keyword
    quiet: tuple = (False,)  # keyword values that ask for nothing (vLLM's defaults): taken without a warning


NO_OPS: dict[str, NoOp] = {
    "trust_remote_code": NoOp(
        None, "no code from the model directory runs: only the architectures miniserve implements load"
    ),
    "enable_chunked_prefill": NoOp(  # (False asks for no chunking: vLLM's default is None)
        None, "prompts are always prefilled in chunks of max_num_batched_tokens", quiet=()
    ),
    "swap_space": NoOp((), "preempted sequences are recomputed, never swapped to CPU memory"),
    "disable_custom_all_reduce": NoOp(None, "tensor parallelism reduces with NCCL's all-reduce"),
    "distributed_executor_backend": NoOp(("mp", "uni"), "the tensor-parallel ranks are processes of this host"),
    "pipeline_parallel_size": NoOp(("1",), "one pipeline stage: tensor parallelism only", quiet=(1,)),
    "enable_prompt_tokens_details": NoOp(None, "usage always carries prompt_tokens_details", offline=False),
    "disable_frontend_multiprocessing": NoOp(
        None, "the engine runs in its own process whatever the flag", offline=False
    ),
    "disable_log_stats": NoOp(None, "the offline engine logs no stats", serve=False, quiet=(True,)),  # (LLM's default)
}  # fmt: skip


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def keyword_warning(name: str, value: object) -> str | None:
    """The warning for an `LLM(...)` keyword in NO_OPS (offline), None where there is nothing to say (None, vLLM's
    unset, or a value of `quiet`: vLLM's default, a switch left off); ValueError for a value it does not take."""
    option = NO_OPS[name]
    if value is None or any(type(value) is type(q) and value == q for q in option.quiet):  # (True is no 1)
        return None
    if option.values is None and not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    if option.values and str(value) not in option.values:
        raise ValueError(f"{name}={value!r} is not supported: {option.why} (it takes {', '.join(option.values)})")
    return f"{name}={value!r} is taken but changes nothing: {option.why}"
