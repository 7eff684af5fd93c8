"""TVM: sparse FFN kernels over the flash bundle layout, their schedule and tuning database,
the per-layer Relax graph with the flash-read hook, named targets and their link."""
