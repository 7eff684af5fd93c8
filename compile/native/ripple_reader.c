/* The phone-side flash reader: O_DIRECT reads of a list of extents with the pool of reader
 * threads keeping `queue_depth` requests in flight, into a staging buffer on huge pages; the
 * storage probe (one latency-table cell per call, Little's law), the same measurement
 * android_host/probe.py makes with runtime_py/reader.py on the host; and the Python engine's
 * flash hook in C (ripple.flash.bind / read / stats).
 *
 * A phone runs TVM's native RPC server, not Python, so this is what the host calls there
 * (registry.c: how the functions reach TVM). The device's per-token runtime, which a compiled
 * model calls with no host at all, is flash_runtime.c.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ripple_native.h"

/* ------------------------------------------------------------------ random */

static uint64_t xorshift(uint64_t* s) {  /* xorshift64* */
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1DULL;
}

/* ------------------------------------------------------------------ files and buffers */

/* One file open at a time (a replay reads one flash file; reopening per call would add an
 * open() to every token). Calls are serialised by call_mu. */
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;
static char open_path[PATH_CAP];
static int open_fd = -1;

static int open_direct(const char* fn, const char* path, int* fd) {
  if (open_fd >= 0 && strcmp(open_path, path) == 0) {
    *fd = open_fd;
    return 0;
  }
  int f = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (f < 0) {
    int e = ERRNO;
    if (e == EINVAL)
      return fail("RuntimeError", "%s: %s: O_DIRECT is refused on this file system; put the file "
                  "on the device's flash (not tmpfs)", fn, path);
    return fail("RuntimeError", "%s: %s: open failed: %s", fn, path, strerror(e));
  }
  if (open_fd >= 0) close(open_fd);
  open_fd = f;
  strcpy(open_path, path);
  *fd = f;
  return 0;
}

static void forget_file(void) {
  if (open_fd >= 0) close(open_fd);
  open_fd = -1;
  open_path[0] = 0;
}

static char* stage = NULL;  /* on huge pages (map_buffer), grown on demand, never shrunk */
static int64_t stage_bytes = 0;
static size_t stage_mapped = 0;

static int staging(const char* fn, int64_t nbytes, char** out) {
  if (nbytes > stage_bytes) {
    size_t mapped = 0;
    /* whole huge pages: this buffer is not counted as a model's DRAM, and a probe of small
     * requests (64 KiB at depth 8) then reads into huge pages as fio's does */
    char* p = map_buffer(align_up(nbytes, (int64_t)2 << 20), &mapped);
    if (!p)
      return fail("RuntimeError", "%s: cannot map a %lld-byte read buffer: %s", fn, (long long)nbytes,
                  strerror(ERRNO));
    unmap_buffer(stage, stage_mapped);
    stage = p;
    stage_bytes = (int64_t)mapped;
    stage_mapped = mapped;
  }
  *out = stage;
  return 0;
}

/* ------------------------------------------------------------------ the probe */

/* The readers' pool; calls are serialised by call_mu. */
static pool_t pool = POOL_INIT;

static void run_probe(job_t* j, int idx) {
  uint64_t s = (j->seed + 1) * 0x9E3779B97F4A7C15ULL + (uint64_t)idx * 0xBF58476D1CE4E5B9ULL + 1;
  char* dst = j->buf + (int64_t)idx * j->size;
  int64_t n = 0;
  while (now_s() < j->deadline) {
    int64_t slot = j->sequential ? atomic_fetch_add(&j->next, 1) % j->slots
                                 : (int64_t)(xorshift(&s) % (uint64_t)j->slots);
    if (read_full(j, dst, slot * j->size, j->size) != 0) return;
    n++;
  }
  atomic_fetch_add(&j->count, n);
}

static int64_t file_bytes(int fd) { return (int64_t)lseek(fd, 0, SEEK_END); }

/* ------------------------------------------------------------------ exported functions */

/* ripple_storage_prepare(path, nbytes) -> bytes: a test file of pseudo-random bytes (kept when
 * it already has the size), written to a temporary name, fsynced, renamed. */
