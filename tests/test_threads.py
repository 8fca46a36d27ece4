"""adapter_batch routes per thread and per asyncio task: concurrent batches on one model never mix.

Before, adapter_batch installed forward pre-hooks on the shared layers, so a second thread's batch
replaced the first one's rows and a thread that never entered the block had its outputs changed.
"""

import asyncio
import threading

import pytest
import quantplug as qp
import torch
from torch import nn

ROUNDS = 5


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to float32 rounding: CPU matmuls running in several threads at once may block their sums
    differently (seen: 1e-7 apart). Another adapter's rows are off by O(1) (random adapters, scale 2)."""
    return torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def hqq_model() -> nn.Module:
    if "hqq" not in qp.load_plugins().backends or not qp.load_plugins().status("hqq").ok:
        pytest.skip("the hqq backend is not installed here")
    return qp.quantize(linear_model(), "hqq", skip=())


def with_adapters(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    qp.attach(model, qp.LoraConfig(r=4, target_modules=["0", "2"], init="random"), "a")
    qp.attach(model, qp.LoraConfig(r=4, target_modules=["0", "2"], init="random"), "b")
    qp.attach(model, qp.LoraConfig(r=2, target_modules=["2"], init="random", use_dora=True), "c")
    qp.set_adapter(model, "a")
    return model.eval()


BATCHES = {
    "left": ["a", "b", "__base__", "c"],
    "right": ["c", "c", "a", "b", "__base__", "a"],
}


def alone(model, x, names):
    with torch.no_grad():
        if names is None:
            return model(x)
        with qp.adapter_batch(model, names):
            return model(x)


@pytest.mark.parametrize("build", [linear_model, hqq_model])
def test_threads_serving_different_batches_get_what_each_gets_alone(build):
    model = with_adapters(build())
    torch.manual_seed(2)
    inputs = {"left": torch.randn(4, 64), "right": torch.randn(6, 64), "plain": torch.randn(3, 64)}
    names = {"left": BATCHES["left"], "right": BATCHES["right"], "plain": None}
    want = {key: alone(model, inputs[key], names[key]) for key in inputs}
    barrier = threading.Barrier(len(inputs))
    got: dict[str, list] = {key: [] for key in inputs}
    errors: list[BaseException] = []

    def serve(key):
        try:
            with torch.no_grad():
                if names[key] is None:  # never enters adapter_batch
                    barrier.wait()
                    for _ in range(ROUNDS):
                        got[key].append(model(inputs[key]))
                        barrier.wait()
                    return
                with qp.adapter_batch(model, names[key]):
                    barrier.wait()  # every thread is inside its block (or running plain) at once
                    for _ in range(ROUNDS):
                        got[key].append(model(inputs[key]))
                        barrier.wait()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=serve, args=(key,)) for key in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for key in inputs:
        assert len(got[key]) == ROUNDS
        for output in got[key]:
            assert same(output, want[key]), f"thread {key!r} got another thread's routing"


def test_asyncio_tasks_route_independently():
    model = with_adapters(linear_model())
    torch.manual_seed(3)
    x = torch.randn(4, 64)
    want = {name: alone(model, x, [name] * 4) for name in ("a", "b", "c")}
    want["plain"] = alone(model, x, None)

    def run(x):
        with torch.no_grad():  # grad mode is per thread, not per task: never hold it across an await
            return model(x)

    async def serve(name):
        if name == "plain":
            await asyncio.sleep(0)
            return run(x)
        with qp.adapter_batch(model, [name] * 4):
            await asyncio.sleep(0)  # the other tasks enter and leave their blocks meanwhile
            first = run(x)
            await asyncio.sleep(0)
            return first, run(x)

    async def main():
        return await asyncio.gather(*(serve(n) for n in ("a", "b", "plain", "c")))

    results = dict(zip(("a", "b", "plain", "c"), asyncio.run(main())))
    assert torch.equal(results.pop("plain"), want["plain"])
    for name, outputs in results.items():
        assert all(torch.equal(out, want[name]) for out in outputs), name


def test_routing_ends_with_the_block_even_on_error():
    model = with_adapters(linear_model())
    x = torch.randn(2, 64)
    plain = alone(model, x, None)
    with pytest.raises(ZeroDivisionError), qp.adapter_batch(model, ["b", "c"]):
        raise ZeroDivisionError
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    for layer in qp.lora_layers(model).values():
        assert not layer._forward_pre_hooks, "adapter_batch must not install hooks on shared layers"


def test_a_batch_on_one_model_leaves_another_model_alone():
    first, second = with_adapters(linear_model()), with_adapters(linear_model())
    x = torch.randn(2, 64)
    plain = alone(second, x, None)
    with torch.no_grad(), qp.adapter_batch(first, ["b", "c"]):
        assert torch.equal(second(x), plain)
        with qp.adapter_batch(second, ["c", "__base__"]):
            routed = second(x)
            inner_first = first(x)
    assert torch.equal(routed, alone(second, x, ["c", "__base__"]))
    assert torch.equal(inner_first, alone(first, x, ["b", "c"]))


def test_adapter_batch_with_a_string_is_a_clear_error():
    model = with_adapters(linear_model())
    message = r"one adapter name per row.*\['a'\] \* batch_size"
    with pytest.raises(TypeError, match=message), qp.adapter_batch(model, "a"):
        pass
    with pytest.raises(TypeError, match="hold adapter names"), qp.adapter_batch(model, ["a", None]):
        pass
    with pytest.raises(KeyError, match="'zz'"), qp.adapter_batch(model, ["a", "zz"]):
        pass


def test_compiled_model_routes_per_thread():
    """Under torch.compile the routing is read from a thread-local that dynamo guards on per call."""
    model = with_adapters(linear_model())
    x = torch.randn(3, 64)
    names = ["b", "__base__", "c"]
    want_plain, want_routed = alone(model, x, None), alone(model, x, names)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), want_plain, atol=1e-5)
        with qp.adapter_batch(model, names):
            assert torch.allclose(compiled(x), want_routed, atol=1e-5)
            seen = {}
            other = threading.Thread(target=lambda: seen.setdefault("plain", compiled(x)))
            other.start()
            other.join()
            assert torch.allclose(seen["plain"], want_plain, atol=1e-5)
        assert torch.allclose(compiled(x), want_plain, atol=1e-5)
