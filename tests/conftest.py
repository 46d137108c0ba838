import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter (eager calls inside ops.triton_on_cpu()).
# The variable must be set before triton is first imported, which happens when teacache_kernels.ops loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fresh Inductor cache per run would recompile every C++ kernel; keep it in the repo (git-ignored) so
# repeated local runs are fast. CI starts from a clean clone, so CI always measures a cold compile.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "inductor")
)

from teacache_kernels import ops  # noqa: E402  (after the environment is set)
from teacache_kernels.ops._backend import INTERPRET  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# The Triton implementation is testable here: on a GPU, or in the interpreter on CPU.
TRITON_DEVICE = "cuda" if HAS_CUDA else ("cpu" if INTERPRET else None)

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_report_header(config):
    where = "CUDA" if HAS_CUDA else ("CPU, Triton interpreter" if INTERPRET else "CPU, no Triton interpreter")
    return f"teacache_kernels tests: torch {torch.__version__}; Triton kernels run on: {where}"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and leaves no dynamo config behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["torch", "triton"])
def impl(request):
    """Which implementation of the fused ops a test exercises, and on which device."""
    if request.param == "torch":
        yield "cpu"
        return
    if TRITON_DEVICE is None:
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    if TRITON_DEVICE == "cpu":
        with ops.triton_on_cpu():
            yield "cpu"
    else:
        yield "cuda"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run much faster on one thread than on oversubscribed ones; the setting is put back after the
    module. Modules of tiny-model tests use it: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
