import json

import numpy as np
import pytest

from ripple.android_host.devices import (Device, DeviceError, list_devices, load_device, published_table,
                                         save_device)
from ripple.runtime_py import storage_model as sm
from ripple.runtime_py.storage_model import StorageModelError, StorageProfile

SIZES = [4096 << i for i in range(11)]
QDS = [1, 2, 4, 8, 16, 32]


def affine_profile(overhead_us: float, MBps: float, iops_cap: float = 1e12) -> StorageProfile:
    """A device whose requests cost overhead + size / bandwidth, served q at a time."""
    return published_table(overhead_us + 4096 / MBps, iops_cap, MBps, SIZES, QDS)


def test_latency_at_table_points_is_the_table():
    p = affine_profile(80, 2000)
    for i, s in enumerate(SIZES):
        for j, q in enumerate(QDS):
            assert sm.latency_s(p, s, q) * 1e6 == pytest.approx(p.latency_us[i, j], rel=1e-9)


def test_latency_past_the_table_grows_with_size():
    p = affine_profile(80, 2000)
    big = SIZES[-1]
    assert sm.latency_s(p, 4 * big, 1) == pytest.approx(4 * sm.latency_s(p, big, 1))


def test_batch_time_is_latency_over_queue_depth_per_request():
    p = affine_profile(80, 2000)
    sizes = np.full(32, 65536)
    assert sm.batch_s(p, sizes, 32) == pytest.approx(32 * sm.latency_s(p, 65536, 32) / 32)
    # Fewer requests than the queue holds run at their own count.
    assert sm.batch_s(p, sizes[:4], 32) == pytest.approx(4 * sm.latency_s(p, 65536, 4) / 4)
    assert sm.batch_s(p, [], 32) == 0.0


def test_gap_threshold_is_request_overhead_times_bandwidth():
    p = affine_profile(100, 1000)        # one request alone: 100 us + size / 1 GB/s
    overhead, bw = sm.affine(p, 1)
    assert overhead == pytest.approx(100e-6, rel=0.02)
    assert bw == pytest.approx(1e9, rel=0.02)
    assert sm.gap_threshold_bytes(p, 1) == pytest.approx(100e-6 * 1e9, rel=0.03)


def test_bandwidth_bound_device_has_almost_no_gap_worth_reading():
    # Per-request cost vanishes at depth: the threshold shrinks to under a block.
    p = affine_profile(100, 1000, iops_cap=1e12)
    assert sm.gap_threshold_bytes(p, 32) < sm.gap_threshold_bytes(p, 1) / 10


def test_split_size_is_where_cost_per_byte_flattens():
    p = affine_profile(100, 1000)
    split = sm.split_bytes(p, 1)
    per_byte = [float(sm.service_s(p, s, 1)) / s for s in SIZES]
    assert per_byte[SIZES.index(split)] <= min(per_byte) * 1.05
    assert all(pb > min(per_byte) * 1.05 for s, pb in zip(SIZES, per_byte) if s < split)


def test_back_to_back_requests_cost_no_more_than_sequential_bandwidth():
    p = affine_profile(500, 2000)               # large per-request cost, 2 GB/s sequential
    pieces = np.stack([np.arange(8) * 65536, np.full(8, 65536)], axis=1)
    scattered = pieces * np.array([[3, 1]])     # same sizes, gaps between them
    assert sm.batch_s(p, pieces[:, 1], 8, pieces[:, 0]) == pytest.approx(8 * 65536 / 2e9)
    assert sm.batch_s(p, scattered[:, 1], 8, scattered[:, 0]) == pytest.approx(sm.batch_s(p, scattered[:, 1], 8))
    assert sm.batch_s(p, scattered[:, 1], 8) > 8 * 65536 / 2e9


def test_replay_sums_layers_per_token():
    p = affine_profile(80, 2000)
    layer = np.array([[0, 65536], [1 << 20, 4096]])
    t = sm.replay(p, [[layer, layer], [layer]], 32)
    one = sm.batch_s(p, layer[:, 1], 32)
    assert t.tolist() == pytest.approx([2 * one, one])


@pytest.mark.parametrize("bad", [
    dict(latency_us=np.ones((3, 6))),
    dict(sizes=np.array(SIZES[::-1])),
    dict(latency_us=-np.ones((11, 6))),
    dict(seq_MBps=0.0),
])
def test_malformed_tables_are_refused(bad):
    args = dict(sizes=np.array(SIZES), queue_depths=np.array(QDS), latency_us=np.ones((11, 6)), seq_MBps=100.0)
    args.update(bad)
    with pytest.raises(StorageModelError):
        StorageProfile(**args)


def test_published_table_keeps_the_published_figures():
    p = published_table(27.0, 580_000, 4200, SIZES, QDS)
    assert p.latency_us[0, 0] == pytest.approx(27.0)
    iops_4k_qd32 = 32 / (p.latency_us[0, -1] * 1e-6)
    assert iops_4k_qd32 == pytest.approx(580_000, rel=1e-6)
    mbps = np.array(SIZES)[:, None] * np.array(QDS)[None, :] / p.latency_us
    assert mbps.max() <= 4200 * (1 + 1e-9)


@pytest.mark.parametrize("name", ["oneplus12-ufs40", "pixel8-ufs31"])
def test_shipped_phone_profiles_load_and_say_where_numbers_come_from(name):
    assert name in list_devices()
    d = load_device(name)
    assert d.source == "published figures" and d.details["figures"]
    assert d.storage.latency_us.shape == (len(d.storage.sizes), len(d.storage.queue_depths))
    assert d.cpu_target.startswith("llvm -mtriple=aarch64-linux-android")


def test_device_profile_round_trips_through_json(tmp_path):
    d = Device("t", "measured", affine_profile(80, 2000), 1 << 30, 1 << 20, "llvm", {"x": 1})
    save_device(tmp_path / "t.json", d)
    e = load_device(tmp_path / "t.json")
    assert e.to_json() == d.to_json()


def test_unknown_device_names_the_shipped_ones():
    with pytest.raises(DeviceError, match="oneplus12-ufs40"):
        load_device("no-such-phone")


def test_device_file_without_a_table_is_one_clear_error(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"format": "ripple-device-1", "name": "x", "source": "measured",
                             "storage": {"sizes": [4096]}, "dram_bytes": 1, "dram_budget_bytes": 1,
                             "cpu_target": "llvm"}))
    with pytest.raises(DeviceError, match=str(f)):
        load_device(f)
