/* The device's flash runtime: what a compiled Relax model calls, per layer and per token, to
 * get its FFN weights from flash with no Python and no host.
 *
 *   ripple.rt.open(config_path) -> 0        read the config (compile/runtime_config.py), open
 *                                           the flash files, read what is pinned into DRAM,
 *                                           start the read-ahead thread
 *   ripple.rt.whole(layer) -> uint8 (B,)    a layer read whole: its extent of whole.rflash
 *   ripple.rt.fetch(layer, logits (T, n) float32) -> (k, cols)
 *                                           the bundles of the neurons some row predicts active
 *   ripple.rt.stats(out (16,) float64)      counters since open (see rt_stats below)
 *   ripple.rt.close()                       stop the threads, free everything
 *
 * With the config's verify on (`ripple compile --verify`), every block read (fetch's extents,
 * the read-ahead's and the pinned reads at open) is checked against the CRC32 the pack stored
 * for it, and a block that differs is a one-line error of the call that needed it.
 *
 * Returned tensors are views of the runtime's memory, not copies: a fetch view lives until the
 * next fetch; a whole view of a read-ahead layer until the next whole() call of a read-ahead
 * layer (read_ahead + 1 buffers: that call issues a read into the buffer of the one before),
 * of a pinned layer until close. A second open, or close, frees them all.
 *
 * Whole layers are read `read_ahead` layers early, in cyclic order (after the last layer comes
 * layer 0 of the next token), by one background thread driving its own pool at queue_depth, so
 * the reads hide behind the compute of the layers between (LLM in a flash, Sec. 3.3: a phone's
 * flash reaches its bandwidth only with requests in flight). The pool's readers take the
 * requests of every issued layer from one queue in stream order, so the next layer's requests
 * fill the queue while the last of this one's finish (one layer at a time, 7 requests of
 * 256 KiB on SmolLM2, left it nearly empty at each layer's tail: 0.9 GB/s of a disk's 1.5);
 * a layer is done when its own requests are. Sparse layers are read on the caller's thread
 * when the predictor's logits are known: runs of active slots, widened to the alignment,
 * neighbours closer than collapse_gap_bytes read as one (Ripple's access collapse: one larger
 * request costs less than two small ones), cut to max_request_bytes, all in flight together.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ripple_native.h"
#include "runtime_config.h"

/* A read-ahead buffer: the position it holds, from the taking of its first request on. */
typedef struct {
  int64_t pos;             /* -1: none yet */
  int64_t layer;
  int64_t left;            /* its requests not yet read */
  int done;                /* all read (and checked): whole() may hand it out */
  int failed;              /* a read or its checksum failed: err says how */
  char err[1024];
} ahead_t;

/* A layer's bundles read ahead by ripple.rt.prefetch, until its fetch takes them. */
typedef struct {
  int64_t layer;           /* -1: free */
  int64_t left;            /* its requests not yet read (and checked) */
  int64_t covered;         /* slots whose bundle the reads hold whole */
  int failed;              /* a read or its checksum failed: err says how */
  char err[1024];
  char* buf;               /* the reads, back to back (one mapping of stage_cap bytes) */
  size_t mapped;
  int64_t* slot_off;       /* (n,) where slot s's bundle lies in buf; -1: not read */
} pf_t;

/* Counters, as ripple.rt.stats hands them out (see there). */
enum {
  ST_IO_WAIT, ST_READ_SECONDS, ST_BYTES_READ, ST_BYTES_NEEDED, ST_REQUESTS, ST_ACTIVE, ST_HITS,
  ST_FETCHES, ST_WHOLES, ST_PINNED_BYTES, ST_BUFFER_BYTES, ST_O_DIRECT, ST_LAYERS, ST_VERIFIED,
  ST_VERIFY_SECONDS, ST_PREFETCHES, ST_PF_BYTES, ST_PF_USED, ST_PF_UNUSED, ST_MISSES, ST_QD_MAX,
  ST_QD_SUM, ST_QD_SAMPLES, ST_PF_WAIT, ST_COUNT
};

static struct {
  int open;                /* a runtime is open */
  int opened_once;         /* its counters exist (they outlive close) */
  rt_config_t cfg;
  int bfd, wfd;
  int64_t stage_cap, gather_cap, max_reqs, wreqs, piece;
  /* DRAM held from open to close */
  char** pinned_whole;     /* (L,) a pinned whole layer's extent, else NULL */
  char** pinned_rows;      /* (L,) a layer's pinned bundles in slot order, else NULL */
  int32_t* pin_row;        /* (L, n) row of neuron i in pinned_rows[l], or -1 */
  /* fetch's buffers (caller's thread) */
  char* gather;            /* (n, bundle_bytes): fetch's result */
  char* stage;             /* what the reads land in */
  uint8_t *act, *mark;     /* (n,) active neurons, marked slots */
  int64_t *run_lo, *run_len, *run_ext, *ext_off, *ext_start, *req, *req_start;
  /* read-ahead: positions p = 0, 1, ... of the cyclic stream of whole layers not pinned; p is
   * read into buffer p % nbuf as requests q = p * wreqs .. p * wreqs + wreqs - 1, which the
   * readers take in order: next_req .. issued * wreqs - 1 are still to take. */
  int64_t *stream, *stream_idx, stream_len, nbuf;
  char** ahead_buf;        /* nbuf pointers into region */
  char* region;            /* the read-ahead buffers, one mapping (map_buffer) */
  size_t region_bytes, stage_mapped;
  ahead_t* ahead;
  int64_t issued, next_req, consumed;
  int64_t busy;            /* requests taken, not yet finished (nor their layer's check) */
  int64_t in_reads;        /* preads in flight: read seconds count while > 0 */
  double reads_mark;       /* when read seconds were last brought up to date */
  int started, quit, thread_started;
  pthread_t thread;
  int64_t *wreq, *wreq_start;  /* a pinned whole layer's requests, at open */
  /* lookahead: lookahead + 1 prefetch buffers (layer t in pf[t % npf]: the layers in flight
   * are consecutive, one token's), their requests in one FIFO (la_req: 4 int64 a request,
   * buffer, file offset, length, offset in the buffer) that the lookahead pool's readers
   * take from, so several layers' requests share the device's queue */
  pf_t* pf;
  int64_t npf, la_cap, la_head, la_tail;
  /* the LRU part of the cache: per sparse layer lru_per_layer rows (lru_rows + (l * cap + r) *
   * bundle_bytes) of bundles it read, a list from most to least recently used */
  char* lru_rows;
  int32_t *lru_of, *lru_id, *lru_prev, *lru_next;   /* (L, n) row of neuron i or -1; (L, cap) each */
  int32_t *lru_head, *lru_tail, *lru_used;         /* (L,) */
  int32_t* neuron_at;      /* (L, n) the neuron in slot s */
  int64_t* la_req;
  int la_started;
  pthread_t la_thread;
  double st[ST_COUNT];     /* under ra_mu */
} rt = {.bfd = -1, .wfd = -1};

