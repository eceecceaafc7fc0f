"""Monochrome images (8- and 16-bit) through every reader: lookout_edge.images, the trainer, the
client and `lookout-edge detect` against an agent process, and the camera's decoded sources."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from lookout_edge.client.camera.config import CameraConfig, Crop
from lookout_edge.client.camera.sources import FileSource, read_image, to_model_input
from lookout_edge.client.camera.status import CameraStats
from lookout_edge.client.edge_client import EdgeAgentClient, as_rgb_array
from lookout_edge.images import gray_to_rgb888, to_rgb888
from lookout_edge.trainer.datasets import load_dataset
from lookout_edge.trainer.synthetic import write_synthetic_dataset
from lookout_edge.trainer.train import TrainOptions, train

from .conftest import AgentProcess, lookout_edge_command, short_tmpdir

RAMP16 = (np.arange(64 * 80, dtype=np.uint32).reshape(64, 80) * 13 % 65536).astype(np.uint16)


def rgb(gray8: np.ndarray) -> np.ndarray:
    return np.repeat(gray8[:, :, None], 3, axis=2)


def test_sixteen_bits_keep_their_eight_most_significant_bits(tmp_path: Path) -> None:
    expected = rgb((RAMP16 >> 8).astype(np.uint8))
    png = tmp_path / "mono16.png"
    Image.fromarray(RAMP16).save(png)
    big_endian = Image.frombytes("I;16B", (80, 64), RAMP16.astype(">u2").tobytes())
    as_int32 = Image.fromarray(RAMP16.astype(np.int32), "I")  # as some Pillow versions open 16-bit PNGs
    with Image.open(png) as opened:
        assert opened.mode == "I;16"
        for image in (opened, big_endian, as_int32):
            np.testing.assert_array_equal(to_rgb888(image), expected, err_msg=image.mode)
        # What the conversion must not do: Pillow's own convert clips everything above 255.
        assert (np.asarray(opened.convert("RGB")) == 255).mean() > 0.9
    for array in (RAMP16, RAMP16.astype(">u2"), RAMP16[:, :, None]):
        np.testing.assert_array_equal(to_rgb888(array), expected)
    # "I" values outside 0..65535 are clipped, not wrapped.
    clipped = to_rgb888(Image.fromarray(np.array([[-5, 70000]], np.int32), "I"))
    np.testing.assert_array_equal(clipped[0, :, 0], [0, 255])


def test_eight_bit_gray_palette_and_alpha_are_replicated() -> None:
    gray = (np.arange(64 * 80).reshape(64, 80) % 256).astype(np.uint8)
    expected = rgb(gray)
    palette = Image.fromarray(gray).convert("P")  # a gray palette image
    with_alpha = Image.fromarray(np.dstack([gray, np.full_like(gray, 7)]), "LA")
    for image in (Image.fromarray(gray), with_alpha, palette):
        np.testing.assert_array_equal(to_rgb888(image), expected, err_msg=image.mode)
    np.testing.assert_array_equal(to_rgb888(gray), expected)
    binary = to_rgb888(Image.fromarray(gray > 127))
    np.testing.assert_array_equal(binary, rgb(np.where(gray > 127, 255, 0).astype(np.uint8)))
    colour = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb888(Image.fromarray(colour)), colour)
    np.testing.assert_array_equal(to_rgb888(colour), colour)
    # Camera formats of fewer bits, least significant bits first: 10-bit 1023 is white.
    np.testing.assert_array_equal(
        gray_to_rgb888(np.array([[0, 512, 1023]], np.uint16), 10)[0, :, 0], [0, 128, 255]
    )


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (Image.fromarray(np.zeros((4, 4), np.float32), "F"), "floating-point images are not supported"),
        (np.zeros((4, 4), np.float32), r"got shape \(4, 4\) and dtype float32"),
        (np.zeros((4, 4, 4), np.uint8), r"got shape \(4, 4, 4\)"),
        (np.zeros((4, 4), np.int64), "dtype int64"),
    ],
)
def test_what_is_not_an_image_is_a_clear_error(given: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_rgb888(given)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        as_rgb_array(given)  # type: ignore[arg-type]


def _frame(values: np.ndarray, pixel_format: str) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(values, format=pixel_format)
    assert frame.format.name == pixel_format
    return frame


def test_gray_camera_frames_become_rgb888_by_the_same_rule() -> None:
    ramp10 = (RAMP16 >> 6).astype(np.uint16)
    for values, pixel_format, bits in (
        (RAMP16, "gray16le", 16),
        (RAMP16, "gray16be", 16),
        (ramp10, "gray10le", 10),
        ((RAMP16 >> 8).astype(np.uint8), "gray", 8),
    ):
        expected = gray_to_rgb888(values, bits)
        frame = _frame(values, pixel_format)
        np.testing.assert_array_equal(to_model_input(frame, None, None), expected, err_msg=pixel_format)
        crop = Crop(x=8, y=4, width=40, height=32)
        np.testing.assert_array_equal(to_model_input(frame, crop, None), expected[4:36, 8:48])
        resized = to_model_input(frame, None, (40, 32))
        assert resized.shape == (32, 40, 3) and resized.dtype == np.uint8
        assert (resized[..., 0] == resized[..., 2]).all()
    # FFmpeg's own gray16 -> rgb24 rounds (up to 1 level off): the camera does not use it.
    assert (_frame(RAMP16, "gray16le").to_ndarray(format="rgb24")[..., 0] != RAMP16 >> 8).any()


def test_a_gray16_video_file_and_a_16_bit_image_folder_file(tmp_path: Path) -> None:
    video = tmp_path / "mono.mkv"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("ffv1", rate=5)
        stream.width, stream.height, stream.pix_fmt = 80, 64, "gray16le"
        for shift in range(3):
            frame = _frame(np.roll(RAMP16, shift, axis=1), "gray16le")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    camera = CameraConfig(name="mono", source=str(video), model="m")
    source = FileSource(camera, CameraStats("mono"))
    frames = []
    while (frame := source.next_frame(1.0)) is not None:
        frames.append(frame)
    source.close()
    assert len(frames) == 3 and frames[0].raw.format.name == "gray16le"
    for shift, frame in enumerate(frames):
        expected = gray_to_rgb888(np.roll(RAMP16, shift, axis=1), 16)
        np.testing.assert_array_equal(to_model_input(frame.raw, None, None), expected)
    png = tmp_path / "mono16.png"
    Image.fromarray(RAMP16).save(png)
    np.testing.assert_array_equal(read_image(png, 10**6), gray_to_rgb888(RAMP16, 16))


def _mono_dataset(root: Path) -> tuple[Path, Path]:
    """The synthetic dataset as 16-bit monochrome PNGs (gray * 257: full scale), and 8-bit ones."""
    write_synthetic_dataset(root / "colour", normal=20, anomalous=10, segmentation=False)
    for kind, scale, dtype in (("mono16", 257, np.uint16), ("mono8", 1, np.uint8)):
        for path in sorted((root / "colour").glob("*/*.png")):
            target = root / kind / path.relative_to(root / "colour")
            target.parent.mkdir(parents=True, exist_ok=True)
            gray = np.asarray(Image.open(path).convert("L")).astype(np.uint32) * scale
            Image.fromarray(gray.astype(dtype)).save(target)
    return root / "mono16", root / "mono8"


def test_train_and_detect_on_16_bit_monochrome_images(tmp_path: Path) -> None:
    mono16, mono8 = _mono_dataset(tmp_path / "data")
    sample = mono16 / "anomaly" / "anomaly-000.png"
    with Image.open(sample) as image:
        assert image.mode == "I;16" and np.asarray(image).max() > 255
    models = tmp_path / "models"
    package = train(mono16, models / "mono", "mono", options=TrainOptions(short_side=96)).package
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["metrics"]["auroc"] >= 0.9  # learnt from the gray pixels, not from white
    # The training images read as the 8-bit images they were made from: v * 257 >> 8 == v.
    dataset = load_dataset(mono16).train
    eight_bit = load_dataset(mono8).train
    for a, b in zip(dataset.samples[::7], eight_bit.samples[::7], strict=True):
        np.testing.assert_array_equal(dataset.load_image(a), eight_bit.load_image(b))

    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    normal = mono16 / "normal" / "normal-000.png"
    expected = {
        path: float(session.run(["anomaly_score"], {"image": dataset.load_image(s)})[0])
        for path, s in ((normal, dataset.samples[0]), (sample, dataset.samples[20]))
    }
    assert dataset.samples[20].image_path == sample
    socket_dir = short_tmpdir()
    agent = AgentProcess(socket_dir / "agent.sock", models)
    try:
        agent.wait_ready()
        with EdgeAgentClient(agent.address) as client:
            client.start_and_wait("mono")
            # The typed client reads the 16-bit file itself, and takes the 8-bit gray array.
            assert client.detect(sample, "mono").anomaly_score == pytest.approx(expected[sample], abs=1e-5)
            gray = np.asarray(Image.open(mono8 / "anomaly" / "anomaly-000.png"))
            assert gray.ndim == 2
            assert client.detect(gray, "mono").anomaly_score == pytest.approx(expected[sample], abs=1e-5)
        completed = subprocess.run(
            lookout_edge_command(
                "detect", str(normal), str(sample), "--model", "mono", "--json", "--socket", agent.address
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr
        results = json.loads(completed.stdout)
        for result in results:
            assert result["anomaly_score"] == pytest.approx(expected[Path(result["image"])], abs=1e-5)
            assert result["is_anomalous"] == (result["anomaly_score"] >= result["anomaly_threshold"])
    finally:
        agent.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
