/* The phone-side flash reader: O_DIRECT reads of a list of extents with a pool of pthreads
 * keeping `queue_depth` requests in flight, into a 4 KiB-aligned staging buffer; and the
 * storage probe (one latency-table cell per call, Little's law), the same measurement
 * android_host/probe.py makes with runtime_py/reader.py on the host.
 *
 * A phone runs TVM's native RPC server, not Python, so this is what the host calls there.
 * Functions reach TVM two ways:
 *   - module functions: symbols __tvm_ffi_<name>, the C ABI TVM_FFI_DLL_EXPORT_TYPED_FUNC
 *     emits. `load_module(this .so)["ripple_flash_read_extents"]` finds them with no TVM
 *     symbol resolved at load time (a phone's RPC app does not export its runtime's symbols
 *     to the libraries it dlopens); errors go through the context symbol
 *     __TVMFFIErrorSetRaisedFromCStr, which TVM's loader fills in, as it does for kernels.
 *   - global functions (ripple.storage.prepare, ripple.storage.probe, ripple.flash.read_extents,
 *     ripple.flash.bind / read / stats: the Relax graph's flash hook, ripple.native.abi,
 *     ripple.native.globals), registered by a constructor when the TVM FFI symbols can be
 *     found in the process (dlsym; e.g. a server started with --load-library, or the RPC
 *     server's worker after load_module). ripple.native.globals() says how many were
 *     registered; a ripple.flash.read the process already has is kept.
 * No glibc-only calls: the android build links against bionic's libc/libdl (errno through
 * __errno(), see RIPPLE_BIONIC).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <tvm/ffi/c_api.h>

#if defined(RIPPLE_BIONIC) && !defined(__BIONIC__)
/* Built with glibc's headers, linked against bionic: glibc's errno macro calls
 * __errno_location, which bionic does not have. */
extern int* __errno(void);
#define ERRNO (*__errno())
#else
#define ERRNO errno
#endif

#define RIPPLE_ABI 1
#define ALIGN 4096
#define PATH_CAP 4096
#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------ errors */

typedef void (*set_error_fn)(const char* kind, const char* message);
/* Filled in by TVM's library loader (a context symbol), or by the constructor via dlsym. */
EXPORT set_error_fn __TVMFFIErrorSetRaisedFromCStr = NULL;

static int fail(const char* kind, const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (__TVMFFIErrorSetRaisedFromCStr) __TVMFFIErrorSetRaisedFromCStr(kind, msg);
  return -1;
}

/* ------------------------------------------------------------------ arguments */

static int want_args(const char* fn, int32_t got, int32_t want) {
  if (got == want) return 0;
  return fail("TypeError", "%s: takes %d arguments, got %d", fn, want, got);
}

static int arg_int(const TVMFFIAny* a, int i, const char* fn, const char* name, int64_t* out) {
  if (a[i].type_index == kTVMFFIInt || a[i].type_index == kTVMFFIBool) {
    *out = a[i].v_int64;
    return 0;
  }
  return fail("TypeError", "%s: argument %d (%s) must be an int (type index %d given)", fn, i, name,
              a[i].type_index);
}

static int arg_float(const TVMFFIAny* a, int i, const char* fn, const char* name, double* out) {
  if (a[i].type_index == kTVMFFIFloat) {
    *out = a[i].v_float64;
    return 0;
  }
  if (a[i].type_index == kTVMFFIInt) {
    *out = (double)a[i].v_int64;
    return 0;
  }
  return fail("TypeError", "%s: argument %d (%s) must be a number (type index %d given)", fn, i,
              name, a[i].type_index);
}

