/* ripple-run: greedy decoding of an APP folder, with no Python in the process.
 *
 *   APP/ripple-run --prompt-ids 1,2,3 --tokens N --json F [--app DIR] [--threads N]
 *                  [--max-len M] [--dump-logits F] [--stepwise-prompt]
 *
 * The APP folder is what `ripple compile` writes (app.json says what is where):
 *   library          the Relax VM executable: prefill(tokens, kv, pos, params) and
 *                    decode(token, kv, pos, params), each -> logits (1, vocab) float32
 *   runtime_library  the native flash runtime; dlopen'ed RTLD_GLOBAL before the VM is made,
 *                    since its constructor registers the ripple.rt.* globals the VM resolves
 *   runtime_config   passed to ripple.rt.open(path); ripple.rt.stats(out) then gives
 *                    cumulative figures, diffed around each call for per-token numbers;
 *                    ripple.rt.close(), when registered, at the end
 *   params           raw tensors in one file, passed in order as one tuple
 * Prefill runs once over the prompt; its logits give the first id, and each decode call the
 * next (argmax), until N ids or an eos id. Token i+1 comes from decode call i, so
 * token_ms has one entry fewer than ids.
 *
 * Links only the TVM runtime the apache-tvm wheel ships (libtvm_runtime.so, libtvm_ffi.so)
 * and uses only the tvm_ffi headers: the wheel's tvm/runtime headers include files it does
 * not ship.
 *
 * Exit codes: 0 done; 2 bad input (flags, app.json, files), nothing written; 1 an error
 * raised while loading or running the model.
 */
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <sstream>
#include <string>
#include <vector>

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

namespace ffi = tvm::ffi;

namespace {

constexpr int kFormat = 1;        // app.json "format" this runner reads
constexpr int kStats = 24;        // ripple.rt.stats vector length
// ripple.rt.stats slots (cumulative since ripple.rt.open).
enum Stat { kIoWait = 0, kReadS, kBytesRead, kBytesNeeded, kReads, kActive, kCacheHits,
            kFetchCalls, kWholeCalls, kPinned, kBuffers, kODirect, kLayers };
constexpr int kAllocatorPooled = 2;  // the VM's memory allocator kind (as in the notes)

/* Bad input: flags, app.json, the files it names. One line on stderr, exit 2. */
struct BadInput {
  std::string msg;
};

[[noreturn]] void bad(const std::string& msg) { throw BadInput{msg}; }

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

// ------------------------------------------------------------------ command line

struct Options {
  std::vector<int32_t> prompt_ids;
  int64_t tokens = -1;
  std::string json_out;
  std::string app;
  int threads = 0;      // 0: TVM's default
  int64_t max_len = 0;  // 0: prompt + tokens
  std::string dump_logits;
  bool stepwise_prompt = false;  // the prompt one token per call (prefill of 1, then decode)
};

int64_t parse_int(const std::string& flag, const std::string& s, int64_t lo) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0 || v < lo)
    bad(flag + " " + (s.empty() ? "''" : s) + ": not an integer >= " + std::to_string(lo));
  return v;
}

std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || errno != 0 || v < 0 || v > INT32_MAX)
      bad("--prompt-ids " + s + ": '" + item +
          "' is not a token id; give comma-separated ids, e.g. --prompt-ids 1,2,3");
    ids.push_back(static_cast<int32_t>(v));
  }
  if (ids.empty() || (!s.empty() && s.back() == ','))
    bad("--prompt-ids '" + s + "': give comma-separated ids, e.g. --prompt-ids 1,2,3");
  return ids;
}

const char* kUsage =
    "usage: ripple-run --prompt-ids 1,2,3 --tokens N --json F [--app DIR] [--threads N] "
    "[--max-len M] [--dump-logits F] [--stepwise-prompt]";

