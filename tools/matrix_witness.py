"""A tiny attach + train step + merge on one backend: proof that a backend works here.

Run by the matrix's doctor sessions (``python tools/matrix_witness.py hqq``)
next to a backend that is too old or broken, to show that the other
backends keep working. Prints one JSON line; exits 1 with the reason when
the backend does not work.
"""

from __future__ import annotations

import json
import sys

MODE = "dense"


def main(backend: str) -> int:
    import quantplug as qp
    import torch
    from torch import nn

    statuses = {row.name: row for row in qp.backends()}  # must not raise, whatever else is installed
    status = statuses.get(backend)
    if status is None or not status.ok:
        print(json.dumps({"backend": backend, "ok": False, "reason": f"status: {status}"}))
        return 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    model = qp.quantize(model, backend)
    kinds = sorted({str(qp.detect(m)) for m in model.modules() if qp.detect(m) not in (None, "linear")})
    qp.attach(model, qp.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
    qp.prepare_for_training(model)
    params = qp.trainable_parameters(model)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.05)
    x = torch.randn(4, 64)
    loss = model(x).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in params), "adapter parameters got no gradient"
    model.eval()
    with torch.no_grad():
        before = model(x).float()
        report = qp.merge(model, mode=MODE)
        after = model(x).float()
    rel = ((after - before).norm() / before.norm()).item()
    ok = bool(torch.isfinite(after).all()) and rel < 5e-2 and kinds == [backend]
    print(
        json.dumps(
            {
                "backend": backend,
                "ok": ok,
                "layers": kinds,
                "merge_rel_err": rel,
                "report": str(type(report).__name__),
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
