"""The plugins' inline PTX (bnb's NF4/FP4 register lookup, hqq's two-weights-per-instruction decode, gptq's
code-into-mantissa decode) run on the CPU.

Triton's interpreter cannot run inline assembly, so the fused kernels take
another path there; these tests run the asm itself through
``quantplug.testing.ptx`` on random inputs and compare every output bit with
the rounding the library's own dequantization does, computed in PyTorch.
The GPU tests (tests/gpu) then check the kernels that carry it.
"""

import math
import random
from fractions import Fraction

import pytest
import torch
from quantplug.testing import ptx
from quantplug_bnb import _ptx as bnb_ptx
from quantplug_hqq import _ptx as hqq_ptx

HALF2 = {torch.bfloat16: "bf16x2", torch.float16: "f16x2"}


def bits16(values, dtype):
    """float values -> their 16-bit patterns in dtype (rounded once, to nearest even)."""
    return [
        int(b) & 0xFFFF
        for b in torch.tensor(values, dtype=torch.float32).to(dtype).view(torch.int16).tolist()
    ]


def unpack(word):
    return [word & 0xFFFF, word >> 16]


# -- the emulator itself ------------------------------------------------------------------------------------


def test_prmt_picks_bytes_and_replicates_signs():
    a, b = 0x03020100, 0x87868584
    assert ptx.prmt(a, b, 0x3210) == a
    assert ptx.prmt(a, b, 0x7654) == b
    assert ptx.prmt(a, b, 0x0415) == 0x00840185
    # bit 3 of a selector nibble: the selected byte's sign bit, replicated
    assert ptx.prmt(a, b, 0x8C8C) == 0x00FF00FF


def test_lop3_follows_its_truth_table():
    a, b, c = 0xF0F0F0F0, 0xCCCCCCCC, 0xAAAAAAAA
    assert ptx.lop3(a, b, c, 0xF0) == a and ptx.lop3(a, b, c, 0xCC) == b and ptx.lop3(a, b, c, 0xAA) == c
    assert ptx.lop3(0x12345678, 0x9ABCDEF0, 0x0F0F0F0F, 0xD8) == 0x1A3C5E70  # c ? b : a, per bit
    assert ptx.lop3(0x00000005, 0x000F000F, 0x43004300, 0xEA) == 0x43004305  # (a & b) | c