EXPORT int __tvm_ffi_ripple_storage_prepare(void* self, const TVMFFIAny* args, int32_t n,
                                            TVMFFIAny* result) {
  static const char* fn = "ripple.storage.prepare";
  char path[PATH_CAP], tmp[PATH_CAP + 16];
  int64_t want = 0;
  (void)self;
  if (want_args(fn, n, 2) || arg_str(args, 0, fn, "path", path) ||
      arg_int(args, 1, fn, "nbytes", &want))
    return -1;
  if (want <= 0) return fail("ValueError", "%s: nbytes must be positive", fn);
  want = (want + ALIGN - 1) / ALIGN * ALIGN;
  pthread_mutex_lock(&call_mu);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    int64_t have = file_bytes(fd);
    close(fd);
    if (have >= want) {
      pthread_mutex_unlock(&call_mu);
      ret_int(result, have);
      return 0;
    }
  }
  if (strcmp(open_path, path) == 0) forget_file();
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    int e = ERRNO;
    pthread_mutex_unlock(&call_mu);
    return fail("RuntimeError", "%s: cannot create %s: %s", fn, tmp, strerror(e));
  }
  const int64_t chunk = 8 << 20;
  uint64_t* block = (uint64_t*)malloc((size_t)chunk);
  uint64_t s = 0x243F6A8885A308D3ULL;
  int64_t done = 0;
  int e = block ? 0 : ENOMEM;
  while (!e && done < want) {
    for (int64_t w = 0; w < chunk / 8; ++w) block[w] = xorshift(&s);
    int64_t left = want - done < chunk ? want - done : chunk, off = 0;
    while (!e && off < left) {
      ssize_t k = write(fd, (char*)block + off, (size_t)(left - off));
      if (k < 0 && ERRNO != EINTR) e = ERRNO;
      if (k > 0) off += k;
    }
    done += off;
  }
  free(block);
  if (!e && fsync(fd) != 0) e = ERRNO;
  close(fd);
  if (!e && rename(tmp, path) != 0) e = ERRNO;
  pthread_mutex_unlock(&call_mu);
  if (e) {
    unlink(tmp);
    return fail("RuntimeError", "%s: writing %s failed: %s", fn, path, strerror(e));
  }
  ret_int(result, want);
  return 0;
}

/* ripple_storage_probe(path, size, queue_depth, seconds, sequential, seed) -> latency_us:
 * `queue_depth` threads each keep one O_DIRECT read of `size` bytes in flight (random aligned
 * offsets, or consecutive ones when sequential) for about `seconds`; the mean latency of one
 * request is elapsed * queue_depth / requests (Little's law). */
EXPORT int __tvm_ffi_ripple_storage_probe(void* self, const TVMFFIAny* args, int32_t n,
                                          TVMFFIAny* result) {
  static const char* fn = "ripple.storage.probe";
  char path[PATH_CAP];
  int64_t size = 0, qd = 0, sequential = 0, seed = 0;
  double seconds = 0;
  (void)self;
  if (want_args(fn, n, 6) || arg_str(args, 0, fn, "path", path) ||
      arg_int(args, 1, fn, "size", &size) || arg_int(args, 2, fn, "queue_depth", &qd) ||
      arg_float(args, 3, fn, "seconds", &seconds) || arg_int(args, 4, fn, "sequential", &sequential) ||
      arg_int(args, 5, fn, "seed", &seed))
    return -1;
  if (size < ALIGN || size % ALIGN)
    return fail("ValueError", "%s: size %lld must be a positive multiple of %d", fn, (long long)size, ALIGN);
  if (qd < 1 || qd > 256) return fail("ValueError", "%s: queue_depth %lld must be in 1..256", fn, (long long)qd);
  if (!(seconds > 0 && seconds < 600)) return fail("ValueError", "%s: seconds must be in (0, 600)", fn);
  pthread_mutex_lock(&call_mu);
  int fd, rc = -1;
  char* buf;
  if (open_direct(fn, path, &fd) == 0 && staging(fn, size * qd, &buf) == 0) {
    int64_t slots = file_bytes(fd) / size;
    if (slots < 1) {
      fail("ValueError", "%s: %s is smaller than one %lld-byte request", fn, path, (long long)size);
    } else {
      job_t j;
      memset(&j, 0, sizeof j);
      j.run = run_probe;
      j.nthreads = (int)qd;
      j.fd = fd;
      j.buf = buf;
      j.size = size;
      j.slots = slots;
      j.seed = (uint64_t)seed;
      j.sequential = sequential != 0;
      j.deadline = now_s() + seconds;
      double el;
      if (pool_run(fn, &pool, &j, &el) == 0) {
        long long count = atomic_load(&j.count);
        if (atomic_load(&j.failed)) {
          job_error(fn, path, &j);
        } else if (count == 0) {
          fail("RuntimeError", "%s: no request completed in %g s", fn, seconds);
        } else {
          ret_float(result, el * (double)qd / (double)count * 1e6);
          rc = 0;
        }
      }
    }
  }
  pthread_mutex_unlock(&call_mu);
  return rc;
}

