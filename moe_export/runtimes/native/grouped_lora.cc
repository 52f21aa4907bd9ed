// Native ONNX Runtime CPU kernels for the moe_export custom ops (docs/op-contract.md):
//
//   GroupedLoRA(x [T,D_in], expert_ids [T,K] int64, gates [T,K], A [E_A,R,D_in], B [E,D_out,R]) -> y [T,D_out]
//       y[t] = sum_j gates[t,j] * B[e] (A[e or 0] x[t]),  e = expert_ids[t,j]
//   GroupedLoRASlots(x, expert_ids, A, B) -> y [T,K,D_out],  y[t,j] = B[e] (A[e or 0] x[t])
//   GroupedLoRAAdd(x, expert_ids, gates, A, B, base) -> base + GroupedLoRA(...) viewed as base's shape
//   RoutedGroupedLoRA(x, router_weight [D_in,E], A, B; k, normalize) -> (y, expert_ids [T,k], gates [T,k]):
//       the router inside the op: softmax(x W) in fp32, top-k (ties: lower expert id first, as ONNX TopK),
//       gates divided by their sum when normalize, then GroupedLoRA on that routing
//   RoutedGroupedLoRAAdd(x, router_weight, A, B, base; k, normalize) -> (base + ..., expert_ids, gates)
//
// The model file carries a standard-op function body for each op; when this library is registered
// (SessionOptions.register_custom_ops_library) ONNX Runtime runs these kernels instead, which do only
// the K selected experts' work per token rather than every expert's. fp32 is the fast path; fp16
// inputs are converted to fp32, computed, and converted back (a correctness path). The inner loops are
// compiled once per instruction set (AVX-512, AVX2+FMA, portable) and chosen at run time, so one
// build runs on any x86-64 CPU and the file builds on arm64 (portable loops only).
// Legend: T tokens, K slots per token, E experts, E_A experts owning an A (E or 1), R rank.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#define MOE_EXPORT_API extern "C" __attribute__((visibility("default")))

// MOE_VW floats per vector; MOE_NT tokens x MOE_NR rows per shrink tile, MOE_NT rows x MOE_NC vectors per
// expand tile (sized to the register file: 16 vector registers below AVX-512, 32 with it). The .inc
// undefines all four at its end, so each ISA block below states only its own values.
namespace moe_portable {
#define MOE_VW 4
#define MOE_NT 4
#define MOE_NR 2
#define MOE_NC 2
#include "grouped_lora_kernels.inc"
}  // namespace moe_portable

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOE_HAVE_X86_VARIANTS 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace moe_avx2 {
#define MOE_VW 8
#define MOE_NT 4
#define MOE_NR 2
#define MOE_NC 2
#include "grouped_lora_kernels.inc"
}  // namespace moe_avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma,prefer-vector-width=512")
#endif
namespace moe_avx512 {
#define MOE_VW 16
#define MOE_NT 4
#define MOE_NR 4
#define MOE_NC 4
#include "grouped_lora_kernels.inc"
}  // namespace moe_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace {

// Kernel calls since the library was loaded (all sessions of the process): lets a test see that a client
// which registers the library by itself (onnxruntime-genai, from genai_config.json) really runs the kernels.
std::atomic<unsigned long long> g_compute_calls{0};
// Calls of an *Add op that ONNX Runtime ran in place (output 0 in base's buffer): lets a test see may_inplace work.
std::atomic<unsigned long long> g_in_place_calls{0};

using ShrinkFn = void (*)(const float*, const float*, int64_t, int64_t, float*);
using ExpandFn = void (*)(const float* const*, const float* const*, int64_t, int64_t, int64_t, const float*, float*);

using ShrinkTokensFn = void (*)(const float*, int64_t, int64_t, const float* const*, float* const*, int64_t);
using ExpandRowsFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, const float* const*, float* const*,
                              int64_t);

struct Isa {
  const char* name;
  ShrinkFn shrink;  // per-token path
  ExpandFn expand;
  ShrinkTokensFn shrink_tokens;  // expert-grouped path
  ExpandRowsFn expand_rows;
};

#define MOE_ISA(label, ns) \
  Isa { label, ns::shrink, ns::expand, ns::shrink_tokens, ns::expand_rows }
const Isa kPortable = MOE_ISA("portable", moe_portable);
#ifdef MOE_HAVE_X86_VARIANTS
const Isa kAvx2 = MOE_ISA("avx2", moe_avx2);
const Isa kAvx512 = MOE_ISA("avx512", moe_avx512);
#endif

// The best ISA this CPU runs; MOE_EXPORT_KERNEL_ISA=portable|avx2|avx512 caps it (tests run every path).
const Isa& select_isa() {
  const char* cap = std::getenv("MOE_EXPORT_KERNEL_ISA");
  const std::string want = cap ? cap : "";
#ifdef MOE_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  if (want == "portable") return kPortable;
  if (want == "avx2") return avx2 ? kAvx2 : kPortable;
  if (avx512) return kAvx512;
  if (avx2) return kAvx2;
#endif
  return kPortable;
}

