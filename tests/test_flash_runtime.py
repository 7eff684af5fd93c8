"""The device's flash runtime (compile/native/flash_runtime.c), built for this machine and
loaded into this process, called through its globals as a compiled model calls them: fetch
returns exactly the asked bundles however the reads are planned, whole returns exactly a
layer's extent token after token, the counters add up, and bad input is one line, never a
crash. Real files on the real disk, real O_DIRECT; with verify, a changed byte is a one-line
error of the call that read it."""
import shutil

import numpy as np
import pytest
import tvm

from ripple.compile import native_reader as nr
from ripple.compile.runtime_config import (HEADER, RuntimeConfig, block_crc_tables, read_runtime_config,
                                           write_runtime_config)
from ripple.runtime_py.app_session import (MISSES, PF_BYTES, PF_USED, PF_WAIT, PREFETCHES, QD_MAX, QD_SAMPLES,
                                           QD_SUM)
from ripple.runtime_py.planner import plan_reads

L, N, WHOLE_BYTES = 4, 300, 3 * 4096
IO_WAIT, READ_S, BYTES, NEEDED, REQUESTS, ACTIVE, HITS, FETCHES, WHOLES, PINNED, BUFFERS, O_DIRECT, \
    LAYERS, VERIFIED, VERIFY_S = range(15)


@pytest.fixture(scope="module")
def rt():
    """The globals, after the host build is loaded into this process."""
    mod = nr.load_reader()
    fns = {name: tvm.get_global_func(f"ripple.rt.{name}") for name in ("open", "whole", "fetch", "prefetch",
                                                                     "stats", "close")}
    assert mod[nr.RT_FETCH] is not None       # also a module function, for a runner that dlopens it
    yield fns
    fns["close"]()


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """4 layers x 300 neurons of d=64 SwiGLU fp16 bundles (384 bytes: runs cross blocks) in a
    random placement, and a whole copy of 3 blocks a layer, written as the packer writes them."""
    from ripple.layout import BundleSpec
    from ripple.layout.pack import write_layout
    from ripple.layout.reader import open_layout
    spec, rng = BundleSpec("swiglu", 64, "fp16"), np.random.default_rng(4)
    layers = [(rng.integers(0, 256, (N, spec.bundle_bytes), dtype=np.uint8), rng.permutation(N))
              for _ in range(L)]
    d = tmp_path_factory.mktemp("rt")
    write_layout(d, spec, layers, {}, "random", "flash-runtime-test")
    (d / "whole.rflash").write_bytes(rng.integers(0, 256, L * WHOLE_BYTES, dtype=np.uint8).tobytes())
    return open_layout(d)


def config(layout, name="rt.cfg", folder=None, **change) -> str:
    """A config for `layout` (all layers sparse, nothing pinned) with `change` applied."""
    cfg = RuntimeConfig(
        bundles_file="model.rflash", whole_file="whole.rflash", n_layers=L, n=N,
        bundle_bytes=layout.bundle_bytes, alignment=layout.alignment, view_dtype="float16",
        region_offsets=layout.region_offsets, slot_of=layout.slot_of,
        whole_offsets=np.arange(L) * WHOLE_BYTES, whole_layer_bytes=WHOLE_BYTES,
        layer_mode=np.zeros(L, np.int8), logit_thresholds=np.full(L, 1.0, np.float32),
        pinned_layers=np.zeros(L, bool), pinned_bundles=[np.zeros(0, np.int32)] * L,
        sets_all=False, queue_depth=8, read_ahead=1, collapse_gap_bytes=0, max_request_bytes=0,
        o_direct=True)
    for k, v in change.items():
        setattr(cfg, k, v)
    path = (folder or layout.path.parent) / name
    write_runtime_config(path, cfg)
    return str(path)


def file_bundles(layout, layer: int, ids) -> np.ndarray:
    """uint8 (k, bundle_bytes): the bundles of neurons `ids` as numpy reads them from the file."""
    raw = np.fromfile(layout.path, np.uint8)
    at = layout.region_offsets[layer] + layout.slot_of[layer][np.asarray(ids, np.int64)] * layout.bundle_bytes
    return np.stack([raw[a:a + layout.bundle_bytes] for a in at]) if len(at) else \
        np.zeros((0, layout.bundle_bytes), np.uint8)


