"""The fused kernels' hot loops in SASS, compiled for a GPU this machine need not have (no device time).

    python scripts/sass_fused.py [--formats hqq,bnb,torchao] [--tokens 1,16] [--arch 90] [--dtype bf16]
        [--config hqq:16=32,64,4,4,2 ...] [--dump DIR]

For each format and token count it builds a small layer with the library on
the CPU, calls the plugin's ``fused_lora_linear`` with the adapter as a layer
does, and stops at the kernel launch: the launch's own arguments and
constexprs (those of a real launch, integers divisible by 16 marked so, as
Triton specializes them) are compiled by Triton for ``sm_<arch>`` with its
bundled ptxas. It then finds the hot loop (the longest backward branch in
the SASS) and prints its instructions per weight element, per thread, with
the loop's instruction mix. On the GPUs these kernels are bound by the SM,
not by memory (docs/performance.md), so this count is what a change has to
lower; Nsight Compute on the device gives the dynamic count (hqq's one-token
GEMV: 9.2 measured, against this script's static count of its loop).

The count is of one loop iteration's instructions times the threads of a
program, over the weight elements one iteration decodes (:data:`ELEMENTS`).
It also prints the instructions outside the loop, which each thread runs
once per program: at 4096 inputs and a wide step (two steps a program) they
are a third of a one-token kernel's work (bnb, 2026-12-06).
It says nothing of latency, occupancy or memory: time on the GPU decides.
"""

import argparse
import collections
import importlib
import os
import re
import sys

import torch
from tune_fused import PLUGINS  # format -> (kernel module's package, variant)

# weight elements one loop iteration decodes, from the launch's constexprs
ELEMENTS = {
    "_hqq4_gemv_kernel": lambda c: 2 * c["BLOCK_N"] * c["BLOCK_K"],
    "_hqq4_word_gemv_kernel": lambda c: 2 * c["BLOCK_N"] * c["BLOCK_K"],
    "_hqq4_lora_kernel": lambda c: 2 * c["BLOCK_N"] * c["GS"],
    "_nf4_gemv_kernel": lambda c: c["BLOCK_N"] * c["BLOCK_K"],
    "_nf4_lora_kernel": lambda c: c["BLOCK_N"] * c["BLOCK_K"],
    "_int8_gemv_kernel": lambda c: c["BLOCK_N"] * c["BLOCK_K"],
    "_int8_lora_kernel": lambda c: c["BLOCK_N"] * c["BLOCK_K"],
    "_gptq4_gemv_kernel": lambda c: c["BLOCK_N"] * c["BLOCK_K"],
    "_gptq4_lora_kernel": lambda c: c["BLOCK_N"] * c["BLOCK_K"],
    "_awq4_gemv_kernel": lambda c: c["BLOCK_N"] * c["BLOCK_K"],
    "_awq4_lora_kernel": lambda c: c["BLOCK_N"] * c["BLOCK_K"],
}
TRITON_TYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8", torch.int8: "i8",
    torch.int32: "i32", torch.int64: "i64",
}  # fmt: skip


class _Launch:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call and runs nothing."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def capture(fmt, tokens, dtype, config, arch, kernel=None, adapter=True):
    """The main kernel's launch ``(fn, args, kwargs)`` for ``tokens`` rows of a 1024 x 2048 layer with an r=16
    adapter (``adapter=False``: the base alone, ``LORA=0``)."""
    import quantplug as qp
    from quantplug.plugin import fused_lora as fl

    ck = importlib.import_module(f"{PLUGINS[fmt][0]}._cuda_kernels")
    torch.manual_seed(0)
    linear = torch.nn.Linear(2048, 1024, bias=False, dtype=dtype)
    base = qp.quantize(linear, fmt, PLUGINS[fmt][1])
    x = torch.randn(tokens, 2048, dtype=dtype)
    A, B = torch.randn(16, 2048, dtype=dtype), torch.randn(1024, 16, dtype=dtype)
    calls = []
    names = [n for n in dir(ck) if n.endswith("_kernel") and hasattr(getattr(ck, n), "arg_names")]
    saved = {n: getattr(ck, n) for n in names}
    shrink, interpret, capability = fl.shrink_kernel, fl.INTERPRET, fl.capability
    try:
        for n in names:
            setattr(ck, n, _Launch(saved[n], calls))
        fl.shrink_kernel = _Launch(shrink, [])
        fl.INTERPRET = True  # admit CPU tensors; the kernels keep the constexprs they were imported with
        fl.capability = lambda device: divmod(arch, 10)  # the launch's choices (PDL) for the target GPU
        lora = (x, A, B, 2.0) if adapter else (None, None, None, 0.0)
        ck.fused_lora_linear(
            base, x, *lora, config=config, force=True, **({"kernel": kernel} if kernel else {})
        )
    finally:
        fl.shrink_kernel, fl.INTERPRET, fl.capability = shrink, interpret, capability
        for n, fn in saved.items():
            setattr(ck, n, fn)
    if not calls:
        raise SystemExit(f"{fmt}: the plugin served no kernel for {tokens} tokens")
    return calls[-1]


