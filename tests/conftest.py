import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(params=["llama", "gpt2"])
def arch(request):
    return request.param
