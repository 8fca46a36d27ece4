"""FSDP2 (``quantplug.distributed``) on CPU: two gloo processes train the same adapter as one process.

The workers are forked from this process, so they inherit torch, transformers,
bitsandbytes and hqq already imported (importing them again costs ~20 s per
process on the CI machines); a hard deadline fails a hung run instead of
blocking CI.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import quantplug as qp
import torch
from torch import nn

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
pytest.importorskip("transformers")

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 4  # each rank takes GLOBAL_BATCH // WORLD rows; the reference takes all of them
SEQ = 16
DEADLINE_S = 120
# fp32 throughout. The sharded run differs from the single-process one only in the order of
# float sums: each rank's half-batch matmuls, then FSDP2's reduce-scatter averaging the two
# gradients, against one full-batch matmul. Measured (4 SGD steps, 2 ranks, this CPU): at most
# 2.8e-8 (bnb nf4), 3.0e-8 (hqq 4-bit) and 3.5e-8 (bnb nf4 DoRA) on adapter entries of up to
# 0.27, i.e. a few fp32 ulps; the per-step losses agree to 2e-7 relative. ATOL leaves a ~30x margin for other CPUs' kernels
# and is 1e4 times below how far training moves the weights (~0.1, asserted below), so a wrongly
# scaled gradient (summed, not averaged), a rank's lost step or a mis-gathered shard fails.
ATOL = 1e-6
CASES = [("bnb", "nf4", False), ("hqq", "4bit-g64", False), ("bnb", "nf4", True)]  # last: DoRA


def _usable(backend: str) -> bool:
    try:
        return qp.load_plugins().status(backend).ok
    except KeyError:
        return False


def build(backend: str, variant: str | None, adapter: bool = True, dora: bool = False) -> nn.Module:
    """A 2-block LLaMA, fp32, every linear but the head quantized, LoRA on all of them: the same on every rank."""
    from quantplug.testing.models import tiny_llama

    model = qp.quantize(tiny_llama(0, max_position_embeddings=SEQ).train(), backend, variant)
    if adapter:
        torch.manual_seed(1)
        qp.attach(model, qp.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=dora))
        qp.prepare_for_training(model)
    return model


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=generator) for _ in range(STEPS)]


def train(model: nn.Module, rank: int = 0, world: int = 1) -> list[float]:
    """STEPS of SGD with momentum (linear in the gradient, so a wrongly scaled gradient shows; AdamW
    would normalise it away); returns the global batch's mean loss per step."""
    optimizer = torch.optim.SGD(qp.trainable_parameters(model), lr=0.5, momentum=0.9)
    losses = []
    for batch in batches():
        rows = batch.chunk(world)[rank]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{attr}": qp.distributed.full_tensor(getattr(layer, attr)["default"].detach()).clone()
        for path, layer in qp.lora_layers(model).items()
        for attr in ("lora_A", "lora_B", "lora_magnitude")
        if "default" in getattr(layer, attr)
    }


def count_lean_backwards() -> list:
    """A list that grows by one each time the lean training node's backward runs (in this process)."""
    from quantplug import _lean

    calls, grads = [], _lean._grads

    def counted(*args):
        calls.append(1)
        return grads(*args)

    _lean._grads = counted
    return calls