static int arg_str(const TVMFFIAny* a, int i, const char* fn, const char* name, char* buf) {
  const char* p = NULL;
  size_t n = 0;
  const TVMFFIByteArray* ba;
  switch (a[i].type_index) {
    case kTVMFFIRawStr:
      p = a[i].v_c_str;
      n = strlen(p);
      break;
    case kTVMFFISmallStr:
      p = a[i].v_bytes;
      n = a[i].small_str_len;
      break;
    case kTVMFFIByteArrayPtr:
      ba = (const TVMFFIByteArray*)a[i].v_ptr;
      p = ba->data;
      n = ba->size;
      break;
    case kTVMFFIStr:
      ba = (const TVMFFIByteArray*)((const char*)a[i].v_obj + sizeof(TVMFFIObject));
      p = ba->data;
      n = ba->size;
      break;
    default:
      return fail("TypeError", "%s: argument %d (%s) must be a str (type index %d given)", fn, i,
                  name, a[i].type_index);
  }
  if (n == 0 || n >= PATH_CAP)
    return fail("ValueError", "%s: argument %d (%s): empty or longer than %d bytes", fn, i, name,
                PATH_CAP - 1);
  memcpy(buf, p, n);
  buf[n] = 0;
  return 0;
}

/* A CPU tensor, compact, of the given dtype code/bits (or None when allow_none). */
static int arg_tensor(const TVMFFIAny* a, int i, const char* fn, const char* name, int code,
                      int bits, int allow_none, DLTensor** out) {
  DLTensor* t;
  if (a[i].type_index == kTVMFFINone && allow_none) {
    *out = NULL;
    return 0;
  }
  if (a[i].type_index == kTVMFFIDLTensorPtr)
    t = (DLTensor*)a[i].v_ptr;
  else if (a[i].type_index == kTVMFFITensor)
    t = (DLTensor*)((char*)a[i].v_obj + sizeof(TVMFFIObject));
  else
    return fail("TypeError", "%s: argument %d (%s) must be a tensor%s (type index %d given)", fn, i,
                name, allow_none ? " or None" : "", a[i].type_index);
  if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost)
    return fail("ValueError", "%s: %s must be on the CPU", fn, name);
  if (t->dtype.code != code || t->dtype.bits != bits || t->dtype.lanes != 1)
    return fail("TypeError", "%s: %s must be %s%d", fn, name,
                code == kDLInt ? "int" : code == kDLUInt ? "uint" : "float", bits);
  if (t->strides) {
    int64_t expect = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
      if (t->shape[d] != 1 && t->strides[d] != expect)
        return fail("ValueError", "%s: %s must be contiguous", fn, name);
      expect *= t->shape[d];
    }
  }
  *out = t;
  return 0;
}

static int64_t numel(const DLTensor* t) {
  int64_t n = 1;
  for (int d = 0; d < t->ndim; ++d) n *= t->shape[d];
  return n;
}

static void* tensor_data(const DLTensor* t) { return (char*)t->data + t->byte_offset; }

static void ret_float(TVMFFIAny* r, double v) {
  r->type_index = kTVMFFIFloat;
  r->zero_padding = 0;
  r->v_float64 = v;
}

static void ret_int(TVMFFIAny* r, int64_t v) {
  r->type_index = kTVMFFIInt;
  r->zero_padding = 0;
  r->v_int64 = v;
}

/* ------------------------------------------------------------------ clock, random */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

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

static char* stage = NULL;  /* 4 KiB-aligned, grown on demand, never shrunk */
static int64_t stage_bytes = 0;

static int staging(const char* fn, int64_t nbytes, char** out) {
  if (nbytes > stage_bytes) {
    void* p = NULL;
    int64_t size = (nbytes + ALIGN - 1) / ALIGN * ALIGN;
    if (posix_memalign(&p, ALIGN, (size_t)size) != 0)
      return fail("RuntimeError", "%s: cannot allocate a %lld-byte read buffer", fn, (long long)size);
    memset(p, 0, (size_t)size);  /* first-touch faults now, not while timing reads */
    free(stage);
    stage = (char*)p;
    stage_bytes = size;
  }
  *out = stage;
  return 0;
}

/* ------------------------------------------------------------------ the thread pool */

typedef struct job job_t;
struct job {
  void (*run)(job_t*, int idx);
  int nthreads;
  int fd;
  char* buf;
  /* read_extents */
  const int64_t* ext;
  const int64_t* starts;
  int64_t m;
  /* probe */
  int64_t size, slots;
  double deadline;
  uint64_t seed;
  int sequential;
  /* shared progress */
  atomic_llong next;
  atomic_llong count;
  atomic_int failed;
  int err;
  int64_t err_off, err_len, err_got;
};

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_go = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static int pool_threads = 0;  /* helpers; the calling thread is participant 0 */
static job_t* pool_job = NULL;
static int pool_tickets = 0;  /* helper places of the current job not yet taken */
static int pool_pending = 0;  /* helper places not yet finished */

