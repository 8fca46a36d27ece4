"""GPU tests: every fast kernel against its reference, CUDA graphs, torch.compile.

Skipped, with the reason, on machines without a CUDA device (CI has none);
``scripts/gpu_run.sh`` runs them on one.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not CUDA:
                item.add_marker(
                    pytest.mark.skip(
                        reason="needs a CUDA device (CI has none; scripts/gpu_run.sh runs these)"
                    )
                )


@pytest.fixture
def triton_kernels():
    pytest.importorskip("triton", reason="needs Triton for the fast CUDA kernels")
    from quantplug import _triton as triton_kernels

    return triton_kernels
