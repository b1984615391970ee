"""Registers, spills, shared memory, occupancy and the SASS instruction mix of the paged attention kernels,
compiled offline for a GPU this machine need not have (no GPU, no CUDA driver: Triton's nvidia backend and the
ptxas/nvdisasm/cuobjdump it bundles are enough).

    python benchmarks/kernel_resources.py                                   # every shape x cache, launcher defaults
    python benchmarks/kernel_resources.py --shapes llama-3.1-8b --caches fp8 fp8-staged \\
        --block-n 64 128 --warps 4 8 --stages 1 2 3 --maxnreg 0 80 168 --json out.json

Why: Nsight Compute needs the GPU, but what limits a kernel's occupancy (registers per thread, shared memory per
block) and how many instructions its inner loop issues are decided by the compiler, not the device. The same
Triton version as the GPU's gives the same cubin: on triton 3.6 this reproduces the H200's ncu figures of the
decode kernel (203 registers fp8, 93 bf16; benchmarks/results/decode_attention_ncu_h200.txt).

Each kernel is compiled from the arguments its own launcher passes (`decode_attention`, `extend_attention` are
called on small CPU tensors with the kernel swapped for a recorder), so the constexprs, dtypes and
specialisations cannot drift from what runs on the GPU. Timing is out of scope: these are compiler facts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (query heads, KV heads, head_dim) -- the checkpoints of benchmarks/throughput.py
SHAPES = {"qwen3-0.6b": (16, 8, 128), "llama-3.2-1b": (32, 8, 64), "llama-3.1-8b": (32, 8, 128)}
# name: (cache dtype, fp8_decode); "fp8" is what a CUDA device picks for e4m3fn ("auto" -> the hardware conversion)
CACHES = {
    "bf16": (torch.bfloat16, "auto"),
    "fp8": (torch.float8_e4m3fn, "hw"),
    "fp8-staged": (torch.float8_e4m3fn, "hw-staged"),
    "fp8-pairs": (torch.float8_e4m3fn, "hw-pairs"),
    "fp8-bits": (torch.float8_e4m3fn, "bits"),
}
BLOCK_SIZE = 16
CONTEXT = 4096  # decode: 8 splits of 512 (the split count only sizes the grid)
PROMPT = 512  # extend: one prompt chunk (--extend-chunk Q CTX: Q new tokens over CTX positions; only the grid differs)

# Per-SM limits of compute capability 9.0 (H100, H200): CUDA occupancy calculator figures.
SM90 = dict(regs=65536, reg_unit=256, max_warps=64, max_blocks=32, smem=233472, smem_reserved=1024)
# Opcode families summarised per loop iteration (the full mnemonics are in the JSON)
FAMILIES = (
    "HMMA", "HGMMA", "F2FP", "HADD2", "HMUL2", "HFMA2", "I2F", "F2F", "PRMT", "LOP3", "IMAD", "IADD3", "SHF", "LEA",
    "ISETP", "SEL", "LDS", "LDSM", "STS", "STSM", "LDG", "LDGSTS", "SHFL", "MUFU", "BAR",
)  # fmt: skip


def nvidia_tools() -> dict | None:
    """Paths of the nvidia backend's bundled tools, or None where Triton lacks the backend (then nothing here
    can run: the tests skip)."""
    try:
        import triton
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return None
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    tools = {name: bindir / name for name in ("ptxas", "cuobjdump", "nvdisasm")}
    return tools if all(p.exists() for p in tools.values()) else None


# ------------------------------------------------------------------------------------------ capturing a launch


@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the call instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


@contextlib.contextmanager
def recording(module, name: str):
    """Swap `module.name` (a @triton.jit kernel) for a recorder for the duration; yields the recorded launches."""
    kernel, launches = getattr(module, name), []
    setattr(module, name, _Recorder(kernel, launches))
    try:
        yield launches
    finally:
        setattr(module, name, kernel)


def launcher_inputs(shape: str, cache: str, q_len: int, seq_len: int):
    """One sequence of `seq_len` cached positions with `q_len` new queries, as the launchers take it: only the
    dtypes, strides and constexprs matter (the pool holds one page; nothing is read)."""
    from miniserve.kernels.metadata import AttentionMetadata

    hq, hkv, d = SHAPES[shape]
    cache_dtype, fp8_decode = CACHES[cache]
    q = torch.zeros(q_len, hq, d, dtype=torch.bfloat16)
    kc = torch.zeros(1, BLOCK_SIZE, hkv, d, dtype=torch.uint8 if cache_dtype.itemsize == 1 else cache_dtype)
    kc = kc.view(cache_dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.full((q_len,), -1, dtype=torch.int64),
        query_start_loc=torch.tensor([0, q_len], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=torch.zeros(1, -(-seq_len // BLOCK_SIZE), dtype=torch.int32),
        max_query_len=q_len,
        max_seq_len=seq_len,
    )
    scale = torch.ones(1)
    return (q, kc, kc.clone(), meta, scale, scale, 0.1), fp8_decode


def capture(kernel: str, shape: str, cache: str, chunk: tuple[int, int] = (PROMPT, PROMPT), **launch) -> Launch:
    """The main kernel launch that `decode_attention` / `extend_attention` would make (block_n, num_warps,
    num_stages, and extend's variants: the launcher's own parameters; None = its default). chunk: extend's
    (new tokens, context)."""
    import miniserve.kernels.decode_attention as decode_module
    import miniserve.kernels.extend_attention as extend_module

    launch = {k: v for k, v in launch.items() if v is not None}
    if kernel == "decode":
        inputs, fp8_decode = launcher_inputs(shape, cache, 1, CONTEXT)
        with (
            recording(decode_module, "_decode_split_kernel") as calls,
            recording(decode_module, "_decode_reduce_kernel"),
        ):
            decode_module.decode_attention(*inputs, fp8_decode=fp8_decode, **launch)
    else:
        inputs, fp8_decode = launcher_inputs(shape, cache, *chunk)
        with recording(extend_module, "_extend_kernel") as calls:
            extend_module.extend_attention(*inputs, fp8_decode=fp8_decode, **launch)
    return calls[0]


# ---------------------------------------------------------------------------------------------------- compiling

TRITON_TYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8", torch.int8: "i8",
    torch.int32: "i32", torch.int64: "i64",
}  # fmt: skip


def specialize(value) -> tuple[str, bool]:
    """(Triton signature type, divisible by 16) of a runtime argument, as the JIT specialises it on a GPU:
    pointers of CUDA allocations are 256-byte aligned; integers that are 1 become constexprs."""
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype], True
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialise {type(value).__name__}")


def compile_launch(launch: Launch, arch: int):
    """Compile a recorded launch for sm_<arch> with triton.compile (no driver needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion") if k in kwargs}
    fn = launch.kernel
    bound = inspect.signature(fn.fn).bind(*launch.args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, divisible = specialize(value)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), options


# ------------------------------------------------------------------------------------------- reading the cubin


def resource_usage(cubin: bytes, tools: dict) -> dict:
    """cuobjdump's REG / STACK / LOCAL / SHARED (static) of the one kernel in the cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([tools["cuobjdump"], "--dump-resource-usage", str(path)], capture_output=True, text=True)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out.stdout))
    return {k.lower(): int(v) for k, v in fields.items()}


def disassemble(cubin: bytes, tools: dict) -> list[tuple[int, str, int]]:
    """SASS as (address, instruction, live general registers after it); labels as (address, '.L:name', -1)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        run = subprocess.run(
            [tools["nvdisasm"], "-c", "-plr", "-lrm", "count", str(path)], capture_output=True, text=True
        )
        if run.returncode:  # nvdisasm's live-register report fails at 255 registers: plain SASS, live counts 0
            run = subprocess.run([tools["nvdisasm"], "-c", str(path)], capture_output=True, text=True)
        out = run.stdout
    rows, last = [], 0
    for line in out.splitlines():
        if m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;(?:\s*//\s*\|\s*(\d*))?", line):
            last = int(m.group(1), 16)
            rows.append((last, m.group(2), int(m.group(3) or 0)))
        elif m := re.match(r"^(\.L_\w+):", line):
            rows.append((last + 16, ".L:" + m.group(1), -1))
    return rows


def mnemonic(instruction: str) -> str:
    """'@!P2 LDS.U8 R1, [R2]' -> 'LDS.U8'."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


def _loops(sass: list[tuple[int, str, int]]) -> list[list[tuple[int, str, int]]]:
    """Every loop in code order: a backward branch's target label up to the branch (live instructions only)."""
    labels = {text[3:]: addr for addr, text, live in sass if live < 0}
    loops = []
    for addr, text, live in sass:
        m = re.search(r"BRA\s+`?\(?(\.L_\w+)", text)
        if live < 0 or not m or labels.get(m.group(1), addr + 1) > addr:
            continue
        loops.append([row for row in sass if labels[m.group(1)] <= row[0] <= addr and row[2] >= 0])
    return loops


def _mma_count(body: list[tuple[int, str, int]]) -> int:
    return sum("MMA" in t for _, t, _ in body)


def main_loop(sass: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
    """The instructions of the innermost loop with the most tensor-core instructions (the KV loop)."""
    best = max(_loops(sass), key=_mma_count, default=[])
    return best if _mma_count(best) else []


def mma_loops(sass: list[tuple[int, str, int]]) -> list[dict]:
    """Every innermost loop with tensor-core instructions, in code order: its length and MMA count (the split
    extend kernel has two KV loops, the unmasked one and the diagonal)."""
    return [
        {"instructions": len(body), "mma": _mma_count(body), "fsel": sum(mnemonic(t) == "FSEL" for _, t, _ in body)}
        for body in _loops(sass)
        if _mma_count(body)
    ]


def instruction_mix(rows) -> dict:
    full = collections.Counter(mnemonic(t) for _, t, _ in rows)
    families = {f: sum(n for m, n in full.items() if m.split(".")[0] == f) for f in FAMILIES}
    return {"total": sum(full.values()), "families": {f: n for f, n in families.items() if n}, "mnemonics": full}


# --------------------------------------------------------------------------------------------------- occupancy


def occupancy(regs: int, num_warps: int, smem_bytes: int, limits: dict = SM90) -> dict:
    """Resident blocks per SM and the fraction of the SM's warp slots they fill, from registers (allocated per
    warp in units of 256), shared memory (plus the runtime's 1 KiB per block), warps and blocks. What the
    ncu 'Block Limit' lines say: 203 registers x 4 warps -> 2 blocks, 12.5%; 93 -> 5 blocks, 31.25%."""
    unit = limits["reg_unit"]
    regs_per_warp = -(-regs * 32 // unit) * unit
    by = {
        "registers": (limits["regs"] // regs_per_warp) // num_warps,
        "shared_memory": limits["smem"] // (smem_bytes + limits["smem_reserved"]),
        "warps": limits["max_warps"] // num_warps,
        "blocks": limits["max_blocks"],
    }
    blocks = min(by.values())
    limiter = min(by, key=by.get)
    return {"blocks_per_sm": blocks, "limited_by": limiter, "occupancy": blocks * num_warps / limits["max_warps"]}


# ------------------------------------------------------------------------------------------------------- report


def analyse(kernel: str, shape: str, cache: str, arch: int, tools: dict, variant: str = "", **launch) -> dict:
    """Compile one configuration and read everything off its cubin (variant: a name for the row only)."""
    recorded = capture(kernel, shape, cache, **launch)
    compiled, options = compile_launch(recorded, arch)
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin, tools)
    sass = disassemble(cubin, tools)
    loop = main_loop(sass)
    block_n = recorded.kwargs["BLOCK_N"]
    warps = options.get("num_warps", 4)
    smem = compiled.metadata.shared
    mix = instruction_mix(loop)
    peak = max(loop, key=lambda r: r[2]) if loop else (0, "", 0)
    return {
        "kernel": kernel,
        "shape": shape,
        "cache": cache,
        "block_n": block_n,
        "num_warps": warps,
        "num_stages": options.get("num_stages", 3),
        "maxnreg": options.get("maxnreg"),
        "kv_mode": recorded.kwargs["KV_MODE"],
        "variant": variant,
        "block_m": recorded.kwargs.get("BLOCK_M"),
        "rows_m": recorded.kwargs.get("BLOCK_M", 0) * recorded.kwargs.get("GROUP_PACK", 1) or None,
        "registers": usage.get("reg", 0),
        "spill_stack_bytes": usage.get("stack", 0),  # ptxas spills registers to the stack frame
        "local_bytes": usage.get("local", 0),
        "shared_bytes": smem,
        "static_shared_bytes": usage.get("shared", 0),
        **occupancy(usage.get("reg", 0), warps, smem),
        "kernel_instructions": sum(1 for r in sass if r[2] >= 0),
        "loop_instructions": mix["total"],  # per thread per iteration (one BLOCK_N tile of K and V)
        "loop_warp_instructions_per_kv_position": mix["total"] * warps / block_n,
        "loop_families": mix["families"],
        "loop_mnemonics": dict(mix["mnemonics"].most_common()),
        "mma_loops": mma_loops(sass),
        "loop_peak_live_registers": peak[2],
        "loop_peak_at": mnemonic(peak[1]) if peak[1] else "",
    }


COLUMNS = (
    ("kernel", "{:7s}"), ("shape", "{:13s}"), ("cache", "{:10s}"), ("block_n", "{:>4d}"), ("num_warps", "{:>2d}"),
    ("num_stages", "{:>2d}"), ("registers", "{:>4d}"), ("spill_stack_bytes", "{:>5d}"), ("shared_bytes", "{:>6d}"),
    ("blocks_per_sm", "{:>3d}"), ("occupancy", "{:>6.1%}"), ("limited_by", "{:13s}"),
    ("loop_instructions", "{:>5d}"), ("loop_warp_instructions_per_kv_position", "{:>6.1f}"),
)  # fmt: skip
HEAD = "kernel  shape         cache        bn  w  s regs spill   smem blk    occ limited_by    loop  /kvpos"
KEY_FAMILIES = ("LDS", "LDSM", "STS", "F2FP", "PRMT", "IMAD", "HMMA", "HGMMA", "LDGSTS", "LDG")


def format_row(r: dict) -> str:
    cells = " ".join(fmt.format(r[key]) for key, fmt in COLUMNS)
    mix = " ".join(f"{f}={r['loop_families'][f]}" for f in KEY_FAMILIES if f in r["loop_families"])
    lds8 = r["loop_mnemonics"].get("LDS.U8", 0)
    name = f"{r['variant']} (M={r['rows_m']}) " if r["variant"] else ""
    loops = "/".join(str(loop["instructions"]) for loop in r["mma_loops"])
    return f"{name}{cells}  {mix}" + (f" (LDS.U8={lds8})" if lds8 else "") + (f" loops={loops}" if "/" in loops else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--kernels", nargs="+", default=["decode", "extend"], choices=["decode", "extend"])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--caches", nargs="+", default=list(CACHES), choices=list(CACHES))
    ap.add_argument("--block-n", nargs="+", type=int, default=[None], help="default: the launcher's (kv_block_n)")
    ap.add_argument("--warps", nargs="+", type=int, default=[None])
    ap.add_argument("--stages", nargs="+", type=int, default=[None])
    ap.add_argument("--maxnreg", nargs="+", type=int, default=[0], help="register caps (ptxas --maxrregcount); 0: none")
    ap.add_argument("--block-m", nargs="+", type=int, default=[None], help="extend: query tokens per program")
    ap.add_argument(
        "--extend-chunk", nargs=2, type=int, default=[PROMPT, PROMPT], metavar=("Q", "CTX"),
        help="extend: Q new tokens over a context of CTX (only the grid depends on it)",
    )  # fmt: skip
    ap.add_argument(
        "--variants", nargs="+", default=None,
        help="extend launch variants by name (tune_extend_attention.EXTEND_VARIANTS; 'all': every one)",
    )  # fmt: skip
    ap.add_argument("--json", default=None, help="write the rows here (with provenance)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    tools = nvidia_tools()
    if tools is None:
        print("Triton's nvidia backend (and its bundled ptxas/cuobjdump/nvdisasm) is not installed", file=sys.stderr)
        return 2
    rows = []
    print(HEAD)
    variants = {"": {}}
    if args.variants:
        from benchmarks.tune_extend_attention import EXTEND_VARIANTS

        names = list(EXTEND_VARIANTS) if args.variants == ["all"] else args.variants
        variants = {name: EXTEND_VARIANTS[name] for name in names}
        args.kernels = ["extend"]
    knobs = (args.block_n, args.warps, args.stages, args.maxnreg, args.block_m, variants)
    grid = itertools.product(args.kernels, args.shapes, args.caches, *knobs)
    for kernel, shape, cache, bn, warps, stages, maxnreg, block_m, variant in grid:
        launch = dict(block_n=bn, num_warps=warps, num_stages=stages, maxnreg=maxnreg or None)
        if kernel == "extend":
            launch.update({"block_m": block_m, "chunk": tuple(args.extend_chunk), **variants[variant]})
        try:
            row = analyse(kernel, shape, cache, args.arch, tools, variant, **launch)
        except Exception as e:  # noqa: BLE001 - one configuration out of resources must not stop the sweep
            print(f"{kernel} {shape} {cache} {launch}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows.append(row)
        print(format_row(row), flush=True)
    if args.json:
        from benchmarks.provenance import write_result

        write_result(args.json, {"target": f"sm_{args.arch}", "limits": SM90, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