def row_set(rows: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in rows}


def stats(rt) -> np.ndarray:
    out = tvm.runtime.tensor(np.zeros(24, np.float64))
    rt["stats"](out)
    return out.numpy()


def fetch(rt, layer, logits) -> np.ndarray:
    got = rt["fetch"](layer, tvm.runtime.tensor(np.ascontiguousarray(logits, np.float32)))
    return got.numpy()


@pytest.mark.parametrize("gap, max_request", [(0, 0), (65536, 8192)], ids=["exact", "collapse+split"])
def test_fetch_returns_the_bundles_of_every_neuron_some_row_predicts(rt, layout, gap, max_request):
    rt["open"](config(layout, collapse_gap_bytes=gap, max_request_bytes=max_request))
    rng = np.random.default_rng(gap + max_request)
    for i in range(25):
        layer, T = int(rng.integers(0, L)), int(rng.integers(1, 4))
        logits = rng.standard_normal((T, N)) * rng.uniform(0.3, 2)
        ids = np.flatnonzero((logits > 1.0).any(axis=0))
        before = stats(rt)
        got = fetch(rt, layer, logits)
        after = stats(rt) - before
        assert got.dtype == np.float16 and got.shape == (len(ids), layout.bundle_bytes // 2)
        assert row_set(got.view(np.uint8)) == row_set(file_bundles(layout, layer, ids)), f"call {i}"
        plan = plan_reads(np.sort(layout.slot_of[layer][ids]), int(layout.region_offsets[layer]),
                          layout.bundle_bytes, layout.alignment, gap, max_request)
        assert after[BYTES] == plan.extents[:, 1].sum() and after[REQUESTS] == len(plan.extents)
        assert after[NEEDED] == len(ids) * layout.bundle_bytes and after[ACTIVE] == len(ids)
        assert after[FETCHES] == 1 and after[HITS] == 0 and after[IO_WAIT] == after[READ_S]
        assert (after[READ_S] > 0) == (len(ids) > 0)     # no active neuron: nothing read
    s = stats(rt)
    assert s[O_DIRECT] == 1 and s[LAYERS] == L and s[PINNED] == 0 and s[WHOLES] == 0
    assert s[BUFFERS] >= 2 * N * layout.bundle_bytes


def test_collapse_reads_fewer_requests_of_more_bytes(rt, layout):
    logits = np.where(np.arange(N) % 7 == 0, 5.0, -5.0)[None, :]
    seen = {}
    for gap in (0, 1 << 20):
        rt["open"](config(layout, collapse_gap_bytes=gap))
        fetch(rt, 2, logits)
        seen[gap] = stats(rt)[[BYTES, REQUESTS]]
    assert seen[1 << 20][1] == 1 < seen[0][1] and seen[1 << 20][0] >= seen[0][0]


def test_pinned_bundles_are_copied_from_dram_and_not_read(rt, layout):
    pinned = np.arange(0, N, 3, dtype=np.int32)
    rt["open"](config(layout, pinned_bundles=[pinned, pinned[:0], pinned[:10], pinned[:0]]))
    assert stats(rt)[PINNED] == (len(pinned) + 10) * layout.bundle_bytes
    logits = np.random.default_rng(7).standard_normal((2, N))
    ids = np.flatnonzero((logits > 1.0).any(axis=0))
    got = fetch(rt, 0, logits)
    assert row_set(got.view(np.uint8)) == row_set(file_bundles(layout, 0, ids))
    misses = np.setdiff1d(ids, pinned)
    plan = plan_reads(np.sort(layout.slot_of[0][misses]), int(layout.region_offsets[0]),
                      layout.bundle_bytes, layout.alignment)
    s = stats(rt)
    assert s[HITS] == len(ids) - len(misses) > 0 and s[ACTIVE] == len(ids)
    assert s[BYTES] == plan.extents[:, 1].sum()        # the pinned ones were read at open only
    everything = fetch(rt, 0, np.full((1, N), 9.0))     # all pinned of the layer among them
    assert row_set(everything.view(np.uint8)) == row_set(file_bundles(layout, 0, np.arange(N)))


def test_sets_all_fetches_every_neuron_and_no_active_neuron_is_an_empty_view(rt, layout):
    rt["open"](config(layout, sets_all=True, view_dtype="uint8"))
    got = fetch(rt, 1, np.full((1, N), -np.inf))
    assert got.dtype == np.uint8 and row_set(got) == row_set(file_bundles(layout, 1, np.arange(N)))
    rt["open"](config(layout, view_dtype="int8"))
    empty = fetch(rt, 1, np.full((3, N), -np.inf))
    assert empty.shape == (0, layout.bundle_bytes) and empty.dtype == np.int8
    s = stats(rt)
    assert s[BYTES] == 0 and s[REQUESTS] == 0 and s[FETCHES] == 1 and s[ACTIVE] == 0


@pytest.mark.parametrize("read_ahead, max_request", [(0, 0), (1, 4096), (2, 8192)])
def test_whole_returns_each_layers_extent_token_after_token(rt, layout, read_ahead, max_request):
    """Layers 1 and 3 are read ahead, layer 2 is pinned, layer 0 sparse: three tokens."""
    whole = np.fromfile(layout.path.parent / "whole.rflash", np.uint8).reshape(L, WHOLE_BYTES)
    rt["open"](config(layout, layer_mode=np.array([0, 1, 1, 1], np.int8), read_ahead=read_ahead,
                      pinned_layers=np.array([0, 0, 1, 0], bool), max_request_bytes=max_request))
    assert stats(rt)[PINNED] == WHOLE_BYTES
    pinned_at = set()
    for token in range(3):
        fetch(rt, 0, np.zeros((1, N)))
        for layer in (1, 2, 3):
            view = rt["whole"](layer)
            a = np.from_dlpack(view)                  # no copy: the runtime's own memory
            assert a.shape == (WHOLE_BYTES,) and a.ctypes.data % 64 == 0
            assert np.array_equal(a, whole[layer]), f"token {token} layer {layer}"
            if layer == 2:
                pinned_at.add(a.ctypes.data)
    assert len(pinned_at) == 1                        # the pinned copy itself, every token
    rt["close"]()
    s = stats(rt)                                     # the counters outlive close
    assert s[WHOLES] == 9 and s[NEEDED] == 9 * WHOLE_BYTES and s[ACTIVE] == 9 * N
    streamed = s[BYTES] / WHOLE_BYTES                 # read-ahead reads that finished
    assert streamed == int(streamed) and 6 <= streamed <= 6 + read_ahead
    per_layer = -(-WHOLE_BYTES // max_request) if max_request else 1
    assert s[REQUESTS] == streamed * per_layer and s[READ_S] > 0 and s[IO_WAIT] >= 0
    region = -(-N * layout.bundle_bytes // layout.alignment) * layout.alignment
    assert s[BUFFERS] == N * layout.bundle_bytes + region + (read_ahead + 1) * WHOLE_BYTES  # gather, stage


def test_a_config_of_whole_layers_only_needs_no_bundles_file(rt, layout, tmp_path):
    """An APP whose layers are all read whole ships no model.rflash: the runtime opens none,
    and refuses a config that names none while a layer would read bundles."""
    import shutil
    shutil.copy(layout.path.parent / "whole.rflash", tmp_path / "whole.rflash")
    whole = np.fromfile(tmp_path / "whole.rflash", np.uint8).reshape(L, WHOLE_BYTES)
    rt["open"](config(layout, folder=tmp_path, bundles_file=None, layer_mode=np.ones(L, np.int8)))
    for layer in range(L):
        assert np.array_equal(np.from_dlpack(rt["whole"](layer)), whole[layer])
    rt["close"]()
    with pytest.raises(ValueError, match=r"names no bundles file, but layer 0 reads bundles; compile the APP again"):
        rt["open"](config(layout, folder=tmp_path, name="sparse.cfg", bundles_file=None))


def test_whole_out_of_order_restarts_the_read_ahead_at_the_asked_layer(rt, layout):
    whole = np.fromfile(layout.path.parent / "whole.rflash", np.uint8).reshape(L, WHOLE_BYTES)
    rt["open"](config(layout, layer_mode=np.ones(L, np.int8), read_ahead=2))
    for layer in (2, 3, 0, 3, 1, 1, 2):
        assert np.array_equal(rt["whole"](layer).numpy(), whole[layer]), layer


@pytest.mark.parametrize("read_ahead", [1, 3])
def test_whole_with_several_layers_in_flight_in_any_order_returns_each_extent(rt, layout, read_ahead):
    """Requests of one block each, several layers' worth in flight at once: jumps in the order
    restart the stream, and only layers whose reads all finished are counted."""
    whole = np.fromfile(layout.path.parent / "whole.rflash", np.uint8).reshape(L, WHOLE_BYTES)
    rt["open"](config(layout, layer_mode=np.ones(L, np.int8), read_ahead=read_ahead,
                      max_request_bytes=4096, queue_depth=16))
    rng = np.random.default_rng(read_ahead)
    layer = 0
    for call in range(200):
        layer = int(rng.integers(0, L)) if rng.random() < 0.1 else (layer + 1) % L
        assert np.array_equal(rt["whole"](layer).numpy(), whole[layer]), call
    rt["close"]()
    s = stats(rt)
    streamed = s[BYTES] / WHOLE_BYTES
    assert streamed == int(streamed) and s[REQUESTS] == 3 * streamed and s[WHOLES] == 200


def test_a_whole_file_truncated_after_open_fails_the_whole_call_of_that_layer_only(rt, layout, tmp_path):
    for f in ("model.rflash", "whole.rflash"):
        shutil.copyfile(layout.path.parent / f, tmp_path / f)
    whole = np.fromfile(tmp_path / "whole.rflash", np.uint8).reshape(L, WHOLE_BYTES)
    rt["open"](config(layout, folder=tmp_path, layer_mode=np.array([0, 1, 1, 1], np.int8), read_ahead=2,
                      max_request_bytes=4096))
    with open(tmp_path / "whole.rflash", "r+b") as f:
        f.truncate(3 * WHOLE_BYTES + 4096)                          # layer 3 keeps its first block
    for token in range(2):
        for layer in (1, 2):
            assert np.array_equal(rt["whole"](layer).numpy(), whole[layer]), (token, layer)
        with pytest.raises(RuntimeError, match=r"ripple.rt.whole: .*whole.rflash: short read at offset \d+ "
                                               r"\(0 of 4096 bytes\); is the file truncated\?") as e:
            rt["whole"](3)
        one_line(e)
    rt["close"]()
    s = stats(rt)
    streamed = s[BYTES] / WHOLE_BYTES                                # never layer 3
    assert streamed == int(streamed) and 4 <= streamed <= 6 and s[REQUESTS] == 3 * streamed

def test_o_direct_off_reads_buffered_and_says_so(rt, layout):
    rt["open"](config(layout, o_direct=False))
    got = fetch(rt, 3, np.full((1, N), 2.0))
    assert row_set(got.view(np.uint8)) == row_set(file_bundles(layout, 3, np.arange(N)))
    assert stats(rt)[O_DIRECT] == 0


def test_the_config_reads_back_as_written(layout):
    pins = [np.array([5, 1], np.int32), np.zeros(0, np.int32), np.array([7], np.int32), np.zeros(0, np.int32)]
    path = config(layout, name="round.cfg", whole_file=None, pinned_bundles=pins, read_ahead=3)
    cfg = read_runtime_config(path)
    assert cfg.whole_file is None and cfg.bundles_file == "model.rflash" and cfg.read_ahead == 3
    assert np.array_equal(cfg.slot_of, layout.slot_of) and cfg.view_dtype == "float16"
    assert [p.tolist() for p in cfg.pinned_bundles] == [[5, 1], [], [7], []]


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg.strip(), msg
    return msg


def test_bad_calls_are_one_line_errors(rt, layout):
    rt["close"]()
    with pytest.raises(RuntimeError, match=r"ripple.rt.whole: no runtime is open; call ripple.rt.open") as e:
        rt["whole"](1)
    one_line(e)
    rt["open"](config(layout, layer_mode=np.array([0, 1, 0, 0], np.int8)))
    ok = tvm.runtime.tensor(np.zeros((1, N), np.float32))
    cases = [
        (ValueError, r"ripple.rt.fetch: layer 7 outside 0..3", lambda: rt["fetch"](7, ok)),
        (ValueError, r"ripple.rt.whole: layer -1 outside 0..3", lambda: rt["whole"](-1)),
        (ValueError, r"ripple.rt.fetch: layer 1 is read whole \(layer_mode 1\); call ripple.rt.whole",
         lambda: rt["fetch"](1, ok)),
        (ValueError, r"ripple.rt.whole: layer 0 is sparse \(layer_mode 0\); call ripple.rt.fetch",
         lambda: rt["whole"](0)),
        (TypeError, r"ripple.rt.fetch: logits must be float32",
         lambda: rt["fetch"](0, tvm.runtime.tensor(np.zeros((1, N), np.float64)))),
        (ValueError, r"ripple.rt.fetch: logits must have shape \(T, 300\), got \(1, 299\)",
         lambda: rt["fetch"](0, tvm.runtime.tensor(np.zeros((1, N - 1), np.float32)))),
        (TypeError, r"ripple.rt.fetch: takes 2 arguments, got 1", lambda: rt["fetch"](0)),
        (ValueError, r"ripple.rt.stats: out must have shape \(24,\) float64",
         lambda: rt["stats"](tvm.runtime.tensor(np.zeros(4, np.float64)))),
    ]
    for kind, says, call in cases:
        with pytest.raises(kind, match=says) as e:
            call()
        one_line(e)
    assert fetch(rt, 0, np.zeros((1, N))).shape[0] == 0     # still open and working


def test_bad_files_are_one_line_errors_at_open(rt, layout, tmp_path):
    for f in ("model.rflash", "whole.rflash"):
        shutil.copyfile(layout.path.parent / f, tmp_path / f)
    good = config(layout, folder=tmp_path, layer_mode=np.array([0, 1, 0, 0], np.int8))
    raw = open(good, "rb").read()
    (tmp_path / "magic.cfg").write_bytes(b"GGUF" + raw[4:])
    (tmp_path / "short.cfg").write_bytes(raw[:-5])
    # slot_of[2, 0] = slot_of[2, 1], past the Python writer's own check: names of 24 bytes, then
    # three int64 and two float32 arrays of L
    slots = np.frombuffer(raw, np.int32, L * N, HEADER.size + 24 + L * 32).copy()
    slots[2 * N] = slots[2 * N + 1]
    (tmp_path / "slots.cfg").write_bytes(raw[:HEADER.size + 24 + L * 32] + slots.tobytes()
                                         + raw[HEADER.size + 24 + L * 32 + slots.nbytes:])
    cases = [
        (str(tmp_path / "none.cfg"), r"none.cfg: open failed: No such file or directory"),
        (str(tmp_path / "magic.cfg"), r"magic.cfg is not a ripple runtime config \(bad magic\)"),
        (str(tmp_path / "short.cfg"), r"short.cfg: the header says \d+ bytes, the file has \d+"),
        (str(tmp_path / "slots.cfg"), r"layer 2: slot_of is not a permutation of 0..299"),
        (config(layout, name="gone.cfg", folder=tmp_path, bundles_file="gone.rflash"),
         r"gone.rflash: open failed: No such file or directory"),
    ]
    os_truncate = tmp_path / "whole.rflash"
    for path, says in cases:
        with pytest.raises(Exception, match=rf"ripple.rt.open: .*{says}") as e:
            rt["open"](path)
        one_line(e)
    with open(os_truncate, "r+b") as f:
        f.truncate(2 * WHOLE_BYTES - 4096)
    with pytest.raises(RuntimeError, match=r"ripple.rt.open: .*whole.rflash holds 20480 bytes, layer 1's "
                                           r"whole extent ends at 24576; the file is truncated") as e:
        rt["open"](good)
    one_line(e)
    with pytest.raises(RuntimeError, match="no runtime is open"):
        rt["fetch"](0, tvm.runtime.tensor(np.zeros((1, N), np.float32)))   # a failed open leaves none


def test_a_file_truncated_after_open_is_a_short_read(rt, layout, tmp_path):
    shutil.copyfile(layout.path, tmp_path / "model.rflash")
    rt["open"](config(layout, folder=tmp_path, whole_file=None))
    with open(tmp_path / "model.rflash", "r+b") as f:
        f.truncate(int(layout.region_offsets[3]))
    with pytest.raises(RuntimeError, match=r"ripple.rt.fetch: .*model.rflash: short read at offset \d+ "
                                           r"\(0 of \d+ bytes\); is the file truncated\?") as e:
        fetch(rt, 3, np.full((1, N), 9.0))
    one_line(e)
    assert fetch(rt, 0, np.full((1, N), 9.0)).shape == (N, layout.bundle_bytes // 2)


# ------------------------------------------------------------------ block checksums (verify)

@pytest.fixture(scope="module")
def checked(layout):
    """The config fields of `ripple compile --verify`: the tables of model.rflash's manifest and
    of a whole copy whose per-block CRCs are computed as the packer computes them."""
    from ripple.layout.block_crc import BlockCrc
    from ripple.layout.whole_copy import WholeCopy
    path = layout.path.parent / "whole.rflash"
    tables = []
    for extent in np.fromfile(path, np.uint8).reshape(L, WHOLE_BYTES):
        crc = BlockCrc(layout.alignment)
        crc.update(extent)
        tables.append(crc.finish())
    copy = WholeCopy(path, "", layout.alignment, (), np.arange(L) * WHOLE_BYTES, WHOLE_BYTES, (),
                     tuple(tables))
    bundle_crc32, whole_crc32 = block_crc_tables(layout, copy)
    return {"verify": True, "bundle_crc32": bundle_crc32, "whole_crc32": whole_crc32}


def flip_byte(layout, folder, name: str, at: int) -> None:
    """Copies of both flash files in `folder`, one bit of `name`'s byte `at` flipped."""
    for f in ("model.rflash", "whole.rflash"):
        shutil.copyfile(layout.path.parent / f, folder / f)
    with open(folder / name, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ 0x10]))


def test_verify_checks_every_block_read_and_counts_it(rt, layout, checked):
    """Sparse layers 0 and 3 (some of layer 0 pinned), layer 1 read ahead, layer 2 pinned whole."""
    whole = np.fromfile(layout.path.parent / "whole.rflash", np.uint8).reshape(L, WHOLE_BYTES)
    pins = [np.arange(0, N, 5, dtype=np.int32)] + [np.zeros(0, np.int32)] * 3
    rt["open"](config(layout, layer_mode=np.array([0, 1, 1, 0], np.int8), pinned_bundles=pins,
                      pinned_layers=np.array([0, 0, 1, 0], bool), max_request_bytes=8192, **checked))
    rng = np.random.default_rng(13)
    for token in range(2):
        for layer in (0, 1, 2, 3):
            if layer in (1, 2):
                assert np.array_equal(rt["whole"](layer).numpy(), whole[layer]), (token, layer)
                continue
            logits = rng.standard_normal((2, N))
            ids = np.flatnonzero((logits > 1.0).any(axis=0))
            got = fetch(rt, layer, logits).view(np.uint8)
            assert row_set(got) == row_set(file_bundles(layout, layer, ids)), (token, layer)
    rt["close"]()
    s = stats(rt)
    assert s[VERIFIED] == s[BYTES] > 0 and s[VERIFY_S] > 0


def test_verify_a_changed_byte_of_a_fetched_bundle_is_a_one_line_error(rt, layout, checked, tmp_path):
    neuron = 17
    at = int(layout.region_offsets[2] + layout.slot_of[2][neuron] * layout.bundle_bytes) + 5
    flip_byte(layout, tmp_path, "model.rflash", at)
    block = at // layout.alignment * layout.alignment
    only = np.where(np.arange(N) == neuron, 5.0, -5.0)[None, :]
    rt["open"](config(layout, folder=tmp_path, **checked))
    with pytest.raises(RuntimeError, match=rf"ripple.rt.fetch: .*model.rflash: block at byte {block} does "
                                           r"not match its checksum; the file changed since `ripple pack`: "
                                           r"pack it again \(`ripple pack`\)") as e:
        fetch(rt, 2, only)
    one_line(e)
    assert fetch(rt, 1, only).shape == (1, layout.bundle_bytes // 2)   # other blocks still read
    rt["open"](config(layout, folder=tmp_path))                       # verify off: read as it is
    got = fetch(rt, 2, only).view(np.uint8)
    assert (got != file_bundles(layout, 2, [neuron])).sum() == 1


def test_verify_a_changed_byte_of_a_whole_layer_fails_its_whole_call(rt, layout, checked, tmp_path):
    at = WHOLE_BYTES + layout.alignment + 7                           # layer 1, its second block
    flip_byte(layout, tmp_path, "whole.rflash", at)
    whole = np.fromfile(layout.path.parent / "whole.rflash", np.uint8).reshape(L, WHOLE_BYTES)
    says = (rf"whole.rflash: block at byte {WHOLE_BYTES + layout.alignment} does not match its checksum; "
            r"the file changed since `ripple pack`: pack it again \(`ripple pack --whole-copy`\)")
    rt["open"](config(layout, folder=tmp_path, layer_mode=np.array([0, 1, 1, 1], np.int8), **checked))
    assert np.array_equal(rt["whole"](3).numpy(), whole[3])         # read ahead: layer 1 is next
    with pytest.raises(RuntimeError, match=rf"ripple.rt.whole: .*{says}") as e:
        rt["whole"](1)
    one_line(e)
    assert np.array_equal(rt["whole"](2).numpy(), whole[2])
    with pytest.raises(RuntimeError, match=rf"ripple.rt.open: .*{says}") as e:   # pinned: read at open
        rt["open"](config(layout, folder=tmp_path, layer_mode=np.array([0, 1, 1, 1], np.int8),
                          pinned_layers=np.array([0, 1, 0, 0], bool), **checked))
    one_line(e)
    rt["open"](config(layout, folder=tmp_path, layer_mode=np.array([0, 1, 1, 1], np.int8)))
    assert (rt["whole"](1).numpy() != whole[1]).sum() == 1            # verify off: no check
    assert stats(rt)[VERIFIED] == 0


def test_verify_tables_read_back_and_a_short_one_is_refused_at_open(rt, layout, checked):
    cfg = read_runtime_config(config(layout, name="verify.cfg", **checked))
    assert cfg.verify and np.array_equal(cfg.bundle_crc32, checked["bundle_crc32"])
    assert np.array_equal(cfg.whole_crc32, checked["whole_crc32"]) and len(cfg.whole_crc32) == L * 3
    assert not read_runtime_config(config(layout, name="plain.cfg")).verify
    with pytest.raises(ValueError, match="empty unless verify is on"):
        config(layout, name="bad.cfg", bundle_crc32=checked["bundle_crc32"])
    short = checked | {"bundle_crc32": checked["bundle_crc32"][:-1]}
    with pytest.raises(ValueError, match=r"ripple.rt.open: .*layer 3's region ends at byte \d+, the "
                                         r"bundles file's checksum table covers \d+") as e:
        rt["open"](config(layout, name="short.cfg", **short))
    one_line(e)



def prefetch(rt, layer, logits) -> int:
    return rt["prefetch"](layer, tvm.runtime.tensor(np.ascontiguousarray(logits, np.float32)))


@pytest.mark.parametrize("gap", [0, 65536], ids=["exact", "collapse"])
def test_a_prefetched_layer_returns_its_own_set_taking_what_was_read_ahead(rt, layout, gap):
    la = np.full(L, np.inf, np.float32)
    la[1:] = 0.5                                  # layers 1..3 may be prefetched
    rt["open"](config(layout, lookahead=2, la_thresholds=la, collapse_gap_bytes=gap))
    rng = np.random.default_rng(gap + 1)
    for i in range(12):
        layer = int(rng.integers(1, L))
        ahead, own = rng.standard_normal((1, N)), rng.standard_normal((2, N))
        before = stats(rt)
        assert prefetch(rt, layer, ahead) > 0
        got = fetch(rt, layer, own)
        d = stats(rt) - before
        ids = np.flatnonzero((own > 1.0).any(axis=0))        # the layer's own set, nothing else
        assert row_set(got.view(np.uint8)) == row_set(file_bundles(layout, layer, ids)) and len(got) == len(ids)
        predicted = (ahead > 0.5).any(axis=0)
        plan = plan_reads(np.sort(layout.slot_of[layer][np.flatnonzero(predicted)]),
                          int(layout.region_offsets[layer]), layout.bundle_bytes, layout.alignment, gap, 0)
        assert d[PF_BYTES] == plan.extents[:, 1].sum() and d[PREFETCHES] == 1, f"call {i}"
        # every bundle of the set came from the prefetch or was a miss read on demand
        assert d[PF_USED] + d[MISSES] == len(ids) and d[PF_USED] >= (predicted[ids]).sum()
        assert d[BYTES] >= d[PF_BYTES] and d[IO_WAIT] >= d[PF_WAIT] >= 0
    s = stats(rt)
    assert 1 <= s[QD_MAX] <= 8 and s[QD_SUM] >= s[QD_SAMPLES] > 0


def test_a_second_prefetch_before_the_fetch_replaces_the_first(rt, layout):
    la = np.full(L, np.inf, np.float32)
    la[2] = 0.0
    rt["open"](config(layout, lookahead=1, la_thresholds=la))
    prefetch(rt, 2, np.full((1, N), 1.0))                     # everything
    prefetch(rt, 2, np.where(np.arange(N) < 10, 1.0, -1.0)[None, :])   # then ten
    own = np.where(np.arange(N) < 20, 2.0, -2.0)[None, :]
    got = fetch(rt, 2, own)
    assert row_set(got.view(np.uint8)) == row_set(file_bundles(layout, 2, np.arange(20)))
    # The first (everything) was dropped: what the second's blocks do not hold is read on demand.
    from ripple.runtime_py.planner import covered_slots
    region = int(layout.region_offsets[2])
    second = plan_reads(np.sort(layout.slot_of[2][:10]), region, layout.bundle_bytes, layout.alignment)
    held = layout.perm[2][covered_slots(second, region, layout.bundle_bytes, N)]
    assert stats(rt)[MISSES] == len(np.setdiff1d(np.arange(20), held)) > 0


def test_prefetch_refuses_a_layer_the_config_does_not_prefetch(rt, layout):
    la = np.full(L, np.inf, np.float32)
    la[1] = 0.0
    rt["open"](config(layout, lookahead=1, la_thresholds=la))
    with pytest.raises(ValueError, match=r"ripple.rt.prefetch: layer 2 is not prefetched in this config") as e:
        prefetch(rt, 2, np.zeros((1, N)))
    one_line(e)
    with pytest.raises(ValueError, match="be > 0 when a layer is prefetched"):     # the writer refuses it
        config(layout, name="bad.cfg", lookahead=0, la_thresholds=la)
    # and the runtime too, given such a file: the header's lookahead (field 20) set to 0
    raw = bytearray(open(config(layout, name="la.cfg", lookahead=1, la_thresholds=la), "rb").read())
    raw[8 + 8 * 20:8 + 8 * 21] = (0).to_bytes(8, "little")
    (layout.path.parent / "la0.cfg").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"layer 1: lookahead threshold 0: only a sparse layer is prefetched, "
                                         r"with a lookahead > 0") as e:
        rt["open"](str(layout.path.parent / "la0.cfg"))
    one_line(e)


def test_the_lru_keeps_what_a_layer_read_and_serves_it_again(rt, layout):
    rt["open"](config(layout, lru_per_layer=50))
    assert stats(rt)[PINNED] == L * 50 * layout.bundle_bytes
    own = np.where(np.arange(N) < 40, 2.0, -2.0)[None, :]
    first = fetch(rt, 3, own)
    before = stats(rt)
    again = fetch(rt, 3, own)
    d = stats(rt) - before
    assert d[HITS] == 40 and d[BYTES] == 0                     # all 40 kept, none read
    assert row_set(again.view(np.uint8)) == row_set(first.view(np.uint8)) \
        == row_set(file_bundles(layout, 3, np.arange(40)))
    # 40 others push 30 of them out (50 rows): 10 stay
    fetch(rt, 3, np.where((np.arange(N) >= 100) & (np.arange(N) < 140), 2.0, -2.0)[None, :])
    before = stats(rt)
    fetch(rt, 3, own)
    assert (stats(rt) - before)[HITS] == 10
