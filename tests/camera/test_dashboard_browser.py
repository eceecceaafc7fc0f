"""The dashboard in a real browser: counts that follow the images, a review that lands in a
dataset `lookout-edge evaluate` reads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image
from selenium.webdriver.common.by import By

from tests.camera.conftest import (
    SCREENSHOTS,
    agent_and_folder,
    folder_camera_config,
    free_port,
    read_events,
    save_image,
    wait_for,
)
from tests.conftest import HEIGHT, lookout_edge_command, make_image


def normal_image(seed: int) -> np.ndarray:
    """A grey image the sample model finds normal, different for each seed."""
    pixels = make_image()
    pixels[0, 0] = (seed, seed, seed)
    return pixels


def screenshot(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    """The top of the page, its charts and frames reloaded first."""
    driver.execute_script("window.scrollTo(0, 0); if (typeof reload === 'function') reload();")
    wait_for(
        lambda: driver.execute_script("return [...document.images].every(i => i.complete)"), 5, "the images"
    )
    driver.save_screenshot(str(SCREENSHOTS / name))


def field(driver, camera: str, name: str) -> str:  # type: ignore[no-untyped-def]
    return str(driver.find_element(By.CSS_SELECTOR, f"[data-camera='{camera}'][data-field='{name}']").text)


def test_overview_camera_page_and_review_in_a_browser(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path, browser
) -> None:
    agent, folder = agent_and_folder(agent_process, tmp_path)
    events_path = tmp_path / "events.jsonl"
    config = folder_camera_config(
        agent.address, "line1", folder, [{"type": "jsonl", "path": str(events_path)}]
    )
    port = free_port()
    config["dashboard"] = {"address": f"127.0.0.1:{port}"}
    daemon = camera_daemon(config)
    images = {"0-good.png": normal_image(0), "1-good.png": normal_image(1)}
    for name, pixels in images.items():
        save_image(folder, name, pixels)
    wait_for(lambda: len(read_events(events_path)) == 2, 30, "two events")

    browser.get(f"http://127.0.0.1:{port}/")
    wait_for(lambda: field(browser, "line1", "inferences") == "2", 10, "2 inferences on the overview")
    assert field(browser, "line1", "last_hour.ok") == "2"
    assert field(browser, "line1", "model_status") == "RUNNING"
    later = {"2-bad.png": make_image(red=HEIGHT // 2), "3-good.png": normal_image(2)}
    for name, pixels in later.items():
        save_image(folder, name, pixels)
    images.update(later)
    # The page updates itself: no reload.
    wait_for(lambda: field(browser, "line1", "inferences") == "4", 30, "4 inferences on the overview")
    assert field(browser, "line1", "last_hour.ng") == "1"
    assert field(browser, "line1", "last_hour.yield") == "0.75"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    screenshot(browser, "overview.png")

    events = {Path(e["source_file"]).name: e for e in read_events(events_path)}
    bad, good = events["2-bad.png"]["event_id"], events["0-good.png"]["event_id"]
    browser.find_element(By.LINK_TEXT, "line1").click()
    wait_for(lambda: "Camera line1" in browser.title, 10, "the camera page")
    assert field(browser, "line1", "inferences") == "4"
    assert len(browser.find_elements(By.CSS_SELECTOR, "img[alt='frame with mask']")) == 1
    for event_id, label in ((bad, "anomaly"), (good, "normal")):
        item = browser.find_element(By.CSS_SELECTOR, f"[data-event='{event_id}']")
        item.find_element(By.TAG_NAME, "input").send_keys(f"checked as {label}")
        item.find_element(By.CSS_SELECTOR, f"button.{label}").click()
        wait_for(
            lambda item=item, label=label: (
                item.find_element(By.CLASS_NAME, "result").text == f"labelled {label}"
            ),
            10,
            "the review",
        )
    screenshot(browser, "camera.png")
    browser.get(f"http://127.0.0.1:{port}/review")
    screenshot(browser, "review.png")

    review = Path(config["state_dir"]) / "review"
    lines = [json.loads(line) for line in (review / "review.manifest").read_text().splitlines()]
    by_id = {line["lookout-edge-review"]["event_id"]: line for line in lines}
    assert set(by_id) == {bad, good}
    for event_id, source, label in ((bad, "2-bad.png", 1), (good, "0-good.png", 0)):
        line = by_id[event_id]
        assert line["anomaly-label"] == label
        assert line["anomaly-label-metadata"]["type"] == "groundtruth/image-classification"
        saved = np.asarray(Image.open(review / line["source-ref"]))
        assert np.array_equal(saved, images[source])  # the frame itself, not the overlay
    assert by_id[bad]["lookout-edge-review"]["note"] == "checked as anomaly"

    evaluated = subprocess.run(
        lookout_edge_command(
            "evaluate",
            str(models_dir / "seg"),
            str(review / "review.manifest"),
            "--json",
            "--report",
            str(tmp_path / "report"),
        ),
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["images"] == {"normal": 1, "anomalous": 1}
    assert daemon.stop() == 0
