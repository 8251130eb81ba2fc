# One-command set-up: every target creates the virtual environment it needs from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all demo bench clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The web monitor's browser test (tests/test_web_monitor.py) drives Debian's chromium through
# Playwright (Playwright's own browser download is not used). Installed here when missing (CI
# runs as root on Debian); without it that test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "installing Debian's chromium for tests/test_web_monitor.py"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
			|| echo "could not install chromium: tests/test_web_monitor.py will skip"; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) browser
	$(PY) -m pytest -q

# The main job: a small TIVA trial (NMPC + EKF against the PID on the same 4 patients) with
# its HTML report; one closed-loop run with a plot; an open-loop simulation of a regimen.
demo: $(STAMP)
	rm -rf out/demo/tiva
	$(VENV)/bin/mpc-dose compare scenarios/tiva_benchmark.toml scenarios/tiva_benchmark_pid.toml \
		--patients 4 --quiet --out out/demo/tiva
	$(VENV)/bin/mpc-dose report out/demo/tiva
	$(VENV)/bin/mpc-dose run scenarios/pid_tiva_noise.toml --patient 13 --seed 1 \
		--out out/demo/closed_loop
	$(VENV)/bin/mpc-dose simulate --model propofol-schnider+remifentanil-minto+bis-bouillon \
		--covariates age=35,height_cm=170,weight_kg=70,sex=male \
		--doses scenarios/doses/tiva_induction.csv --duration 40min --step 1 \
		--out out/demo/open_loop/timeseries.csv --plot

bench: $(STAMP) browser
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/simulate_speed.py
	$(PY) benchmarks/validate_anaesthesia.py
	$(PY) benchmarks/plant_throughput.py
	$(PY) benchmarks/nmpc_speed.py
	$(PY) benchmarks/tiva_training.py
	$(PY) benchmarks/zmq_load.py
	$(PY) benchmarks/trial_speed.py
	$(PY) benchmarks/fuzz_bridge.py
	$(PY) benchmarks/web_monitor.py

clean:
	rm -rf $(VENV) out .pytest_cache
