/* Packed-function plumbing: one-line errors, typed arguments, returned values and tensor
 * views, and finding the TVM FFI in the process (see registry.c for why by dlsym).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ripple_native.h"

/* ------------------------------------------------------------------ errors */

EXPORT set_error_fn __TVMFFIErrorSetRaisedFromCStr = NULL;

int fail(const char* kind, const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (__TVMFFIErrorSetRaisedFromCStr) __TVMFFIErrorSetRaisedFromCStr(kind, msg);
  return -1;
}

/* ------------------------------------------------------------------ arguments */

int want_args(const char* fn, int32_t got, int32_t want) {
  if (got == want) return 0;
  return fail("TypeError", "%s: takes %d arguments, got %d", fn, want, got);
}

int arg_int(const TVMFFIAny* a, int i, const char* fn, const char* name, int64_t* out) {
  if (a[i].type_index == kTVMFFIInt || a[i].type_index == kTVMFFIBool) {
    *out = a[i].v_int64;
    return 0;
  }
  return fail("TypeError", "%s: argument %d (%s) must be an int (type index %d given)", fn, i, name,
              a[i].type_index);
}

int arg_float(const TVMFFIAny* a, int i, const char* fn, const char* name, double* out) {
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

int arg_str(const TVMFFIAny* a, int i, const char* fn, const char* name, char* buf) {
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
int arg_tensor(const TVMFFIAny* a, int i, const char* fn, const char* name, int code, int bits,
               int allow_none, DLTensor** out) {
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

int64_t numel(const DLTensor* t) {
  int64_t n = 1;
  for (int d = 0; d < t->ndim; ++d) n *= t->shape[d];
  return n;
}

void* tensor_data(const DLTensor* t) { return (char*)t->data + t->byte_offset; }

/* ------------------------------------------------------------------ results */

void ret_float(TVMFFIAny* r, double v) {
  r->type_index = kTVMFFIFloat;
  r->zero_padding = 0;
  r->v_float64 = v;
}

void ret_int(TVMFFIAny* r, int64_t v) {
  r->type_index = kTVMFFIInt;
  r->zero_padding = 0;
  r->v_int64 = v;
}

/* Where a process may keep the TVM FFI: exported to everyone (a Python process), or in a
 * library already loaded under one of these names (looked up without loading it). */
static const char* FFI_LIBS[] = {"libtvm_ffi.so", "libtvm_runtime.so", "libtvm4j_runtime_packed.so"};

void* ffi_symbol(const char* name) {
  void* p = dlsym(RTLD_DEFAULT, name);
  for (size_t i = 0; !p && i < sizeof FFI_LIBS / sizeof *FFI_LIBS; ++i) {
    void* h = dlopen(FFI_LIBS[i], RTLD_LAZY | RTLD_NOLOAD);
    if (h) p = dlsym(h, name);
  }
  return p;
}

/* The DLPack struct a view hands to TVM, with room for its shape: TVM keeps pointing at
 * dl_tensor.shape until it calls the deleter, which frees this struct and not the data. */
typedef struct {
  DLManagedTensor m;
  int64_t shape[2];
} view_t;

static void free_view(DLManagedTensor* m) { free(m); }

typedef int (*from_dlpack_fn)(DLManagedTensor*, int32_t, int32_t, TVMFFIObjectHandle*);
static from_dlpack_fn from_dlpack = NULL;

int ret_view(const char* fn, TVMFFIAny* r, void* data, int ndim, const int64_t* shape,
             DLDataType dtype) {
  if (ndim < 1 || ndim > 2) return fail("RuntimeError", "%s: a view of rank %d (internal)", fn, ndim);
  if (!from_dlpack) from_dlpack = (from_dlpack_fn)ffi_symbol("TVMFFITensorFromDLPack");
  if (!from_dlpack)
    return fail("RuntimeError", "%s: TVMFFITensorFromDLPack is not in this process; load the "
                "library into a process that runs TVM", fn);
  view_t* v = (view_t*)malloc(sizeof *v);
  if (!v) return fail("RuntimeError", "%s: out of memory", fn);
  memset(v, 0, sizeof *v);
  for (int d = 0; d < ndim; ++d) v->shape[d] = shape[d];
  v->m.dl_tensor.data = data;
  v->m.dl_tensor.device.device_type = kDLCPU;
  v->m.dl_tensor.device.device_id = 0;
  v->m.dl_tensor.ndim = ndim;
  v->m.dl_tensor.dtype = dtype;
  v->m.dl_tensor.shape = v->shape;
  v->m.dl_tensor.strides = NULL;
  v->m.dl_tensor.byte_offset = 0;
  v->m.manager_ctx = NULL;
  v->m.deleter = free_view;
  TVMFFIObjectHandle h = NULL;
  /* 64: the kernels' buffers are declared 64-byte aligned; ours are 4096-aligned. On failure
   * TVM raised the error and did not take the struct. */
  if (from_dlpack(&v->m, 64, 1, &h) != 0) {
    free(v);
    return -1;
  }
  r->type_index = kTVMFFITensor;
  r->zero_padding = 0;
  r->v_obj = (TVMFFIObject*)h;
  return 0;
}