enum class Mode { kSum, kSlots, kAdd, kRouted, kRoutedAdd };

bool routed(Mode m) { return m == Mode::kRouted || m == Mode::kRoutedAdd; }
bool adds(Mode m) { return m == Mode::kAdd || m == Mode::kRoutedAdd; }

// Input positions per op (see the header comment). Routed ops take router_weight where the others take
// expert_ids and give expert_ids and gates back as outputs 1 and 2.
constexpr size_t kX = 0, kIds = 1, kRouterWeight = 1;
size_t gates_index(Mode) { return 2; }
size_t a_index(Mode m) { return m == Mode::kSum || m == Mode::kAdd ? 3 : 2; }
size_t b_index(Mode m) { return a_index(m) + 1; }
size_t base_index(Mode m) { return m == Mode::kAdd ? 5 : 4; }
const char* op_name(Mode m) {
  switch (m) {
    case Mode::kSlots: return "GroupedLoRASlots";
    case Mode::kAdd: return "GroupedLoRAAdd";
    case Mode::kRouted: return "RoutedGroupedLoRA";
    case Mode::kRoutedAdd: return "RoutedGroupedLoRAAdd";
    default: return "GroupedLoRA";
  }
}

void to_float(const void* src, ONNXTensorElementDataType type, size_t n, float* dst) {
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    const auto* h = static_cast<const Ort::Float16_t*>(src);
    for (size_t i = 0; i < n; ++i) dst[i] = h[i].ToFloat();
  }
}

// B [E, D_out, R] (any supported type) -> Bt [E, R, D_out] fp32: the expand loop streams rows of Bt.
void transpose_b(const void* b, ONNXTensorElementDataType type, int64_t E, int64_t d_out, int64_t R, float* bt) {
  std::vector<float> row(static_cast<size_t>(R));
  const size_t esize = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : 2;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t o = 0; o < d_out; ++o) {
      to_float(static_cast<const char*>(b) + ((e * d_out + o) * R) * esize, type, R, row.data());
      for (int64_t r = 0; r < R; ++r) bt[(e * R + r) * d_out + o] = row[r];
    }
}

struct Dims {
  int64_t T, K, E, EA, R, d_in, d_out;
};

// Everything one call needs, as fp32 views; shared read-only by the worker threads.
struct Job {
  Dims d;
  Mode mode;
  const Isa* isa;
  const float* x;        // [T, D_in]
  const int64_t* ids;    // [T, K]
  const float* gates;    // [T, K] (null for slots)
  const float* A;        // [E_A, R, D_in]
  const float* bt;       // [E, R, D_out]
  const float* base;     // [T, D_out] (kAdd only)
  float* y;              // [T, D_out] or [T, K, D_out]
  int64_t block;         // tokens per parallel task
};

void run_tokens(const Job& job, int64_t t0, int64_t t1) {
  const Dims& d = job.d;
  const int64_t R = d.R, K = d.K;
  thread_local std::vector<float> h;  // per-thread scratch: a decode step calls this once per routed linear
  thread_local std::vector<const float*> bts, hgs;
  h.resize(static_cast<size_t>((K + 1) * R));
  bts.resize(static_cast<size_t>(K));
  hgs.resize(static_cast<size_t>(K));
  float* shared = h.data() + K * R;  // A x for a shared A (HydraLoRA), computed once per token
  for (int64_t t = t0; t < t1; ++t) {
    const float* xt = job.x + t * d.d_in;
    const int64_t* ids = job.ids + t * K;
    if (d.EA == 1) job.isa->shrink(job.A, xt, R, d.d_in, shared);
    if (job.mode == Mode::kSlots) {
      for (int64_t j = 0; j < K; ++j) {
        const float* hj = shared;
        if (d.EA != 1) {
          job.isa->shrink(job.A + ids[j] * R * d.d_in, xt, R, d.d_in, h.data() + j * R);
          hj = h.data() + j * R;
        }
        const float* bt = job.bt + ids[j] * R * d.d_out;
        job.isa->expand(&bt, &hj, 1, R, d.d_out, nullptr, job.y + (t * K + j) * d.d_out);
      }
      continue;
    }
    int64_t n = 0;
    for (int64_t j = 0; j < K; ++j) {
      const float g = job.gates[t * K + j];
      if (g == 0.f) continue;  // an unselected slot (top-p padding): no work, same sum
      float* hj = h.data() + n * R;
      if (d.EA == 1) {
        for (int64_t r = 0; r < R; ++r) hj[r] = g * shared[r];
      } else {
        job.isa->shrink(job.A + ids[j] * R * d.d_in, xt, R, d.d_in, hj);
        for (int64_t r = 0; r < R; ++r) hj[r] *= g;
      }
      bts[n] = job.bt + ids[j] * R * d.d_out;
      hgs[n] = hj;
      ++n;
    }
    const float* base = job.base ? job.base + t * d.d_out : nullptr;
    job.isa->expand(bts.data(), hgs.data(), n, R, d.d_out, base, job.y + t * d.d_out);
  }
}