/* ripple_flash_read_extents(path, extents (m, 2) int64, out (>= total,) uint8 or None,
 * queue_depth) -> seconds: every extent (offset, length; multiples of 4096) read with O_DIRECT,
 * up to queue_depth in flight, back to back into `out` (as runtime_py.reader.FlashReader lays
 * them out). The time covers the reads only; the copy into `out` comes after it. */
EXPORT int __tvm_ffi_ripple_flash_read_extents(void* self, const TVMFFIAny* args, int32_t n,
                                               TVMFFIAny* result) {
  static const char* fn = "ripple.flash.read_extents";
  char path[PATH_CAP];
  DLTensor *ext, *out;
  int64_t qd = 0;
  (void)self;
  if (want_args(fn, n, 4) || arg_str(args, 0, fn, "path", path) ||
      arg_tensor(args, 1, fn, "extents", kDLInt, 64, 0, &ext) ||
      arg_tensor(args, 2, fn, "out", kDLUInt, 8, 1, &out) || arg_int(args, 3, fn, "queue_depth", &qd))
    return -1;
  if (ext->ndim != 2 || ext->shape[1] != 2)
    return fail("ValueError", "%s: extents must have shape (m, 2)", fn);
  if (qd < 1 || qd > 256) return fail("ValueError", "%s: queue_depth %lld must be in 1..256", fn, (long long)qd);
  const int64_t m = ext->shape[0];
  const int64_t* e = (const int64_t*)tensor_data(ext);
  int64_t* starts = (int64_t*)malloc(sizeof(int64_t) * (size_t)(m > 0 ? m : 1));
  if (!starts) return fail("RuntimeError", "%s: out of memory", fn);
  int64_t total = 0;
  for (int64_t i = 0; i < m; ++i) {
    if (e[2 * i] < 0 || e[2 * i + 1] <= 0 || e[2 * i] % ALIGN || e[2 * i + 1] % ALIGN) {
      free(starts);
      return fail("ValueError", "%s: extent %lld (%lld, %lld) is not a positive range aligned to "
                  "%d bytes (O_DIRECT)", fn, (long long)i, (long long)e[2 * i],
                  (long long)e[2 * i + 1], ALIGN);
    }
    starts[i] = total;
    total += e[2 * i + 1];
  }
  if (out && numel(out) < total) {
    free(starts);
    return fail("ValueError", "%s: out holds %lld bytes, the extents need %lld", fn,
                (long long)numel(out), (long long)total);
  }
  pthread_mutex_lock(&call_mu);
  int fd, rc = -1;
  char* buf;
  double el = 0;
  if (open_direct(fn, path, &fd) == 0 && staging(fn, total > 0 ? total : ALIGN, &buf) == 0) {
    job_t j;
    memset(&j, 0, sizeof j);
    j.run = run_read;
    j.nthreads = (int)(qd < m ? qd : (m > 0 ? m : 1));
    j.fd = fd;
    j.buf = buf;
    j.ext = e;
    j.starts = starts;
    j.m = m;
    if (m == 0 || pool_run(fn, &pool, &j, &el) == 0) {
      if (atomic_load(&j.failed)) {
        job_error(fn, path, &j);
      } else {
        if (out) memcpy(tensor_data(out), buf, (size_t)total);
        ret_float(result, el);
        rc = 0;
      }
    }
  }
  pthread_mutex_unlock(&call_mu);
  free(starts);
  return rc;
}

/* ------------------------------------------------------------------ the graph's flash hook */

/* compile/graph.py's Relax graph calls the packed function ripple.flash.read(layer, ids, out):
 * fill out (k, cols) with the bundles of neurons `ids`, rows in slot order, bytes as in the
 * flash file. ripple.flash.bind(path, region_offsets (L,), slot_of (L, n), bundle_bytes,
 * alignment, queue_depth) says which layout; it is the Python engine's FlashHook
 * (runtime_py/tvm_ffn.py) in C: runs of active slots, widened to the alignment, blocks
 * shared by two runs read once, all extents of the layer in flight together. */
static struct {
  char path[PATH_CAP];
  int64_t layers, n, bundle_bytes, align, qd;
  int64_t* region;   /* (layers,) */
  int64_t* slot_of;  /* (layers, n) */
  double seconds;    /* totals since bind: read time, bytes read, requests, calls */
  int64_t bytes, reads, calls;
} hook;

static int cmp_i64(const void* a, const void* b) {
  int64_t x = *(const int64_t*)a, y = *(const int64_t*)b;
  return (x > y) - (x < y);
}