def _worker(rank: int, world: int, init_file: str, out: str, backend: str, variant: str, dora: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = build(backend, variant, dora=dora)
        qp.distributed.shard(model)
        base = next(layer.base for layer in qp.lora_layers(model).values())
        adapters = {id(p) for p in qp.trainable_parameters(model)}
        lean_backwards = count_lean_backwards()
        result = {
            "adapter_sharded": all(type(p).__name__ == "DTensor" for p in qp.trainable_parameters(model)),
            "base_sharded": any(type(p).__name__ == "DTensor" for p in base.parameters()),
            "only_adapters_train": {id(p) for p in model.parameters() if p.requires_grad} == adapters,
            "losses": train(model, rank, world),
            "lean_backwards": len(lean_backwards),
            "layers": len(qp.lora_layers(model)),
        }
        # every rank calls it (the gather is a collective); only rank 0 writes, so rank 1's folder must not appear
        qp.save_adapter(model, os.path.join(out, f"adapter-rank{rank}"))
        result["tensors"] = adapter_tensors(model)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_workers(tmp_path, *args) -> list[dict]:
    """Fork WORLD workers; fail (and kill them) if they are not done by DEADLINE_S."""
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _worker,
        args=(WORLD, str(tmp_path / "init"), str(tmp_path), *args),
        nprocs=WORLD,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the {WORLD} FSDP2 workers did not finish within {DEADLINE_S} s (hung collective?)"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("backend,variant,dora", CASES, ids=["bnb", "hqq", "bnb-dora"])
def test_two_ranks_train_the_same_adapter_as_one_process(tmp_path, backend, variant, dora):
    if not _usable(backend):
        pytest.skip(f"backend {backend} is not usable here")
    build(backend, variant)  # import the backend's library here, once, before forking
    ranks = run_workers(tmp_path, backend, variant, dora)

    model = build(backend, variant, dora=dora)
    start = adapter_tensors(model)
    losses = train(model)
    want = adapter_tensors(model)
    reference = qp.save_adapter(model, tmp_path / "reference")

    for result in ranks:
        assert result["adapter_sharded"] and result["base_sharded"] and result["only_adapters_train"]
        assert result["losses"] == pytest.approx(losses, rel=1e-5)
        # sharded LoRA layers train through the lean node (one backward per layer and step); DoRA does not
        assert result["lean_backwards"] == (0 if dora else STEPS * result["layers"]), result["lean_backwards"]
        assert result["tensors"].keys() == want.keys()
        for key, tensor in result["tensors"].items():
            torch.testing.assert_close(tensor, want[key], atol=ATOL, rtol=0, msg=key)
    moved = max((want[k] - start[k]).abs().max().item() for k in want)
    assert moved > 1e4 * ATOL, (
        f"training barely moved the adapter ({moved:.2e}): the comparison would prove nothing"
    )

    # the files: rank 0 wrote PEFT's format, identical in keys and config, equal values; rank 1 wrote nothing
    from safetensors.torch import load_file

    sharded = tmp_path / "adapter-rank0"
    assert not (tmp_path / "adapter-rank1").exists()
    assert json.loads((sharded / "adapter_config.json").read_text()) == json.loads(
        (reference / "adapter_config.json").read_text()
    )
    got, expected = (
        load_file(sharded / "adapter_model.safetensors"),
        load_file(reference / "adapter_model.safetensors"),
    )
    assert got.keys() == expected.keys() and all(k.startswith("base_model.model.model.layers.") for k in got)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=ATOL, rtol=0, msg=key)

    # after training: load the sharded run's adapter into an unsharded model, then merge it. Both stay in
    # training mode (no dropout here): an eval forward would send bnb to its bf16 CPU inference kernel
    ids = batches()[0][:2]
    fresh = qp.load_adapter(build(backend, variant, adapter=False), sharded)
    with torch.no_grad():
        trained, loaded = model(ids).logits, fresh(ids).logits
        torch.testing.assert_close(loaded, trained, atol=1e-4, rtol=0)
        qp.merge(fresh, mode="dense")
        torch.testing.assert_close(fresh(ids).logits, loaded, atol=1e-4, rtol=0)


# -- what cannot shard says so, before anything changes -----------------------------------------


def test_bnb_int8_refuses_naming_layer_backend_and_reason():
    if not _usable("bnb"):
        pytest.skip("bitsandbytes is not usable here")
    model = build("bnb", "int8", adapter=False)
    qp.attach(model, qp.LoraConfig(r=4, target_modules=["q_proj"]))  # the other int8 layers are refused too
    with pytest.raises(qp.distributed.ShardingError) as caught:
        qp.distributed.shard(model)
    message = str(caught.value)
    assert "backend 'bnb'" in message and "Linear8bitLt" in message and "variant 'int8'" in message
    assert "14 layers: model.layers.0.self_attn.q_proj" in message  # 7 per block: wrapped or not
    assert qp.load_plugins().status("bnb").info.limits["shardable:int8"] in message
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())


class Codes(nn.Module):
    """A toy quantized layer whose backend declares shardable=False."""

    def __init__(self):
        super().__init__()
        self.in_features = self.out_features = 8
        self.register_buffer("codes", torch.ones(8, 8, dtype=torch.int8))

    def forward(self, x):
        return x @ self.codes.float().T


def test_backend_declaring_not_shardable_refuses():
    from types import ModuleType

    reason = "codes are int8 buffers, which FSDP2 does not shard"
    plugin = ModuleType("codes_plugin")
    plugin.quantplug_backend_info = qp.hookimpl(
        lambda: qp.BackendInfo(name="codes", shardable=False, limits={"shardable": reason})
    )
    plugin.quantplug_detect_layer = qp.hookimpl(lambda module: "codes" if isinstance(module, Codes) else None)
    name = qp.register(plugin, name="codes-plugin")
    try:
        model = nn.Sequential(nn.Linear(8, 8), Codes())
        qp.attach(model, qp.LoraConfig(r=2, target_modules=["1"]))
        with pytest.raises(
            qp.distributed.ShardingError, match=rf"backend 'codes', Codes \(1 layer: 1\): {reason}"
        ):
            qp.distributed.shard(model)
    finally:
        qp.unregister(name)


def test_shard_needs_adapters_and_a_process_group():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no adapters"):
        qp.distributed.shard(model)
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["0"]))
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            qp.distributed.shard(model)


def test_find_blocks_takes_transformers_decoder_layers():
    if not _usable("bnb"):
        pytest.skip("bitsandbytes is not usable here")
    model = build("bnb", "nf4")
    assert qp.distributed.find_blocks(model) == list(model.model.layers)
    plain = nn.Sequential(nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    qp.attach(plain, qp.LoraConfig(r=2, target_modules="all-linear"))
    assert qp.distributed.find_blocks(plain) == list(plain[0])


def test_doctor_shows_fsdp2_per_backend(capsys):
    from quantplug.apps.cli import main

    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "fsdp2" in lines[0].split()
    rows = {line.split()[0]: line for line in lines[2:] if line.strip() and not line.startswith(" ")}
    assert "yes" in rows["linear"].split()
    if _usable("bnb"):
        assert "yes, not int8" in rows["bnb"]