void run_block(void* data, size_t i) {
  const Job& job = *static_cast<const Job*>(data);
  const int64_t t0 = static_cast<int64_t>(i) * job.block;
  run_tokens(job, t0, std::min(job.d.T, t0 + job.block));
}

// The expert-grouped path for many tokens. Entries are (token, slot) pairs bucketed by expert:
// phase 1 computes every entry's gated rank-R vector hg with the expert's A reused across token tiles,
// phase 2 splits D_out into column chunks (one per task, so no two threads write the same y element)
// and adds each expert's B^T hg for all its entries while that expert's B columns sit in L1.
struct Grouped {
  const Job* job;
  std::vector<int64_t> order, offsets;  // entry ids bucketed by expert
  std::vector<float> geff, H, Hs;       // merged gates; hg per entry [T*K, R]; shared-A products [T, R]
  std::vector<const float*> xs, hg;     // per bucketed entry: its token's x, its hg
  std::vector<float*> ys, hs;           // per bucketed entry: its output row, where its A x goes
  std::vector<int64_t> tasks;           // phase 1: (first, last) positions in `order`
  int64_t rows = 0, chunk = 0;
};

constexpr int64_t kGroupedMinTokens = 4;
constexpr int64_t kTokenBlock = 256;
constexpr int64_t kShrinkTask = 32;   // entries per phase-1 task
constexpr int64_t kColumnChunk = 128;  // y columns per phase-2 task (a multiple of every 2 x vector width)

void shrink_task(void* data, size_t i) {
  Grouped& g = *static_cast<Grouped*>(data);
  const Job& job = *g.job;
  const int64_t first = g.tasks[2 * i], last = g.tasks[2 * i + 1];
  const int64_t e = job.d.EA == 1 ? 0 : job.ids[g.order[first]];
  job.isa->shrink_tokens(job.A + e * job.d.R * job.d.d_in, job.d.R, job.d.d_in, g.xs.data() + first,
                         g.hs.data() + first, last - first);
}

void expand_task(void* data, size_t i) {
  Grouped& g = *static_cast<Grouped*>(data);
  const Job& job = *g.job;
  const Dims& d = job.d;
  const int64_t o0 = static_cast<int64_t>(i) * g.chunk, o1 = std::min(d.d_out, o0 + g.chunk);
  if (job.base != job.y)  // in place (see may_inplace), y already holds base
    for (int64_t row = 0; row < g.rows; ++row) {
      float* y = job.y + row * d.d_out;
      if (job.base)
        std::memcpy(y + o0, job.base + row * d.d_out + o0, (o1 - o0) * sizeof(float));
      else
        std::memset(y + o0, 0, (o1 - o0) * sizeof(float));
    }
  for (int64_t e = 0; e < d.E; ++e) {
    const int64_t first = g.offsets[e], n = g.offsets[e + 1] - first;
    if (n > 0)
      job.isa->expand_rows(job.bt + e * d.R * d.d_out, d.R, d.d_out, o0, o1, g.hg.data() + first,
                           g.ys.data() + first, n);
  }
}

void run_grouped(Ort::KernelContext& ctx, const Job& job) {
  const Dims& d = job.d;
  const int64_t n = d.T * d.K, R = d.R;
  const bool slots = job.mode == Mode::kSlots;
  Grouped g;
  g.job = &job;
  g.rows = slots ? n : d.T;
  g.geff.assign(static_cast<size_t>(n), 1.f);
  if (!slots) {
    // One expert twice in a token: merge the gates (B A x is linear in them) so no output row
    // appears twice in one expert's bucket, where two tiles would race on it.
    std::copy(job.gates, job.gates + n, g.geff.begin());
    for (int64_t t = 0; t < d.T; ++t)
      for (int64_t j = 1; j < d.K; ++j)
        for (int64_t i = 0; i < j; ++i)
          if (job.ids[t * d.K + i] == job.ids[t * d.K + j] && g.geff[t * d.K + i] != 0.f) {
            g.geff[t * d.K + i] += g.geff[t * d.K + j];
            g.geff[t * d.K + j] = 0.f;
            break;
          }
  }
  g.offsets.assign(static_cast<size_t>(d.E + 1), 0);
  for (int64_t i = 0; i < n; ++i)
    if (slots || g.geff[i] != 0.f) ++g.offsets[job.ids[i] + 1];
  for (int64_t e = 0; e < d.E; ++e) g.offsets[e + 1] += g.offsets[e];
  const int64_t m = g.offsets[d.E];
  g.order.resize(static_cast<size_t>(m));
  {
    std::vector<int64_t> fill(g.offsets.begin(), g.offsets.end() - 1);
    for (int64_t i = 0; i < n; ++i)
      if (slots || g.geff[i] != 0.f) g.order[fill[job.ids[i]]++] = i;
  }
  g.H.resize(static_cast<size_t>(n * R));
  g.xs.resize(static_cast<size_t>(m));
  g.hg.resize(static_cast<size_t>(m));
  g.ys.resize(static_cast<size_t>(m));
  for (int64_t p = 0; p < m; ++p) {
    const int64_t i = g.order[p];
    g.xs[p] = job.x + (i / d.K) * d.d_in;
    g.hg[p] = g.H.data() + i * R;
    g.ys[p] = job.y + (slots ? i : i / d.K) * d.d_out;
  }
  // Phase 1: A x per entry (per token when A is shared), in tasks of up to kShrinkTask entries.
  if (d.EA == 1) {
    g.Hs.resize(static_cast<size_t>(d.T * R));
    g.xs.resize(static_cast<size_t>(m + d.T));
    g.hs.resize(static_cast<size_t>(m + d.T));
    for (int64_t t = 0; t < d.T; ++t) {
      g.xs[m + t] = job.x + t * d.d_in;
      g.hs[m + t] = g.Hs.data() + t * R;
    }
    for (int64_t t = 0; t < d.T; t += kShrinkTask) g.tasks.insert(g.tasks.end(), {m + t, std::min(m + d.T, m + t + kShrinkTask)});
  } else {
    g.hs.resize(static_cast<size_t>(m));
    for (int64_t p = 0; p < m; ++p) g.hs[p] = g.H.data() + g.order[p] * R;
    for (int64_t e = 0; e < d.E; ++e)
      for (int64_t p = g.offsets[e]; p < g.offsets[e + 1]; p += kShrinkTask)
        g.tasks.insert(g.tasks.end(), {p, std::min(g.offsets[e + 1], p + kShrinkTask)});
  }
  ctx.ParallelFor(shrink_task, g.tasks.size() / 2, 0, &g);
  for (int64_t p = 0; p < m; ++p) {  // gate (and, for a shared A, copy) each entry's vector
    const int64_t i = g.order[p];
    float* h = g.H.data() + i * R;
    if (d.EA == 1) std::memcpy(h, g.Hs.data() + (i / d.K) * R, R * sizeof(float));
    if (!slots)
      for (int64_t r = 0; r < R; ++r) h[r] *= g.geff[i];
  }
  // Phase 2: column chunks.
  g.chunk = kColumnChunk;
  ctx.ParallelFor(expand_task, static_cast<size_t>((d.d_out + g.chunk - 1) / g.chunk), 0, &g);
}