EXPORT int __tvm_ffi_ripple_flash_bind(void* self, const TVMFFIAny* args, int32_t n,
                                       TVMFFIAny* result) {
  static const char* fn = "ripple.flash.bind";
  char path[PATH_CAP];
  DLTensor *region, *slot_of;
  int64_t bb = 0, align = 0, qd = 0;
  (void)self;
  if (want_args(fn, n, 6) || arg_str(args, 0, fn, "path", path) ||
      arg_tensor(args, 1, fn, "region_offsets", kDLInt, 64, 0, &region) ||
      arg_tensor(args, 2, fn, "slot_of", kDLInt, 64, 0, &slot_of) ||
      arg_int(args, 3, fn, "bundle_bytes", &bb) || arg_int(args, 4, fn, "alignment", &align) ||
      arg_int(args, 5, fn, "queue_depth", &qd))
    return -1;
  if (region->ndim != 1 || slot_of->ndim != 2 || slot_of->shape[0] != region->shape[0])
    return fail("ValueError", "%s: region_offsets (L,) and slot_of (L, n) disagree", fn);
  if (bb <= 0 || align < 512 || (align & (align - 1)) || align % 512 || qd < 1 || qd > 256)
    return fail("ValueError", "%s: bundle_bytes > 0, alignment a power of two >= 512 and "
                "queue_depth in 1..256 required", fn);
  int64_t L = region->shape[0], N = slot_of->shape[1];
  int64_t* r = (int64_t*)malloc(sizeof(int64_t) * (size_t)L);
  int64_t* so = (int64_t*)malloc(sizeof(int64_t) * (size_t)(L * N));
  if (!r || !so) {
    free(r);
    free(so);
    return fail("RuntimeError", "%s: out of memory", fn);
  }
  memcpy(r, tensor_data(region), sizeof(int64_t) * (size_t)L);
  memcpy(so, tensor_data(slot_of), sizeof(int64_t) * (size_t)(L * N));
  pthread_mutex_lock(&call_mu);
  free(hook.region);
  free(hook.slot_of);
  memset(&hook, 0, sizeof hook);
  strcpy(hook.path, path);
  hook.layers = L;
  hook.n = N;
  hook.bundle_bytes = bb;
  hook.align = align;
  hook.qd = qd;
  hook.region = r;
  hook.slot_of = so;
  pthread_mutex_unlock(&call_mu);
  (void)result;  /* returns None */
  return 0;
}