static pthread_mutex_t rt_mu = PTHREAD_MUTEX_INITIALIZER;  /* one call at a time */
static pthread_mutex_t ra_mu = PTHREAD_MUTEX_INITIALIZER;  /* read-ahead state, counters */
static pthread_cond_t ra_work = PTHREAD_COND_INITIALIZER;  /* the thread has positions to read */
static pthread_cond_t ra_done = PTHREAD_COND_INITIALIZER;  /* a position was read */
static pthread_cond_t la_work = PTHREAD_COND_INITIALIZER;  /* prefetch requests to read */
static pthread_cond_t la_done = PTHREAD_COND_INITIALIZER;  /* a prefetch buffer was read */
static pool_t fetch_pool = POOL_INIT, ahead_pool = POOL_INIT, la_pool = POOL_INIT;

static const char* NO_RUNTIME = "no runtime is open; call ripple.rt.open(config_path) first";

/* ------------------------------------------------------------------ reads */

typedef struct {
  double seconds, verify_seconds;
  int64_t bytes, requests, verified;
} io_t;

/* ------------------------------------------------------------------ block checksums */

/* zlib's CRC32 (reflected polynomial 0xEDB88320, ~0 in and out), as layout/block_crc.py
 * computes each block's with zlib.crc32; slicing by 8 bytes, table-driven, no library. */
static uint32_t crc_tab[8][256];

static void crc_init(void) {
  if (crc_tab[0][128]) return;
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ 0xEDB88320u : c >> 1;
    crc_tab[0][i] = c;
  }
  for (int t = 1; t < 8; ++t)
    for (int i = 0; i < 256; ++i)
      crc_tab[t][i] = (crc_tab[t - 1][i] >> 8) ^ crc_tab[0][crc_tab[t - 1][i] & 0xff];
}