// A routed op's router over one call's tokens: what the function body's MatMul -> Cast -> Softmax -> TopK ->
// ReduceSum/Div computes, token by token.
struct RouteJob {
  const Isa* isa;
  const float* wt;   // router weight transposed [E, D_in], fp32
  bool half_logits;  // the router runs in fp16 (the model's dtype): its logits are fp16 values
  bool normalize;
  int64_t E, d_in, K;
  const float* x;  // [T, D_in]
  int64_t* ids;    // [T, K] out
  float* gates;    // [T, K] out, fp32
  int64_t T, block;
};

void route_tokens(const RouteJob& r, int64_t t0, int64_t t1) {
  // The logits of the whole range first: tiles of tokens share each load of the router weight. Every path of
  // shrink_tokens sums a dot product in the same order, so a token's routing does not depend on how many tokens
  // came with it.
  thread_local std::vector<float> logits;
  thread_local std::vector<const float*> xs;
  thread_local std::vector<float*> hs;
  thread_local std::vector<char> taken;
  const int64_t n = t1 - t0;
  logits.resize(static_cast<size_t>(n * r.E));
  xs.resize(static_cast<size_t>(n));
  hs.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    xs[i] = r.x + (t0 + i) * r.d_in;
    hs[i] = logits.data() + i * r.E;
  }
  r.isa->shrink_tokens(r.wt, r.E, r.d_in, xs.data(), hs.data(), n);
  taken.resize(static_cast<size_t>(r.E));
  for (int64_t t = t0; t < t1; ++t) {
    float* probs = hs[t - t0];
    if (r.half_logits)
      for (int64_t e = 0; e < r.E; ++e) probs[e] = Ort::Float16_t(probs[e]).ToFloat();
    const float top = *std::max_element(probs, probs + r.E);
    float sum = 0.f;
    for (int64_t e = 0; e < r.E; ++e) sum += (probs[e] = std::exp(probs[e] - top));
    const float scale = 1.f / sum;  // softmax as ONNX Runtime's: exp(l - max) times the reciprocal of the sum
    for (int64_t e = 0; e < r.E; ++e) probs[e] *= scale;
    std::fill(taken.begin(), taken.end(), 0);
    int64_t* ids = r.ids + t * r.K;
    float* gates = r.gates + t * r.K;
    float picked = 0.f;
    for (int64_t j = 0; j < r.K; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < r.E; ++e)  // strictly greater: of equal probabilities the lower id wins, as TopK
        if (!taken[e] && (best < 0 || probs[e] > probs[best])) best = e;
      taken[best] = 1;
      ids[j] = best;
      gates[j] = probs[best];
      picked += probs[best];
    }
    if (r.normalize)
      for (int64_t j = 0; j < r.K; ++j) gates[j] /= picked;
  }
}

void route_block(void* data, size_t i) {
  const RouteJob& r = *static_cast<const RouteJob*>(data);
  const int64_t t0 = static_cast<int64_t>(i) * r.block;
  route_tokens(r, t0, std::min(r.T, t0 + r.block));
}

