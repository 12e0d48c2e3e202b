import pytest
import torch

from normbench.data import DEBIAN_FASHION_MNIST, fetch


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory):
    """A data root holding Fashion-MNIST and its tensor cache, prepared from Debian's package as `make setup` does."""
    if not DEBIAN_FASHION_MNIST.exists():
        pytest.fail("Debian's dataset-fashion-mnist is not installed; `make test` installs it (as root)")
    root = tmp_path_factory.mktemp("data")
    fetch("fashion_mnist", root, download=False)
    return root


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU"))])
def device(request) -> str:
    """Each device a test's claim must hold on: the CPU always, CUDA where a GPU is present."""
    return request.param