Options parse_args(int argc, char** argv) {
  Options o;
  bool have_ids = false;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i], value;
    size_t eq = flag.find('=');
    bool inline_value = flag.rfind("--", 0) == 0 && eq != std::string::npos;
    if (inline_value) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
    }
    if (flag == "--stepwise-prompt" && !inline_value) {  // a switch: takes no value
      o.stepwise_prompt = true;
      continue;
    }
    static const char* kFlags[] = {"--prompt-ids", "--tokens", "--json", "--app",
                                   "--threads", "--max-len", "--dump-logits"};
    if (std::find_if(std::begin(kFlags), std::end(kFlags),
                     [&](const char* f) { return flag == f; }) == std::end(kFlags))
      bad("unknown argument '" + flag + "'; " + kUsage);
    if (!inline_value) {
      if (i + 1 >= argc) bad(flag + " needs a value; " + kUsage);
      value = argv[++i];
    }
    if (flag == "--prompt-ids") {
      o.prompt_ids = parse_ids(value);
      have_ids = true;
    } else if (flag == "--tokens") {
      o.tokens = parse_int(flag, value, 1);
    } else if (flag == "--json") {
      o.json_out = value;
    } else if (flag == "--app") {
      o.app = value;
    } else if (flag == "--threads") {
      o.threads = static_cast<int>(parse_int(flag, value, 1));
    } else if (flag == "--max-len") {
      o.max_len = parse_int(flag, value, 1);
    } else {
      o.dump_logits = value;
    }
  }
  if (!have_ids) bad(std::string("--prompt-ids is required; ") + kUsage);
  if (o.tokens < 0) bad(std::string("--tokens is required; ") + kUsage);
  if (o.json_out.empty()) bad(std::string("--json is required; ") + kUsage);
  return o;
}

// ------------------------------------------------------------------ files