constexpr int64_t kRouteParallelTokens = 64;  // fewer tokens route inline: a hand-off costs more than E dots

// Router weight [D_in, E] (fp32 or fp16) -> [E, D_in] fp32 rows, so each logit is one dot product with x.
// Returns whether the weight is fp16 (then the router runs, and rounds its logits, in fp16).
bool pack_router(const Ort::ConstValue& w, std::vector<float>& wt, int64_t& rows, int64_t& cols) {
  const auto info = w.GetTensorTypeAndShapeInfo();
  const auto shape = info.GetShape();
  if (shape.size() != 2) throw Ort::Exception("router_weight must be [D_in, E]", ORT_INVALID_ARGUMENT);
  cols = shape[0];
  rows = shape[1];
  std::vector<float> w32(info.GetElementCount());
  to_float(w.GetTensorRawData(), info.GetElementType(), w32.size(), w32.data());
  wt.resize(w32.size());
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t e = 0; e < rows; ++e) wt[e * cols + i] = w32[i * rows + e];
  return info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
}

// v's data as fp32: itself, or converted into buf. Takes v's type and size from a caller that has them at hand
// (each GetTensorTypeAndShapeInfo is an allocation and a few API calls, on every call of the kernel).
const float* as_float(const Ort::ConstValue& v, ONNXTensorElementDataType type, size_t count, std::vector<float>& buf) {
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return v.GetTensorData<float>();
  buf.resize(count);
  to_float(v.GetTensorRawData(), type, count, buf.data());
  return buf.data();
}

const float* as_float(const Ort::ConstValue& v, std::vector<float>& buf) {
  const auto info = v.GetTensorTypeAndShapeInfo();
  return as_float(v, info.GetElementType(), info.GetElementCount(), buf);
}

// One call's fp32 copies (empty when the inputs are fp32 already).
struct Buffers {
  std::vector<float> x32, g32, a32, bt, base32, y32, w32;
};

struct Kernel {
  Kernel(const OrtApi& api, const OrtKernelInfo* info, Mode mode) : api_(api), mode_(mode), isa_(&select_isa()) {
    // A and B are usually initializers: convert/transpose them once here instead of on every call, and keep their
    // shapes (a decode step would otherwise ask ONNX Runtime for them on every call).
    Ort::ConstKernelInfo kinfo(info);
    int is_const = 0;
    Ort::ConstValue b = kinfo.GetTensorConstantInput(b_index(mode), &is_const);
    if (is_const) {
      b_shape_ = pack_b(b, bt_);
      bt_ready_ = true;
    }
    Ort::ConstValue a = kinfo.GetTensorConstantInput(a_index(mode), &is_const);
    if (is_const) {
      const auto info_a = a.GetTensorTypeAndShapeInfo();
      a_shape_ = info_a.GetShape();
      a_const_ = true;
      if (info_a.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        a32_.resize(info_a.GetElementCount());
        to_float(a.GetTensorRawData(), info_a.GetElementType(), a32_.size(), a32_.data());
        a_ready_ = true;
      }
    }
    if (routed(mode)) {
      k_ = kinfo.GetAttribute<int64_t>("k");
      normalize_ = kinfo.GetAttribute<int64_t>("normalize") != 0;
      Ort::ConstValue w = kinfo.GetTensorConstantInput(kRouterWeight, &is_const);
      if (is_const) {
        wt_half_ = pack_router(w, wt_, wt_rows_, wt_cols_);
        wt_ready_ = true;
      }
    }
  }

  // B's shape, having transposed B into bt.
  static std::vector<int64_t> pack_b(const Ort::ConstValue& b, std::vector<float>& bt) {
    const auto info = b.GetTensorTypeAndShapeInfo();
    auto shape = info.GetShape();
    if (shape.size() != 3) throw Ort::Exception("B must be [E, D_out, R]", ORT_INVALID_ARGUMENT);
    bt.resize(info.GetElementCount());
    transpose_b(b.GetTensorRawData(), info.GetElementType(), shape[0], shape[1], shape[2], bt.data());
    return shape;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    g_compute_calls.fetch_add(1, std::memory_order_relaxed);
    try {
      Compute(context);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api_.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api_.CreateStatus(ORT_FAIL, e.what());
    }
  }

