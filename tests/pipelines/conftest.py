import pytest
from support.weights import make_weights_root


@pytest.fixture(scope="session")
def weights_root(tmp_path_factory):
    """A weights root (vae/, lidm_dynamic/, lvdm/) of tiny random diffusers models."""
    return make_weights_root(tmp_path_factory.mktemp("weights_root"))