std::string dirname_of(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string absolute(const std::string& path) {
  char buf[PATH_MAX];
  if (realpath(path.c_str(), buf) == nullptr) return path;
  return buf;
}

bool is_dir(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string exe_dir() {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) bad("cannot read /proc/self/exe; pass --app DIR");
  buf[n] = '\0';
  return dirname_of(buf);
}

/* A file in the APP folder named by app.json; must exist. */
std::string app_file(const std::string& app, const std::string& name, const std::string& field) {
  if (name.empty() || name.find('/') != std::string::npos)
    bad(app + "/app.json: " + field + " '" + name + "' must be a file name in the APP folder");
  std::string path = app + "/" + name;
  struct stat st;
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    bad(path + ": not found (app.json " + field + "); rebuild the APP with `ripple compile`");
  return path;
}

/* Written to a temporary name beside `path`, then renamed: a reader never sees half a file. */
void write_atomic(const std::string& path, const void* data, size_t size) {
  std::string tmp = path + ".tmp." + std::to_string(getpid());
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw std::runtime_error(tmp + ": " + std::strerror(errno));
  const char* p = static_cast<const char*>(data);
  size_t left = size;
  while (left > 0) {
    ssize_t n = write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::string err = std::strerror(errno);
      close(fd);
      unlink(tmp.c_str());
      throw std::runtime_error(tmp + ": " + err);
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  close(fd);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string err = std::strerror(errno);
    unlink(tmp.c_str());
    throw std::runtime_error(path + ": " + err);
  }
}

/* A line "Key:   123 kB" of /proc/self/status, in bytes. */
int64_t proc_status_bytes(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  size_t klen = std::strlen(key);
  while (std::getline(f, line))
    if (line.compare(0, klen, key) == 0 && line.size() > klen && line[klen] == ':')
      return std::atoll(line.c_str() + klen + 1) * 1024;
  return 0;
}

// ------------------------------------------------------------------ app.json

struct DType {
  const char* name;
  DLDataType dl;
};
const DType kDTypes[] = {
    {"float32", {kDLFloat, 32, 1}}, {"float16", {kDLFloat, 16, 1}},
    {"bfloat16", {kDLBfloat, 16, 1}}, {"uint8", {kDLUInt, 8, 1}},
    {"int8", {kDLInt, 8, 1}},        {"int32", {kDLInt, 32, 1}},
    {"int64", {kDLInt, 64, 1}},
};

DLDataType dtype_of(const std::string& name, const std::string& where) {
  for (const DType& d : kDTypes)
    if (name == d.name) return d.dl;
  bad(where + ": unknown dtype '" + name + "'; this runner reads float32, float16, bfloat16, "
      "uint8, int8, int32, int64");
}

struct TensorEntry {
  std::string name;
  std::vector<int64_t> shape;
  DLDataType dtype;
  int64_t offset = 0, nbytes = 0;
};

struct App {
  std::string dir, json_path;
  std::string library, runtime_library, runtime_config, params_file;
  std::vector<TensorEntry> params;
  std::string prefill = "prefill", decode = "decode";
  std::vector<int64_t> kv_shape;  // -1 where app.json has null (max_len)
  DLDataType kv_dtype;
  std::vector<int64_t> eos;
  int64_t vocab = 0, max_positions = 0;
};

/* Typed access to the parsed JSON, each failure naming the field. */
struct Json {
  std::string where;  // "APP/app.json"

  ffi::json::Object object(const ffi::Any& v, const std::string& field) const {
    if (auto m = v.try_cast<ffi::json::Object>()) return *m;
    bad(where + ": " + field + " must be an object");
  }
  ffi::json::Array array(const ffi::Any& v, const std::string& field) const {
    if (auto a = v.try_cast<ffi::json::Array>()) return *a;
    bad(where + ": " + field + " must be a list");
  }
  ffi::Any get(const ffi::json::Object& o, const std::string& key, const std::string& field) const {
    auto it = o.find(ffi::String(key));
    if (it == o.end()) bad(where + ": missing " + field + "; rebuild the APP with `ripple compile`");
    return (*it).second;
  }
  bool has(const ffi::json::Object& o, const std::string& key) const {
    auto it = o.find(ffi::String(key));
    return it != o.end() && (*it).second != nullptr;
  }
  std::string str(const ffi::Any& v, const std::string& field) const {
    if (auto s = v.try_cast<ffi::String>()) return std::string(*s);
    bad(where + ": " + field + " must be a string");
  }
  int64_t integer(const ffi::Any& v, const std::string& field) const {
    if (v.type_index() == ffi::TypeIndex::kTVMFFIInt) return v.cast<int64_t>();
    bad(where + ": " + field + " must be an integer");
  }
};

App read_app(const std::string& dir) {
  App app;
  app.dir = dir;
  app.json_path = dir + "/app.json";
  std::ifstream f(app.json_path, std::ios::binary);
  if (!f)
    bad(app.json_path + ": not found; pass --app DIR of a folder `ripple compile` wrote "
        "(default: the folder ripple-run is in)");
  std::stringstream text;
  text << f.rdbuf();
  ffi::String err;
  ffi::Any root = ffi::json::Parse(text.str(), &err);
  if (!err.empty()) bad(app.json_path + ": not valid JSON (" + one_line(std::string(err)) + ")");
  Json js{app.json_path};
  ffi::json::Object o = js.object(root, "the top level");

  int64_t format = js.integer(js.get(o, "format", "format"), "format");
  if (format != kFormat)
    bad(app.json_path + ": format " + std::to_string(format) + ", this runner reads format " +
        std::to_string(kFormat) + "; rebuild the APP and the runner from the same ripple");

  app.library = app_file(dir, js.str(js.get(o, "library", "library"), "library"), "library");
  if (js.has(o, "runtime_library"))
    app.runtime_library = app_file(
        dir, js.str(js.get(o, "runtime_library", ""), "runtime_library"), "runtime_library");
  if (js.has(o, "runtime_config"))
    app.runtime_config = absolute(app_file(
        dir, js.str(js.get(o, "runtime_config", ""), "runtime_config"), "runtime_config"));

  ffi::json::Object params = js.object(js.get(o, "params", "params"), "params");
  app.params_file = app_file(dir, js.str(js.get(params, "file", "params.file"), "params.file"),
                             "params.file");
  ffi::json::Array tensors = js.array(js.get(params, "tensors", "params.tensors"), "params.tensors");
  for (size_t i = 0; i < tensors.size(); ++i) {
    std::string at = "params.tensors[" + std::to_string(i) + "]";
    ffi::json::Object t = js.object(tensors[i], at);
    TensorEntry e;
    e.name = js.str(js.get(t, "name", at + ".name"), at + ".name");
    at = "params tensor '" + e.name + "'";
    e.dtype = dtype_of(js.str(js.get(t, "dtype", at + " dtype"), at + " dtype"),
                       app.json_path + ": " + at);
    int64_t count = 1;
    for (const ffi::Any& d : js.array(js.get(t, "shape", at + " shape"), at + " shape")) {
      int64_t n = js.integer(d, at + " shape");
      if (n < 0) bad(app.json_path + ": " + at + " has a negative dimension");
      e.shape.push_back(n);
      count *= n;
    }
    e.offset = js.integer(js.get(t, "offset", at + " offset"), at + " offset");
    e.nbytes = js.integer(js.get(t, "nbytes", at + " nbytes"), at + " nbytes");
    int64_t want = count * e.dtype.bits / 8;
    if (e.offset < 0 || e.nbytes != want)
      bad(app.json_path + ": " + at + " has nbytes " + std::to_string(e.nbytes) + " at offset " +
          std::to_string(e.offset) + ", its shape and dtype make " + std::to_string(want) +
          "; rebuild the APP with `ripple compile`");
    app.params.push_back(e);
  }

  ffi::json::Object fns = js.object(js.get(o, "functions", "functions"), "functions");
  for (auto [key, name] : {std::pair{"prefill", &app.prefill}, std::pair{"decode", &app.decode}}) {
    ffi::Any v = js.get(fns, key, std::string("functions.") + key);
    if (auto fo = v.try_cast<ffi::json::Object>(); fo && js.has(*fo, "name"))
      *name = js.str(js.get(*fo, "name", ""), std::string("functions.") + key + ".name");
  }

  ffi::json::Object kv = js.object(js.get(o, "kv", "kv"), "kv");
  for (const ffi::Any& d : js.array(js.get(kv, "shape", "kv.shape"), "kv.shape"))
    app.kv_shape.push_back(d == nullptr ? -1 : js.integer(d, "kv.shape"));
  if (std::count(app.kv_shape.begin(), app.kv_shape.end(), -1) != 1)
    bad(app.json_path + ": kv.shape needs exactly one null (the max_len axis)");
  app.kv_dtype = dtype_of(js.str(js.get(kv, "dtype", "kv.dtype"), "kv.dtype"),
                          app.json_path + ": kv.dtype");

  for (const ffi::Any& id : js.array(js.get(o, "eos_token_ids", "eos_token_ids"), "eos_token_ids"))
    app.eos.push_back(js.integer(id, "eos_token_ids"));
  app.vocab = js.integer(js.get(o, "vocab", "vocab"), "vocab");
  app.max_positions = js.integer(js.get(o, "max_positions", "max_positions"), "max_positions");
  if (app.vocab <= 0) bad(app.json_path + ": vocab must be positive");
  return app;
}

// ------------------------------------------------------------------ tensors

/* 64-byte aligned host memory, zeroed (the caller's kv starts at zero). */
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t size = std::max<size_t>(ffi::GetDataSize(*t), 1);
    void* p = nullptr;
    if (posix_memalign(&p, 64, (size + 63) / 64 * 64) != 0) throw std::bad_alloc();
    std::memset(p, 0, size);
    t->data = p;
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

ffi::Tensor empty(const std::vector<int64_t>& shape, DLDataType dtype) {
  return ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                  dtype, DLDevice{kDLCPU, 0});
}

