/* Reading the flash runtime's config (compile/runtime_config.py documents the format): every
 * size is checked against the file's length before an array is touched, and every offset and
 * slot the runtime will read by is checked here, so a bad config is one line at open, never a
 * read out of bounds per token.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime_config.h"

/* A config is a few MB at most (slot_of of a 7B model: 32 x 11008 x 4 bytes = 1.4 MB; with
 * verify, 4 bytes per 4 KiB block of its ~4 GB model.rflash: 4 MB more). */
#define RT_MAX_FILE_BYTES ((int64_t)1 << 32)

int64_t rt_elem_bytes(int64_t view_dtype) { return view_dtype == RT_FLOAT16 ? 2 : 1; }

static int64_t i64_at(const char* p) {
  int64_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

/* The file's bytes, whole; *size its length. */
static int slurp(const char* fn, const char* path, char** out, int64_t* size) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = ERRNO;
    return fail("RuntimeError", "%s: %s: open failed: %s", fn, path, strerror(e));
  }
  int64_t n = (int64_t)lseek(fd, 0, SEEK_END);
  if (n < RT_HEADER_BYTES || n > RT_MAX_FILE_BYTES) {
    close(fd);
    return fail("ValueError", "%s: %s: %lld bytes is not a runtime config (%d to %lld bytes); "
                "write it with compile.runtime_config.write_runtime_config", fn, path, (long long)n,
                RT_HEADER_BYTES, (long long)RT_MAX_FILE_BYTES);
  }
  char* b = (char*)malloc((size_t)n);
  if (!b) {
    close(fd);
    return fail("RuntimeError", "%s: %s: out of memory for %lld bytes", fn, path, (long long)n);
  }
  int64_t got = 0;
  while (got < n) {
    ssize_t k = pread(fd, b + got, (size_t)(n - got), (off_t)got);
    if (k < 0 && ERRNO == EINTR) continue;
    if (k <= 0) {
      int e = k < 0 ? ERRNO : 0;
      close(fd);
      free(b);
      return fail("RuntimeError", "%s: %s: read failed at byte %lld: %s", fn, path, (long long)got,
                  e ? strerror(e) : "unexpected end of file");
    }
    got += k;
  }
  close(fd);
  *out = b;
  *size = n;
  return 0;
}

/* `name` (len bytes, no NUL inside) against the config's folder, unless absolute. */
static int resolve(const char* fn, const char* config, const char* name, int64_t len, char* out,
                   const char* what) {
  for (int64_t i = 0; i < len; ++i)
    if (name[i] == 0) return fail("ValueError", "%s: %s: the %s name holds a NUL byte", fn, config, what);
  int64_t dir = 0;
  if (name[0] != '/')
    for (int64_t i = 0; config[i]; ++i)
      if (config[i] == '/') dir = i + 1;
  if (dir + len >= PATH_CAP)
    return fail("ValueError", "%s: %s: the %s path is longer than %d bytes", fn, config, what,
                PATH_CAP - 1);
  memcpy(out, config, (size_t)dir);
  memcpy(out + dir, name, (size_t)len);
  out[dir + len] = 0;
  return 0;
}

#define BAD(...)                  \
  do {                            \
    fail("ValueError", __VA_ARGS__); \
    goto bad;                     \
  } while (0)

