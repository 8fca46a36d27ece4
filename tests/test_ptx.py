"""The plugins' inline PTX (bnb's NF4/FP4 register lookup, hqq's two-weights-per-instruction decode) run on the CPU.

Triton's interpreter cannot run inline assembly, so the fused kernels take
another path there; these tests run the asm itself through
``quantplug.testing.ptx`` on random inputs and compare every output bit with
the rounding the library's own dequantization does, computed in PyTorch.
The GPU tests (tests/gpu) then check the kernels that carry it.
"""

import random

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


@pytest.mark.parametrize(
    ("asm", "operands", "message"),
    [
        ("add.f32 $0, $1, $2;", {1: 0, 2: 0}, "'add.f32' is not emulated"),
        ("mov.b32 $0, t;", {}, "'t' is read before it is written"),
    ],
)
def test_unknown_instructions_and_unset_registers_are_refused(asm, operands, message):
    with pytest.raises(ValueError, match=message):
        ptx.run(asm, operands)


# -- bnb: the 16-entry table looked up in registers ---------------------------------------------------------


def planes(table_bits):
    """The byte planes the kernel builds (_table_planes): H0-H3 then L0-L3, four entries a word."""
    high = [sum(((table_bits[4 * j + t] >> 8) & 255) << (8 * t) for t in range(4)) for j in range(4)]
    low = [sum((table_bits[4 * j + t] & 255) << (8 * t) for t in range(4)) for j in range(4)]
    return high + low


def lookup_operands(word, table_bits):
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
def test_bnb_lookup_gives_each_codes_table_value(dtype):
    rng = random.Random(0)
    asm = bnb_ptx.LOOKUP_VALUES
    for table in tables():
        table_bits = bits16(table, dtype)
        for _ in range(300):
            packed = [rng.randrange(256) for _ in range(4)]
            got = ptx.run(asm, lookup_operands(sum(b << (8 * i) for i, b in enumerate(packed)), table_bits))
            high = unpack(got[0]) + unpack(got[1])  # the four bytes' high nibbles: their first elements
            low = unpack(got[2]) + unpack(got[3])
            assert high == [table_bits[b >> 4] for b in packed], (packed, table)
            assert low == [table_bits[b & 15] for b in packed], (packed, table)


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