/* Each tensor read from params.bin into its own aligned buffer. */
ffi::Array<ffi::Tensor> load_params(const App& app, int64_t* total) {
  int fd = open(app.params_file.c_str(), O_RDONLY);
  if (fd < 0) bad(app.params_file + ": " + std::strerror(errno));
  struct stat st;
  fstat(fd, &st);
  ffi::Array<ffi::Tensor> out;
  *total = 0;
  for (const TensorEntry& e : app.params) {
    if (e.offset + e.nbytes > st.st_size) {
      close(fd);
      bad(app.params_file + ": " + std::to_string(st.st_size) + " bytes, but tensor '" + e.name +
          "' ends at " + std::to_string(e.offset + e.nbytes) +
          " (app.json); the file is truncated: rebuild the APP with `ripple compile`");
    }
    ffi::Tensor t = empty(e.shape, e.dtype);
    char* dst = static_cast<char*>(t.data_ptr());
    for (int64_t done = 0; done < e.nbytes;) {
      ssize_t n = pread(fd, dst + done, e.nbytes - done, e.offset + done);
      if (n <= 0) {
        std::string err = n < 0 ? std::strerror(errno) : "unexpected end of file";
        close(fd);
        bad(app.params_file + ": reading tensor '" + e.name + "': " + err);
      }
      done += n;
    }
    *total += e.nbytes;
    out.push_back(t);
  }
  close(fd);
  return out;
}