/* A helper takes a place (a ticket) in the posted job; only as many helpers as the job has
 * places are woken, so a job of 3 reads does not wake a pool grown to 32 threads for another. */
static void* pool_worker(void* arg) {
  (void)arg;
  pthread_mutex_lock(&pool_mu);
  for (;;) {
    while (pool_tickets == 0) pthread_cond_wait(&pool_go, &pool_mu);
    job_t* j = pool_job;
    int idx = j->nthreads - pool_tickets--;
    pthread_mutex_unlock(&pool_mu);
    j->run(j, idx);
    pthread_mutex_lock(&pool_mu);
    if (--pool_pending == 0) pthread_cond_signal(&pool_done);
  }
  return NULL;
}

/* Runs j on j->nthreads participants (this thread and nthreads - 1 helpers); returns the
 * wall seconds from the start signal to the last participant's end. */
static int pool_run(const char* fn, job_t* j, double* seconds) {
  pthread_mutex_lock(&pool_mu);
  while (pool_threads < j->nthreads - 1) {
    pthread_t th;
    int e = pthread_create(&th, NULL, pool_worker, NULL);
    if (e != 0) {
      pthread_mutex_unlock(&pool_mu);
      return fail("RuntimeError", "%s: cannot start reader thread %d: %s", fn, pool_threads + 1,
                  strerror(e));
    }
    pthread_detach(th);
    pool_threads++;
  }
  double t0 = now_s();
  pool_job = j;
  pool_tickets = pool_pending = j->nthreads - 1;
  for (int i = 1; i < j->nthreads; ++i) pthread_cond_signal(&pool_go);
  pthread_mutex_unlock(&pool_mu);
  j->run(j, 0);
  pthread_mutex_lock(&pool_mu);
  while (pool_pending > 0) pthread_cond_wait(&pool_done, &pool_mu);
  pthread_mutex_unlock(&pool_mu);
  *seconds = now_s() - t0;
  return 0;
}

static void record_error(job_t* j, int err, int64_t off, int64_t len, int64_t got) {
  int expected = 0;
  if (atomic_compare_exchange_strong(&j->failed, &expected, 1)) {
    j->err = err;
    j->err_off = off;
    j->err_len = len;
    j->err_got = got;
  }
}

/* Reads len bytes at off into dst completely; 0, or -1 after recording the error. */
static int read_full(job_t* j, char* dst, int64_t off, int64_t len) {
  int64_t got = 0;
  while (got < len) {
    ssize_t k = pread(j->fd, dst + got, (size_t)(len - got), (off_t)(off + got));
    if (k < 0) {
      if (ERRNO == EINTR) continue;
      record_error(j, ERRNO, off, len, got);
      return -1;
    }
    if (k == 0) {
      record_error(j, 0, off, len, got);
      return -1;
    }
    got += k;
  }
  return 0;
}

static void run_read(job_t* j, int idx) {
  (void)idx;
  for (;;) {
    int64_t i = atomic_fetch_add(&j->next, 1);
    if (i >= j->m || atomic_load(&j->failed)) return;
    if (read_full(j, j->buf + j->starts[i], j->ext[2 * i], j->ext[2 * i + 1]) != 0) return;
  }
}

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

