/* One call of a compiled model's prefill or decode on this device, timed by this device's
 * clock, with the greedy next id taken here: what `ripple bench e2e --rpc` drives a phone's
 * decode loop through. Per token it is one RPC round trip, and neither the link's latency
 * nor the logits' way back (196 KB a token on SmolLM2) is in the time, as in ripple-run.
 *
 *   ripple.rt.step(vm Module, name str, tokens (n,) int32, kv, pos int, params Array,
 *                  out (2 + 24,) float64) -> 0
 *
 * vm is the Relax VM module (vm_load_executable's), name "prefill" or "decode"; the call is
 * vm[name](tokens, kv, Shape([pos]), params). out[0]: seconds of the call; out[1]: the
 * argmax of the last row of the logits it returned; out[2..25]: ripple.rt.stats after it.
 * A module, not a function, is taken because TVM's RPC passes modules to the device but not
 * functions.
 */
#include <string.h>

#include "ripple_native.h"

EXPORT int __tvm_ffi_ripple_rt_stats(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result);

typedef int (*get_global_fn)(const TVMFFIByteArray*, TVMFFIObjectHandle*);
typedef int (*call_fn)(TVMFFIObjectHandle, TVMFFIAny*, int32_t, TVMFFIAny*);
typedef int (*dec_ref_fn)(TVMFFIObjectHandle);

#define STATS_SLOTS 24

static TVMFFIAny int_any(int64_t v) {
  TVMFFIAny a;
  memset(&a, 0, sizeof a);
  a.type_index = kTVMFFIInt;
  a.v_int64 = v;
  return a;
}

static TVMFFIAny str_any(const char* s) {
  TVMFFIAny a;
  memset(&a, 0, sizeof a);
  a.type_index = kTVMFFIRawStr;
  a.v_c_str = s;
  return a;
}

/* The argmax of the last row of a (rows, vocab) float32 tensor; -1 when it is not one. */
static int64_t last_row_argmax(const DLTensor* t) {
  if (t->ndim != 2 || t->dtype.code != kDLFloat || t->dtype.bits != 32 || t->shape[1] < 1) return -1;
  const float* x = (const float*)tensor_data(t) + (t->shape[0] - 1) * t->shape[1];
  int64_t best = 0;
  for (int64_t i = 1; i < t->shape[1]; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

EXPORT int __tvm_ffi_ripple_rt_step(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  static const char* fn = "ripple.rt.step";
  char name[PATH_CAP];
  DLTensor *tokens, *out;
  int64_t pos = 0;
  (void)self;
  if (want_args(fn, n, 7) || arg_str(args, 1, fn, "name", name) ||
      arg_tensor(args, 2, fn, "tokens", kDLInt, 32, 0, &tokens) || arg_int(args, 4, fn, "pos", &pos) ||
      arg_tensor(args, 6, fn, "out", kDLFloat, 64, 0, &out))
    return -1;
  if (args[0].type_index != kTVMFFIModule)
    return fail("TypeError", "%s: argument 0 (vm) must be the Relax VM module (type index %d given)", fn,
                args[0].type_index);
  if (out->ndim != 1 || out->shape[0] != 2 + STATS_SLOTS)
    return fail("ValueError", "%s: out must have shape (%d,) float64", fn, 2 + STATS_SLOTS);
  get_global_fn get_global = (get_global_fn)ffi_symbol("TVMFFIFunctionGetGlobal");
  call_fn call = (call_fn)ffi_symbol("TVMFFIFunctionCall");
  dec_ref_fn dec_ref = (dec_ref_fn)ffi_symbol("TVMFFIObjectDecRef");
  if (!get_global || !call || !dec_ref)
    return fail("RuntimeError", "%s: the TVM FFI is not in this process; load the library into a "
                "process that runs TVM", fn);
  TVMFFIObjectHandle get_fn = NULL, make_shape = NULL;
  TVMFFIByteArray g1 = {"ffi.ModuleGetFunction", strlen("ffi.ModuleGetFunction")};
  TVMFFIByteArray g2 = {"ffi.Shape", strlen("ffi.Shape")};
  TVMFFIAny f, shape, res;
  memset(&f, 0, sizeof f);
  memset(&shape, 0, sizeof shape);
  memset(&res, 0, sizeof res);
  int rc = -1;
  if (get_global(&g1, &get_fn) != 0 || get_global(&g2, &make_shape) != 0) goto done;
  if (!get_fn || !make_shape) {
    fail("RuntimeError", "%s: ffi.ModuleGetFunction or ffi.Shape is not registered here", fn);
    goto done;
  }
  TVMFFIAny q[3] = {args[0], str_any(name), int_any(1)};
  q[2].type_index = kTVMFFIBool;
  if (call(get_fn, q, 3, &f) != 0) goto done;
  if (f.type_index != kTVMFFIFunction) {
    fail("ValueError", "%s: the module has no function %s", fn, name);
    goto done;
  }
  TVMFFIAny p = int_any(pos);
  if (call(make_shape, &p, 1, &shape) != 0) goto done;
  TVMFFIAny a[4] = {args[2], args[3], shape, args[5]};
  double t0 = now_s();
  if (call(f.v_obj, a, 4, &res) != 0) goto done;
  double seconds = now_s() - t0;
  if (res.type_index != kTVMFFITensor) {
    fail("TypeError", "%s: %s returned type index %d, not a tensor of logits", fn, name, res.type_index);
    goto done;
  }
  int64_t id = last_row_argmax((const DLTensor*)((char*)res.v_obj + sizeof(TVMFFIObject)));
  if (id < 0) {
    fail("ValueError", "%s: %s returned no (rows, vocab) float32 logits", fn, name);
    goto done;
  }
  double* o = (double*)tensor_data(out);
  o[0] = seconds;
  o[1] = (double)id;
  DLTensor view = *out;
  int64_t slots = STATS_SLOTS;
  view.shape = &slots;
  view.strides = NULL;
  view.byte_offset += 2 * sizeof(double);
  TVMFFIAny sv;
  memset(&sv, 0, sizeof sv);
  sv.type_index = kTVMFFIDLTensorPtr;
  sv.v_ptr = &view;
  if (__tvm_ffi_ripple_rt_stats(NULL, &sv, 1, NULL) != 0) goto done;
  rc = 0;
  ret_int(result, 0);
done:
  if (res.type_index >= kTVMFFIStaticObjectBegin) dec_ref(res.v_obj);
  if (shape.type_index >= kTVMFFIStaticObjectBegin) dec_ref(shape.v_obj);
  if (f.type_index >= kTVMFFIStaticObjectBegin) dec_ref(f.v_obj);
  if (get_fn) dec_ref(get_fn);
  if (make_shape) dec_ref(make_shape);
  return rc;
}