def test_fma_rounds_once_to_nearest_even():
    one_third = bits16([1 / 3], torch.bfloat16)[0]
    three = bits16([3.0], torch.bfloat16)[0]
    minus_zero = 0x80008000
    got = ptx.run(
        "fma.rn.bf16x2 $0, $1, $2, $3;", {1: one_third | three << 16, 2: three | three << 16, 3: minus_zero}
    )
    exact = torch.tensor([1 / 3], dtype=torch.bfloat16).double().item() * 3
    assert unpack(got[0]) == bits16([exact, 9.0], torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_half_rounds_as_torch_does_from_float32(dtype):
    # float32 -> bf16/fp16 in torch is one rounding to nearest even: subnormals, overflow, ties and signed zeros
    values = torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 10 ** torch.empty(5000).uniform_(
        -9, 6
    )
    edges = [0.0, -0.0, 65504.0, 65519.0, 65520.0, 6e-8, 2.98e-8, 3.39e38, -3.4e38, 1 + 2**-8, 1 + 3 * 2**-8]
    values = torch.cat([values, torch.tensor(edges)])
    want = [int(b) & 0xFFFF for b in values.to(dtype).view(torch.int16).tolist()]
    got = [ptx.round_half(Fraction(v), dtype, str(v).startswith("-")) for v in values.tolist()]
    assert got == want


@pytest.mark.parametrize(
    ("asm", "operands", "message"),
    [
        ("add.f32 $0, $1, $2;", {1: 0, 2: 0}, "'add.f32' is not emulated"),
        ("mov.b32 $0, t;", {}, "'t' is read before it is written"),
        ("ld.global.nc.v4.b32 {a, b, c, d}, [$1];", {1: 8}, "misaligned"),  # a 16-byte load at 8
        ("ld.global.nc.v4.b32 {a, b, c, d}, [$1];", {1: 32}, "reads address 44, not in memory"),
    ],
)
def test_unknown_instructions_unset_registers_and_bad_loads_are_refused(asm, operands, message):
    with pytest.raises(ValueError, match=message):
        ptx.run(asm, operands, {8: 1, 12: 2, 16: 3, 20: 4, 32: 5, 36: 6, 40: 7})


def test_vector_load_reads_words_at_a_64_bit_address():
    address = 1 << 40
    memory = {address + 4 * i: 0x11111111 * (i + 1) for i in range(4)}
    got = ptx.run("ld.global.nc.v4.b32 {a, b, c, d}, [$1];\nxor.b32 $0, a, d;", {1: address}, memory)
    assert got == {0: 0x11111111 ^ 0x44444444}


# -- bnb: the 16-entry table looked up in registers ---------------------------------------------------------


def planes(table_bits):
    """The byte planes the kernel builds (_table_planes): H0-H3 then L0-L3, four entries a word."""
    high = [sum(((table_bits[4 * j + t] >> 8) & 255) << (8 * t) for t in range(4)) for j in range(4)]
    low = [sum((table_bits[4 * j + t] & 255) << (8 * t) for t in range(4)) for j in range(4)]
    return high + low


def lookup_operands(word, table_bits):
    # the tensor-core kernel's lookup (pack=4)
    operands = {4: word}
    for index, plane in enumerate(planes(table_bits)):  # $5-$36: each word broadcast to four registers
        for r in range(4):
            operands[5 + 4 * index + r] = plane
    return operands


def tables():
    """bitsandbytes' NF4 and FP4 tables (its own, built on the CPU) and a random one."""
    functional = pytest.importorskip("bitsandbytes.functional")
    yield functional.get_4bit_type("nf4", device="cpu").tolist()
    yield functional.get_4bit_type("fp4", device="cpu").tolist()
    yield [random.Random(5).uniform(-2, 2) for _ in range(16)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bnb_table_planes_are_the_tables_bytes_rounded_once(dtype):
    # the planes the kernel builds from the float32 table in memory, in every lane, as planes() builds them
    # from the table rounded to dtype (once, to nearest even)
    asm = bnb_ptx.table_planes(HALF2[dtype])
    address = 1 << 36
    for table in tables():
        words = torch.tensor(table, dtype=torch.float32).view(torch.int32).tolist()
        memory = {address + 4 * i: w for i, w in enumerate(words)}
        want = planes(bits16(table, dtype))
        for lane in (0, 7, 31):
            got = ptx.run(asm, {8: address}, memory, lane=lane)
            assert [got[i] for i in range(8)] == want, (table, lane)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bnb_dot_word_sums_each_codes_table_value_times_its_input(dtype):
    # the one-token GEMV's step: eight codes' values times their inputs, the products of the odd and even
    # elements each summed in dtype, one rounding per fma, in the elements' order
    rng = random.Random(0)
    asm = bnb_ptx.dot_word(HALF2[dtype])
    for table in tables():
        table_bits = bits16(table, dtype)
        values = [ptx.halves(b, dtype)[0] for b in table_bits]
        for _ in range(300):
            packed = [rng.randrange(256) for _ in range(4)]
            codes = [c for b in packed for c in (b >> 4, b & 15)]  # a byte's first element in its high nibble
            x_bits = bits16([rng.gauss(0, 2) for _ in range(8)], dtype)
            address = 16 * rng.randrange(1, 1 << 40)  # the inputs' 64-bit address, as the kernel passes it
            operands = {1: sum(b << (8 * i) for i, b in enumerate(packed)), 2: address}
            operands.update({3 + i: plane for i, plane in enumerate(planes(table_bits))})
            memory = {address + 4 * j: x_bits[2 * j] | x_bits[2 * j + 1] << 16 for j in range(4)}
            got = unpack(ptx.run(asm, operands, memory)[0])
            x = [ptx.halves(b, dtype)[0] for b in x_bits]
            for half in (0, 1):
                total = Fraction(0)
                for element in range(half, 8, 2):
                    exact = Fraction(values[codes[element]]) * Fraction(x[element]) + total
                    bits = ptx.round_half(exact, dtype)
                    total = Fraction(ptx.halves(bits, dtype)[0])
                assert got[half] == bits, (packed, table, half)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bnb_scaled_lookup_is_the_table_value_times_absmax_rounded(dtype):
    rng = random.Random(1)
    asm = bnb_ptx.lookup_scaled(HALF2[dtype])
    for table in tables():
        table_bits = bits16(table, dtype)
        rounded_table = torch.tensor(table, dtype=torch.float32).to(dtype)
        for _ in range(300):
            packed = [rng.randrange(256) for _ in range(4)]
            absmax = torch.tensor([rng.uniform(1e-3, 4.0) for _ in range(4)]).to(dtype)
            absmax_bits = bits16(absmax.float().tolist(), dtype)
            operands = lookup_operands(sum(b << (8 * i) for i, b in enumerate(packed)), table_bits)
            operands[37] = absmax_bits[0] | absmax_bits[1] << 16
            operands[38] = absmax_bits[2] | absmax_bits[3] << 16
            got = ptx.run(asm, operands)
            codes_high = torch.tensor([b >> 4 for b in packed])
            codes_low = torch.tensor([b & 15 for b in packed])
            want_high = (rounded_table[codes_high] * absmax).view(torch.int16)  # one rounding of the product
            want_low = (rounded_table[codes_low] * absmax).view(torch.int16)
            assert unpack(got[0]) + unpack(got[1]) == [int(v) & 0xFFFF for v in want_high.tolist()]
            assert unpack(got[2]) + unpack(got[3]) == [int(v) & 0xFFFF for v in want_low.tolist()]


# -- hqq: (q - zero) * scale, two weights per instruction, as hqq rounds ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hqq_decode_is_bit_for_bit_hqqs_rounding(dtype):
    rng = random.Random(2)
    asm = hqq_ptx.codes_to_weights(HALF2[dtype])
    for _ in range(500):
        packed = [rng.randrange(256) for _ in range(4)]
        # per byte: the top half's scale and zero, then the bottom half's (hqq: zero in [0, 15], scale > 0)
        scale_top, scale_bot = (
            torch.tensor([rng.uniform(1e-3, 0.1) for _ in range(4)]).to(dtype) for _ in "tb"
        )
        zero_top, zero_bot = (torch.tensor([rng.uniform(0, 15) for _ in range(4)]).to(dtype) for _ in "tb")

        def pairs(values):
            b = bits16(values.float().tolist(), dtype)
            return b[0] | b[1] << 16, b[2] | b[3] << 16

        operands = {4: sum(b << (8 * i) for i, b in enumerate(packed))}
        for first, values in zip((5, 7, 9, 11), (scale_top, -zero_top, scale_bot, -zero_bot), strict=True):
            operands[first], operands[first + 1] = pairs(values)
        got = ptx.run(asm, operands)
        # hqq's dequantize in the compute dtype: (W_q - zero), rounded, then * scale, rounded
        top = ((torch.tensor([b >> 4 for b in packed]).to(dtype) - zero_top) * scale_top).view(torch.int16)
        bottom = ((torch.tensor([b & 15 for b in packed]).to(dtype) - zero_bot) * scale_bot).view(torch.int16)
        assert unpack(got[0]) + unpack(got[1]) == [int(v) & 0xFFFF for v in top.tolist()], packed
        assert unpack(got[2]) + unpack(got[3]) == [int(v) & 0xFFFF for v in bottom.tolist()], packed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hqq_dot_word_sums_centred_codes_times_inputs(dtype):
    # the one-token GEMV's step: per half, (q - 8) * x for inputs k and k+2 (low) and k+1 and k+3 (high),
    # each product and the sum rounded once to dtype
    rng = random.Random(3)
    asm = hqq_ptx.dot_word(HALF2[dtype])
    for _ in range(500):
        packed = [rng.randrange(256) for _ in range(4)]
        x_bits = bits16([rng.gauss(0, 2) for _ in range(4)], dtype)
        x = [ptx.halves(b, dtype)[0] for b in x_bits]
        address = 8 * rng.randrange(1, 1 << 40)
        memory = {address: x_bits[0] | x_bits[1] << 16, address + 4: x_bits[2] | x_bits[3] << 16}
        got = ptx.run(asm, {2: sum(b << (8 * i) for i, b in enumerate(packed)), 3: address}, memory)
        for out, codes in ((0, [b >> 4 for b in packed]), (1, [b & 15 for b in packed])):
            for half in (0, 1):
                # float64 is exact here (a code times a 16-bit input, plus a 16-bit sum), zero signs included
                first = to_bits((codes[half] - 8) * x[half] + -0.0, dtype)
                second = (codes[half + 2] - 8) * x[half + 2] + ptx.halves(first, dtype)[0]
                assert unpack(got[out])[half] == to_bits(second, dtype), (packed, out, half)


def to_bits(value, dtype):
    """An exact float64 value rounded once to dtype, as 16 bits (IEEE's zero sign kept)."""
    return ptx.round_half(Fraction(value), dtype, math.copysign(1.0, value) < 0)


# -- gptq ------------------------------------------------------------------------------------------------------


def test_gptq_mantissa_puts_each_code_into_one_plus_a_sixteenth():
    """Each of a packed word's eight codes (bits 4j to 4j+3) comes out as the float32 1 + q / 16, exactly."""
    from quantplug_gptqmodel import _ptx as gptq_ptx

    rng = random.Random(7)
    words = [rng.getrandbits(32) for _ in range(64)] + [0, 0xFFFFFFFF, 0x76543210, 0x89ABCDEF]
    for j in range(8):
        direction, amount = ("shl", 19 - 4 * j) if 4 * j <= 19 else ("shr", 4 * j - 19)
        asm = gptq_ptx.mantissa(direction)
        for word in words:
            got = ptx.run(asm, {1: word, 2: amount})[0]
            want = 1 + ((word >> (4 * j)) & 15) / 16
            assert torch.tensor([got], dtype=torch.int64).to(torch.int32).view(torch.float32).item() == want


def test_gptq_mantissa_names_its_shift():
    from quantplug_gptqmodel import _ptx as gptq_ptx

    with pytest.raises(ValueError, match="'shl' or 'shr'"):
        gptq_ptx.mantissa("rotate")