  [[noreturn]] static void fail(const char* op, const std::string& what) {
    throw Ort::Exception(std::string("moe_export kernel: ") + op + ": " + what, ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto x = ctx.GetInput(kX);
    auto A = ctx.GetInput(a_index(mode_));
    const auto x_info = x.GetTensorTypeAndShapeInfo();
    const auto xs = x_info.GetShape();
    // A constant A's and B's shapes were kept at creation; only inputs that are not constant are asked for theirs.
    std::vector<int64_t> a_asked, b_asked;
    if (!a_const_) a_asked = A.GetTensorTypeAndShapeInfo().GetShape();
    const auto& as = a_const_ ? a_shape_ : a_asked;
    Ort::ConstValue B{nullptr};
    if (!bt_ready_) {
      B = ctx.GetInput(b_index(mode_));
      b_asked = B.GetTensorTypeAndShapeInfo().GetShape();
    }
    const auto& bs = bt_ready_ ? b_shape_ : b_asked;
    if (xs.size() < 2 || as.size() != 3 || bs.size() != 3)
      fail(op_name(mode_), "expected x [..., D_in], A [E_A,R,D_in], B [E,D_out,R]");
    // x [..., D_in]: the leading dims are the tokens (the exporter feeds [batch, sequence, D_in] unflattened)
    int64_t tokens = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i) tokens *= xs[i];
    Dims d{tokens, k_, bs[0], as[0], as[1], xs.back(), bs[1]};
    if (as[2] != d.d_in || bs[2] != d.R || !(d.EA == 1 || d.EA == d.E))
      fail(op_name(mode_), "A/B/x do not chain or E_A is neither 1 nor E");
    const bool f32 = x_info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    Job job{d, mode_, isa_, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1};
    Buffers buf;
    job.x = f32 ? x.GetTensorData<float>() : as_float(x, buf.x32);
    if (routed(mode_))
      route_call(ctx, job, f32, buf);
    else
      read_routing(ctx, job, buf);
    if (a_ready_)
      job.A = a32_.data();
    else  // a constant A that is not converted is fp32: read where ONNX Runtime keeps it
      job.A = a_const_ ? A.GetTensorData<float>() : as_float(A, buf.a32);
    if (!bt_ready_) pack_b(B, buf.bt);
    job.bt = bt_ready_ ? bt_.data() : buf.bt.data();
    write_output(ctx, job, f32, buf);
  }

  // GroupedLoRA(Slots/Add): expert_ids and gates are inputs; sets K, ids and gates of `job`.
  void read_routing(Ort::KernelContext& ctx, Job& job, Buffers& buf) const {
    const char* op = op_name(mode_);
    auto ids = ctx.GetInput(kIds);
    const auto is = ids.GetTensorTypeAndShapeInfo().GetShape();
    if (is.size() != 2 || is[0] != job.d.T) fail(op, "expected expert_ids [T,K] for x [..., D_in] of T tokens");
    job.d.K = is[1];
    job.ids = ids.GetTensorData<int64_t>();
    for (int64_t i = 0; i < job.d.T * job.d.K; ++i)
      if (job.ids[i] < 0 || job.ids[i] >= job.d.E)
        fail(op, "expert id " + std::to_string(job.ids[i]) + " outside [0, E)");
    if (mode_ != Mode::kSlots) {
      auto gates = ctx.GetInput(gates_index(mode_));
      if (gates.GetTensorTypeAndShapeInfo().GetShape() != is) fail(op, "gates must match expert_ids");
      job.gates = as_float(gates, buf.g32);
    }
  }

  // RoutedGroupedLoRA(Add): route every token (outputs 1 and 2), then the op runs on the gates as output, in
  // x's type, as the function body's GroupedLoRA reads them.
  void route_call(Ort::KernelContext& ctx, Job& job, bool f32, Buffers& buf) const {
    const Dims& d = job.d;
    const char* op = op_name(mode_);
    if (k_ < 1 || k_ > d.E) fail(op, "k=" + std::to_string(k_) + " is not between 1 and B's experts");
    const float* wt = wt_.data();
    bool half = wt_half_;
    int64_t rows = wt_rows_, cols = wt_cols_;
    if (!wt_ready_) {
      half = pack_router(ctx.GetInput(kRouterWeight), buf.w32, rows, cols);
      wt = buf.w32.data();
    }
    if (rows != d.E || cols != d.d_in) fail(op, "router_weight must be [D_in, E] for x [..., D_in] and B [E,...]");
    auto ids_out = ctx.GetOutput(1, {d.T, d.K});
    auto gates_out = ctx.GetOutput(2, {d.T, d.K});
    const size_t n = static_cast<size_t>(d.T * d.K);
    buf.g32.resize(n);
    RouteJob r{isa_, wt, half, normalize_, d.E, d.d_in, d.K, job.x, ids_out.GetTensorMutableData<int64_t>(),
               buf.g32.data(), d.T, 1};
    if (d.T >= kRouteParallelTokens) {
      r.block = kRouteParallelTokens / 4;
      ctx.ParallelFor(route_block, static_cast<size_t>((d.T + r.block - 1) / r.block), 0, &r);
    } else {
      route_tokens(r, 0, d.T);
    }
    if (f32) {
      if (n) std::memcpy(gates_out.GetTensorMutableData<float>(), buf.g32.data(), n * sizeof(float));
    } else {
      auto* out = gates_out.GetTensorMutableData<Ort::Float16_t>();
      for (size_t i = 0; i < n; ++i) buf.g32[i] = (out[i] = Ort::Float16_t(buf.g32[i])).ToFloat();
    }
    job.ids = r.ids;
    job.gates = buf.g32.data();
  }

