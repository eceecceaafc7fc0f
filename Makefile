# lookout-edge: `make setup` once, then `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

STAMP := $(VENV)/.installed

# Debian packages the camera tests run: a GStreamer RTSP server, the mosquitto broker, and the
# browser the dashboard test drives.
SYSTEM_PACKAGES := gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-ugly python3-gi mosquitto chromium chromium-driver

.PHONY: setup system-packages proto lint test demo bench clean components

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) system-packages

# Installs only what is missing, and only where apt-get exists.
system-packages:
	@command -v apt-get >/dev/null || exit 0; \
	missing=$$(for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; }

proto: setup
	$(PY) proto/generate.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The wheel smoke installs the built wheel into a clean venv and trains, serves and detects with it.
test: lint
	$(PY) tests/wheel_smoke.py
	$(BIN)/pytest

demo: setup
	$(PY) -m lookout_edge.cli.demo

bench: setup
	$(PY) bench/bench_agent.py $(BENCH_ARGS)
	$(PY) bench/bench_trainer.py
	$(PY) bench/bench_camera.py
	$(PY) bench/bench_factory_io.py
	$(PY) bench/bench_soak.py
	$(PY) bench/bench_scale.py
	$(PY) bench/bench_quality.py $(QUALITY_ARGS)
	$(PY) bench/bench_custom_labels.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Greengrass components (docs/greengrass.md): make components BUCKET=my-bucket [PREFIX=path]
# [COMPONENT_ARGS="--offline aarch64 --offline-python 3.10 --camera-model my-model:1.0.0"]
components: setup
	@test -n "$(BUCKET)" || { echo "usage: make components BUCKET=bucket [PREFIX=prefix]"; exit 2; }
	$(PY) -m lookout_edge.components.build --bucket "$(BUCKET)" --prefix "$(PREFIX)" $(COMPONENT_ARGS)