def compile_launch(fn, args, kwargs, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "launch_pdl")}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[i]
        if torch.is_tensor(value):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0 and value != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return compile(src, target=GPUTarget("cuda", arch, 32), options=options), constexprs, options


def hot_loop(sass):
    """The instructions of the longest loop (a label and the backward branch to it)."""
    labels, instructions = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.?L\w+|LBB\w+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
        elif "\t" in line:
            instructions.append(line.split("\t", 1)[1].strip())
    best = (0, -1)
    for end, ins in enumerate(instructions):
        branch = re.search(r"BRA\s+`?\(?(\.?L\w+|LBB\w+)", ins)
        start = labels.get(branch.group(1)) if branch else None
        if start is not None and start < end and end - start > best[1] - best[0]:
            best = (start, end)
    return instructions[best[0] : best[1] + 1]


def instruction_count(sass):
    """The kernel's instructions (static: each once), without the padding and the final self-branch."""
    lines = [line.split("\t", 1)[1].strip() for line in sass.splitlines() if "\t" in line]
    return sum(1 for i in lines if i and not i.startswith("NOP")) - 1


def opcode(instruction):
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def main():
    parser = argparse.ArgumentParser(
        description="Count the instructions of each fused kernel's hot loop per weight element, compiled "
        "for a GPU this machine need not have (Triton's bundled ptxas; no device time).",
        epilog="Example: python scripts/sass_fused.py --formats hqq --tokens 16 --config hqq:16=32,64,4,4,2 "
        "(a tile to try before timing it with scripts/tune_fused.py on the device).",
    )
    parser.add_argument("--formats", default="hqq,bnb,torchao", help="comma-separated (default: all three)")
    parser.add_argument("--tokens", default="1,16", help="input rows: 1 (the GEMV) and 2-16 (tensor cores)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability: 90 Hopper, 80 Ampere")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="FORMAT:TOKENS=BLOCK_N,BLOCK_K,warps,stages[,splitk] instead of the plugin's CONFIGS (repeatable)",
    )
    parser.add_argument("--dump", help="write each kernel's SASS to this folder")
    parser.add_argument(
        "--kernel", help="the one-token kernel of a plugin that has several (hqq: gemv, word, mma)"
    )
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    configs = {}
    for item in args.config:
        key, value = item.split("=")
        fmt, tokens = key.split(":")
        configs[(fmt, int(tokens))] = tuple(int(v) for v in value.split(","))
    from triton.tools.disasm import get_sass

    for fmt in args.formats.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            fn, call_args, kwargs = capture(
                fmt, tokens, dtype, configs.get((fmt, tokens)), args.arch, args.kernel
            )
            compiled, constexprs, options = compile_launch(fn, call_args, kwargs, args.arch)
            sass = get_sass(compiled.asm["cubin"])
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                with open(os.path.join(args.dump, f"{fmt}_{tokens}_{fn.__name__}.sass"), "w") as f:
                    f.write(sass)
            loop = hot_loop(sass)
            threads = 32 * options.get("num_warps", 4)
            elements = ELEMENTS[fn.__name__](constexprs)
            mix = collections.Counter(opcode(i) for i in loop).most_common(8)
            tile = tuple(constexprs[k] for k in ("BLOCK_N", "BLOCK_K")) + tuple(options.values())
            print(
                f"{fmt:8s} tokens={tokens:<3d}{fn.__name__:20s} {tile}: loop {len(loop)} instructions, "
                f"{len(loop) * threads / elements:.2f} per weight element; "
                + " ".join(f"{op} {n}" for op, n in mix)
                + f"; outside the loop {instruction_count(sass) - len(loop)} a thread (prologue, epilogue)",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