// ------------------------------------------------------------------ the run

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/* ripple.rt.stats, when the APP has a runtime; zeros otherwise. */
struct Stats {
  std::optional<ffi::Function> fn;
  ffi::Tensor out;
  std::vector<double> read() {
    std::vector<double> v(kStats, 0.0);
    if (fn) {
      (*fn)(out);
      std::memcpy(v.data(), out.data_ptr(), sizeof(double) * kStats);
    }
    return v;
  }
};

struct Step {
  std::vector<double> before, after;
  double d(int i) const { return after[i] - before[i]; }
};

int32_t argmax(const ffi::Tensor& tensor, int64_t vocab, std::vector<float>* dump) {
  const DLTensor* logits = tensor.GetDLTensorPtr();
  if (logits->dtype.code != kDLFloat || logits->dtype.bits != 32 || logits->ndim != 2 ||
      logits->shape[1] != vocab || logits->device.device_type != kDLCPU)
    throw std::runtime_error("the model returned logits that are not (1, " +
                             std::to_string(vocab) + ") float32 on the CPU");
  const float* p = reinterpret_cast<const float*>(static_cast<const char*>(logits->data) +
                                                  logits->byte_offset) +
                   (logits->shape[0] - 1) * vocab;
  if (dump) dump->insert(dump->end(), p, p + vocab);
  return static_cast<int32_t>(std::max_element(p, p + vocab) - p);
}