  // Output 0 (base + delta for the *Add forms, in base's shape), computed in fp32 and converted for fp16.
  void write_output(Ort::KernelContext& ctx, Job& job, bool f32, Buffers& buf) const {
    const Dims& d = job.d;
    std::vector<int64_t> out_shape{d.T, d.d_out};
    if (mode_ == Mode::kSlots) out_shape = {d.T, d.K, d.d_out};
    if (adds(mode_)) {
      auto base = ctx.GetInput(base_index(mode_));
      const auto binfo = base.GetTensorTypeAndShapeInfo();
      out_shape = binfo.GetShape();
      if (static_cast<int64_t>(binfo.GetElementCount()) != d.T * d.d_out || out_shape.empty() ||
          out_shape.back() != d.d_out)
        fail(op_name(mode_), "base must hold T x D_out values with D_out last");
      job.base = as_float(base, binfo.GetElementType(), binfo.GetElementCount(), buf.base32);
    }
    auto y = ctx.GetOutput(0, out_shape);
    const size_t y_count = static_cast<size_t>(d.T * d.d_out * (mode_ == Mode::kSlots ? d.K : 1));
    if (f32) {
      job.y = y.GetTensorMutableData<float>();
      if (job.base == job.y) g_in_place_calls.fetch_add(1, std::memory_order_relaxed);
    } else {
      buf.y32.resize(y_count);
      job.y = buf.y32.data();
    }
    if (d.T > 0) run(ctx, job);
    if (!f32) {
      auto* out = y.GetTensorMutableData<Ort::Float16_t>();
      for (size_t i = 0; i < y_count; ++i) out[i] = Ort::Float16_t(buf.y32[i]);
    }
  }

  // Small calls (decode steps) run per token, inline: a thread hand-off costs more than their work, and
  // each weight is read once anyway. Many tokens take the expert-grouped path, which reuses weights.
  static void run(Ort::KernelContext& ctx, Job& job) {
    const Dims& d = job.d;
    if (d.T >= kGroupedMinTokens) {
      // Token blocks keep each column chunk of y (block x kColumnChunk floats) in L2 across the experts.
      for (int64_t t0 = 0; t0 < d.T; t0 += kTokenBlock) {
        Job part = job;
        part.d.T = std::min(kTokenBlock, d.T - t0);
        part.x += t0 * d.d_in;
        part.ids += t0 * d.K;
        if (part.gates) part.gates += t0 * d.K;
        if (part.base) part.base += t0 * d.d_out;
        part.y += t0 * d.d_out * (job.mode == Mode::kSlots ? d.K : 1);
        run_grouped(ctx, part);
      }
      return;
    }
    const double work = static_cast<double>(d.T) * d.K * d.R * (d.d_in + d.d_out);
    if (d.T < 2 || work < 2.0e5) {
      run_tokens(job, 0, d.T);
      return;
    }
    job.block = std::max<int64_t>(1, d.T / 32);
    const size_t blocks = static_cast<size_t>((d.T + job.block - 1) / job.block);
    ctx.ParallelFor(run_block, blocks, 0, &job);
  }

  const OrtApi& api_;
  Mode mode_;
  const Isa* isa_;
  std::vector<float> bt_, a32_, wt_;
  std::vector<int64_t> a_shape_, b_shape_;  // of a constant A, B
  // a_const_: A is an initializer (fp32 unless a_ready_: converted into a32_); bt_ready_: B is one, in bt_
  bool a_const_ = false, bt_ready_ = false, a_ready_ = false, wt_ready_ = false, wt_half_ = false, normalize_ = false;
  int64_t k_ = 0, wt_rows_ = 0, wt_cols_ = 0;  // routed ops: TopK's k; the packed router weight's E, D_in
};

// The *Add ops' output 0 may take base's buffer: ONNX Runtime then skips an allocation and the kernel skips
// copying base into y, a whole pass over [T, D_out] per call. ONNX Runtime reuses a buffer only when it can see
// that the two values have the same shape, hence the shape inference: output 0 has base's type and shape.
template <int kBaseInput>
size_t ORT_API_CALL may_inplace(int** input_index, int** output_index) {
  *input_index = new int[1]{kBaseInput};
  *output_index = new int[1]{0};
  return 1;
}

void ORT_API_CALL release_inplace(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

// Whether every dim of `info` is known or named (an unknown dim must not be passed on as a value of -1).
bool fully_described(const OrtApi& api, const OrtTensorTypeAndShapeInfo* info) {
  size_t rank = 0;
  if (OrtStatus* st = api.GetDimensionsCount(info, &rank)) {
    api.ReleaseStatus(st);
    return false;
  }
  std::vector<int64_t> dims(rank);
  std::vector<const char*> names(rank, nullptr);
  OrtStatus* st = rank ? api.GetDimensions(info, dims.data(), rank) : nullptr;
  if (st == nullptr && rank) st = api.GetSymbolicDimensions(info, names.data(), rank);
  if (st != nullptr) {
    api.ReleaseStatus(st);
    return false;
  }
  for (size_t i = 0; i < rank; ++i)
    if (dims[i] < 0 && (names[i] == nullptr || names[i][0] == '\0')) return false;
  return rank > 0;
}

template <int kBaseInput>
OrtStatusPtr ORT_API_CALL infer_add_shape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api.ShapeInferContext_GetInputTypeShape(ctx, kBaseInput, &info)) {
    api.ReleaseStatus(st);  // base's shape is unknown here: leave output 0's unknown too
    return nullptr;
  }
  // `info` stays the context's (the C++ API's ShapeInferContext does not release it either)
  return fully_described(api, info) ? api.ShapeInferContext_SetOutputTypeShape(ctx, 0, info) : nullptr;
}

