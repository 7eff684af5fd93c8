/* The pool of reader threads: `queue_depth` participants (the caller and helpers) each keep
 * one pread in flight, taking extents from a shared counter, so the storage sees that many
 * requests at once (a phone's UFS reaches its bandwidth only at depth; see the probe).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "ripple_native.h"

double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

/* What reads land in: one mapping whose 2 MiB-aligned parts the kernel may back with huge
 * pages (transparent huge pages, on madvise). An O_DIRECT read into 4 KiB pages pins each page
 * and hands the disk one segment per page: a 1 MiB request is 256, more than a virtio disk
 * takes (~254), so the kernel splits it, and the reader pays CPU time per page that a phone's
 * compute threads share. The mapping ends at the buffer's last 4 KiB page, so no partial huge
 * page is faulted in (DRAM held stays what the callers count). Zeroed (first-touch faults now,
 * not while a token waits); NULL with errno set on failure. */
char* map_buffer(int64_t bytes, size_t* mapped) {
  const size_t huge = (size_t)2 << 20, size = (size_t)align_up(bytes > 0 ? bytes : 1, ALIGN);
  char* p = (char*)mmap(NULL, size + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  char* at = (char*)(((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1));
  if (at > p) munmap(p, (size_t)(at - p));
  munmap(at + size, (size_t)(p + size + huge - (at + size)));
#ifdef MADV_HUGEPAGE
  madvise(at, size, MADV_HUGEPAGE);  /* advice: without THP the buffer stays on 4 KiB pages */
#endif
  memset(at, 0, size);
  *mapped = size;
  return at;
}

void unmap_buffer(char* p, size_t mapped) {
  if (p) munmap(p, mapped);
}

/* A helper takes a place (a ticket) in the posted job; only as many helpers as the job has
 * places are woken, so a job of 3 reads does not wake a pool grown to 32 threads for another. */
static void* pool_worker(void* arg) {
  pool_t* p = (pool_t*)arg;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (p->tickets == 0 && !p->quit) pthread_cond_wait(&p->go, &p->mu);
    if (p->quit) break;
    job_t* j = p->job;
    int idx = j->nthreads - p->tickets--;
    pthread_mutex_unlock(&p->mu);
    j->run(j, idx);
    pthread_mutex_lock(&p->mu);
    if (--p->pending == 0) pthread_cond_signal(&p->done);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

int pool_run(const char* fn, pool_t* p, job_t* j, double* seconds) {
  if (j->nthreads < 1 || j->nthreads > POOL_MAX)
    return fail("ValueError", "%s: %d reader threads asked, 1..%d allowed", fn, j->nthreads, POOL_MAX);
  pthread_mutex_lock(&p->run_mu);
  pthread_mutex_lock(&p->mu);
  while (p->threads < j->nthreads - 1) {
    int e = pthread_create(&p->tid[p->threads], NULL, pool_worker, p);
    if (e != 0) {
      pthread_mutex_unlock(&p->mu);
      pthread_mutex_unlock(&p->run_mu);
      return fail("RuntimeError", "%s: cannot start reader thread %d: %s", fn, p->threads + 1,
                  strerror(e));
    }
    p->threads++;
  }
  double t0 = now_s();
  p->job = j;
  p->tickets = p->pending = j->nthreads - 1;
  for (int i = 1; i < j->nthreads; ++i) pthread_cond_signal(&p->go);
  pthread_mutex_unlock(&p->mu);
  j->run(j, 0);
  pthread_mutex_lock(&p->mu);
  while (p->pending > 0) pthread_cond_wait(&p->done, &p->mu);
  p->job = NULL;
  pthread_mutex_unlock(&p->mu);
  *seconds = now_s() - t0;
  pthread_mutex_unlock(&p->run_mu);
  return 0;
}

void pool_stop(pool_t* p) {
  pthread_mutex_lock(&p->run_mu);
  pthread_mutex_lock(&p->mu);
  p->quit = 1;
  pthread_cond_broadcast(&p->go);
  int n = p->threads;
  pthread_mutex_unlock(&p->mu);
  for (int i = 0; i < n; ++i) pthread_join(p->tid[i], NULL);
  pthread_mutex_lock(&p->mu);
  p->threads = 0;
  p->quit = 0;
  pthread_mutex_unlock(&p->mu);
  pthread_mutex_unlock(&p->run_mu);
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

/* Requests in flight across every pool of the process, sampled as each one starts: the queue
 * depth the device saw (the lookahead's point is to keep it up). */
static atomic_llong inflight, depth_max, depth_sum, depth_samples;

void queue_depth_seen(int64_t* max, int64_t* sum, int64_t* samples) {
  *max = atomic_load(&depth_max);
  *sum = atomic_load(&depth_sum);
  *samples = atomic_load(&depth_samples);
}

void queue_depth_reset(void) {
  atomic_store(&depth_max, 0);
  atomic_store(&depth_sum, 0);
  atomic_store(&depth_samples, 0);
}

int read_full(job_t* j, char* dst, int64_t off, int64_t len) {
  int64_t got = 0;
  long long d = atomic_fetch_add(&inflight, 1) + 1, m = atomic_load(&depth_max);
  while (d > m && !atomic_compare_exchange_weak(&depth_max, &m, d)) {
  }
  atomic_fetch_add(&depth_sum, d);
  atomic_fetch_add(&depth_samples, 1);
  int rc = 0;
  while (got < len) {
    ssize_t k = pread(j->fd, dst + got, (size_t)(len - got), (off_t)(off + got));
    if (k < 0) {
      if (ERRNO == EINTR) continue;
      record_error(j, ERRNO, off, len, got);
      rc = -1;
      break;
    }
    if (k == 0) {
      record_error(j, 0, off, len, got);
      rc = -1;
      break;
    }
    got += k;
  }
  atomic_fetch_sub(&inflight, 1);
  return rc;
}

void run_read(job_t* j, int idx) {
  (void)idx;
  for (;;) {
    int64_t i = atomic_fetch_add(&j->next, 1);
    if (i >= j->m || atomic_load(&j->failed)) return;
    if (read_full(j, j->buf + j->starts[i], j->ext[2 * i], j->ext[2 * i + 1]) != 0) return;
  }
}

void job_message(char* out, size_t cap, const char* fn, const char* path, const job_t* j) {
  if (j->err == 0)
    snprintf(out, cap, "%s: %s: short read at offset %lld (%lld of %lld bytes); is the file "
             "truncated?", fn, path, (long long)(j->err_off + j->err_got), (long long)j->err_got,
             (long long)j->err_len);
  else
    snprintf(out, cap, "%s: %s: read of %lld bytes at offset %lld failed: %s", fn, path,
             (long long)j->err_len, (long long)j->err_off, strerror(j->err));
}

int job_error(const char* fn, const char* path, const job_t* j) {
  char msg[1024];
  job_message(msg, sizeof msg, fn, path, j);
  return fail("RuntimeError", "%s", msg);
}