static int job_error(const char* fn, const char* path, const job_t* j) {
  if (j->err == 0)
    return fail("RuntimeError", "%s: %s: short read at offset %lld (%lld of %lld bytes); is the "
                "file truncated?", fn, path, (long long)(j->err_off + j->err_got),
                (long long)j->err_got, (long long)j->err_len);
  return fail("RuntimeError", "%s: %s: read of %lld bytes at offset %lld failed: %s", fn, path,
              (long long)j->err_len, (long long)j->err_off, strerror(j->err));
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
      if (pool_run(fn, &j, &el) == 0) {
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
    if (m == 0 || pool_run(fn, &j, &el) == 0) {
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
  if (m > 0 && pool_run(fn, &j, &el) != 0) goto done;
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

EXPORT int __tvm_ffi_ripple_native_abi(void* self, const TVMFFIAny* args, int32_t n,
                                       TVMFFIAny* result) {
  (void)self;
  (void)args;
  if (want_args("ripple.native.abi", n, 0)) return -1;
  ret_int(result, RIPPLE_ABI);
  return 0;
}

static int globals_registered = 0;

EXPORT int __tvm_ffi_ripple_native_globals(void* self, const TVMFFIAny* args, int32_t n,
                                           TVMFFIAny* result) {
  (void)self;
  (void)args;
  if (want_args("ripple.native.globals", n, 0)) return -1;
  ret_int(result, globals_registered);
  return 0;
}

/* ------------------------------------------------------------------ global registration */

static const struct {
  const char* name;
  TVMFFISafeCallType fn;
} GLOBALS[] = {
    {"ripple.storage.prepare", __tvm_ffi_ripple_storage_prepare},
    {"ripple.storage.probe", __tvm_ffi_ripple_storage_probe},
    {"ripple.flash.read_extents", __tvm_ffi_ripple_flash_read_extents},
    {"ripple.flash.bind", __tvm_ffi_ripple_flash_bind},
    {"ripple.flash.read", __tvm_ffi_ripple_flash_read},
    {"ripple.flash.stats", __tvm_ffi_ripple_flash_stats},
    {"ripple.native.abi", __tvm_ffi_ripple_native_abi},
    {"ripple.native.globals", __tvm_ffi_ripple_native_globals},
};
/* A hook its host already registered (the Python engine's FlashHook) is kept. */
static const char* KEEP_EXISTING = "ripple.flash.read";

/* Where a process may keep the TVM FFI: exported to everyone (a Python process), or in a
 * library already loaded under one of these names (looked up without loading it). */
static const char* FFI_LIBS[] = {"libtvm_ffi.so", "libtvm_runtime.so", "libtvm4j_runtime_packed.so"};

static void* ffi_symbol(const char* name) {
  void* p = dlsym(RTLD_DEFAULT, name);
  for (size_t i = 0; !p && i < sizeof FFI_LIBS / sizeof *FFI_LIBS; ++i) {
    void* h = dlopen(FFI_LIBS[i], RTLD_LAZY | RTLD_NOLOAD);
    if (h) p = dlsym(h, name);
  }
  return p;
}

typedef int (*get_global_fn)(const TVMFFIByteArray*, TVMFFIObjectHandle*);
typedef int (*create_fn)(void*, TVMFFISafeCallType, void (*)(void*), TVMFFIObjectHandle*);
typedef int (*set_global_fn)(const TVMFFIByteArray*, TVMFFIObjectHandle, int);
typedef int (*dec_ref_fn)(TVMFFIObjectHandle);

__attribute__((constructor)) static void register_globals(void) {
  if (!__TVMFFIErrorSetRaisedFromCStr)
    __TVMFFIErrorSetRaisedFromCStr = (set_error_fn)ffi_symbol("TVMFFIErrorSetRaisedFromCStr");
  create_fn create = (create_fn)ffi_symbol("TVMFFIFunctionCreate");
  set_global_fn set_global = (set_global_fn)ffi_symbol("TVMFFIFunctionSetGlobal");
  dec_ref_fn dec_ref = (dec_ref_fn)ffi_symbol("TVMFFIObjectDecRef");
  get_global_fn get_global = (get_global_fn)ffi_symbol("TVMFFIFunctionGetGlobal");
  if (!create || !set_global || !dec_ref || !get_global) return;
  for (size_t i = 0; i < sizeof GLOBALS / sizeof *GLOBALS; ++i) {
    TVMFFIObjectHandle f = NULL;
    TVMFFIByteArray name = {GLOBALS[i].name, strlen(GLOBALS[i].name)};
    if (strcmp(GLOBALS[i].name, KEEP_EXISTING) == 0 && get_global(&name, &f) == 0 && f) {
      dec_ref(f);
      continue;
    }
    if (create(NULL, GLOBALS[i].fn, NULL, &f) != 0) continue;
    if (set_global(&name, f, 1) == 0) globals_registered++;
    dec_ref(f);
  }
}