int rt_config_read(const char* fn, const char* path, rt_config_t* c) {
  char* b = NULL;
  int64_t size = 0;
  uint8_t* seen = NULL;
  memset(c, 0, sizeof *c);
  if (slurp(fn, path, &b, &size) != 0) return -1;
  if (memcmp(b, RT_MAGIC, 5) != 0)
    BAD("%s: %s is not a ripple runtime config (bad magic); write it with "
        "compile.runtime_config.write_runtime_config", fn, path);
  if (memcmp(b, RT_MAGIC, 8) != 0 || i64_at(b + 8) != RT_VERSION)
    BAD("%s: %s: config version %.8s/%lld, this runtime reads %s/%d; rewrite it with this ripple",
        fn, path, b, (long long)i64_at(b + 8), RT_MAGIC, RT_VERSION);
  const char* h = b + 16;  /* fields after the version, in compile/runtime_config.py's order */
  int64_t file_bytes = i64_at(h), L = i64_at(h + 8), n = i64_at(h + 16), bb = i64_at(h + 24),
          align = i64_at(h + 32), vd = i64_at(h + 40), wlb = i64_at(h + 48), all = i64_at(h + 56),
          qd = i64_at(h + 64), ra = i64_at(h + 72), gap = i64_at(h + 80), maxreq = i64_at(h + 88),
          od = i64_at(h + 96), s1 = i64_at(h + 104), s2 = i64_at(h + 112), P = i64_at(h + 120),
          verify = i64_at(h + 128), B = i64_at(h + 136), W = i64_at(h + 144), J = i64_at(h + 152),
          lru = i64_at(h + 160);
  if (file_bytes != size)
    BAD("%s: %s: the header says %lld bytes, the file has %lld; it is truncated or was changed; "
        "write it again", fn, path, (long long)file_bytes, (long long)size);
  if (L < 1 || L > (1 << 16) || n < 1 || n > (1 << 26) || bb < 1 || bb > (1 << 30))
    BAD("%s: %s: n_layers %lld, n %lld, bundle_bytes %lld outside 1..65536, 1..2^26, 1..2^30", fn,
        path, (long long)L, (long long)n, (long long)bb);
  if (align < 512 || align > (1 << 24) || (align & (align - 1)))
    BAD("%s: %s: alignment %lld must be a power of two in 512..2^24", fn, path, (long long)align);
  if (vd < RT_UINT8 || vd > RT_FLOAT16 || bb % rt_elem_bytes(vd))
    BAD("%s: %s: view_dtype %lld with bundle_bytes %lld: want 0 (uint8), 1 (int8) or 2 (float16) "
        "dividing a bundle", fn, path, (long long)vd, (long long)bb);
  if (wlb < 0 || wlb > ((int64_t)1 << 40) || wlb % align)
    BAD("%s: %s: whole_layer_bytes %lld must be a multiple of the alignment %lld", fn, path,
        (long long)wlb, (long long)align);
  if ((all != 0 && all != 1) || (od != 0 && od != 1))
    BAD("%s: %s: sets_all %lld and o_direct %lld must be 0 or 1", fn, path, (long long)all, (long long)od);
  if (qd < 1 || qd > POOL_MAX || ra < 0 || ra > 64)
    BAD("%s: %s: queue_depth %lld must be in 1..%d and read_ahead %lld in 0..64", fn, path,
        (long long)qd, POOL_MAX, (long long)ra);
  if (gap < 0 || gap > ((int64_t)1 << 40) || maxreq < 0 || maxreq > ((int64_t)1 << 40) || maxreq % align)
    BAD("%s: %s: collapse_gap_bytes %lld must be >= 0 and max_request_bytes %lld 0 (no limit) or a "
        "multiple of the alignment %lld", fn, path, (long long)gap, (long long)maxreq, (long long)align);
  if (s1 < 0 || s1 >= PATH_CAP || s1 + s2 == 0 || s2 < 0 || s2 >= PATH_CAP || P < 0 || P > L * n)
    BAD("%s: %s: file name lengths %lld, %lld or pinned bundle count %lld out of range", fn, path,
        (long long)s1, (long long)s2, (long long)P);
  if ((verify != 0 && verify != 1) || B < 0 || B > RT_MAX_FILE_BYTES / 4 || W < 0 ||
      W > RT_MAX_FILE_BYTES / 4 || (!verify && (B || W)))
    BAD("%s: %s: verify %lld with checksum tables of %lld and %lld blocks: want verify 0 or 1, "
        "and tables only with verify", fn, path, (long long)verify, (long long)B, (long long)W);
  if (J < 0 || J >= L)
    BAD("%s: %s: lookahead %lld must lie in 0..%lld (layers ahead)", fn, path, (long long)J,
        (long long)L - 1);
  if (lru < 0 || lru > n)
    BAD("%s: %s: lru_per_layer %lld must lie in 0..%lld (bundles of a layer)", fn, path, (long long)lru,
        (long long)n);
  int64_t at = RT_HEADER_BYTES + align_up(s1 + s2, 8);
  int64_t want = at + L * (8 * 3 + 4 + 4) + L * n * 4 + (P + B + W) * 4 + 2 * L;
  if (want != size)
    BAD("%s: %s: %lld bytes, the header's sizes need %lld; write it again", fn, path,
        (long long)size, (long long)want);
  if (s1 > 0 && resolve(fn, path, b + RT_HEADER_BYTES, s1, c->bundles_path, "bundles file") != 0)
    goto bad;
  if (s2 > 0 && resolve(fn, path, b + RT_HEADER_BYTES + s1, s2, c->whole_path, "whole-copy file") != 0)
    goto bad;
  c->region_offsets = (const int64_t*)(b + at);
  c->whole_offsets = c->region_offsets + L;
  c->pinned_counts = c->whole_offsets + L;
  c->thresholds = (const float*)(c->pinned_counts + L);
  c->la_thresholds = c->thresholds + L;
  c->slot_of = (const int32_t*)(c->la_thresholds + L);
  c->pinned_ids = c->slot_of + L * n;
  c->bundle_crcs = (const uint32_t*)(c->pinned_ids + P);
  c->whole_crcs = c->bundle_crcs + B;
  c->layer_mode = (const int8_t*)(c->whole_crcs + W);
  c->pinned_layers = (const uint8_t*)(c->layer_mode + L);

  seen = (uint8_t*)malloc((size_t)n);
  if (!seen) {
    fail("RuntimeError", "%s: out of memory", fn);
    goto bad;
  }
  int64_t pinned_sum = 0;
  for (int64_t l = 0; l < L; ++l) {
    int64_t ro = c->region_offsets[l], wo = c->whole_offsets[l], pc = c->pinned_counts[l];
    int mode = c->layer_mode[l], pin = c->pinned_layers[l];
    float thr = c->thresholds[l];
    if (ro < 0 || ro % align || ro > ((int64_t)1 << 56) || wo < 0 || wo % align ||
        wo > ((int64_t)1 << 56))
      BAD("%s: %s: layer %lld: region offset %lld / whole offset %lld not a multiple of the "
          "alignment %lld", fn, path, (long long)l, (long long)ro, (long long)wo, (long long)align);
    if (mode != 0 && mode != 1)
      BAD("%s: %s: layer %lld: layer_mode %d must be 0 (sparse) or 1 (whole)", fn, path,
          (long long)l, mode);
    if (pin > 1 || (pin && mode != 1))
      BAD("%s: %s: layer %lld: pinned_layers %d: only a whole layer (layer_mode 1) is pinned whole",
          fn, path, (long long)l, pin);
    if (mode == 1 && (s2 == 0 || wlb == 0))
      BAD("%s: %s: layer %lld is read whole but the config names no whole-copy file (or its "
          "whole_layer_bytes is 0)", fn, path, (long long)l);
    if (thr != thr) BAD("%s: %s: layer %lld: logit threshold is NaN", fn, path, (long long)l);
    float la = c->la_thresholds[l];
    if (la != la || (la < INFINITY && (mode != 0 || J == 0)))
      BAD("%s: %s: layer %lld: lookahead threshold %g: only a sparse layer is prefetched, with a "
          "lookahead > 0 in the header, and never at NaN", fn, path, (long long)l, (double)la);
    if (pc < 0 || pc > n || pinned_sum + pc > P)
      BAD("%s: %s: layer %lld: %lld pinned bundles do not fit the %lld listed", fn, path,
          (long long)l, (long long)pc, (long long)P);
    /* with verify, every block a read of this layer can touch has its CRC */
    int64_t end = mode == 0 ? ro + align_up(n * bb, align) : wo + wlb, blocks = mode == 0 ? B : W;
    if (verify && end > blocks * align)
      BAD("%s: %s: layer %lld's %s ends at byte %lld, the %s file's checksum table covers %lld; "
          "write the config again with compile.runtime_config.block_crc_tables", fn, path,
          (long long)l, mode == 0 ? "region" : "whole extent", (long long)end,
          mode == 0 ? "bundles" : "whole-copy", (long long)(blocks * align));
    if (pc > 0 && mode != 0)
      BAD("%s: %s: layer %lld is read whole (layer_mode 1) but pins %lld bundles", fn, path,
          (long long)l, (long long)pc);
    memset(seen, 0, (size_t)n);
    const int32_t* so = c->slot_of + l * n;
    for (int64_t i = 0; i < n; ++i) {
      if (so[i] < 0 || so[i] >= n || seen[so[i]])
        BAD("%s: %s: layer %lld: slot_of is not a permutation of 0..%lld (neuron %lld -> slot %d)",
            fn, path, (long long)l, (long long)n - 1, (long long)i, so[i]);
      seen[so[i]] = 1;
    }
    memset(seen, 0, (size_t)n);
    const int32_t* ids = c->pinned_ids + pinned_sum;
    for (int64_t i = 0; i < pc; ++i) {
      if (ids[i] < 0 || ids[i] >= n || seen[ids[i]])
        BAD("%s: %s: layer %lld: pinned neuron %d is out of 0..%lld or listed twice", fn, path,
            (long long)l, ids[i], (long long)n - 1);
      seen[ids[i]] = 1;
    }
    pinned_sum += pc;
  }
  if (pinned_sum != P)
    BAD("%s: %s: the layers pin %lld bundles, the header says %lld", fn, path,
        (long long)pinned_sum, (long long)P);
  free(seen);
  c->blob = b;
  c->n_layers = L;
  c->n = n;
  c->bundle_bytes = bb;
  c->alignment = align;
  c->view_dtype = vd;
  c->whole_layer_bytes = wlb;
  c->sets_all = all;
  c->queue_depth = qd;
  c->read_ahead = ra;
  c->collapse_gap_bytes = gap;
  c->max_request_bytes = maxreq;
  c->o_direct = od;
  c->pinned_total = P;
  c->verify = verify;
  c->n_bundle_crcs = B;
  c->n_whole_crcs = W;
  c->lookahead = J;
  c->lru_per_layer = lru;
  return 0;
bad:
  free(seen);
  free(b);
  memset(c, 0, sizeof *c);
  return -1;
}

void rt_config_free(rt_config_t* c) {
  free(c->blob);
  memset(c, 0, sizeof *c);
}