EXPORT int __tvm_ffi_ripple_flash_read(void* self, const TVMFFIAny* args, int32_t n,
                                       TVMFFIAny* result) {
  static const char* fn = "ripple.flash.read";
  int64_t layer = 0;
  DLTensor *ids_t, *out;
  (void)self;
  (void)result;
  if (want_args(fn, n, 3) || arg_int(args, 0, fn, "layer", &layer) ||
      arg_tensor(args, 1, fn, "ids", kDLInt, 64, 0, &ids_t))
    return -1;
  if (args[2].type_index == kTVMFFIDLTensorPtr)
    out = (DLTensor*)args[2].v_ptr;
  else if (args[2].type_index == kTVMFFITensor)
    out = (DLTensor*)((char*)args[2].v_obj + sizeof(TVMFFIObject));
  else
    return fail("TypeError", "%s: argument 2 (out) must be a tensor", fn);
  pthread_mutex_lock(&call_mu);
  int rc = -1;
  int64_t k = numel(ids_t), bb = hook.bundle_bytes, a = hook.align;
  int64_t *slots = NULL, *ext = NULL, *starts = NULL, *run_ext = NULL, *run_lo = NULL, *run_len = NULL;
  if (!hook.region) {
    fail("RuntimeError", "%s: no layout bound; call ripple.flash.bind(path, region_offsets, "
         "slot_of, bundle_bytes, alignment, queue_depth) first", fn);
    goto done;
  }
  if (layer < 0 || layer >= hook.layers) {
    fail("ValueError", "%s: layer %lld outside 0..%lld", fn, (long long)layer, (long long)hook.layers - 1);
    goto done;
  }
  if (out->ndim != 2 || out->shape[0] != k || out->shape[1] * ((out->dtype.bits + 7) / 8) != bb) {
    fail("ValueError", "%s: out must be (k=%lld, one bundle of %lld bytes per row)", fn,
         (long long)k, (long long)bb);
    goto done;
  }
  size_t cap = (size_t)(k > 0 ? k : 1);
  slots = (int64_t*)malloc(sizeof(int64_t) * cap);
  ext = (int64_t*)malloc(sizeof(int64_t) * 2 * cap);
  starts = (int64_t*)malloc(sizeof(int64_t) * cap);
  run_ext = (int64_t*)malloc(sizeof(int64_t) * cap);
  run_lo = (int64_t*)malloc(sizeof(int64_t) * cap);
  run_len = (int64_t*)malloc(sizeof(int64_t) * cap);
  if (!slots || !ext || !starts || !run_ext || !run_lo || !run_len) {
    fail("RuntimeError", "%s: out of memory", fn);
    goto done;
  }
  const int64_t* ids = (const int64_t*)tensor_data(ids_t);
  const int64_t* so = hook.slot_of + layer * hook.n;
  for (int64_t i = 0; i < k; ++i) {
    if (ids[i] < 0 || ids[i] >= hook.n) {
      fail("ValueError", "%s: neuron id %lld outside 0..%lld", fn, (long long)ids[i], (long long)hook.n - 1);
      goto done;
    }
    slots[i] = so[ids[i]];
  }
  qsort(slots, (size_t)k, sizeof(int64_t), cmp_i64);
  /* runs of consecutive slots -> aligned byte ranges; touching or overlapping ones merged */
  int64_t m = 0, runs = 0, total = 0;
  for (int64_t i = 0; i < k;) {
    int64_t j = i + 1;
    while (j < k && slots[j] == slots[j - 1] + 1) ++j;
    int64_t lo = hook.region[layer] + slots[i] * bb, hi = lo + (j - i) * bb;
    int64_t alo = lo / a * a, ahi = (hi + a - 1) / a * a;
    if (m > 0 && alo <= ext[2 * (m - 1)] + ext[2 * (m - 1) + 1]) {
      int64_t end = ext[2 * (m - 1)] + ext[2 * (m - 1) + 1];
      ext[2 * (m - 1) + 1] += (ahi > end ? ahi - end : 0);
    } else {
      ext[2 * m] = alo;
      ext[2 * m + 1] = ahi - alo;
      ++m;
    }
    run_ext[runs] = m - 1;
    run_lo[runs] = lo;
    run_len[runs] = (j - i) * bb;
    ++runs;
    i = j;
  }
  for (int64_t e = 0; e < m; ++e) {
    starts[e] = total;
    total += ext[2 * e + 1];
  }
  int fd;
  char* buf;
  double el = 0;
  if (open_direct(fn, hook.path, &fd) != 0 || staging(fn, total > 0 ? total : ALIGN, &buf) != 0) goto done;
  job_t j;
  memset(&j, 0, sizeof j);
  j.run = run_read;
  j.nthreads = (int)(hook.qd < m ? hook.qd : (m > 0 ? m : 1));
  j.fd = fd;
  j.buf = buf;
  j.ext = ext;
  j.starts = starts;
  j.m = m;
  if (m > 0 && pool_run(fn, &pool, &j, &el) != 0) goto done;
  if (atomic_load(&j.failed)) {
    job_error(fn, hook.path, &j);
    goto done;
  }
  char* dst = (char*)tensor_data(out);
  for (int64_t r = 0; r < runs; ++r) {
    int64_t e = run_ext[r];
    memcpy(dst, buf + starts[e] + (run_lo[r] - ext[2 * e]), (size_t)run_len[r]);
    dst += run_len[r];
  }
  hook.seconds += el;
  hook.bytes += total;
  hook.reads += m;
  hook.calls += 1;
  rc = 0;
done:
  pthread_mutex_unlock(&call_mu);
  free(slots);
  free(ext);
  free(starts);
  free(run_ext);
  free(run_lo);
  free(run_len);
  return rc;
}

/* ripple_flash_stats(out (4,) float64): [read seconds, bytes read, requests, calls] since bind. */
EXPORT int __tvm_ffi_ripple_flash_stats(void* self, const TVMFFIAny* args, int32_t n,
                                        TVMFFIAny* result) {
  static const char* fn = "ripple.flash.stats";
  DLTensor* out;
  (void)self;
  (void)result;
  if (want_args(fn, n, 1) || arg_tensor(args, 0, fn, "out", kDLFloat, 64, 0, &out)) return -1;
  if (numel(out) != 4) return fail("ValueError", "%s: out must hold 4 float64", fn);
  pthread_mutex_lock(&call_mu);
  double* o = (double*)tensor_data(out);
  o[0] = hook.seconds;
  o[1] = (double)hook.bytes;
  o[2] = (double)hook.reads;
  o[3] = (double)hook.calls;
  pthread_mutex_unlock(&call_mu);
  return 0;
}