std::string num(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  if (v == std::floor(v) && std::fabs(v) < 9.0e15)
    std::snprintf(buf, sizeof buf, "%.0f", v);
  else
    std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

template <typename T>
std::string list(const std::vector<T>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + num(static_cast<double>(v[i]));
  return s + "]";
}

std::string json_str(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

int run(const Options& opt) {
  // The thread pool reads TVM_NUM_THREADS when it starts, at the first parallel kernel.
  if (opt.threads > 0) setenv("TVM_NUM_THREADS", std::to_string(opt.threads).c_str(), 1);
  std::string dir = opt.app.empty() ? exe_dir() : opt.app;
  if (!is_dir(dir)) bad("--app " + dir + ": not a folder; pass the APP folder `ripple compile` wrote");
  dir = absolute(dir);
  std::string json_dir = dirname_of(opt.json_out);
  if (!is_dir(json_dir)) bad("--json " + opt.json_out + ": folder " + json_dir + " does not exist");
  if (!opt.dump_logits.empty() && !is_dir(dirname_of(opt.dump_logits)))
    bad("--dump-logits " + opt.dump_logits + ": folder " + dirname_of(opt.dump_logits) +
        " does not exist");

  App app = read_app(dir);
  const int64_t n_prompt = static_cast<int64_t>(opt.prompt_ids.size());
  for (int32_t id : opt.prompt_ids)
    if (id >= app.vocab)
      bad("--prompt-ids: id " + std::to_string(id) + " is outside the vocabulary (" +
          std::to_string(app.vocab) + " ids)");
  const int64_t need = n_prompt + opt.tokens;
  const int64_t max_len = opt.max_len > 0 ? opt.max_len : need;
  if (max_len < need)
    bad("--max-len " + std::to_string(max_len) + " is below prompt + tokens = " +
        std::to_string(need) + "; raise it or drop it");
  if (app.max_positions > 0 && max_len > app.max_positions)
    bad("prompt + tokens (or --max-len) = " + std::to_string(max_len) + " exceeds the model's " +
        std::to_string(app.max_positions) + " positions; ask for fewer --tokens");

  int64_t params_bytes = 0;
  ffi::Array<ffi::Tensor> params = load_params(app, &params_bytes);
  std::vector<int64_t> kv_shape = app.kv_shape;
  std::replace(kv_shape.begin(), kv_shape.end(), int64_t{-1}, max_len);
  ffi::Tensor kv = empty(kv_shape, app.kv_dtype);
  const int64_t kv_bytes = static_cast<int64_t>(ffi::GetDataSize(*kv.GetDLTensorPtr()));

  // Its constructor registers the ripple.rt.* globals, which the VM looks up when it starts.
  if (!app.runtime_library.empty() &&
      dlopen(app.runtime_library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr)
    bad(app.runtime_library + ": cannot load (" + one_line(dlerror()) +
        "); rebuild the APP for this machine");

  // Opened before the VM exists: a missing ripple.rt.* is the APP's fault (exit 2), not the
  // VM's "cannot find function" at initialization.
  Stats stats;
  if (!app.runtime_config.empty()) {
    auto open_fn = ffi::Function::GetGlobal("ripple.rt.open");
    stats.fn = ffi::Function::GetGlobal("ripple.rt.stats");
    if (!open_fn || !stats.fn)
      bad("app.json has a runtime_config but no ripple.rt.open/ripple.rt.stats is registered" +
          std::string(app.runtime_library.empty() ? " (no runtime_library in app.json)"
                                                  : " by " + app.runtime_library) +
          "; rebuild the APP with its runtime library");
    stats.out = empty({kStats}, DLDataType{kDLFloat, 64, 1});
    (*open_fn)(ffi::String(app.runtime_config));
  }
  ffi::Module lib = ffi::Module::LoadFromFile(absolute(app.library));
  auto load_exec = lib->GetFunction("vm_load_executable");
  if (!load_exec)
    bad(app.library + ": not a Relax VM executable (no vm_load_executable); rebuild the APP");
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  vm->GetFunction("vm_initialization")
      .value()(static_cast<int>(kDLCPU), 0, kAllocatorPooled, static_cast<int>(kDLCPU), 0,
               kAllocatorPooled);
  ffi::Function fn[2];
  const std::string* names[2] = {&app.prefill, &app.decode};
  for (int i = 0; i < 2; ++i) {
    auto f = vm->GetFunction(*names[i]);
    if (!f) bad(app.library + ": has no function '" + *names[i] + "' (app.json functions)");
    fn[i] = *f;
  }
  const ffi::Function& prefill = fn[0];
  const ffi::Function& decode = fn[1];

  int threads = opt.threads;
  if (auto nt = ffi::Function::GetGlobal("runtime.NumThreads")) threads = (*nt)().cast<int>();

  std::vector<float> dump;
  std::vector<float>* dump_p = opt.dump_logits.empty() ? nullptr : &dump;
  std::vector<int32_t> ids;

  // Prefill: all prompt ids at positions 0..n-1; its logits give the first id. With
  // --stepwise-prompt, the first id alone, then one decode call per prompt id: a prompt step
  // of a sparse layer reads the union of its tokens' predicted sets, a token alone its own.
  const int64_t n_first = opt.stepwise_prompt ? 1 : n_prompt;
  ffi::Tensor tokens = empty({n_first}, DLDataType{kDLInt, 32, 1});
  std::memcpy(tokens.data_ptr(), opt.prompt_ids.data(), sizeof(int32_t) * n_first);
  Step pre{stats.read(), {}};
  double t0 = now_s();
  ffi::Tensor logits = prefill(tokens, kv, ffi::Shape({0}), params).cast<ffi::Tensor>();
  for (int64_t i = n_first; i < n_prompt; ++i) {
    ffi::Tensor one = empty({1}, DLDataType{kDLInt, 32, 1});
    static_cast<int32_t*>(one.data_ptr())[0] = opt.prompt_ids[i];
    logits = decode(one, kv, ffi::Shape({i}), params).cast<ffi::Tensor>();
  }
  double prefill_s = now_s() - t0;
  pre.after = stats.read();
  ids.push_back(argmax(logits, app.vocab, dump_p));

  auto is_eos = [&](int32_t id) {
    return std::find(app.eos.begin(), app.eos.end(), id) != app.eos.end();
  };
  std::vector<double> token_ms, io_ms, bytes, reads, active;
  ffi::Tensor token = empty({1}, DLDataType{kDLInt, 32, 1});
  while (static_cast<int64_t>(ids.size()) < opt.tokens && !is_eos(ids.back())) {
    static_cast<int32_t*>(token.data_ptr())[0] = ids.back();
    int64_t pos = n_prompt + static_cast<int64_t>(ids.size()) - 1;
    Step s{stats.read(), {}};
    double t = now_s();
    logits = decode(token, kv, ffi::Shape({pos}), params).cast<ffi::Tensor>();
    token_ms.push_back((now_s() - t) * 1e3);
    s.after = stats.read();
    ids.push_back(argmax(logits, app.vocab, dump_p));
    io_ms.push_back(s.d(kIoWait) * 1e3);
    bytes.push_back(s.d(kBytesRead));
    reads.push_back(s.d(kReads));
    active.push_back(s.d(kActive));
  }
  std::vector<double> end = stats.read();
  // Its reader threads stop before the process tears down; the counters outlive close.
  if (stats.fn)
    if (auto close_fn = ffi::Function::GetGlobal("ripple.rt.close")) (*close_fn)();

  std::string j = "{\n";
  auto field = [&](const std::string& k, const std::string& v, bool last = false) {
    j += "  " + json_str(k) + ": " + v + (last ? "\n" : ",\n");
  };
  field("prompt_ids", list(opt.prompt_ids));
  field("ids", list(ids));
  field("token_ms", list(token_ms));
  field("prefill_ms", num(prefill_s * 1e3));
  field("prefill_tokens_per_s", num(prefill_s > 0 ? n_prompt / prefill_s : 0.0));
  field("io_wait_ms", list(io_ms));
  field("bytes_read", list(bytes));
  field("reads", list(reads));
  field("active_neurons", list(active));
  field("prefill_io", "{\"io_wait_ms\": " + num(pre.d(kIoWait) * 1e3) + ", \"read_s\": " +
                          num(pre.d(kReadS)) + ", \"bytes_read\": " + num(pre.d(kBytesRead)) +
                          ", \"bytes_needed\": " + num(pre.d(kBytesNeeded)) + ", \"reads\": " +
                          num(pre.d(kReads)) + ", \"active_neurons\": " + num(pre.d(kActive)) +
                          "}");
  field("peak_rss_bytes", num(static_cast<double>(proc_status_bytes("VmHWM"))));
  field("rss_bytes", num(static_cast<double>(proc_status_bytes("VmRSS"))));
  field("dram_bytes", "{\"params\": " + num(static_cast<double>(params_bytes)) + ", \"kv\": " +
                          num(static_cast<double>(kv_bytes)) + ", \"runtime_pinned\": " +
                          num(end[kPinned]) + ", \"runtime_buffers\": " + num(end[kBuffers]) +
                          "}");
  field("o_direct", end[kODirect] != 0 ? "true" : "false");
  field("runtime_stats", stats.fn ? "true" : "false");
  field("threads", num(threads));
  field("max_len", num(static_cast<double>(max_len)));
  field("app", json_str(dir));
  field("runner", json_str("ripple-run"), true);
  j += "}\n";

  if (dump_p) write_atomic(opt.dump_logits, dump.data(), dump.size() * sizeof(float));
  write_atomic(opt.json_out, j.data(), j.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const BadInput& e) {
    std::fprintf(stderr, "ripple-run: error: %s\n", one_line(e.msg).c_str());
    return 2;
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "ripple-run: error: %s: %s\n", e.kind().c_str(),
                 one_line(e.message()).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ripple-run: error: %s\n", one_line(e.what()).c_str());
    return 1;
  }
}
