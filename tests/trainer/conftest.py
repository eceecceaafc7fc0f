import numpy as np
import pytest

from lookout_edge.trainer.weights import load_pretrained_weights


@pytest.fixture(scope="session")
def weights() -> dict[str, np.ndarray]:
    return load_pretrained_weights()
