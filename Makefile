# Two entry points: `make demo` (one task through the simulated graph) and `make test`.
# Both create .venv/ if missing and install everything into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The PyTorch build known to install on this machine class (see README).
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_TASK ?= bowl_then_stack
STAMP := $(VENV)/.helmstack-installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): setup.py package.xml $(wildcard interfaces/helmstack_interfaces/*/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[ros,learning,test]'
	$(BIN)/helmstack build-interfaces
	touch $(STAMP)

demo: install
	$(BIN)/helmstack run --sim --task $(DEMO_TASK) --out runs/$$(date +%Y%m%d-%H%M%S)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info
