/* The flash runtime's config file, as compile/runtime_config.py writes it (the format is
 * documented there); runtime_config.c reads and checks it. Internal to the library.
 */
#ifndef RIPPLE_RUNTIME_CONFIG_H_
#define RIPPLE_RUNTIME_CONFIG_H_

#include <stdint.h>

#include "ripple_native.h"

#define RT_MAGIC "RPLRT001"
#define RT_VERSION 3
#define RT_FIELDS 22            /* int64 header fields after the magic */
#define RT_HEADER_BYTES (8 + 8 * RT_FIELDS)

enum { RT_UINT8 = 0, RT_INT8 = 1, RT_FLOAT16 = 2 };   /* view_dtype */

typedef struct {
  char* blob;                   /* the file's bytes: the arrays below point into it */
  char bundles_path[PATH_CAP];  /* resolved against the config's folder; "" when no layer is sparse */
  char whole_path[PATH_CAP];    /* "" when the layout has no whole copy */
  int64_t n_layers, n, bundle_bytes, alignment, view_dtype, whole_layer_bytes, sets_all,
      queue_depth, read_ahead, collapse_gap_bytes, max_request_bytes, o_direct, pinned_total,
      verify, n_bundle_crcs, n_whole_crcs, lookahead, lru_per_layer;
  const int64_t* region_offsets;   /* (L,) */
  const int64_t* whole_offsets;    /* (L,) */
  const int64_t* pinned_counts;    /* (L,) pinned bundles per layer */
  const float* thresholds;         /* (L,) */
  const float* la_thresholds;      /* (L,) a prefetch's threshold; +inf: never prefetched */
  const int32_t* slot_of;          /* (L, n) */
  const int32_t* pinned_ids;       /* (pinned_total,) layer 0's, then layer 1's, ... */
  const uint32_t* bundle_crcs;     /* (n_bundle_crcs,) CRC32 of each alignment block, if verify */
  const uint32_t* whole_crcs;      /* (n_whole_crcs,) the same for the whole-copy file */
  const int8_t* layer_mode;        /* (L,) 0 sparse, 1 whole */
  const uint8_t* pinned_layers;    /* (L,) */
} rt_config_t;

/* Reads and checks `path`; on failure raises one line (naming fn and the file) and returns -1
 * with nothing left allocated. */
INTERNAL int rt_config_read(const char* fn, const char* path, rt_config_t* c);
INTERNAL void rt_config_free(rt_config_t* c);
INTERNAL int64_t rt_elem_bytes(int64_t view_dtype);

#endif  /* RIPPLE_RUNTIME_CONFIG_H_ */
