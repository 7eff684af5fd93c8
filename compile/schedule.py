"""A CPU schedule for the FFN kernels, written over a few knobs that the tuner searches.

The up part (gate/up rows times x) is an inner-reduction GEMV: the d-reduction is split
into `lanes` partial sums (rfactor) so it becomes SIMD FMAs, and neurons are split into
parallel tasks of `rows`. The down part is an outer reduction over the k active neurons:
  down="j": outputs are split into parallel tasks of `down_chunk` vectors of `down_vec`
            lanes, each task streams the k down columns' slice it owns;
  down="k": the k neurons are split into `down_split` parallel tasks, each summing its
            neurons' columns into its own copy of y (rfactor), then the copies are added.
Generic TVM schedules do not fit this kernel: dlight's CPU rules recompute the whole up
GEMV for every output (~300x slower, see the TVM 0.27 notes), and MetaSchedule crashes in
the 0.27 wheel; hence this hand-written space.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from tvm import s_tir

from ..layout import q8
from ..layout.bundle import BundleSpec


@dataclass(frozen=True)
class Knobs:
    lanes: int = 16          # up GEMV: partial sums per neuron (SIMD lanes)
    rows: int = 8            # up GEMV: neurons per parallel task
    down: str = "j"          # "j": parallel over outputs; "k": split-k with partial outputs
    down_vec: int = 32       # down: output lanes per vector
    down_chunk: int = 1      # down="j": vectors per parallel task
    down_split: int = 2      # down="k": parallel k-chunks (copies of y)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Knobs":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown schedule knobs {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


DEFAULT = Knobs()

# The values the tuner may try; a setting must also pass `valid`.
SPACE: dict[str, tuple] = {
    "lanes": (8, 16, 32, 64),
    "rows": (1, 2, 4, 8, 16, 32, 64),
    "down": ("j", "k"),
    "down_vec": (8, 16, 32, 64),
    "down_chunk": (1, 2, 3, 4, 6, 9),
    "down_split": (2, 4, 8, 16),
}


def valid(knobs: Knobs, d: int) -> bool:
    """Settings whose splits divide d exactly: a remainder adds a predicate to the inner loop."""
    if d % knobs.lanes or d % knobs.down_vec:
        return False
    if knobs.down == "j":
        return (d // knobs.down_vec) % knobs.down_chunk == 0 and knobs.down_split == DEFAULT.down_split
    return knobs.down_chunk == DEFAULT.down_chunk


def schedule_sparse(func, spec: BundleSpec, knobs: Knobs = DEFAULT):
    """The scheduled IRModule of compile.ffn.sparse_ffn(spec)."""
    if not valid(knobs, spec.d_model):
        raise ValueError(f"knobs {knobs} do not fit d_model {spec.d_model}")
    sch = s_tir.Schedule(func)
    run = Q4_RUN if spec.dtype in ("q4", "q4d8") else None
    _up_gemv(sch, "gu", knobs, n_outer=2, run=run)
    _down(sch, knobs, run=Q8_RUN if spec.dtype == "q4d8" else run)
    if spec.dtype == "q4":
        _q4_minimums(sch)
    return sch.mod


# q4: the 16 nibbles that share a byte run and a shift (the low or high halves of a Q4_1
# block's 16 bytes). A vector wider than this mixes shifts and re-reads bytes, which TVM
# emits as a gather: measured on d=576, k=307, 2 cores: 145 us with 32-lane down vectors vs
# 85 us as two unrolled 16-lane vectors. Wider lanes/down_vec knobs are unrolled runs of 16.
Q4_RUN = 16
# q4d8's down column: int8 values in one contiguous run, a scale per 32 outputs. A vector
# within one block multiplies by one broadcast coefficient; a wider one is unrolled blocks.
Q8_RUN = q8.BLOCK


def _vectorize_runs(sch, loop, width: int, run: int | None) -> None:
    """Vectorize `loop` (extent `width`), as unrolled vectors of `run` lanes when narrower."""
    if run is None or width <= run:
        sch.vectorize(loop)
        return
    outer, inner = sch.split(loop, factors=[None, run])
    sch.unroll(outer)
    sch.vectorize(inner)


def _q4_minimums(sch) -> None:
    """The q4 kernel's per-block sum of act * minimum over the k neurons: its init must sit
    outside the k loop, or k = 0 leaves it unwritten."""
    am = sch.get_sblock("am")
    sch.decompose_reduction(am, sch.get_loops(am)[-1])


def _up_gemv(sch, name: str, knobs: Knobs, n_outer: int, run: int | None = None) -> None:
    """rfactor the d-reduction of block `name` (loops: n_outer spatial, then the reduction)."""
    blk = sch.get_sblock(name)
    loops = sch.get_loops(blk)
    _, rji = sch.split(loops[-1], factors=[None, knobs.lanes])
    rf = sch.rfactor(rji, factor_axis=n_outer)
    rf_loops = sch.get_loops(rf)
    io, ii = sch.split(rf_loops[0], factors=[None, knobs.rows])
    sch.parallel(io)
    rjo = sch.get_loops(rf)[-2]
    # before decompose_reduction (TVM 0.27)
    _vectorize_runs(sch, sch.get_loops(rf)[-1], knobs.lanes, run)
    # rf loops now: io, ii, [outer spatial...], rjo, lanes; init goes above rjo.
    sch.decompose_reduction(rf, rjo)
    sch.reverse_compute_at(blk, ii)


def _down(sch, knobs: Knobs, run: int | None = None) -> None:
    yb = sch.get_sblock("y")
    j, ri = sch.get_loops(yb)
    if knobs.down == "j":
        jo, jm, ji = sch.split(j, factors=[None, knobs.down_chunk, knobs.down_vec])
        sch.reorder(jo, ri, jm, ji)
        sch.parallel(jo)
        _vectorize_runs(sch, ji, knobs.down_vec, run)
        sch.decompose_reduction(yb, ri)
        return
    t, _ = sch.split(ri, factors=[knobs.down_split, None])
    yrf = sch.rfactor(t, factor_axis=0)            # y_rf[t, j]: each task's partial y
    loops = sch.get_loops(yrf)                     # j, t, ri_inner
    jo, ji = sch.split(loops[0], factors=[None, knobs.down_vec])
    t_loop, r_loop = loops[1], loops[2]
    sch.reorder(t_loop, r_loop, jo, ji)
    sch.parallel(t_loop)
    _vectorize_runs(sch, ji, knobs.down_vec, run)
    sch.decompose_reduction(yrf, r_loop)
    # The final sum over t copies: vectorised over j.
    j2, _ = sch.get_loops(yb)
    _, j2i = sch.split(j2, factors=[None, knobs.down_vec])
    sch.vectorize(j2i)


def schedule_dense(func, activation: str, knobs: Knobs = DEFAULT):
    """The dense baseline: all three GEMVs inner reductions, each rfactored and parallel."""
    sch = s_tir.Schedule(func)
    for name in (["g", "u"] if activation == "swiglu" else ["u"]):
        _up_gemv(sch, name, knobs, n_outer=1)
    _up_gemv(sch, "y", knobs, n_outer=1)
    return sch.mod