struct Op : Ort::CustomOpBase<Op, Kernel, true> {
  Op(const char* name, Mode mode, ONNXTensorElementDataType t, ONNXTensorElementDataType tg)
      : name_(name), mode_(mode), t_(t), tg_(tg) {
    if (adds(mode)) {  // CustomOpBase's constructor set these to null; the base input's position is per op
      const bool plain = mode == Mode::kAdd;
      OrtCustomOp::GetMayInplace = plain ? &may_inplace<5> : &may_inplace<4>;
      OrtCustomOp::ReleaseMayInplace = &release_inplace;
      OrtCustomOp::InferOutputShapeFn = plain ? &infer_add_shape<5> : &infer_add_shape<4>;
    }
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(api, info, mode_);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, e.what());
    }
  }

  const char* GetName() const { return name_; }
  size_t GetInputTypeCount() const {
    if (routed(mode_)) return mode_ == Mode::kRoutedAdd ? 5 : 4;
    return mode_ == Mode::kSlots ? 4 : mode_ == Mode::kAdd ? 6 : 5;
  }
  // Routed ops: tg_ is the router weight's type (fp32, or the model's fp16 for routers that run in it).
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (routed(mode_)) return i == kRouterWeight ? tg_ : t_;
    if (i == kIds) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (mode_ != Mode::kSlots && i == gates_index(mode_)) return tg_;
    return t_;
  }
  size_t GetOutputTypeCount() const { return routed(mode_) ? 3 : 1; }  // routed: y, expert_ids, gates
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return routed(mode_) && i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : t_;
  }

  const char* name_;
  Mode mode_;
  ONNXTensorElementDataType t_, tg_;
};

constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;

// One kernel per (T, TG) pair: ONNX Runtime merges same-named custom ops into one schema.
std::vector<Op>& all_ops() {
  static std::vector<Op> ops = [] {
    std::vector<Op> v;
    for (auto t : {kF32, kF16})
      for (auto tg : {kF32, kF16}) {
        v.emplace_back("GroupedLoRA", Mode::kSum, t, tg);
        v.emplace_back("GroupedLoRAAdd", Mode::kAdd, t, tg);
        v.emplace_back("RoutedGroupedLoRA", Mode::kRouted, t, tg);
        v.emplace_back("RoutedGroupedLoRAAdd", Mode::kRoutedAdd, t, tg);
      }
    for (auto t : {kF32, kF16}) v.emplace_back("GroupedLoRASlots", Mode::kSlots, t, t);
    return v;
  }();
  return ops;
}

}  // namespace

// The ORT API version the library asks for: that of its headers (tests build a variant that asks for a
// version no runtime offers, to see the mismatch reported).
#ifndef MOE_EXPORT_ORT_API_VERSION
#define MOE_EXPORT_ORT_API_VERSION ORT_API_VERSION
#endif

// Called by ONNX Runtime for each SessionOptions the library is registered on. A runtime older than the
// API version asked for returns no API: then nothing is registered and registration fails with a message
// saying why (succeeding would let the caller believe the kernels run), so the caller can run the model's
// function bodies and say so. API version 1, which every runtime offers, carries the error.
MOE_EXPORT_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(MOE_EXPORT_ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* v1 = api_base->GetApi(1);
    const std::string want = std::to_string(MOE_EXPORT_ORT_API_VERSION);
    const std::string msg = "moe_export kernels need ONNX Runtime API " + want + " (onnxruntime >= 1." + want +
                            "); this onnxruntime is " + api_base->GetVersionString() + ", so nothing was registered";
    return v1 != nullptr ? v1->CreateStatus(ORT_NOT_IMPLEMENTED, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  static std::mutex mutex;
  static std::vector<Ort::CustomOpDomain> domains;  // must outlive every session that uses them
  try {
    std::lock_guard<std::mutex> lock(mutex);
    Ort::CustomOpDomain domain("moe_export");
    for (Op& op : all_ops()) domain.Add(&op);
    Ort::UnownedSessionOptions(options).Add(domain);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}

// For `moe-export kernels`: the instruction set this CPU gets and the ORT API version built against.
MOE_EXPORT_API const char* MoeExportKernelIsa() { return select_isa().name; }
MOE_EXPORT_API int MoeExportOrtApiVersion() { return MOE_EXPORT_ORT_API_VERSION; }
// How many times ONNX Runtime ran one of these kernels in this process (any session, any client).
MOE_EXPORT_API unsigned long long MoeExportKernelCalls() { return g_compute_calls.load(); }
// How many of those an *Add op ran in place, in base's buffer.
MOE_EXPORT_API unsigned long long MoeExportInPlaceCalls() { return g_in_place_calls.load(); }
