/* What the files of the native library share (internal; not an API an app includes):
 * errors and packed-function arguments (ffi_args.c), the clock and the pool of reader
 * threads (read_pool.c). Everything here is hidden: the library exports only its
 * __tvm_ffi_* functions and the context symbol TVM's loader fills in.
 */
#ifndef RIPPLE_NATIVE_H_
#define RIPPLE_NATIVE_H_

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <tvm/ffi/c_api.h>

#if defined(RIPPLE_BIONIC) && !defined(__BIONIC__)
/* Built with glibc's headers, linked against bionic: glibc's errno macro calls
 * __errno_location, which bionic does not have. */
extern int* __errno(void);
#define ERRNO (*__errno())
#else
#define ERRNO errno
#endif

#define RIPPLE_ABI 2
#define ALIGN 4096
#define PATH_CAP 4096
#define EXPORT __attribute__((visibility("default")))
#define INTERNAL __attribute__((visibility("hidden")))

/* ------------------------------------------------------------------ errors, arguments */

typedef void (*set_error_fn)(const char* kind, const char* message);
/* Filled in by TVM's library loader (a context symbol), or by the constructor via dlsym. */
extern EXPORT set_error_fn __TVMFFIErrorSetRaisedFromCStr;

INTERNAL int fail(const char* kind, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
INTERNAL int want_args(const char* fn, int32_t got, int32_t want);
INTERNAL int arg_int(const TVMFFIAny* a, int i, const char* fn, const char* name, int64_t* out);
INTERNAL int arg_float(const TVMFFIAny* a, int i, const char* fn, const char* name, double* out);
INTERNAL int arg_str(const TVMFFIAny* a, int i, const char* fn, const char* name, char* buf);
INTERNAL int arg_tensor(const TVMFFIAny* a, int i, const char* fn, const char* name, int code,
                        int bits, int allow_none, DLTensor** out);
INTERNAL int64_t numel(const DLTensor* t);
INTERNAL void* tensor_data(const DLTensor* t);
INTERNAL void ret_float(TVMFFIAny* r, double v);
INTERNAL void ret_int(TVMFFIAny* r, int64_t v);
/* A TVM FFI symbol of this process (exported, or in a TVM library already loaded), or NULL. */
INTERNAL void* ffi_symbol(const char* name);
/* Returns a tensor of shape[0..ndim) over `data` (owned by the caller, who keeps it alive):
 * a view, no copy; the result owns the tensor object. */
INTERNAL int ret_view(const char* fn, TVMFFIAny* r, void* data, int ndim, const int64_t* shape,
                      DLDataType dtype);

/* ------------------------------------------------------------------ clock, thread pool */

INTERNAL double now_s(void);
INTERNAL int64_t align_up(int64_t x, int64_t a);

typedef struct job job_t;
struct job {
  void (*run)(job_t*, int idx);
  int nthreads;
  int fd;
  char* buf;
  /* reads: m extents (offset, length) into buf + starts[i] */
  const int64_t* ext;
  const int64_t* starts;
  int64_t m;
  /* the storage probe */
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

#define POOL_MAX 256
/* Helper threads running one job at a time for whoever calls pool_run (participant 0). */
typedef struct {
  pthread_mutex_t run_mu;  /* held for a whole job: concurrent callers take turns */
  pthread_mutex_t mu;
  pthread_cond_t go, done;
  int threads;             /* helpers started */
  int tickets;             /* helper places of the current job not yet taken */
  int pending;             /* helper places not yet finished */
  int quit;
  job_t* job;
  pthread_t tid[POOL_MAX];
} pool_t;
#define POOL_INIT                                                                              \
  {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,             \
   PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, {0}}

/* A zeroed read buffer on huge pages where the kernel gives them (read_pool.c); NULL on failure. */
INTERNAL char* map_buffer(int64_t bytes, size_t* mapped);
INTERNAL void unmap_buffer(char* p, size_t mapped);
/* Runs j on j->nthreads participants; *seconds = wall time from start to the last one's end. */
INTERNAL int pool_run(const char* fn, pool_t* p, job_t* j, double* seconds);
/* Ends the pool's helpers (no job may be running); the pool can be used again afterwards. */
INTERNAL void pool_stop(pool_t* p);
/* job_t.run for reads of extents; read_full reads all of len bytes or records why not. */
INTERNAL void run_read(job_t* j, int idx);
INTERNAL int read_full(job_t* j, char* dst, int64_t off, int64_t len);
/* Requests in flight as each read_full started, over the whole process: the largest, their sum
 * and how many (mean = sum / samples); reset clears them. */
INTERNAL void queue_depth_seen(int64_t* max, int64_t* sum, int64_t* samples);
INTERNAL void queue_depth_reset(void);
/* The one-line error of a failed job (a short read names the offset: a truncated file). */
INTERNAL int job_error(const char* fn, const char* path, const job_t* j);
/* The same line into out, for a thread with no caller to raise it to. */
INTERNAL void job_message(char* out, size_t cap, const char* fn, const char* path, const job_t* j);

#endif  /* RIPPLE_NATIVE_H_ */