/* Little-endian loads: the targets are x86-64 and arm64. */
static uint32_t crc32_of(const unsigned char* p, int64_t len) {
  uint32_t c = 0xFFFFFFFFu, lo, hi;
  for (; len >= 8; p += 8, len -= 8) {
    memcpy(&lo, p, 4);
    memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = crc_tab[7][lo & 0xff] ^ crc_tab[6][(lo >> 8) & 0xff] ^ crc_tab[5][(lo >> 16) & 0xff] ^
        crc_tab[4][lo >> 24] ^ crc_tab[3][hi & 0xff] ^ crc_tab[2][(hi >> 8) & 0xff] ^
        crc_tab[1][(hi >> 16) & 0xff] ^ crc_tab[0][hi >> 24];
  }
  while (len-- > 0) c = crc_tab[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

static double thread_cpu_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Checks the aligned blocks of [off, off + len) of a file, held at buf, against its table
 * (whose coverage runtime_config.c checked); adds to io's verify counters. Returns the byte
 * offset of the first block that differs, or -1. */
static int64_t bad_block(const uint32_t* crcs, int64_t off, const char* buf, int64_t len, io_t* io) {
  const int64_t a = rt.cfg.alignment;
  int64_t bad = -1;
  double t0 = thread_cpu_s();
  for (int64_t at = 0; at < len && bad < 0; at += a)
    if (crc32_of((const unsigned char*)buf + at, a) != crcs[(off + at) / a]) bad = off + at;
  io->verify_seconds += thread_cpu_s() - t0;
  io->verified += len;
  return bad;
}

/* The one-line error; a path of more than 800 bytes is cut, so that the fix always shows. */
static void checksum_message(char* out, size_t cap, const char* fn, const char* path, int64_t at,
                             int whole_copy) {
  snprintf(out, cap, "%s: %.800s: block at byte %lld does not match its checksum; the file changed "
           "since `ripple pack`: pack it again (`ripple pack%s`), then `ripple compile`", fn, path,
           (long long)at, whole_copy ? " --whole-copy" : "");
}

static int checksum_error(const char* fn, const char* path, int64_t at, int whole_copy) {
  char msg[1024];
  checksum_message(msg, sizeof msg, fn, path, at, whole_copy);
  return fail("RuntimeError", "%s", msg);
}

static void run_nothing(job_t* j, int idx) {
  (void)j;
  (void)idx;
}

/* Starts a pool's helpers now: a thread that cannot start is an error of open, not of a token. */
static int warm(const char* fn, pool_t* p, int64_t nthreads) {
  job_t j;
  double el;
  memset(&j, 0, sizeof j);
  j.run = run_nothing;
  j.nthreads = (int)nthreads;
  return pool_run(fn, p, &j, &el);
}

/* A whole layer's extent as requests of at most max_request_bytes, laid out back to back. */
static void whole_requests(int64_t layer, int64_t* req, int64_t* starts) {
  int64_t off = rt.cfg.whole_offsets[layer], wlb = rt.cfg.whole_layer_bytes;
  for (int64_t r = 0; r < rt.wreqs; ++r) {
    int64_t at = r * rt.piece;
    req[2 * r] = off + at;
    req[2 * r + 1] = wlb - at < rt.piece ? wlb - at : rt.piece;
    starts[r] = at;
  }
}

static void read_job(job_t* j, int fd, char* buf, const int64_t* req, const int64_t* starts,
                     int64_t m) {
  memset(j, 0, sizeof *j);
  j->run = run_read;
  j->nthreads = (int)(rt.cfg.queue_depth < m ? rt.cfg.queue_depth : (m > 0 ? m : 1));
  j->fd = fd;
  j->buf = buf;
  j->ext = req;
  j->starts = starts;
  j->m = m;
}

/* Plans the reads of the marked slots of `layer` (mark[s] != 0) into rt's scratch arrays: runs
 * of slots become aligned ranges, neighbours at most collapse_gap_bytes apart (or touching, or
 * sharing a block) one extent (ext_off, ext_start: its place in the staging buffer), extents cut
 * into requests of max_request_bytes (req, req_start); run_lo/run_len/run_ext say where each
 * run of marked slots lies. */
typedef struct {
  int64_t extents, runs, total, requests;
} plan_t;

static int plan_marked(const char* fn, int64_t layer, const uint8_t* mark, plan_t* p) {
  const rt_config_t* c = &rt.cfg;
  const int64_t n = c->n, bb = c->bundle_bytes, a = c->alignment, base = c->region_offsets[layer];
  int64_t m = 0, runs = 0, total = 0, nreq = 0;
  for (int64_t s = 0; s < n;) {
    if (!mark[s]) {
      ++s;
      continue;
    }
    int64_t e = s + 1;
    while (e < n && mark[e]) ++e;
    int64_t lo = base + s * bb, hi = base + e * bb, alo = lo / a * a, ahi = align_up(hi, a);
    if (m > 0 && alo - (rt.ext_off[m - 1] + rt.ext_start[m - 1]) <= c->collapse_gap_bytes) {
      /* ext_start holds each extent's length until the layout below */
      int64_t end = rt.ext_off[m - 1] + rt.ext_start[m - 1];
      if (ahi > end) rt.ext_start[m - 1] = ahi - rt.ext_off[m - 1];
    } else {
      rt.ext_off[m] = alo;
      rt.ext_start[m] = ahi - alo;
      ++m;
    }
    rt.run_lo[runs] = lo;
    rt.run_len[runs] = hi - lo;
    rt.run_ext[runs] = m - 1;
    ++runs;
    s = e;
  }
  for (int64_t e = 0; e < m; ++e) {
    int64_t len = rt.ext_start[e];
    rt.ext_start[e] = total;
    for (int64_t at = 0; at < len; at += rt.piece) {
      if (nreq == rt.max_reqs)
        return fail("RuntimeError", "%s: layer %lld needs more than %lld requests (internal bound)",
                    fn, (long long)layer, (long long)rt.max_reqs);
      rt.req[2 * nreq] = rt.ext_off[e] + at;
      rt.req[2 * nreq + 1] = len - at < rt.piece ? len - at : rt.piece;
      rt.req_start[nreq] = total + at;
      ++nreq;
    }
    total += len;
  }
  if (total > rt.stage_cap)
    return fail("RuntimeError", "%s: layer %lld needs %lld bytes read, the buffer holds %lld "
                "(internal bound)", fn, (long long)layer, (long long)total, (long long)rt.stage_cap);
  *p = (plan_t){m, runs, total, nreq};
  return 0;
}

/* Reads the bundles of the marked slots of `layer` in slot order into dst, one bundle a row;
 * *rows = how many. The plan_marked requests, all in flight together on the fetch pool. */
static int read_marked(const char* fn, int64_t layer, const uint8_t* mark, char* dst, int64_t* rows,
                       io_t* io) {
  const rt_config_t* c = &rt.cfg;
  plan_t p;
  if (plan_marked(fn, layer, mark, &p) != 0) return -1;
  job_t j;
  double el = 0;
  read_job(&j, rt.bfd, rt.stage, rt.req, rt.req_start, p.requests);
  if (p.requests > 0 && pool_run(fn, &fetch_pool, &j, &el) != 0) return -1;
  if (atomic_load(&j.failed)) return job_error(fn, c->bundles_path, &j);
  for (int64_t e = 0; c->verify && e < p.extents; ++e) {
    int64_t len = (e + 1 < p.extents ? rt.ext_start[e + 1] : p.total) - rt.ext_start[e];
    int64_t bad = bad_block(c->bundle_crcs, rt.ext_off[e], rt.stage + rt.ext_start[e], len, io);
    if (bad >= 0) return checksum_error(fn, c->bundles_path, bad, 0);
  }
  char* out = dst;
  for (int64_t r = 0; r < p.runs; ++r) {
    int64_t e = rt.run_ext[r];
    memcpy(out, rt.stage + rt.ext_start[e] + (rt.run_lo[r] - rt.ext_off[e]), (size_t)rt.run_len[r]);
    out += rt.run_len[r];
  }
  *rows = (out - dst) / c->bundle_bytes;
  io->seconds += el;
  io->bytes += p.total;
  io->requests += p.requests;
  return 0;
}

/* ------------------------------------------------------------------ read-ahead */

/* Called with ra_mu held as a pread starts (+1) or ends (-1): read seconds are the wall time
 * with a read in flight, counted as it passes (stats mid-stream include the reads still going). */
static void reads_in_flight(int64_t change) {
  double t = now_s();
  if (rt.in_reads > 0) rt.st[ST_READ_SECONDS] += t - rt.reads_mark;
  rt.reads_mark = t;
  rt.in_reads += change;
}

/* A reader of the read-ahead pool (every participant runs it until close): takes the next
 * request of the stream, reads it into its position's buffer; the reader that finishes a
 * position's last request checks it (verify on) and marks it done. */
static void stream_reads(job_t* j, int idx) {
  (void)j;
  (void)idx;
  const int64_t w = rt.wreqs, wlb = rt.cfg.whole_layer_bytes;
  job_t one;  /* what a failed request leaves for the message */
  pthread_mutex_lock(&ra_mu);
  for (;;) {
    while (!rt.quit && rt.next_req == rt.issued * w) pthread_cond_wait(&ra_work, &ra_mu);
    if (rt.quit) break;
    int64_t q = rt.next_req++, pos = q / w, at = q % w * rt.piece;
    ahead_t* a = &rt.ahead[pos % rt.nbuf];
    char* buf = rt.ahead_buf[pos % rt.nbuf];
    if (at == 0) {
      a->pos = pos;
      a->layer = rt.stream[pos % rt.stream_len];
      a->left = w;
      a->done = a->failed = 0;
    }
    int64_t layer = a->layer;
    int skip = a->failed;  /* the rest of a failed layer is not read */
    ++rt.busy;
    if (!skip) reads_in_flight(1);
    pthread_mutex_unlock(&ra_mu);
    memset(&one, 0, sizeof one);
    one.fd = rt.wfd;
    int bad_read = !skip && read_full(&one, buf + at, rt.cfg.whole_offsets[layer] + at,
                                      wlb - at < rt.piece ? wlb - at : rt.piece) != 0;
    pthread_mutex_lock(&ra_mu);
    if (!skip) reads_in_flight(-1);
    if (bad_read && !a->failed) {
      a->failed = 1;
      job_message(a->err, sizeof a->err, "ripple.rt.whole", rt.cfg.whole_path, &one);
    }
    if (--a->left > 0) {
      --rt.busy;
      continue;
    }
    int read_failed = a->failed;
    io_t io = {0, 0, 0, 0, 0};
    if (!read_failed && rt.cfg.verify) {
      /* checked here, behind the compute of the layers between, as the read itself */
      pthread_mutex_unlock(&ra_mu);
      int64_t bad = bad_block(rt.cfg.whole_crcs, rt.cfg.whole_offsets[layer], buf, wlb, &io);
      pthread_mutex_lock(&ra_mu);
      if (bad >= 0) {
        a->failed = 1;
        checksum_message(a->err, sizeof a->err, "ripple.rt.whole", rt.cfg.whole_path, bad, 1);
      }
    }
    if (!read_failed) {
      rt.st[ST_BYTES_READ] += (double)wlb;
      rt.st[ST_REQUESTS] += (double)w;
    }
    rt.st[ST_VERIFIED] += (double)io.verified;
    rt.st[ST_VERIFY_SECONDS] += io.verify_seconds;
    a->done = 1;
    --rt.busy;
    pthread_cond_broadcast(&ra_done);
  }
  pthread_mutex_unlock(&ra_mu);
}

/* Called with ra_mu held: the next position is `layer`'s (stream index idx). Positions none
 * of whose requests was taken are dropped, the ones being read are waited for, and the stream
 * restarts at the first position >= every one issued whose layer is `layer`. */
static void restart_stream(int64_t idx) {
  const int64_t w = rt.wreqs;
  rt.issued = (rt.next_req + w - 1) / w;
  while (rt.next_req < rt.issued * w || rt.busy > 0) pthread_cond_wait(&ra_done, &ra_mu);
  int64_t m = rt.stream_len, p = rt.issued;
  p += ((idx - p % m) % m + m) % m;
  rt.issued = rt.consumed = p;
  rt.next_req = p * w;
  rt.started = 1;
}

/* ------------------------------------------------------------------ LRU */

static void lru_unlink(int64_t l, int32_t r) {
  int32_t* prev = rt.lru_prev + l * rt.cfg.lru_per_layer;
  int32_t* next = rt.lru_next + l * rt.cfg.lru_per_layer;
  if (prev[r] >= 0) next[prev[r]] = next[r]; else rt.lru_head[l] = next[r];
  if (next[r] >= 0) prev[next[r]] = prev[r]; else rt.lru_tail[l] = prev[r];
}

static void lru_front(int64_t l, int32_t r) {
  int32_t* prev = rt.lru_prev + l * rt.cfg.lru_per_layer;
  int32_t* next = rt.lru_next + l * rt.cfg.lru_per_layer;
  prev[r] = -1;
  next[r] = rt.lru_head[l];
  if (rt.lru_head[l] >= 0) prev[rt.lru_head[l]] = r; else rt.lru_tail[l] = r;
  rt.lru_head[l] = r;
}

static char* lru_row(int64_t l, int32_t r) {
  return rt.lru_rows + (l * rt.cfg.lru_per_layer + r) * rt.cfg.bundle_bytes;
}

/* Neuron i of layer l used now: its row, moved to the front; NULL when not held. */
static const char* lru_get(int64_t l, int64_t i) {
  int32_t r = rt.cfg.lru_per_layer ? rt.lru_of[l * rt.cfg.n + i] : -1;
  if (r < 0) return NULL;
  lru_unlink(l, r);
  lru_front(l, r);
  return lru_row(l, r);
}

/* Neuron i of layer l was read into src: kept, the least recently used row out if full. */
static void lru_put(int64_t l, int64_t i, const char* src) {
  const int64_t cap = rt.cfg.lru_per_layer, n = rt.cfg.n;
  if (!cap || rt.lru_of[l * n + i] >= 0) return;
  int32_t r;
  if (rt.lru_used[l] < cap) {
    r = rt.lru_used[l]++;
  } else {
    r = rt.lru_tail[l];
    lru_unlink(l, r);
    rt.lru_of[l * n + rt.lru_id[l * cap + r]] = -1;
  }
  memcpy(lru_row(l, r), src, (size_t)rt.cfg.bundle_bytes);
  rt.lru_id[l * cap + r] = (int32_t)i;
  rt.lru_of[l * n + i] = r;
  lru_front(l, r);
}

/* ------------------------------------------------------------------ lookahead */

/* A reader of the lookahead pool (every participant runs it until close): takes the next
 * prefetch request from the FIFO, reads (and checks) it into its buffer; the last request of
 * a buffer wakes the fetch that may be waiting for it. */
static void la_reads(job_t* j, int idx) {
  (void)j;
  (void)idx;
  job_t one;
  pthread_mutex_lock(&ra_mu);
  for (;;) {
    while (!rt.quit && rt.la_head == rt.la_tail) pthread_cond_wait(&la_work, &ra_mu);
    if (rt.quit) break;
    const int64_t* q = rt.la_req + 4 * (rt.la_head++ % rt.la_cap);
    pf_t* f = &rt.pf[q[0]];
    int64_t off = q[1], len = q[2], at = q[3];
    int skip = f->failed;
    if (!skip) reads_in_flight(1);
    pthread_mutex_unlock(&ra_mu);
    memset(&one, 0, sizeof one);
    one.fd = rt.bfd;
    io_t io = {0, 0, 0, 0, 0};
    int bad_read = !skip && read_full(&one, f->buf + at, off, len) != 0;
    int64_t bad = !skip && !bad_read && rt.cfg.verify
                      ? bad_block(rt.cfg.bundle_crcs, off, f->buf + at, len, &io) : -1;
    pthread_mutex_lock(&ra_mu);
    if (!skip) reads_in_flight(-1);
    if (bad_read && !f->failed) {
      f->failed = 1;
      job_message(f->err, sizeof f->err, "ripple.rt.fetch (prefetched)", rt.cfg.bundles_path, &one);
    } else if (bad >= 0 && !f->failed) {
      f->failed = 1;
      checksum_message(f->err, sizeof f->err, "ripple.rt.fetch (prefetched)", rt.cfg.bundles_path, bad, 0);
    }
    if (!skip && !bad_read) {
      rt.st[ST_BYTES_READ] += (double)len;
      rt.st[ST_PF_BYTES] += (double)len;
      rt.st[ST_REQUESTS] += 1;
    }
    rt.st[ST_VERIFIED] += (double)io.verified;
    rt.st[ST_VERIFY_SECONDS] += io.verify_seconds;
    if (--f->left == 0) pthread_cond_broadcast(&la_done);
  }
  pthread_mutex_unlock(&ra_mu);
}

/* A background pool of readers (the read-ahead's, the lookahead's): queue_depth participants
 * each running `run` until close. */
typedef struct {
  pool_t* pool;
  void (*run)(job_t*, int);
  const char* name;
} readers_t;

static readers_t ahead_readers = {&ahead_pool, stream_reads, "ripple.rt.whole (read-ahead)"};
static readers_t la_readers = {&la_pool, la_reads, "ripple.rt.prefetch (readers)"};

static void* readers_main(void* arg) {
  const readers_t* r = (const readers_t*)arg;
  job_t j;
  double el;
  memset(&j, 0, sizeof j);
  j.run = r->run;
  j.nthreads = (int)rt.cfg.queue_depth;
  /* open started the pool's helpers (warm), so this cannot fail; if it did, read at depth 1 */
  if (pool_run(r->name, r->pool, &j, &el) != 0) r->run(&j, 0);
  return NULL;
}

/* Starts a readers_main thread; an error of open when it cannot. */
static int start_readers(const char* fn, readers_t* r, pthread_t* thread, int* started) {
  if (warm(fn, r->pool, rt.cfg.queue_depth) != 0) return -1;
  int e = pthread_create(thread, NULL, readers_main, r);
  if (e != 0) return fail("RuntimeError", "%s: cannot start the %s thread: %s", fn, r->name, strerror(e));
  *started = 1;
  return 0;
}

/* Ends a readers_main thread: quit, every reader woken on `work`, joined. */
static void stop_readers(pthread_t thread, int started, pthread_cond_t* work) {
  if (!started) return;
  pthread_mutex_lock(&ra_mu);
  rt.quit = 1;
  pthread_cond_broadcast(work);
  pthread_mutex_unlock(&ra_mu);
  pthread_join(thread, NULL);
}

/* Called with ra_mu held: waits until prefetch buffer f holds no reads in flight. */
static void pf_settle(pf_t* f) {
  while (f->left > 0) pthread_cond_wait(&la_done, &ra_mu);
}

/* ------------------------------------------------------------------ open and close */

static void teardown(void) {
  stop_readers(rt.thread, rt.thread_started, &ra_work);
  stop_readers(rt.la_thread, rt.la_started, &la_work);
  pool_stop(&ahead_pool);
  pool_stop(&fetch_pool);
  pool_stop(&la_pool);
  for (int64_t b = 0; rt.pf && b < rt.npf; ++b) {
    unmap_buffer(rt.pf[b].buf, rt.pf[b].mapped);
    free(rt.pf[b].slot_off);
  }
  if (rt.bfd >= 0) close(rt.bfd);
  if (rt.wfd >= 0) close(rt.wfd);
  for (int64_t l = 0; l < rt.cfg.n_layers; ++l) {
    if (rt.pinned_whole) free(rt.pinned_whole[l]);
    if (rt.pinned_rows) free(rt.pinned_rows[l]);
  }
  unmap_buffer(rt.region, rt.region_bytes);
  unmap_buffer(rt.stage, rt.stage_mapped);
  void* owned[] = {rt.pinned_whole, rt.pinned_rows, rt.pin_row, rt.gather, rt.act,
                   rt.mark, rt.run_lo, rt.run_len, rt.run_ext, rt.ext_off, rt.ext_start, rt.req,
                   rt.req_start, rt.stream, rt.stream_idx, rt.ahead_buf, rt.ahead, rt.wreq,
                   rt.wreq_start, rt.pf, rt.la_req, rt.lru_rows, rt.lru_of, rt.lru_id,
                   rt.lru_prev, rt.lru_next, rt.lru_head, rt.lru_tail, rt.lru_used, rt.neuron_at};
  for (size_t i = 0; i < sizeof owned / sizeof *owned; ++i) free(owned[i]);
  rt_config_free(&rt.cfg);
  double st[ST_COUNT];
  memcpy(st, rt.st, sizeof st);
  int once = rt.opened_once;
  memset(&rt, 0, sizeof rt);
  memcpy(rt.st, st, sizeof st);  /* the counters outlive close */
  rt.opened_once = once;
  rt.bfd = rt.wfd = -1;
}

static int alloc(const char* fn, void* out, int64_t bytes, int aligned) {
  void* p = NULL;
  size_t size = (size_t)(bytes > 0 ? align_up(bytes, aligned ? ALIGN : 8) : 8);
  if (aligned ? posix_memalign(&p, ALIGN, size) != 0 : (p = malloc(size)) == NULL)
    return fail("RuntimeError", "%s: cannot allocate %lld bytes", fn, (long long)size);
  memset(p, 0, size);  /* first-touch faults now, not while a token waits */
  *(void**)out = p;
  return 0;
}

static int open_flash(const char* fn, const char* path, int o_direct, int* fd) {
  *fd = open(path, O_RDONLY | O_CLOEXEC | (o_direct ? O_DIRECT : 0));
  if (*fd >= 0) return 0;
  int e = ERRNO;
  if (e == EINVAL && o_direct)
    return fail("RuntimeError", "%s: %s: O_DIRECT is refused on this file system; put the file on "
                "the device's flash, or write the config with o_direct=False to read it buffered",
                fn, path);
  return fail("RuntimeError", "%s: %s: open failed: %s", fn, path, strerror(e));
}

static int check_extent(const char* fn, const char* path, int fd, int64_t layer, int64_t end,
                        const char* what) {
  int64_t size = (int64_t)lseek(fd, 0, SEEK_END);
  if (end <= size) return 0;
  return fail("RuntimeError", "%s: %s holds %lld bytes, layer %lld's %s ends at %lld; the file is "
              "truncated or not the one the config was written for", fn, path, (long long)size,
              (long long)layer, what, (long long)end);
}

static int open_runtime(const char* fn, const char* path) {
  rt_config_t* c = &rt.cfg;
  if (rt_config_read(fn, path, c) != 0) return -1;
  crc_init();
  const int64_t L = c->n_layers, n = c->n, bb = c->bundle_bytes;
  /* a config with no sparse layer may name no bundles file: nothing would read it */
  for (int64_t l = 0; l < L && !c->bundles_path[0]; ++l)
    if (c->layer_mode[l] == 0 || c->pinned_counts[l] > 0)
      return fail("ValueError", "%s: %s names no bundles file, but layer %lld reads bundles; compile the "
                  "APP again", fn, path, (long long)l);
  if (c->bundles_path[0] && open_flash(fn, c->bundles_path, (int)c->o_direct, &rt.bfd) != 0) return -1;
  if (c->whole_path[0] && open_flash(fn, c->whole_path, (int)c->o_direct, &rt.wfd) != 0) return -1;
  for (int64_t l = 0; l < L; ++l) {
    if (c->layer_mode[l] == 0 &&
        check_extent(fn, c->bundles_path, rt.bfd, l, c->region_offsets[l] + align_up(n * bb, c->alignment),
                     "region") != 0)
      return -1;
    if (c->layer_mode[l] == 1 &&
        check_extent(fn, c->whole_path, rt.wfd, l, c->whole_offsets[l] + c->whole_layer_bytes,
                     "whole extent") != 0)
      return -1;
  }
  /* A layer's extents never leave [region, region + n*bb rounded up): the region starts aligned.
   * With no sparse layer and nothing pinned from the bundles no bundle is ever read, so the
   * gather and staging buffers (2 x 2 MB on SmolLM2) are not held. */
  int fetches = 0;
  for (int64_t l = 0; l < L; ++l) fetches |= c->layer_mode[l] == 0 || c->pinned_counts[l] > 0;
  rt.stage_cap = fetches ? align_up(n * bb, c->alignment) : 0;
  rt.gather_cap = fetches ? n * bb : 0;
  rt.piece = c->max_request_bytes > 0 ? c->max_request_bytes : ((int64_t)1 << 62);
  rt.max_reqs = n + (c->max_request_bytes > 0 ? rt.stage_cap / c->max_request_bytes : 0) + 1;
  int64_t z = (int64_t)sizeof(int64_t);
  if (alloc(fn, &rt.gather, rt.gather_cap, 1) ||
      alloc(fn, &rt.act, n, 0) || alloc(fn, &rt.mark, n, 0) || alloc(fn, &rt.run_lo, n * z, 0) ||
      alloc(fn, &rt.run_len, n * z, 0) || alloc(fn, &rt.run_ext, n * z, 0) ||
      alloc(fn, &rt.ext_off, n * z, 0) || alloc(fn, &rt.ext_start, n * z, 0) ||
      alloc(fn, &rt.req, 2 * rt.max_reqs * z, 0) || alloc(fn, &rt.req_start, rt.max_reqs * z, 0) ||
      alloc(fn, &rt.pinned_whole, L * z, 0) || alloc(fn, &rt.pinned_rows, L * z, 0) ||
      alloc(fn, &rt.pin_row, L * n * 4, 0) || alloc(fn, &rt.stream, L * z, 0) ||
      alloc(fn, &rt.stream_idx, L * z, 0))
    return -1;
  /* the reads of a fetch land here: on huge pages, as the read-ahead's (map_buffer) */
  if (rt.stage_cap > 0 && !(rt.stage = map_buffer(rt.stage_cap, &rt.stage_mapped)))
    return fail("RuntimeError", "%s: cannot map a %lld-byte read buffer: %s", fn, (long long)rt.stage_cap,
                strerror(ERRNO));
  if (warm(fn, &fetch_pool, c->queue_depth) != 0) return -1;
  double pinned = 0;
  io_t uncounted = {0, 0, 0, 0, 0};  /* reads at open are not a token's */
  /* pinned bundles: read once, in slot order; pin_row says where each neuron's row is */
  memset(rt.pin_row, 0xff, (size_t)(L * n * 4));
  const int32_t* ids = c->pinned_ids;
  for (int64_t l = 0; l < L; ids += c->pinned_counts[l], ++l) {
    int64_t pc = c->pinned_counts[l], rows = 0;
    if (pc == 0) continue;
    const int32_t* so = c->slot_of + l * n;
    memset(rt.mark, 0, (size_t)n);
    for (int64_t i = 0; i < pc; ++i) rt.mark[so[ids[i]]] = 1;
    if (alloc(fn, &rt.pinned_rows[l], pc * bb, 1) ||
        read_marked(fn, l, rt.mark, rt.pinned_rows[l], &rows, &uncounted))
      return -1;
    int32_t* row_of_slot = (int32_t*)rt.run_len;  /* scratch: n int64 hold n int32 */
    for (int64_t s = 0, r = 0; s < n; ++s) row_of_slot[s] = rt.mark[s] ? (int32_t)r++ : -1;
    for (int64_t i = 0; i < pc; ++i) rt.pin_row[l * n + ids[i]] = row_of_slot[so[ids[i]]];
    pinned += (double)(pc * bb);
  }
  /* whole layers: pinned ones read now; the others form the read-ahead stream */
  int64_t wlb = c->whole_layer_bytes;
  rt.wreqs = wlb > 0 ? (wlb + rt.piece - 1) / rt.piece : 0;
  if (alloc(fn, &rt.wreq, 2 * rt.wreqs * z, 0) || alloc(fn, &rt.wreq_start, rt.wreqs * z, 0)) return -1;
  for (int64_t l = 0; l < L; ++l) {
    rt.stream_idx[l] = -1;
    if (c->layer_mode[l] != 1) continue;
    if (!c->pinned_layers[l]) {
      rt.stream_idx[l] = rt.stream_len;
      rt.stream[rt.stream_len++] = l;
      continue;
    }
    job_t j;
    double el;
    if (alloc(fn, &rt.pinned_whole[l], wlb, 1)) return -1;
    whole_requests(l, rt.wreq, rt.wreq_start);
    read_job(&j, rt.wfd, rt.pinned_whole[l], rt.wreq, rt.wreq_start, rt.wreqs);
    if (pool_run(fn, &fetch_pool, &j, &el) != 0) return -1;
    if (atomic_load(&j.failed)) return job_error(fn, c->whole_path, &j);
    int64_t bad = c->verify ? bad_block(c->whole_crcs, c->whole_offsets[l], rt.pinned_whole[l], wlb,
                                        &uncounted) : -1;
    if (bad >= 0) return checksum_error(fn, c->whole_path, bad, 1);
    pinned += (double)wlb;
  }
  double buffers = (double)(rt.gather_cap + rt.stage_cap);
  if (rt.stream_len > 0) {
    rt.nbuf = c->read_ahead + 1;
    if (alloc(fn, &rt.ahead_buf, rt.nbuf * z, 0) ||
        alloc(fn, &rt.ahead, rt.nbuf * (int64_t)sizeof(ahead_t), 0))
      return -1;
    /* each buffer starts on a 4 KiB boundary (O_DIRECT) */
    const int64_t stride = align_up(wlb, ALIGN);
    rt.region = map_buffer(rt.nbuf * stride, &rt.region_bytes);
    if (!rt.region)
      return fail("RuntimeError", "%s: cannot map %lld bytes of read-ahead buffers: %s", fn,
                  (long long)(rt.nbuf * stride), strerror(ERRNO));
    for (int64_t b = 0; b < rt.nbuf; ++b) {
      rt.ahead[b].pos = -1;
      rt.ahead_buf[b] = rt.region + b * stride;
    }
    buffers += (double)(rt.nbuf * wlb);
    if (start_readers(fn, &ahead_readers, &rt.thread, &rt.thread_started) != 0) return -1;
  }
  if (c->lru_per_layer > 0) {
    const int64_t cap = c->lru_per_layer;
    if (alloc(fn, &rt.lru_rows, L * cap * bb, 1) || alloc(fn, &rt.lru_of, L * n * 4, 0) ||
        alloc(fn, &rt.lru_id, L * cap * 4, 0) || alloc(fn, &rt.lru_prev, L * cap * 4, 0) ||
        alloc(fn, &rt.lru_next, L * cap * 4, 0) || alloc(fn, &rt.lru_head, L * 4, 0) ||
        alloc(fn, &rt.lru_tail, L * 4, 0) || alloc(fn, &rt.lru_used, L * 4, 0) ||
        alloc(fn, &rt.neuron_at, L * n * 4, 0))
      return -1;
    memset(rt.lru_of, 0xff, (size_t)(L * n * 4));
    for (int64_t l = 0; l < L; ++l) {
      rt.lru_head[l] = rt.lru_tail[l] = -1;
      for (int64_t i = 0; i < n; ++i) rt.neuron_at[l * n + c->slot_of[l * n + i]] = (int32_t)i;
    }
    pinned += (double)(L * cap * bb);
  }
  if (c->lookahead > 0) {
    rt.npf = c->lookahead + 1;
    rt.la_cap = rt.npf * rt.max_reqs;
    if (alloc(fn, &rt.pf, rt.npf * (int64_t)sizeof(pf_t), 0) || alloc(fn, &rt.la_req, 4 * rt.la_cap * z, 0))
      return -1;
    for (int64_t b = 0; b < rt.npf; ++b) {
      rt.pf[b].layer = -1;
      if (alloc(fn, &rt.pf[b].slot_off, n * z, 0)) return -1;
      if (!(rt.pf[b].buf = map_buffer(rt.stage_cap, &rt.pf[b].mapped)))
        return fail("RuntimeError", "%s: cannot map a %lld-byte prefetch buffer: %s", fn,
                    (long long)rt.stage_cap, strerror(ERRNO));
    }
    buffers += (double)(rt.npf * rt.stage_cap);
    if (start_readers(fn, &la_readers, &rt.la_thread, &rt.la_started) != 0) return -1;
  }
  memset(rt.st, 0, sizeof rt.st);
  queue_depth_reset();
  rt.st[ST_PINNED_BYTES] = pinned;
  rt.st[ST_BUFFER_BYTES] = buffers;
  rt.st[ST_O_DIRECT] = (double)c->o_direct;
  rt.st[ST_LAYERS] = (double)L;
  rt.open = rt.opened_once = 1;
  return 0;
}

/* ------------------------------------------------------------------ exported functions */

EXPORT int __tvm_ffi_ripple_rt_open(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  static const char* fn = "ripple.rt.open";
  char path[PATH_CAP];
  (void)self;
  if (want_args(fn, n, 1) || arg_str(args, 0, fn, "config_path", path)) return -1;
  pthread_mutex_lock(&rt_mu);
  teardown();
  int rc = open_runtime(fn, path);
  if (rc != 0) teardown();
  pthread_mutex_unlock(&rt_mu);
  if (rc == 0) ret_int(result, 0);
  return rc;
}

static int check_layer(const char* fn, int64_t layer, int want_mode) {
  if (!rt.open) return fail("RuntimeError", "%s: %s", fn, NO_RUNTIME);
  if (layer < 0 || layer >= rt.cfg.n_layers)
    return fail("ValueError", "%s: layer %lld outside 0..%lld", fn, (long long)layer,
                (long long)rt.cfg.n_layers - 1);
  if (rt.cfg.layer_mode[layer] != want_mode)
    return fail("ValueError", want_mode ? "%s: layer %lld is sparse (layer_mode 0); call ripple.rt.fetch"
                                        : "%s: layer %lld is read whole (layer_mode 1); call ripple.rt.whole",
                fn, (long long)layer);
  return 0;
}

EXPORT int __tvm_ffi_ripple_rt_whole(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  static const char* fn = "ripple.rt.whole";
  int64_t layer = 0;
  (void)self;
  if (want_args(fn, n, 1) || arg_int(args, 0, fn, "layer", &layer)) return -1;
  pthread_mutex_lock(&rt_mu);
  if (check_layer(fn, layer, 1) != 0) {
    pthread_mutex_unlock(&rt_mu);
    return -1;
  }
  const int64_t wlb = rt.cfg.whole_layer_bytes;
  char* data = rt.pinned_whole[layer];
  char err[1024] = "";
  double waited = 0;
  pthread_mutex_lock(&ra_mu);
  if (!data) {
    int64_t idx = rt.stream_idx[layer];
    if (!rt.started || rt.stream[rt.consumed % rt.stream_len] != layer) restart_stream(idx);
    int64_t pos = rt.consumed;
    if (rt.issued < pos + 1 + rt.cfg.read_ahead) {
      /* as many readers woken as there are new requests, not the whole pool: a reader that
       * finishes one takes the next itself */
      int64_t more = (pos + 1 + rt.cfg.read_ahead - rt.issued) * rt.wreqs;
      rt.issued = pos + 1 + rt.cfg.read_ahead;  /* into the buffer of the call before: see top */
      for (int64_t i = 0; i < more && i < rt.cfg.queue_depth; ++i) pthread_cond_signal(&ra_work);
    }
    ahead_t* a = &rt.ahead[pos % rt.nbuf];
    double t0 = now_s();
    while (a->pos != pos || !a->done) pthread_cond_wait(&ra_done, &ra_mu);
    waited = now_s() - t0;
    rt.consumed = pos + 1;
    if (!a->failed)
      data = rt.ahead_buf[pos % rt.nbuf];
    else
      strcpy(err, a->err);
  }
  rt.st[ST_IO_WAIT] += waited;
  rt.st[ST_BYTES_NEEDED] += (double)wlb;
  rt.st[ST_ACTIVE] += (double)rt.cfg.n;
  rt.st[ST_WHOLES] += 1;
  pthread_mutex_unlock(&ra_mu);
  int rc = data ? ret_view(fn, result, data, 1, &wlb, (DLDataType){kDLUInt, 8, 1})
                : fail("RuntimeError", "%s", err);
  pthread_mutex_unlock(&rt_mu);
  return rc;
}

/* What prefetch and fetch do once their (layer, logits (T, n) float32) are checked and the
 * runtime is theirs (rt_mu held): 0, or -1 with the error raised. */
typedef int (*sparse_call_fn)(const char* fn, int64_t layer, const DLTensor* logits, TVMFFIAny* result);

/* The packed function around such a body: its arguments parsed, one call at a time, the layer
 * checked to be sparse. */
static int sparse_call(const char* fn, const TVMFFIAny* args, int32_t n, TVMFFIAny* result,
                       sparse_call_fn body) {
  int64_t layer = 0;
  DLTensor* logits;
  if (want_args(fn, n, 2) || arg_int(args, 0, fn, "layer", &layer) ||
      arg_tensor(args, 1, fn, "logits", kDLFloat, 32, 0, &logits))
    return -1;
  pthread_mutex_lock(&rt_mu);
  int rc = check_layer(fn, layer, 0) != 0 ? -1 : body(fn, layer, logits, result);
  pthread_mutex_unlock(&rt_mu);
  return rc;
}

/* rt.act[i] = 1 for the neurons some row of logits (T, n) puts above thr (every one with
 * sets_all). */
static int active_of(const char* fn, const DLTensor* logits, float thr) {
  const int64_t N = rt.cfg.n;
  if (logits->ndim != 2 || logits->shape[1] != N)
    return fail("ValueError", "%s: logits must have shape (T, %lld), got %s(%lld, %lld)", fn, (long long)N,
                logits->ndim == 2 ? "" : "a tensor of another rank: ",
                (long long)(logits->ndim > 0 ? logits->shape[0] : 0),
                (long long)(logits->ndim > 1 ? logits->shape[1] : 0));
  if (rt.cfg.sets_all) {
    memset(rt.act, 1, (size_t)N);
    return 0;
  }
  const float* x = (const float*)tensor_data(logits);
  memset(rt.act, 0, (size_t)N);
  for (int64_t t = 0; t < logits->shape[0]; ++t, x += N)
    for (int64_t i = 0; i < N; ++i) rt.act[i] |= x[i] > thr;
  return 0;
}

/* ripple.rt.prefetch(layer, logits (T, n) float32) -> requests issued. The neurons the
 * lookahead predictor's logits put above the layer's lookahead threshold, less the pinned
 * ones, planned as a fetch plans (runs, collapse, request cut) and queued to the lookahead
 * readers; it returns at once. The layer's fetch then takes what they read and reads the rest
 * of its own set on demand. A prefetch of a layer still holding an earlier one's bundles (no
 * fetch came between) waits for those reads and drops them. */
static int prefetch(const char* fn, int64_t layer, const DLTensor* logits, TVMFFIAny* result) {
  const rt_config_t* c = &rt.cfg;
  if (!(c->la_thresholds[layer] < INFINITY))
    return fail("ValueError", "%s: layer %lld is not prefetched in this config (no lookahead threshold); "
                "compile the APP with --lookahead", fn, (long long)layer);
  if (active_of(fn, logits, c->la_thresholds[layer]) != 0) return -1;
  const int64_t N = c->n, bb = c->bundle_bytes, base = c->region_offsets[layer];
  const int32_t* so = c->slot_of + layer * N;
  const int32_t* pin = rt.pin_row + layer * N;
  memset(rt.mark, 0, (size_t)N);
  const int32_t* held = c->lru_per_layer ? rt.lru_of + layer * N : NULL;
  for (int64_t i = 0; i < N; ++i)
    if (rt.act[i] && pin[i] < 0 && !(held && held[i] >= 0)) rt.mark[so[i]] = 1;
  pf_t* f = &rt.pf[layer % rt.npf];
  pthread_mutex_lock(&ra_mu);
  pf_settle(f);
  f->layer = -1;
  pthread_mutex_unlock(&ra_mu);
  plan_t p;
  if (plan_marked(fn, layer, rt.mark, &p) != 0) return -1;
  /* every slot whose bundle an extent holds whole is read: gaps collapsed in come too */
  int64_t covered = 0;
  for (int64_t s = 0; s < N; ++s) f->slot_off[s] = -1;
  for (int64_t e = 0; e < p.extents; ++e) {
    int64_t len = (e + 1 < p.extents ? rt.ext_start[e + 1] : p.total) - rt.ext_start[e];
    int64_t s0 = (rt.ext_off[e] - base + bb - 1) / bb, s1 = (rt.ext_off[e] + len - base) / bb;
    if (s0 < 0) s0 = 0;
    if (s1 > N) s1 = N;
    for (int64_t s = s0; s < s1; ++s, ++covered)
      f->slot_off[s] = rt.ext_start[e] + base + s * bb - rt.ext_off[e];
  }
  pthread_mutex_lock(&ra_mu);
  f->layer = layer;
  f->left = p.requests;
  f->covered = covered;
  f->failed = 0;
  for (int64_t r = 0; r < p.requests; ++r) {
    int64_t* q = rt.la_req + 4 * (rt.la_tail++ % rt.la_cap);
    q[0] = f - rt.pf;
    q[1] = rt.req[2 * r];
    q[2] = rt.req[2 * r + 1];
    q[3] = rt.req_start[r];
  }
  for (int64_t i = 0; i < p.requests && i < c->queue_depth; ++i) pthread_cond_signal(&la_work);
  rt.st[ST_PREFETCHES] += 1;
  pthread_mutex_unlock(&ra_mu);
  ret_int(result, p.requests);
  return 0;
}

EXPORT int __tvm_ffi_ripple_rt_prefetch(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self;
  return sparse_call("ripple.rt.prefetch", args, n, result, prefetch);
}

static int fetch(const char* fn, int64_t layer, const DLTensor* logits, TVMFFIAny* result) {
  const rt_config_t* c = &rt.cfg;
  if (active_of(fn, logits, c->thresholds[layer]) != 0) return -1;
  const int64_t N = c->n, bb = c->bundle_bytes;
  /* the layer's prefetch, if one was issued since its last fetch */
  pf_t* f = rt.npf && rt.pf[layer % rt.npf].layer == layer ? &rt.pf[layer % rt.npf] : NULL;
  /* hits first, copied from DRAM; then the misses, read in slot order; the prefetched last */
  const int32_t* so = c->slot_of + layer * N;
  const int32_t* pin = rt.pin_row + layer * N;
  int64_t k = 0, hits = 0, misses = 0, ahead = 0;
  memset(rt.mark, 0, (size_t)N);
  for (int64_t i = 0; i < N; ++i) {
    if (!rt.act[i]) continue;
    const char* kept = pin[i] < 0 ? lru_get(layer, i) : NULL;
    if (pin[i] >= 0 || kept) {
      memcpy(rt.gather + hits * bb, kept ? kept : rt.pinned_rows[layer] + (int64_t)pin[i] * bb, (size_t)bb);
      ++hits;
      rt.act[i] = 2;          /* served from DRAM: not taken from a prefetch below */
    } else if (f && f->slot_off[so[i]] >= 0) {
      ++ahead;
    } else {
      rt.mark[so[i]] = 1;
      ++misses;
    }
  }
  io_t io = {0, 0, 0, 0, 0};
  double t0 = now_s(), pf_wait = 0;
  if (misses > 0 && read_marked(fn, layer, rt.mark, rt.gather + hits * bb, &k, &io) != 0) return -1;
  const double demand_s = now_s() - t0;   /* planning and reading the misses */
  k += hits;
  char err[1024] = "";
  if (f && ahead > 0) {      /* none used: the next prefetch into the buffer settles its reads */
    pthread_mutex_lock(&ra_mu);
    double t1 = now_s();
    pf_settle(f);
    pf_wait = now_s() - t1;
    if (f->failed) strcpy(err, f->err);
    pthread_mutex_unlock(&ra_mu);
    if (err[0]) {
      f->layer = -1;
      return fail("RuntimeError", "%s", err);
    }
    for (int64_t i = 0; i < N; ++i)
      if (rt.act[i] == 1 && f->slot_off[so[i]] >= 0)
        memcpy(rt.gather + k++ * bb, f->buf + f->slot_off[so[i]], (size_t)bb);
  }
  if (f) f->layer = -1;
  /* what was read is kept (LRU): the misses lie in slot order after the hits, then the prefetched */
  if (c->lru_per_layer) {
    int64_t row = hits;
    for (int64_t s = 0; s < N && misses > 0; ++s)
      if (rt.mark[s]) lru_put(layer, rt.neuron_at[layer * N + s], rt.gather + row++ * bb);
    for (int64_t i = 0; f && i < N; ++i)
      if (rt.act[i] == 1 && f->slot_off[so[i]] >= 0) lru_put(layer, i, rt.gather + row++ * bb);
  }
  pthread_mutex_lock(&ra_mu);
  /* the caller waited for every read of a fetch, and for the prefetched reads still in flight */
  rt.st[ST_IO_WAIT] += f ? demand_s + pf_wait : io.seconds;
  rt.st[ST_READ_SECONDS] += io.seconds;
  rt.st[ST_BYTES_READ] += (double)io.bytes;
  rt.st[ST_REQUESTS] += (double)io.requests;
  rt.st[ST_BYTES_NEEDED] += (double)(k * bb);
  rt.st[ST_ACTIVE] += (double)k;
  rt.st[ST_HITS] += (double)hits;
  rt.st[ST_FETCHES] += 1;
  rt.st[ST_VERIFIED] += (double)io.verified;
  rt.st[ST_VERIFY_SECONDS] += io.verify_seconds;
  if (f) {
    rt.st[ST_PF_USED] += (double)ahead;
    rt.st[ST_PF_UNUSED] += (double)(f->covered - ahead);
    rt.st[ST_MISSES] += (double)misses;
    rt.st[ST_PF_WAIT] += pf_wait;
  }
  pthread_mutex_unlock(&ra_mu);
  static const DLDataType dtypes[] = {{kDLUInt, 8, 1}, {kDLInt, 8, 1}, {kDLFloat, 16, 1}};
  const int64_t shape[2] = {k, bb / rt_elem_bytes(c->view_dtype)};
  return ret_view(fn, result, rt.gather, 2, shape, dtypes[c->view_dtype]);
}

EXPORT int __tvm_ffi_ripple_rt_fetch(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self;
  return sparse_call("ripple.rt.fetch", args, n, result, fetch);
}

/* out (24,) float64, cumulative since open (kept after close until the next open):
 * [0] seconds whole()/fetch() callers waited for reads, [1] read seconds in all (with those
 * hidden behind compute), [2] bytes read from flash, [3] bytes the kernels needed (k bundles a
 * fetch, whole_layer_bytes a whole call), [4] read requests, [5] active neurons (k a fetch, n
 * a whole call), [6] bundles served from DRAM, [7] fetch calls, [8] whole calls, [9] pinned DRAM
 * bytes, [10] buffer bytes (read-ahead, gather, staging), [11] O_DIRECT (1/0), [12] layers,
 * [13] bytes checked against their block CRC32 (verify on: every byte of [2]; off: 0),
 * [14] CPU seconds spent checking them (on the caller's thread for fetch, on the read-ahead
 * thread for whole layers), [15] prefetch calls, [16] bytes they read (in [2] too), [17]
 * prefetched bundles the layer's own set used, [18] prefetched bundles it did not use (read
 * for nothing: false positives of the lookahead, and gaps collapsed in), [19] bundles of a
 * prefetched layer's own set read on demand (misses), [20] the most requests in flight seen
 * as one started (every pool), [21] their sum and [22] how many (mean depth = [21] / [22]),
 * [23] seconds fetch waited for prefetched reads still in flight (in [0] too). Read-ahead and
 * prefetch reads count when they finish; reads at open (pinned) are checked but not counted. */
EXPORT int __tvm_ffi_ripple_rt_stats(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  static const char* fn = "ripple.rt.stats";
  DLTensor* out;
  (void)self;
  (void)result;
  if (want_args(fn, n, 1) || arg_tensor(args, 0, fn, "out", kDLFloat, 64, 0, &out)) return -1;
  if (out->ndim != 1 || out->shape[0] != ST_COUNT)
    return fail("ValueError", "%s: out must have shape (%d,) float64", fn, (int)ST_COUNT);
  pthread_mutex_lock(&rt_mu);
  int rc = 0;
  if (!rt.opened_once) {
    rc = fail("RuntimeError", "%s: %s", fn, NO_RUNTIME);
  } else {
    pthread_mutex_lock(&ra_mu);
    int64_t mx, sum, samples;
    queue_depth_seen(&mx, &sum, &samples);
    rt.st[ST_QD_MAX] = (double)mx;
    rt.st[ST_QD_SUM] = (double)sum;
    rt.st[ST_QD_SAMPLES] = (double)samples;
    memcpy(tensor_data(out), rt.st, sizeof rt.st);
    pthread_mutex_unlock(&ra_mu);
  }
  pthread_mutex_unlock(&rt_mu);
  return rc;
}

/* Closing with no runtime open does nothing. */
EXPORT int __tvm_ffi_ripple_rt_close(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  (void)self;
  (void)args;
  (void)result;
  if (want_args("ripple.rt.close", n, 0)) return -1;
  pthread_mutex_lock(&rt_mu);
  teardown();
  pthread_mutex_unlock(&rt_mu);
  return 0;
}
