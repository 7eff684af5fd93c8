/* How the library's functions reach TVM, two ways:
 *   - module functions: symbols __tvm_ffi_<name>, the C ABI TVM_FFI_DLL_EXPORT_TYPED_FUNC
 *     emits. `load_module(this .so)["ripple_flash_read_extents"]` finds them with no TVM
 *     symbol resolved at load time (a phone's RPC app does not export its runtime's symbols
 *     to the libraries it dlopens); errors go through the context symbol
 *     __TVMFFIErrorSetRaisedFromCStr, which TVM's loader fills in, as it does for kernels.
 *   - global functions (the reader's ripple.storage.*, ripple.flash.*; the runtime's
 *     ripple.rt.*, which a compiled Relax model calls as packed functions; ripple.native.abi,
 *     ripple.native.globals), registered by a constructor when the TVM FFI symbols can be
 *     found in the process (dlsym; e.g. a server started with --load-library, the RPC
 *     server's worker after load_module, or a native runner that loaded the model library).
 *     ripple.native.globals() says how many were registered; a ripple.flash.read the process
 *     already has is kept.
 * No glibc-only calls: the android build links against bionic's libc/libdl (errno through
 * __errno(), see RIPPLE_BIONIC in ripple_native.h).
 */
#define _GNU_SOURCE
#include <string.h>

#include "ripple_native.h"

#define DECLARE(name)                                                                   \
  EXPORT int __tvm_ffi_##name(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result);
DECLARE(ripple_storage_prepare)
DECLARE(ripple_storage_probe)
DECLARE(ripple_flash_read_extents)
DECLARE(ripple_flash_bind)
DECLARE(ripple_flash_read)
DECLARE(ripple_flash_stats)
DECLARE(ripple_rt_open)
DECLARE(ripple_rt_step)
DECLARE(ripple_rt_whole)
DECLARE(ripple_rt_fetch)
DECLARE(ripple_rt_prefetch)
DECLARE(ripple_rt_stats)
DECLARE(ripple_rt_close)

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
    {"ripple.rt.open", __tvm_ffi_ripple_rt_open},
    {"ripple.rt.whole", __tvm_ffi_ripple_rt_whole},
    {"ripple.rt.fetch", __tvm_ffi_ripple_rt_fetch},
    {"ripple.rt.prefetch", __tvm_ffi_ripple_rt_prefetch},
    {"ripple.rt.stats", __tvm_ffi_ripple_rt_stats},
    {"ripple.rt.close", __tvm_ffi_ripple_rt_close},
    {"ripple.rt.step", __tvm_ffi_ripple_rt_step},
    {"ripple.native.abi", __tvm_ffi_ripple_native_abi},
    {"ripple.native.globals", __tvm_ffi_ripple_native_globals},
};
/* A hook its host already registered (the Python engine's FlashHook) is kept. */
static const char* KEEP_EXISTING = "ripple.flash.read";

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
