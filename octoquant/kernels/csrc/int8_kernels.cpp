// octoquant CPU int8 kernels. Independent of torch's C++ API: every entry takes raw addresses and sizes;
// the Python layer (octoquant/kernels/cpu.py) validates dtypes, shapes and contiguity before calling.
//
// Activations arrive as u8 "a" with an integer offset: real_q = a - offset (offset 128 for int8 data
// stored as q + 128, or the zero-point of uint8 data). Weights are s8, packed by pack_weight_u8s8 into
// 64-column tiles laid out [tile][K/4][4 blocks][16][4] (4 consecutive k of one column in 4 bytes): each
// tile is one contiguous stream, 256 bytes per step of 4 k, which DRAM prefetchers follow well.
//   S[m,n]   = sum_k a[m,k] * w[n,k]                   (u8 x s8 products, int32 sums)
//   acc[m,n] = S[m,n] - offset * colsum[n]             = sum_k (a - offset) * w
// Both sums wrap modulo 2^32 (vpdpbusd and vpaddd do not saturate), so acc is exact whenever the true
// result fits in int32: |acc| <= K * 128 * 128 < 2^31 for K <= 131071 (the Python layer refuses more).
// No vpmaddubsw anywhere: its int16 pair sums saturate (255*127*2 > 32767).
// Epilogue (the spec in kernels/reference.py): y = float(acc) * (row_scale[m] * col_scale[n]) + bias[n],
// as separate IEEE multiplies and an add (no FMA contraction), so results match the reference bit for bit.
// Optionally the epilogue requantizes y for the next layer instead of storing it (OutQ): the u8 it writes
// is what quantize_static would produce from the stored float, so a chain of layers passing u8 codes is
// bit-identical to the same layers passing float.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <immintrin.h>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

// ------------------------------------------------------------------------------------------------ threads
class ThreadPool {
 public:
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  // Runs f(0..n-1), f(0) on the calling thread.
  void run(int n, const std::function<void(int)>& f) {
    if (n <= 1) {
      f(0);
      return;
    }
    ensure(n - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      task_ = &f;
      active_ = n;
      pending_ = n - 1;
      ++generation_;
    }
    cv_.notify_all();
    f(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void ensure(int count) {
    while ((int)workers_.size() < count) {
      int id = (int)workers_.size() + 1;
      workers_.emplace_back([this, id] { loop(id); });
    }
  }
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* task;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        if (id >= active_) continue;
        task = task_;
      }
      (*task)(id);
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (--pending_ == 0) done_cv_.notify_one();
      }
    }
  }
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* task_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, pending_ = 0;
  bool stop_ = false;
};

ThreadPool& own_pool() {
  static ThreadPool p;
  return p;
}

// The host's OpenMP runtime (the libgomp torch loaded), reached through its C ABI: GOMP_parallel(fn, data,
// num_threads, flags) runs fn(data) on the calling thread and num_threads - 1 pool threads. Running our
// loops on torch's own pool avoids two thread pools fighting for the same cores: after every torch op,
// OpenMP workers spin for a while, and a second pool's worker would wait for them.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpThreadNum = int (*)();
GompParallel g_gomp_parallel = nullptr;
OmpThreadNum g_omp_thread_num = nullptr;

struct OmpTask {
  const std::function<void(int)>* f;
};

void omp_trampoline(void* data) { (*static_cast<OmpTask*>(data)->f)(g_omp_thread_num()); }

struct Pool {
  void run(int n, const std::function<void(int)>& f) {
    if (n > 1 && g_gomp_parallel != nullptr) {
      OmpTask task{&f};
      g_gomp_parallel(omp_trampoline, &task, (unsigned)n, 0);
      return;
    }
    own_pool().run(n, f);
  }
};

Pool& pool() {
  static Pool p;
  return p;
}

// The GIL, released for a kernel's duration when the calling thread holds it (a kernel program releases it once
// for all its steps).
class NoGil {
 public:
  NoGil() {
    if (PyGILState_Check()) release_.emplace();
  }

 private:
  std::optional<py::gil_scoped_release> release_;
};

// Split [0, total) into n nearly equal contiguous ranges.
inline void split(int64_t total, int n, int i, int64_t* lo, int64_t* hi) {
  int64_t base = total / n, rem = total % n;
  *lo = i * base + std::min<int64_t>(i, rem);
  *hi = *lo + base + (i < rem ? 1 : 0);
}

// Units [0, total) shared by the n threads of one parallel region in chunks claimed at run time, instead of fixed
// equal ranges: on a shared machine one vCPU at times runs 30-40% slower than the other (a busy neighbour on its
// physical core), and a fixed split then waits for the slow half (measured in such a period: 18% of the regions'
// thread time idle in MobileNetV2 at batch 8, against 5% when quiet). Two threads: thread 0 claims from the front
// and thread 1 from the back, so each walks one contiguous range as with the fixed split, and they meet where the
// work ran out. More threads: one counter from the front. One compare-and-swap per chunk.
class Claims {
 public:
  Claims(int64_t total, int n, int64_t grain)
      : two_(n == 2), grain_(std::max<int64_t>(1, grain)), state_(pack(0, total)) {}
  // The next chunk [lo, hi) of thread i; false when none is left.
  bool next(int i, int64_t* lo, int64_t* hi) {
    uint64_t v = state_.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t f = (int64_t)(v & 0xFFFFFFFFu), b = (int64_t)(v >> 32);
      if (f >= b) return false;
      uint64_t nv;
      // guided: a quarter of what is left (half of an equal share), down to the grain near the end
      const int64_t chunk = std::max(grain_, (b - f) / 4);
      if (two_ && i == 1) {
        *lo = std::max(f, b - chunk);
        *hi = b;
        nv = pack(f, *lo);
      } else {
        *lo = f;
        *hi = std::min(b, f + chunk);
        nv = pack(*hi, b);
      }
      if (state_.compare_exchange_weak(v, nv, std::memory_order_relaxed)) return true;
    }
  }

 private:
  static uint64_t pack(int64_t f, int64_t b) { return (uint64_t)f | ((uint64_t)b << 32); }
  bool two_;
  int64_t grain_;
  std::atomic<uint64_t> state_;
};

// body(thread, lo, hi) over the chunks of [0, total) the t threads claim (Claims: guided, down to chunks of a
// `per_thread`-th of an equal share). A total past the 32-bit halves of Claims' state: fixed ranges.
template <class F>
void run_claimed(int t, int64_t total, int per_thread, F&& body) {
  if (t <= 1 || total <= 1) {
    body(0, 0, total);
    return;
  }
  if (total >= (int64_t)1 << 31) {
    pool().run(t, [&](int i) {
      int64_t lo, hi;
      split(total, t, i, &lo, &hi);
      body(i, lo, hi);
    });
    return;
  }
  Claims claims(total, t, total / ((int64_t)t * per_thread));
  pool().run(t, [&](int i) {
    int64_t lo, hi;
    while (claims.next(i, &lo, &hi)) body(i, lo, hi);
  });
}

// ------------------------------------------------------------------------------------------------ features
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_avx512vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

bool has_avx512vbmi2() {  // the funnel shifts of the 3x3 depthwise kernel on column quads
  static const bool yes = has_avx512vnni() && __builtin_cpu_supports("avx512vbmi2");
  return yes;
}

enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512VNNI = 2 };

// Requantized output, the integer requantization of ONNX Runtime's QLinearConv (octoquant.kernels.reference.
// requantize_codes): u8 = clamp(round_half_even(float32(acc + bias_q) * mult), lo, hi) + add, with lo = qmin - zp,
// hi = qmax - zp, add = zp + shift. The caller passes mult = (in_scale * w_scale) / out_scale as the column scales
// (row scale 1) and the int32 bias bias_q instead of the float bias; `scale` (the output scale) only converts a
// fused clamp's float bound to its code.
struct OutQ {
  uint8_t* y;  // (M, ldy) u8, or null: the epilogue stores float
  float scale, lo, hi;
  int32_t add;
};

// The bounds of round(v) for one column: the quantizer's [q.lo, q.hi], and with a fused clamp y = min(max(y, 0),
// clamp_hi) its code bounds [min(0, c), c], c = round(clamp_hi / scale), inside them (the clamp commutes with the
// monotone rounding: round(min(max(v, 0), c)) = min(max(round(v), 0), c) for integer c)
inline void fold_clamp_one(const OutQ& q, const float* clamp_hi, float* lo, float* hi) {
  if (!clamp_hi) {
    *lo = q.lo;
    *hi = q.hi;
    return;
  }
  float c = std::nearbyint(*clamp_hi / q.scale);
  float lo_c = std::min(0.0f, c);  // the fused clamp at -inf: min(max(-inf, 0), c)
  *lo = std::min(std::max(lo_c, q.lo), q.hi);
  *hi = std::min(std::max(c, q.lo), q.hi);
}

inline uint8_t requantize_scalar(float v, const OutQ& q, const float* clamp_hi) {
  float lo, hi;
  fold_clamp_one(q, clamp_hi, &lo, &hi);
  float r = std::nearbyint(v);  // default rounding mode: to nearest, ties to even
  r = r < lo ? lo : (r > hi ? hi : r);
  return (uint8_t)((int32_t)r + q.add);
}

inline int32_t add_wrap(int32_t a, int32_t b) { return (int32_t)((uint32_t)a + (uint32_t)b); }

struct GemmArgs {
  const uint8_t* a;      // (M, lda) u8, K padded to Kp (multiple of 4) with any value (weights are 0 there)
  int64_t lda;
  const int8_t* w;       // packed (T, Kp/4, 4, 16, 4), T = ceil(N / 64)
  const int32_t* colsum; // (T*64,) sum_k w[n,k]
  int32_t offset;
  const float* row_scale;  // (M,) or null (then 1 value: row_scale0)
  float row_scale0;
  const float* col_scale;  // (T*64,) padded
  const float* bias;       // (N,) or null
  const float* clamp_hi;   // (T*64,) or null: fused activation y = min(max(y, 0), clamp_hi[n])
  float* y;                // (M, ldy) float, or null
  int32_t* acc_out;        // (M, ldy) int32, or null
  int64_t ldy;
  int64_t M, N, Kp;
  OutQ out_q;              // out_q.y set: u8 output (M, ldy), requantized
  // Filled by gemm() for the VNNI epilogue, per padded column (T*64): offset * colsum; row_scale0 * col_scale
  // (static rows); and the integer bounds of the requantized output with the fused clamp folded in.
  const int32_t* off_colsum = nullptr;
  const float* static_scale = nullptr;
  const float* q_lo = nullptr;
  const float* q_hi = nullptr;
  const int32_t* bias_q = nullptr;  // (T*64,) int32 bias of the requantization (out_q.y set), or null
};

// Per-column epilogue constants, worked out once per call instead of once per row (a conv's GEMM has
// K = 16..32 and 10^5 rows: the epilogue, not the multiply-adds, was its cost). Exact: the same float32
// products; the requantization's int32 bias joins offset * colsum (int32 sums wrap alike in either order); the
// fused clamp and the quantizer's clamp compose into one clamp of round(v) (fold_clamp_one).
struct EpilogueConsts {
  std::vector<int32_t> off_colsum;
  std::vector<float> static_scale, q_lo, q_hi;

  // n: padded columns (colsum, col_scale and clamp_hi hold n values); codes: g's output will be requantized codes;
  // static_rows: one row scale (row_scale0) for all rows. Both as the call's g says, or as a plan knows beforehand
  // (a kernel program's or a linear layer's: out_q.y and row_scale are set per run).
  EpilogueConsts(GemmArgs& g, int64_t n) : EpilogueConsts(g, n, g.out_q.y != nullptr, !g.row_scale) {}
  EpilogueConsts(GemmArgs& g, int64_t n, bool codes, bool static_rows) : off_colsum((size_t)n) {
    for (int64_t j = 0; j < n; ++j) off_colsum[j] = (int32_t)((uint32_t)g.offset * (uint32_t)g.colsum[j]);
    if (g.bias_q)  // acc - off_colsum + bias_q = acc - (off_colsum - bias_q)
      for (int64_t j = 0; j < n; ++j) off_colsum[j] = add_wrap(off_colsum[j], -g.bias_q[j]);
    g.off_colsum = off_colsum.data();
    if (static_rows) {
      static_scale.resize((size_t)n);
      for (int64_t j = 0; j < n; ++j) static_scale[j] = g.row_scale0 * g.col_scale[j];
      g.static_scale = static_scale.data();
    }
    if (codes) {
      q_lo.resize((size_t)n);
      q_hi.resize((size_t)n);
      fold_clamp(g.out_q, g.clamp_hi, n, q_lo.data(), q_hi.data());
      g.q_lo = q_lo.data();
      g.q_hi = q_hi.data();
    }
  }

  // per column: the bounds of round(v) (fold_clamp_one)
  static void fold_clamp(const OutQ& q, const float* clamp_hi, int64_t n, float* lo, float* hi) {
    for (int64_t j = 0; j < n; ++j) fold_clamp_one(q, clamp_hi ? clamp_hi + j : nullptr, lo + j, hi + j);
  }
};

constexpr int64_t TILE_BLOCKS = 4;  // 16-column blocks per packed tile
inline int64_t padded_columns(int64_t n) { return (n + 16 * TILE_BLOCKS - 1) / (16 * TILE_BLOCKS) * 16 * TILE_BLOCKS; }

// Address of the 64 bytes of 16-column block `nb` at step k4.
inline const int8_t* wblock(const GemmArgs& g, int64_t nb, int64_t k4) {
  return g.w + (((nb / TILE_BLOCKS) * (g.Kp / 4) + k4) * TILE_BLOCKS + nb % TILE_BLOCKS) * 64;
}

// Write one 16-column block of results for one row: lanes [n0, n0 + valid).
inline void epilogue_scalar(const GemmArgs& g, int64_t m, int64_t n0, const int32_t* s16, int valid) {
  for (int j = 0; j < valid; ++j) {
    int64_t n = n0 + j;
    int32_t acc = (int32_t)((uint32_t)s16[j] - (uint32_t)g.offset * (uint32_t)g.colsum[n]);
    if (g.acc_out) {
      g.acc_out[m * g.ldy + n] = acc;
    } else {
      if (g.bias_q) acc = add_wrap(acc, g.bias_q[n]);
      float rs = g.row_scale ? g.row_scale[m] : g.row_scale0;
      volatile float cs = rs * g.col_scale[n];  // volatile: keep mul and add separate (no FMA)
      float v = (float)acc * cs;
      if (g.bias) v = v + g.bias[n];
      if (g.out_q.y) {
        g.out_q.y[m * g.ldy + n] = requantize_scalar(v, g.out_q, g.clamp_hi ? g.clamp_hi + n : nullptr);
      } else {
        if (g.clamp_hi) v = std::min(std::max(v, 0.0f), g.clamp_hi[n]);
        g.y[m * g.ldy + n] = v;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ scalar
void gemm_scalar(const GemmArgs& g, int64_t nb_lo, int64_t nb_hi, int64_t m_lo, int64_t m_hi) {
  int64_t K4 = g.Kp / 4;
  for (int64_t m = m_lo; m < m_hi; ++m) {
    const uint8_t* a = g.a + m * g.lda;
    for (int64_t nb = nb_lo; nb < nb_hi; ++nb) {
      int32_t s[16] = {0};
      for (int64_t k4 = 0; k4 < K4; ++k4) {
        const int8_t* w = wblock(g, nb, k4);
        for (int j = 0; j < 16; ++j)
          for (int t = 0; t < 4; ++t)
            s[j] = (int32_t)((uint32_t)s[j] + (uint32_t)((int32_t)a[k4 * 4 + t] * (int32_t)w[j * 4 + t]));
      }
      int valid = (int)std::min<int64_t>(16, g.N - nb * 16);
      epilogue_scalar(g, m, nb * 16, s, valid);
    }
  }
}

// ------------------------------------------------------------------------------------------------ AVX-512 VNNI
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma")))

// u8 codes of v (in output units): clamp(round_half_even(v), lo[j], hi[j]) + add, with the integer-valued bounds
// of EpilogueConsts. Clamping before rounding is the same (rounding is monotone and keeps integers), so one
// conversion with embedded round-to-nearest-even does both the rounding and the float -> int step.
VNNI_TARGET inline __m128i requantize_consts_avx512(__m512 v, const OutQ& q, const float* lo, const float* hi) {
  __m512 r = _mm512_min_ps(_mm512_max_ps(v, _mm512_loadu_ps(lo)), _mm512_loadu_ps(hi));
  __m512i i = _mm512_cvt_roundps_epi32(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtepi32_epi8(_mm512_add_epi32(i, _mm512_set1_epi32(q.add)));
}

// The epilogue with EpilogueConsts (g.off_colsum set).
VNNI_TARGET inline void epilogue_vnni(const GemmArgs& g, int64_t m, int64_t n0, __m512i s, int valid) {
  __m512i acc = _mm512_sub_epi32(s, _mm512_loadu_si512((const void*)(g.off_colsum + n0)));
  __mmask16 mask = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
  if (g.acc_out) {
    _mm512_mask_storeu_epi32(g.acc_out + m * g.ldy + n0, mask, acc);
    return;
  }
  __m512 scale = g.static_scale ? _mm512_loadu_ps(g.static_scale + n0)
                                : _mm512_mul_ps(_mm512_set1_ps(g.row_scale[m]), _mm512_loadu_ps(g.col_scale + n0));
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale);
  if (g.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, g.bias + n0));
  if (g.out_q.y) {
    __m128i q = requantize_consts_avx512(v, g.out_q, g.q_lo + n0, g.q_hi + n0);
    // a full block takes a plain store: a masked byte store is several times slower on Zen 4 (measured)
    if (valid >= 16) _mm_storeu_si128((__m128i*)(g.out_q.y + m * g.ldy + n0), q);
    else _mm_mask_storeu_epi8(g.out_q.y + m * g.ldy + n0, mask, q);
    return;
  }
  if (g.clamp_hi) v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), _mm512_loadu_ps(g.clamp_hi + n0));
  _mm512_mask_storeu_ps(g.y + m * g.ldy + n0, mask, v);
}

// The requantized codes of NB (3 or 4) full 16-column blocks of one row, static scale (g.static_scale): the
// operations of epilogue_vnni per block, then one pack to bytes and one store instead of a narrowing move and a
// 16-byte store per block (bit-identical; 24->144 expand conv -9%, 64->384 -12%, 96->576 -11%, measured).
inline bool packed_epilogue(const GemmArgs& g) { return g.out_q.y && g.static_scale && !g.acc_out; }

template <int NB>
VNNI_TARGET inline void store_codes_vnni(const GemmArgs& g, int64_t m, int64_t n0, const __m512i* s) {
  static_assert(NB == 3 || NB == 4, "3 or 4 blocks");
  // constants as memory operands, not registers: the small-K kernel keeps up to 24 weight vectors in registers
  static const int32_t order[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  __m512i q[4];
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) {
    const int64_t n = n0 + 16 * b;
    __m512i acc = _mm512_sub_epi32(s[b], _mm512_loadu_si512((const void*)(g.off_colsum + n)));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(g.static_scale + n));
    if (g.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(g.bias + n));
    __m512 r = _mm512_min_ps(_mm512_max_ps(v, _mm512_loadu_ps(g.q_lo + n)), _mm512_loadu_ps(g.q_hi + n));
    q[b] = _mm512_add_epi32(_mm512_cvt_roundps_epi32(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                            _mm512_set1_epi32(g.out_q.add));
  }
  if (NB == 3) q[3] = q[2];
  // codes are in [0, 255]: the saturating packs change nothing. Per 128-bit lane L, packus leaves dword 4 L + b
  // holding block b's columns 4 L .. 4 L + 3; the permute puts block b's 16 codes at bytes 16 b.
  __m512i u8 = _mm512_packus_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
  u8 = _mm512_permutexvar_epi32(_mm512_loadu_si512((const void*)order), u8);
  uint8_t* out = g.out_q.y + m * g.ldy + n0;
  if (NB == 4) _mm512_storeu_si512((void*)out, u8);
  else _mm512_mask_storeu_epi32((void*)out, (__mmask16)0x0FFF, u8);
}

// MR rows x the first NB 16-column blocks of one 64-column tile (NB < 4 only in a last, partial tile: a conv
// projecting to 16, 24 or 32 channels does not compute the padding columns), k steps [k4_lo, k4_hi).
// NB*MR int32 accumulators (<= 16 zmm). Partial sums live in `part` (MR x 64 int32) between K chunks; the last
// chunk runs the epilogue.
template <int MR, int NB>
__attribute__((noinline)) VNNI_TARGET void tile_vnni(const GemmArgs& g, int64_t m0, int64_t t, int64_t k4_lo, int64_t k4_hi, int32_t* part,
                           bool first, bool last, int64_t pf) {
  const int64_t K4 = g.Kp / 4;
  __m512i acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b)
      acc[r][b] = first ? _mm512_setzero_si512() : _mm512_loadu_si512((const void*)(part + r * 64 + b * 16));
  const int8_t* w = g.w + t * K4 * 256;
  const uint8_t* a = g.a + m0 * g.lda;
  const int64_t lda = g.lda;
  // Fully unrolled (pragmas): the accumulators must stay in registers. Without them GCC kept acc[][] on the
  // stack and stored it every k step (a store-to-load chain per step: 2x slower on a conv's small-K GEMM).
  for (int64_t k4 = k4_lo; k4 < k4_hi; ++k4) {
    const int8_t* wk = w + k4 * 256;
    // pf bytes ahead (see gemm_vnni); prefetching past the end of the weights is harmless (no fault)
    if (pf) {
#pragma GCC unroll 4
      for (int l = 0; l < NB; ++l) _mm_prefetch((const char*)(wk + pf + 64 * l), _MM_HINT_T1);
    }
    __m512i wv[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512((const void*)(wk + 64 * b));
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + k4 * 4, 4);
      __m512i av = _mm512_set1_epi32(a4);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], av, wv[b]);
    }
  }
  if (!last) {
    for (int r = 0; r < MR; ++r)
      for (int b = 0; b < NB; ++b) _mm512_storeu_si512((void*)(part + r * 64 + b * 16), acc[r][b]);
    return;
  }
  const GemmArgs e = g;  // a local copy: the output stores cannot alias it (see smallk_group_vnni)
  if (NB >= 3 && (t * 4 + NB) * 16 <= e.N && packed_epilogue(e)) {  // 64->384 conv -12%, measured
    for (int r = 0; r < MR; ++r) store_codes_vnni<NB == 4 ? 4 : 3>(e, m0 + r, t * 64, acc[r]);
    return;
  }
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b) {
      int64_t n0 = (t * 4 + b) * 16;
      if (n0 < e.N) epilogue_vnni(e, m0 + r, n0, acc[r][b], (int)std::min<int64_t>(16, e.N - n0));
    }
}

template <int NB>
VNNI_TARGET void rows_nb_vnni(const GemmArgs& g, int64_t m0, int64_t mr, int64_t t, int64_t k4_lo, int64_t k4_hi,
                              int32_t* part, bool first, bool last, int64_t pf) {
  switch (mr) {
    case 1: tile_vnni<1, NB>(g, m0, t, k4_lo, k4_hi, part, first, last, pf); break;
    case 2: tile_vnni<2, NB>(g, m0, t, k4_lo, k4_hi, part, first, last, pf); break;
    case 3: tile_vnni<3, NB>(g, m0, t, k4_lo, k4_hi, part, first, last, pf); break;
    default: tile_vnni<4, NB>(g, m0, t, k4_lo, k4_hi, part, first, last, pf); break;
  }
}

VNNI_TARGET void rows_vnni(const GemmArgs& g, int64_t m0, int64_t mr, int64_t t, int64_t k4_lo, int64_t k4_hi,
                           int32_t* part, bool first, bool last, int64_t pf) {
  int64_t blocks = std::min<int64_t>(TILE_BLOCKS, (g.N - t * 64 + 15) / 16);  // the valid blocks of this tile
  switch (blocks) {
    case 1: rows_nb_vnni<1>(g, m0, mr, t, k4_lo, k4_hi, part, first, last, pf); break;
    case 2: rows_nb_vnni<2>(g, m0, mr, t, k4_lo, k4_hi, part, first, last, pf); break;
    case 3: rows_nb_vnni<3>(g, m0, mr, t, k4_lo, k4_hi, part, first, last, pf); break;
    default: rows_nb_vnni<4>(g, m0, mr, t, k4_lo, k4_hi, part, first, last, pf); break;
  }
}

// Small K (Kp <= 32: a MobileNet-style expand conv, an im2col'd 3-channel stem; at K = 64 the tiled kernel is
// faster, measured): the weights of NBG 16-column blocks (K4 * NBG zmm) stay in registers while rows stream past,
// each row K4 broadcasts and K4 * NBG VNNI steps into NBG accumulators. The tiled kernel reloads the weights and
// keeps partial state per 4-row tile: for K = 16 that bookkeeping cost more than the multiply-adds (measured: 59
// cycles per row of 96 outputs before the epilogue, for 24 vpdpbusd).
template <int K4, int NBG>
VNNI_TARGET void smallk_group_vnni(const GemmArgs& args, int64_t nb0, int64_t m_lo, int64_t m_hi) {
  // a local copy: the epilogue's byte stores cannot alias it, so its fields stay in registers instead of being
  // reloaded after every store (5% on the 16->96 expand conv, measured)
  const GemmArgs g = args;
  __m512i w[K4][NBG];
#pragma GCC unroll 8
  for (int k = 0; k < K4; ++k)
#pragma GCC unroll 8
    for (int b = 0; b < NBG; ++b) w[k][b] = _mm512_loadu_si512((const void*)wblock(g, nb0 + b, k));
  int valid[NBG];
  for (int b = 0; b < NBG; ++b) valid[b] = (int)std::min<int64_t>(16, g.N - (nb0 + b) * 16);
  // packed stores need ~6 more vector registers: not when the weights and accumulators already take 30 (K = 16
  // with 6 blocks measured 2% slower packed, K = 24 with 4 blocks 9% faster)
  const bool packed = NBG >= 3 && K4 * NBG + NBG <= 28 && packed_epilogue(g) && valid[NBG - 1] == 16;
  for (int64_t m = m_lo; m < m_hi; ++m) {
    const uint8_t* a = g.a + m * g.lda;
    __m512i acc[NBG];
#pragma GCC unroll 8
    for (int b = 0; b < NBG; ++b) acc[b] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int k = 0; k < K4; ++k) {
      int32_t a4;
      std::memcpy(&a4, a + k * 4, 4);
      const __m512i av = _mm512_set1_epi32(a4);
#pragma GCC unroll 8
      for (int b = 0; b < NBG; ++b) acc[b] = _mm512_dpbusd_epi32(acc[b], av, w[k][b]);
    }
    int b = 0;
    if (packed) {
#pragma GCC unroll 2
      for (; b + 4 <= NBG; b += 4) store_codes_vnni<4>(g, m, (nb0 + b) * 16, acc + b);
      if (NBG - b == 3) {
        store_codes_vnni<3>(g, m, (nb0 + b) * 16, acc + b);
        b += 3;
      }
    }
#pragma GCC unroll 8
    for (; b < NBG; ++b) epilogue_vnni(g, m, (nb0 + b) * 16, acc[b], valid[b]);
  }
}

// Register budget: K4 * NBG weight vectors + NBG accumulators + 1 broadcast <= 31 zmm, at most 6 blocks.
constexpr int smallk_nbg(int k4) { return std::min(6, 31 / (k4 + 1)); }

template <int K4>
VNNI_TARGET void smallk_vnni(const GemmArgs& g, int64_t nb_lo, int64_t nb_hi, int64_t m_lo, int64_t m_hi) {
  constexpr int G = smallk_nbg(K4);
  constexpr int64_t MC = 512;  // rows per pass: every column group re-reads them from L1 / L2
  for (int64_t mb = m_lo; mb < m_hi; mb += MC) {
    int64_t me = std::min(m_hi, mb + MC);
    for (int64_t nb = nb_lo; nb < nb_hi; nb += G) {
      switch (std::min<int64_t>(G, nb_hi - nb)) {
        case 1: smallk_group_vnni<K4, 1>(g, nb, mb, me); break;
        case 2: smallk_group_vnni<K4, std::min(2, G)>(g, nb, mb, me); break;
        case 3: smallk_group_vnni<K4, std::min(3, G)>(g, nb, mb, me); break;
        case 4: smallk_group_vnni<K4, std::min(4, G)>(g, nb, mb, me); break;
        case 5: smallk_group_vnni<K4, std::min(5, G)>(g, nb, mb, me); break;
        default: smallk_group_vnni<K4, std::min(6, G)>(g, nb, mb, me); break;
      }
    }
  }
}

// Blocks [nb_lo, nb_hi) of 16 columns; true when Kp is small enough for smallk_vnni.
VNNI_TARGET bool smallk_dispatch(const GemmArgs& g, int64_t nb_lo, int64_t nb_hi, int64_t m_lo, int64_t m_hi) {
  switch (g.Kp / 4) {
    case 1: smallk_vnni<1>(g, nb_lo, nb_hi, m_lo, m_hi); return true;
    case 2: smallk_vnni<2>(g, nb_lo, nb_hi, m_lo, m_hi); return true;
    case 3: smallk_vnni<3>(g, nb_lo, nb_hi, m_lo, m_hi); return true;
    case 4: smallk_vnni<4>(g, nb_lo, nb_hi, m_lo, m_hi); return true;
    case 5: smallk_vnni<5>(g, nb_lo, nb_hi, m_lo, m_hi); return true;
    case 6: smallk_vnni<6>(g, nb_lo, nb_hi, m_lo, m_hi); return true;
    case 7: smallk_vnni<7>(g, nb_lo, nb_hi, m_lo, m_hi); return true;
    case 8: smallk_vnni<8>(g, nb_lo, nb_hi, m_lo, m_hi); return true;
    default: return false;
  }
}

// Tiles [t_lo, t_hi). Rows in L2-sized blocks (mc x Kp bytes of A stay in L2). Within a block, each tile is
// walked in K chunks of 64 KiB of weights: every row tile consumes a chunk while it is in L1/L2, so the
// weights come from DRAM once per row block, in one sequential stream.
VNNI_TARGET void gemm_vnni(const GemmArgs& g, int64_t t_lo, int64_t t_hi, int64_t m_lo, int64_t m_hi) {
  constexpr int64_t MR = 4;  // 4 rows x 4 blocks = 16 accumulators; 6 rows (24) spills to the stack
  // k4 steps per chunk: 256 * 256 B = 64 KiB of a tile (measured best of 16/64/256 KiB and no chunking)
  constexpr int64_t KC4 = 256;
  const int64_t K4 = g.Kp / 4;
  int64_t mc = std::max<int64_t>(MR, ((256 * 1024) / std::max<int64_t>(g.Kp, 1)) / MR * MR);
  mc = std::min<int64_t>(mc, 256);
  // partial sums of the row tiles between K chunks: a per-thread buffer (allocating and zero-filling 64 KiB per
  // call was a third of a small decode layer's kernel time)
  thread_local std::vector<int32_t> part;
  if (part.size() < (size_t)(mc * 64)) part.resize((size_t)(mc * 64));
  for (int64_t mb = m_lo; mb < m_hi; mb += mc) {
    int64_t me = std::min(m_hi, mb + mc);
    int64_t rows = me - mb;
    int64_t ntiles = (rows + MR - 1) / MR;
    int64_t kc = ntiles == 1 ? K4 : KC4;  // a single row tile needs no chunking
    // Software prefetch (pf bytes ahead, 0: none): several row tiles prefetch the next chunk (tiles are contiguous,
    // so past a tile's end comes the next tile) while computing on this one, so DRAM traffic overlaps the compute
    // of all row tiles instead of adding to it. A single row tile (M <= 4: decode) streams its weights once and
    // leaves that to the hardware prefetcher: its prefetch instructions (one per 64 bytes, 8 KiB ahead) cost
    // more than they brought (in-process A/B, M = 1: 384 x 1536 hot 8.3 -> 6.8 us, 4096 x 4096 cold on 2 threads
    // 351 -> 314 us).
    int64_t pf = ntiles == 1 ? 0 : kc * 256;
    for (int64_t t = t_lo; t < t_hi; ++t) {
      for (int64_t k4 = 0; k4 < K4; k4 += kc) {
        int64_t k4e = std::min(K4, k4 + kc);
        bool first = k4 == 0, last = k4e == K4;
        // split rows evenly into tiles of <= MR (6 rows -> 3 + 3, not 4 + 2)
        int64_t m = mb;
        for (int64_t i = 0; i < ntiles; ++i) {
          int64_t mr = (rows - (m - mb) + (ntiles - i) - 1) / (ntiles - i);
          rows_vnni(g, m, mr, t, k4, k4e, part.data() + (m - mb) * 64, first, last, pf);
          m += mr;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ AVX2
#define AVX2_TARGET __attribute__((target("avx2,fma")))

// codes of v (in output units) without a fused clamp (the callers take the scalar path with one)
AVX2_TARGET inline void requantize_store_avx2(__m256 v, const OutQ& q, uint8_t* out) {
  __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(q.lo)), _mm256_set1_ps(q.hi));
  alignas(32) int32_t qi[8];
  _mm256_store_si256((__m256i*)qi, _mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(q.add)));
  for (int j = 0; j < 8; ++j) out[j] = (uint8_t)qi[j];
}

// acc holds, for one 16-column block, 4 ymm of pair sums: ymm q covers columns 4q..4q+3, two lanes each.
AVX2_TARGET inline void finish_block_avx2(const GemmArgs& g, int64_t m, int64_t n0, const __m256i* acc, int valid) {
  const __m256i perm = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  alignas(32) int32_t s[16];
  __m256i lo = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(acc[0], acc[1]), perm);  // columns 0..7
  __m256i hi = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(acc[2], acc[3]), perm);  // columns 8..15
  _mm256_store_si256((__m256i*)s, lo);
  _mm256_store_si256((__m256i*)(s + 8), hi);
  if (valid == 16 && !g.acc_out && !(g.out_q.y && g.clamp_hi)) {
    float rs = g.row_scale ? g.row_scale[m] : g.row_scale0;
    for (int h = 0; h < 2; ++h) {
      __m256i sv = _mm256_load_si256((const __m256i*)(s + 8 * h));
      __m256i cs = _mm256_loadu_si256((const __m256i*)(g.colsum + n0 + 8 * h));
      __m256i a = _mm256_sub_epi32(sv, _mm256_mullo_epi32(_mm256_set1_epi32(g.offset), cs));
      if (g.bias_q) a = _mm256_add_epi32(a, _mm256_loadu_si256((const __m256i*)(g.bias_q + n0 + 8 * h)));
      __m256 scale = _mm256_mul_ps(_mm256_set1_ps(rs), _mm256_loadu_ps(g.col_scale + n0 + 8 * h));
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(a), scale);
      if (g.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(g.bias + n0 + 8 * h));
      if (g.clamp_hi)  // (float output here: with codes out a fused clamp takes the scalar path)
        v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_loadu_ps(g.clamp_hi + n0 + 8 * h));
      if (g.out_q.y) requantize_store_avx2(v, g.out_q, g.out_q.y + m * g.ldy + n0 + 8 * h);
      else _mm256_storeu_ps(g.y + m * g.ldy + n0 + 8 * h, v);
    }
    return;
  }
  epilogue_scalar(g, m, n0, s, valid);
}

template <int MR>
AVX2_TARGET void tile_avx2(const GemmArgs& g, int64_t m0, int64_t nb) {
  const int64_t K4 = g.Kp / 4;
  __m256i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_si256();
  const uint8_t* a = g.a + m0 * g.lda;
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const int8_t* w = wblock(g, nb, k4);
    __m256i av[MR];
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * g.lda + k4 * 4, 4);
      // 4 u8 -> 4 int16 (zero-extended), repeated: [a0 a1 a2 a3] x 4
      __m128i a16 = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(a4));
      av[r] = _mm256_broadcastq_epi64(a16);
    }
    for (int q = 0; q < 4; ++q) {
      // 16 s8 (columns 4q..4q+3 x k0..k3) sign-extended to int16; vpmaddwd: exact int32 pair sums
      __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + q * 16)));
      for (int r = 0; r < MR; ++r) acc[r][q] = _mm256_add_epi32(acc[r][q], _mm256_madd_epi16(w16, av[r]));
    }
  }
  for (int r = 0; r < MR; ++r)
    finish_block_avx2(g, m0 + r, nb * 16, acc[r], (int)std::min<int64_t>(16, g.N - nb * 16));
}

AVX2_TARGET void gemm_avx2(const GemmArgs& g, int64_t nb_lo, int64_t nb_hi, int64_t m_lo, int64_t m_hi) {
  constexpr int64_t MR = 2;
  int64_t mc = std::max<int64_t>(MR, ((256 * 1024) / std::max<int64_t>(g.Kp, 1)) / MR * MR);
  for (int64_t mb = m_lo; mb < m_hi; mb += mc) {
    int64_t me = std::min(m_hi, mb + mc);
    for (int64_t nb = nb_lo; nb < nb_hi; ++nb)
      for (int64_t m = mb; m < me; m += MR) {
        if (me - m >= 2) tile_avx2<2>(g, m, nb);
        else tile_avx2<1>(g, m, nb);
      }
  }
}

// ------------------------------------------------------------------------------------------------ dispatch
int best_isa() {
  static int isa = has_avx512vnni() ? ISA_AVX512VNNI : (has_avx2() ? ISA_AVX2 : ISA_SCALAR);
  return isa;
}

int check_isa(int isa) {
  if (isa < 0) return best_isa();
  if (isa == ISA_AVX512VNNI && !has_avx512vnni()) throw std::invalid_argument("this CPU lacks AVX-512 VNNI");
  if (isa == ISA_AVX2 && !has_avx2()) throw std::invalid_argument("this CPU lacks AVX2");
  return isa;
}

int threads_for(int64_t macs, int64_t blocks, int nthreads) {
  // Below ~1M multiply-adds a thread hand-off costs more than it saves.
  int t = macs < (1 << 20) ? 1 : nthreads;
  return (int)std::max<int64_t>(1, std::min<int64_t>(t, blocks));
}

void gemm_part(const GemmArgs& g, int isa, int64_t nb_lo, int64_t nb_hi, int64_t m_lo, int64_t m_hi) {
  if (nb_lo >= nb_hi || m_lo >= m_hi) return;
  if (isa == ISA_AVX512VNNI) {
    // a GEMV (one row) streams its weights once: the tiled kernel's prefetching path
    if (m_hi - m_lo > 1 && smallk_dispatch(g, nb_lo, nb_hi, m_lo, m_hi)) return;
    gemm_vnni(g, nb_lo / TILE_BLOCKS, (nb_hi + TILE_BLOCKS - 1) / TILE_BLOCKS, m_lo, m_hi);
  } else if (isa == ISA_AVX2) {
    gemm_avx2(g, nb_lo, nb_hi, m_lo, m_hi);
  } else {
    gemm_scalar(g, nb_lo, nb_hi, m_lo, m_hi);
  }
}

// Threads own whole 64-column tiles (each weight byte read by one thread: decode, large N), or, when the tiles are
// too few to share evenly (a conv's tall-thin GEMM: M = pixels, N = channels), row ranges that read all of the
// (small) weights.
inline bool split_by_rows(int64_t tiles, int64_t row_units, int nthreads) {
  return tiles < 4 * (int64_t)nthreads && row_units >= 4 * (int64_t)nthreads;
}

void gemm(const GemmArgs& args, int isa, int nthreads) {
  GemmArgs g = args;
  int64_t NB = (g.N + 15) / 16;
  std::unique_ptr<EpilogueConsts> consts;  // (a kernel program gives them: worked out once, when it was built)
  if (isa == ISA_AVX512VNNI && !g.off_colsum) consts = std::make_unique<EpilogueConsts>(g, padded_columns(g.N));
  const int64_t unit = TILE_BLOCKS;
  int64_t units = (NB + unit - 1) / unit;  // 64-column tiles
  constexpr int64_t ROW_UNIT = 4;          // rows per share when threads split M (one register tile)
  int64_t row_units = (g.M + ROW_UNIT - 1) / ROW_UNIT;
  bool by_rows = split_by_rows(units, row_units, nthreads);
  int t = threads_for(g.M * g.N * g.Kp, by_rows ? row_units : units, nthreads);
  NoGil nogil;
  // Chunks down to 1/64 of an equal share: the last chunk one thread runs while the other has none left is the
  // imbalance (512 x 4096 x 4096 on 2 threads: 4-tile chunks of ~2.7 ms, 21.76 -> 20.63 ms with 1-tile chunks;
  // 4096 x 11008 M = 1 and 4096 x 4096 M = 32 0.96-0.97x the time, small GEMMs and MobileNetV2 unchanged; measured).
  run_claimed(t, by_rows ? row_units : units, 64, [&](int, int64_t lo, int64_t hi) {
    if (by_rows) gemm_part(g, isa, 0, NB, lo * ROW_UNIT, std::min(g.M, hi * ROW_UNIT));
    else gemm_part(g, isa, lo * unit, std::min(NB, hi * unit), 0, g.M);
  });
}

// ------------------------------------------------------------------------------------------------ quantize
// Dynamic per-row symmetric int8, stored as u8 = q + 128. The rule of octoquant.qparams.symmetric_scale:
// scale = absmax / 127 (float32 division), floored at FLT_MIN, and 1.0 for an all-zero row;
// q = clamp(round_half_even(x / scale), -128, 127).
float row_scale_from_absmax(float absmax) {
  if (absmax == 0.0f) return 1.0f;
  float s = absmax / 127.0f;
  return s < 1.17549435e-38f ? 1.17549435e-38f : s;
}

inline uint8_t q_u8(float x, float scale, int32_t zp, int32_t qmin, int32_t qmax, int32_t shift) {
  float r = std::nearbyint(x / scale);  // default rounding mode: to nearest, ties to even
  float lo = (float)(qmin - zp), hi = (float)(qmax - zp);
  r = r < lo ? lo : (r > hi ? hi : r);
  return (uint8_t)((int32_t)r + zp + shift);
}

VNNI_TARGET void quantize_row_dynamic_avx512(const float* x, int64_t K, uint8_t* out, float* scale_out) {
  __m512 mx = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float absmax = _mm512_reduce_max_ps(mx);
  for (; k < K; ++k) absmax = std::max(absmax, std::fabs(x[k]));
  float s = row_scale_from_absmax(absmax);
  *scale_out = s;
  __m512 sv = _mm512_set1_ps(s);
  __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  __m512i off = _mm512_set1_epi32(128);
  k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(r), off);
    _mm_storeu_si128((__m128i*)(out + k), _mm512_cvtepi32_epi8(q));
  }
  for (; k < K; ++k) out[k] = q_u8(x[k], s, 0, -128, 127, 128);
}

AVX2_TARGET void quantize_row_dynamic_avx2(const float* x, int64_t K, uint8_t* out, float* scale_out) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, mx);
  float absmax = 0.0f;
  for (int i = 0; i < 8; ++i) absmax = std::max(absmax, tmp[i]);
  for (; k < K; ++k) absmax = std::max(absmax, std::fabs(x[k]));
  float s = row_scale_from_absmax(absmax);
  *scale_out = s;
  __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  __m256i off = _mm256_set1_epi32(128);
  k = 0;
  alignas(32) int32_t qi[8];
  for (; k + 8 <= K; k += 8) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
    _mm256_store_si256((__m256i*)qi, _mm256_add_epi32(_mm256_cvtps_epi32(r), off));
    for (int i = 0; i < 8; ++i) out[k + i] = (uint8_t)qi[i];
  }
  for (; k < K; ++k) out[k] = q_u8(x[k], s, 0, -128, 127, 128);
}

void quantize_row_dynamic_scalar(const float* x, int64_t K, uint8_t* out, float* scale_out) {
  float absmax = 0.0f;
  for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::fabs(x[k]));
  float s = row_scale_from_absmax(absmax);
  *scale_out = s;
  for (int64_t k = 0; k < K; ++k) out[k] = q_u8(x[k], s, 0, -128, 127, 128);
}

// Static: u8 = clamp(round_half_even(x / scale) + zp, qmin, qmax) + shift, the reference's rule
// (clamping r to [qmin - zp, qmax - zp] before adding zp is the same thing in exact integers).
// quantize_static's rule on 16 lanes: constants once per loop, the codes of v stored at out
struct Quant16 {
  __m512 sv, lo, hi;
  __m512i off;
  VNNI_TARGET Quant16(float scale, int32_t zp, int32_t qmin, int32_t qmax, int32_t shift)
      : sv(_mm512_set1_ps(scale)),
        lo(_mm512_set1_ps((float)(qmin - zp))),
        hi(_mm512_set1_ps((float)(qmax - zp))),
        off(_mm512_set1_epi32(zp + shift)) {}
  VNNI_TARGET void store(__m512 v, uint8_t* out) const {
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    _mm_storeu_si128((__m128i*)out, _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(r), off)));
  }
};

VNNI_TARGET void quantize_static_avx512(const float* x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax,
                                        int32_t shift, uint8_t* out) {
  const Quant16 q(scale, zp, qmin, qmax, shift);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) q.store(_mm512_loadu_ps(x + i), out + i);
  for (; i < n; ++i) out[i] = q_u8(x[i], scale, zp, qmin, qmax, shift);
}

AVX2_TARGET void quantize_static_avx2(const float* x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax,
                                      int32_t shift, uint8_t* out) {
  __m256 sv = _mm256_set1_ps(scale);
  __m256 lo = _mm256_set1_ps((float)(qmin - zp)), hi = _mm256_set1_ps((float)(qmax - zp));
  __m256i off = _mm256_set1_epi32(zp + shift);
  alignas(32) int32_t qi[8];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
    _mm256_store_si256((__m256i*)qi, _mm256_add_epi32(_mm256_cvtps_epi32(r), off));
    for (int j = 0; j < 8; ++j) out[i + j] = (uint8_t)qi[j];
  }
  for (; i < n; ++i) out[i] = q_u8(x[i], scale, zp, qmin, qmax, shift);
}

// quantize_static on the best ISA given
inline void quantize_static_any(const float* x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax,
                                int32_t shift, uint8_t* out, int isa) {
  if (isa == ISA_AVX512VNNI) quantize_static_avx512(x, n, scale, zp, qmin, qmax, shift, out);
  else if (isa == ISA_AVX2) quantize_static_avx2(x, n, scale, zp, qmin, qmax, shift, out);
  else for (int64_t j = 0; j < n; ++j) out[j] = q_u8(x[j], scale, zp, qmin, qmax, shift);
}

// Thread i's share [lo, hi) of n elements in whole 64-element blocks (the last thread takes the rest)
inline void split64(int64_t n, int t, int i, int64_t* lo, int64_t* hi) {
  split(n / 64, t, i, lo, hi);
  *lo *= 64;
  *hi = (i == t - 1) ? n : *hi * 64;
}

// The 3-channel interleave of an image input: planes r, g, b (n bytes each) -> dst (3n bytes, r0 g0 b0 r1 ...), 16
// pixels (48 bytes) per step with byte shuffles (a byte-by-byte loop was 3/4 of the input quantization's time).
struct Interleave3Masks {
  alignas(16) int8_t m[3][3][16];  // [output chunk][plane][byte]: the plane's byte for that position, or -1 (zero)
  Interleave3Masks() {
    for (int t = 0; t < 3; ++t)
      for (int c = 0; c < 3; ++c)
        for (int i = 0; i < 16; ++i) {
          int j = 16 * t + i;
          m[t][c][i] = (int8_t)(j % 3 == c ? j / 3 : -1);
        }
  }
};

AVX2_TARGET void interleave3_avx2(const uint8_t* r, const uint8_t* g, const uint8_t* b, uint8_t* dst, int64_t n) {
  static const Interleave3Masks masks;
  int64_t p = 0;
  for (; p + 16 <= n; p += 16) {
    const __m128i v[3] = {_mm_loadu_si128((const __m128i*)(r + p)), _mm_loadu_si128((const __m128i*)(g + p)),
                          _mm_loadu_si128((const __m128i*)(b + p))};
    for (int t = 0; t < 3; ++t) {
      __m128i o = _mm_shuffle_epi8(v[0], _mm_load_si128((const __m128i*)masks.m[t][0]));
      o = _mm_or_si128(o, _mm_shuffle_epi8(v[1], _mm_load_si128((const __m128i*)masks.m[t][1])));
      o = _mm_or_si128(o, _mm_shuffle_epi8(v[2], _mm_load_si128((const __m128i*)masks.m[t][2])));
      _mm_storeu_si128((__m128i*)(dst + 3 * p + 16 * t), o);
    }
  }
  for (; p < n; ++p) {
    dst[3 * p] = r[p];
    dst[3 * p + 1] = g[p];
    dst[3 * p + 2] = b[p];
  }
}

// NCHW float -> NHWC u8 codes in one pass (the layout change of a network's input, fused with its
// quantization: no float NHWC copy). Per image, blocks of 64 pixels: each channel's 64 contiguous values are
// quantized as quantize_static does, then interleaved. Pixels [p_lo, p_hi) of image n.
void quantize_nchw_block(const float* x, int64_t C, int64_t HW, int64_t n, int64_t p_lo, int64_t p_hi, float scale,
                         int32_t zp, int32_t qmin, int32_t qmax, int32_t shift, uint8_t* out, int isa,
                         uint8_t* tmp /* C * 64 */) {
  for (int64_t p0 = p_lo; p0 < p_hi; p0 += 64) {
    const int64_t np = std::min<int64_t>(64, p_hi - p0);
    for (int64_t c = 0; c < C; ++c) {
      const float* src = x + (n * C + c) * HW + p0;
      if (isa == ISA_AVX512VNNI) quantize_static_avx512(src, np, scale, zp, qmin, qmax, shift, tmp + c * 64);
      else if (isa == ISA_AVX2) quantize_static_avx2(src, np, scale, zp, qmin, qmax, shift, tmp + c * 64);
      else for (int64_t j = 0; j < np; ++j) tmp[c * 64 + j] = q_u8(src[j], scale, zp, qmin, qmax, shift);
    }
    uint8_t* dst = out + (n * HW + p0) * C;
    if (C == 3 && isa != ISA_SCALAR) {
      interleave3_avx2(tmp, tmp + 64, tmp + 128, dst, np);
      continue;
    }
    for (int64_t j = 0; j < np; ++j)
      for (int64_t c = 0; c < C; ++c) dst[j * C + c] = tmp[c * 64 + j];
  }
}

// ------------------------------------------------------------------------------------------------ W8A16
// Weight-only: float activations x (M, K) times int8 weights packed [NB][K][16], per-group scales
// packed [NB][G][16]: y[m,n] = sum_g scale[n,g] * sum_{k in g} x[m,k] * w[n,k]  (+ bias[n]).
// U independent accumulator chains per row (FMA latency 4, throughput 2/cycle: MR * U >= 4 keeps the FMA
// units busy); 4 k per step from one 64-byte load.
template <int MR>
VNNI_TARGET void wo_tile_avx512(const float* x, int64_t ldx, const int8_t* w, const float* sc, const float* bias,
                                float* y, int64_t ldy, int64_t K, int64_t gs, int64_t n0, int64_t N) {
  constexpr int U = MR >= 4 ? 1 : (MR >= 2 ? 2 : 4);
  __m512 out[MR];
  for (int r = 0; r < MR; ++r) out[r] = _mm512_setzero_ps();
  int64_t G = K / gs;
  for (int64_t gi = 0; gi < G; ++gi) {
    __m512 part[MR][U];
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < U; ++u) part[r][u] = _mm512_setzero_ps();
    int64_t k = gi * gs, ke = (gi + 1) * gs;
    for (; k + 4 <= ke; k += 4) {
      _mm_prefetch((const char*)(w + k * 16 + 8192), _MM_HINT_T0);  // 8 KiB ahead
      __m512i w64 = _mm512_loadu_si512((const void*)(w + k * 16));  // 4 k x 16 columns
      __m512 wv[4];
      wv[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(w64)));
      wv[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(w64, 1)));
      wv[2] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(w64, 2)));
      wv[3] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(w64, 3)));
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < 4; ++j)
          part[r][j % U] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k + j]), wv[j], part[r][j % U]);
    }
    for (; k < ke; ++k) {
      __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k * 16))));
      for (int r = 0; r < MR; ++r) part[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), wv, part[r][0]);
    }
    __m512 s = _mm512_loadu_ps(sc + gi * 16);
    for (int r = 0; r < MR; ++r) {
      __m512 p = part[r][0];
      for (int u = 1; u < U; ++u) p = _mm512_add_ps(p, part[r][u]);
      out[r] = _mm512_fmadd_ps(p, s, out[r]);
    }
  }
  int valid = (int)std::min<int64_t>(16, N - n0);
  __mmask16 mask = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
  __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy + n0, mask, _mm512_add_ps(out[r], b));
}

template <int MR>
AVX2_TARGET void wo_tile_avx2(const float* x, int64_t ldx, const int8_t* w, const float* sc, const float* bias,
                              float* y, int64_t ldy, int64_t K, int64_t gs, int64_t n0, int64_t N) {
  constexpr int U = MR >= 3 ? 1 : 2;  // independent chains per row and half (see the AVX-512 variant)
  __m256 out[MR][2];
  for (int r = 0; r < MR; ++r) out[r][0] = out[r][1] = _mm256_setzero_ps();
  int64_t G = K / gs;
  for (int64_t gi = 0; gi < G; ++gi) {
    __m256 part[MR][2][U];
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < U; ++u) part[r][0][u] = part[r][1][u] = _mm256_setzero_ps();
    for (int64_t k = gi * gs; k < (gi + 1) * gs; ++k) {
      __m128i w16 = _mm_loadu_si128((const __m128i*)(w + k * 16));
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w16));
      __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w16, 8)));
      const int u = (int)(k % U);
      for (int r = 0; r < MR; ++r) {
        __m256 xv = _mm256_set1_ps(x[r * ldx + k]);
        part[r][0][u] = _mm256_fmadd_ps(xv, w0, part[r][0][u]);
        part[r][1][u] = _mm256_fmadd_ps(xv, w1, part[r][1][u]);
      }
    }
    __m256 s0 = _mm256_loadu_ps(sc + gi * 16), s1 = _mm256_loadu_ps(sc + gi * 16 + 8);
    for (int r = 0; r < MR; ++r) {
      __m256 p0 = part[r][0][0], p1 = part[r][1][0];
      for (int u = 1; u < U; ++u) {
        p0 = _mm256_add_ps(p0, part[r][0][u]);
        p1 = _mm256_add_ps(p1, part[r][1][u]);
      }
      out[r][0] = _mm256_fmadd_ps(p0, s0, out[r][0]);
      out[r][1] = _mm256_fmadd_ps(p1, s1, out[r][1]);
    }
  }
  alignas(32) float tmp[16];
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(tmp, out[r][0]);
    _mm256_store_ps(tmp + 8, out[r][1]);
    for (int j = 0; j < 16 && n0 + j < N; ++j) y[r * ldy + n0 + j] = tmp[j] + (bias ? bias[n0 + j] : 0.0f);
  }
}

void wo_block_scalar(const float* x, int64_t ldx, int64_t mr, const int8_t* w, const float* sc, const float* bias,
                     float* y, int64_t ldy, int64_t K, int64_t gs, int64_t n0, int64_t N) {
  for (int64_t r = 0; r < mr; ++r)
    for (int j = 0; j < 16 && n0 + j < N; ++j) {
      float o = 0.0f;
      for (int64_t gi = 0; gi < K / gs; ++gi) {
        float p = 0.0f;
        for (int64_t k = gi * gs; k < (gi + 1) * gs; ++k) p += x[r * ldx + k] * (float)w[k * 16 + j];
        o += p * sc[gi * 16 + j];
      }
      y[r * ldy + n0 + j] = o + (bias ? bias[n0 + j] : 0.0f);
    }
}

// ------------------------------------------------------------------------------------------------ depthwise
// Depthwise conv on NHWC u8 input (N, H, W, C); weights (kh, kw, C) as 32-bit lanes holding the int8 weight
// as int16 in the low half and 0 in the high half (packed once). x - offset (in [-255, 255]) as int32 has its
// value in the low int16 half, so a 16-bit pair multiply-add (vpmaddwd / vpdpwssd) gives lo * w + hi * 0, the
// exact product, in one cheap instruction instead of a 32-bit multiply. Taps outside the image read the zero-point, whose (x - offset) is 0: they are skipped, no padded copy.
// acc[c] = sum_taps (x - offset) * w in int32: exact (|acc| <= taps * 255 * 128). Epilogue as the GEMM's:
// y = float(acc) * (in_scale * col_scale[c]) + bias[c], then the optional fused clamp to [0, clamp_hi[c]].
struct DwArgs {
  const uint8_t* x; int64_t N, H, W, C;
  const int32_t* w; int64_t kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int32_t offset; float in_scale; const float* col_scale; const float* bias; const float* clamp_hi; float* y;
  OutQ out_q;  // out_q.y set: u8 output (N, Ho, Wo, C), requantized
  // Filled by depthwise() for the AVX-512 epilogue (see EpilogueConsts): in_scale * col_scale[c], and the
  // requantized output's bounds with the fused clamp folded in.
  const float* static_scale = nullptr;
  const float* q_lo = nullptr;
  const float* q_hi = nullptr;
  const int32_t* off_wsum = nullptr;  // offset * sum of the channel's weights over all taps
  const int32_t* bias_q = nullptr;    // (C,) int32 bias of the requantization (out_q.y set), or null
  // 3x3, stride 1 or 2, dilation 1 on a CPU with AVX-512 VBMI2 (dw_quads): per kernel row i and channel c the
  // int8 weights (w[i][0], w[i][1], w[i][2], 0) as 4 bytes at wq[(i * C + c) * 4]; null: the other kernels
  const int8_t* wq = nullptr;
  const int32_t* off_bias = nullptr;  // with wq: off_wsum - bias_q
};

struct Taps {  // the in-image taps of one output pixel
  int64_t i0, i1, j0, j1;  // tap index ranges [i0, i1) x [j0, j1)
  int64_t ih0, iw0;        // input coordinates of tap (0, 0)
};

inline Taps taps_of(const DwArgs& a, int64_t ho, int64_t wo) {
  Taps t;
  t.ih0 = ho * a.sh - a.ph;
  t.iw0 = wo * a.sw - a.pw;
  t.i0 = 0; t.i1 = a.kh; t.j0 = 0; t.j1 = a.kw;
  while (t.i0 < t.i1 && t.ih0 + t.i0 * a.dh < 0) ++t.i0;
  while (t.i1 > t.i0 && t.ih0 + (t.i1 - 1) * a.dh >= a.H) --t.i1;
  while (t.j0 < t.j1 && t.iw0 + t.j0 * a.dw < 0) ++t.j0;
  while (t.j1 > t.j0 && t.iw0 + (t.j1 - 1) * a.dw >= a.W) --t.j1;
  return t;
}

// `pix` is the output pixel's index: its C results go to y + pix * C (float) or out_q.y + pix * C (u8).
inline void dw_pixel_scalar(const DwArgs& a, const uint8_t* img, const Taps& t, int64_t pix, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    int32_t acc = 0;
    for (int64_t i = t.i0; i < t.i1; ++i)
      for (int64_t j = t.j0; j < t.j1; ++j)
        acc += ((int32_t)img[((t.ih0 + i * a.dh) * a.W + t.iw0 + j * a.dw) * a.C + c] - a.offset) *
               (int32_t)(int16_t)a.w[(i * a.kw + j) * a.C + c];
    if (a.bias_q) acc = add_wrap(acc, a.bias_q[c]);
    volatile float cs = a.in_scale * a.col_scale[c];
    float v = (float)acc * cs;
    if (a.bias) v = v + a.bias[c];
    if (a.out_q.y) {
      a.out_q.y[pix * a.C + c] = requantize_scalar(v, a.out_q, a.clamp_hi ? a.clamp_hi + c : nullptr);
    } else {
      if (a.clamp_hi) v = std::min(std::max(v, 0.0f), a.clamp_hi[c]);
      a.y[pix * a.C + c] = v;
    }
  }
}

// With the per-channel constants of EpilogueConsts (a.static_scale; a.q_lo / a.q_hi when requantizing).
VNNI_TARGET inline void dw_store_avx512(const DwArgs& a, __m512i acc, int64_t pix, int64_t c) {
  if (a.bias_q) acc = _mm512_add_epi32(acc, _mm512_loadu_si512((const void*)(a.bias_q + c)));
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(a.static_scale + c));
  if (a.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(a.bias + c));
  if (a.out_q.y) {
    __m128i q = requantize_consts_avx512(v, a.out_q, a.q_lo + c, a.q_hi + c);
    _mm_storeu_si128((__m128i*)(a.out_q.y + pix * a.C + c), q);
    return;
  }
  if (a.clamp_hi) v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), _mm512_loadu_ps(a.clamp_hi + c));
  _mm512_storeu_ps(a.y + pix * a.C + c, v);
}

// NB blocks of 16 channels of P adjacent output pixels (same taps, inputs sw * C bytes apart): NB * P
// independent accumulator chains (one chain of 9 dependent vpdpwssd was latency-bound: ~5 cycles each).
template <int NB, int P, bool FULL>
__attribute__((noinline)) VNNI_TARGET void dw_blocks_avx512(const DwArgs& a, const uint8_t* img, const Taps& t,
                                                            int64_t pix, int64_t c) {
  const __m512i off = _mm512_set1_epi32(a.offset);
  const int64_t step = a.sw * a.C;
  __m512i acc[P][NB];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[p][b] = _mm512_setzero_si512();
  for (int64_t i = t.i0; i < t.i1; ++i)
    for (int64_t j = t.j0; j < t.j1; ++j) {
      const uint8_t* px = img + ((t.ih0 + i * a.dh) * a.W + t.iw0 + j * a.dw) * a.C + c;
      const int32_t* wp = a.w + (i * a.kw + j) * a.C + c;
      __m512i wv[NB];
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512((const void*)(wp + 16 * b));
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          __m512i xv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(px + p * step + 16 * b)));
          // all taps in the image: sum x * w here, offset * sum w once below (one operation less per tap)
          acc[p][b] = _mm512_dpwssd_epi32(acc[p][b], FULL ? xv : _mm512_sub_epi32(xv, off), wv[b]);
        }
    }
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < NB; ++b) {
      __m512i v = acc[p][b];
      if (FULL) v = _mm512_sub_epi32(v, _mm512_loadu_si512((const void*)(a.off_wsum + c + 16 * b)));
      dw_store_avx512(a, v, pix + p, c + 16 * b);
    }
}

// 4 interior pixels of a 3-wide kernel at stride 1, dilation 1: the pixels' taps overlap (pixel p's tap j reads
// input column p + j), so each kernel row loads and widens its 6 input columns once instead of 12 taps' worth
// (same products, same int32 sums as dw_blocks_avx512<NB, 4, true>).
template <int NB>
__attribute__((noinline)) VNNI_TARGET void dw_blocks_s1k3_avx512(const DwArgs& a, const uint8_t* img, const Taps& t,
                                                                 int64_t pix, int64_t c) {
  constexpr int P = 4, COLS = P + 2;
  __m512i acc[P][NB];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[p][b] = _mm512_setzero_si512();
  for (int64_t i = 0; i < a.kh; ++i) {
    const uint8_t* row = img + ((t.ih0 + i * a.dh) * a.W + t.iw0) * a.C + c;
    const int32_t* wp = a.w + i * 3 * a.C + c;
    __m512i xv[COLS][NB];
#pragma GCC unroll 8
    for (int q = 0; q < COLS; ++q)
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b)
        xv[q][b] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + q * a.C + 16 * b)));
#pragma GCC unroll 3
    for (int j = 0; j < 3; ++j) {
      __m512i wv[NB];
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512((const void*)(wp + j * a.C + 16 * b));
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) acc[p][b] = _mm512_dpwssd_epi32(acc[p][b], xv[p + j][b], wv[b]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < NB; ++b)
      dw_store_avx512(a, _mm512_sub_epi32(acc[p][b], _mm512_loadu_si512((const void*)(a.off_wsum + c + 16 * b))),
                      pix + p, c + 16 * b);
}

// NB blocks of 16 channels of P pixels: the row-sharing kernel where SHARED (4 interior pixels, 3 wide, stride 1)
template <int NB, int P, bool FULL, bool SHARED>
VNNI_TARGET inline void dw_block_avx512(const DwArgs& a, const uint8_t* img, const Taps& t, int64_t pix, int64_t c) {
  if constexpr (SHARED) dw_blocks_s1k3_avx512<NB>(a, img, t, pix, c);
  else dw_blocks_avx512<NB, P, FULL>(a, img, t, pix, c);
}

// P pixels (P = 1, or 4 interior pixels sharing the full tap set, SHARED: also the input columns of each kernel
// row): whole 16-channel blocks, then the scalar tail.
template <int P, bool FULL, bool SHARED = false>
VNNI_TARGET void dw_pixels_avx512(const DwArgs& a, const uint8_t* img, const Taps& t, int64_t pix) {
  static_assert(!SHARED || (P == 4 && FULL), "row sharing: 4 interior pixels");
  int64_t c = 0;
  if (P == 1) {
    for (; c + 64 <= a.C; c += 64) dw_blocks_avx512<4, 1, FULL>(a, img, t, pix, c);
  } else {
    for (; c + 32 <= a.C; c += 32) dw_block_avx512<2, P, FULL, SHARED>(a, img, t, pix, c);
  }
  if (c + 32 <= a.C) {
    dw_block_avx512<2, P, FULL, SHARED>(a, img, t, pix, c);
    c += 32;
  }
  if (c + 16 <= a.C) {
    dw_block_avx512<1, P, FULL, SHARED>(a, img, t, pix, c);
    c += 16;
  }
  if (c < a.C) {
    Taps tp = t;
    for (int p = 0; p < P; ++p, tp.iw0 += a.sw) dw_pixel_scalar(a, img, tp, pix + p, c, a.C);
  }
}

AVX2_TARGET void dw_pixel_avx2(const DwArgs& a, const uint8_t* img, const Taps& t, int64_t pix) {
  int64_t c = 0;
  if (a.out_q.y && a.clamp_hi) {  // codes with a fused clamp: the scalar path's per-channel bounds
    dw_pixel_scalar(a, img, t, pix, 0, a.C);
    return;
  }
  __m256i off = _mm256_set1_epi32(a.offset);
  __m256 rs = _mm256_set1_ps(a.in_scale);
  for (; c + 8 <= a.C; c += 8) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t i = t.i0; i < t.i1; ++i)
      for (int64_t j = t.j0; j < t.j1; ++j) {
        const uint8_t* px = img + ((t.ih0 + i * a.dh) * a.W + t.iw0 + j * a.dw) * a.C + c;
        __m256i xv = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)px));
        __m256i wv = _mm256_loadu_si256((const __m256i*)(a.w + (i * a.kw + j) * a.C + c));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_sub_epi32(xv, off), wv));
      }
    if (a.bias_q) acc = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i*)(a.bias_q + c)));
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(rs, _mm256_loadu_ps(a.col_scale + c)));
    if (a.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(a.bias + c));
    if (a.clamp_hi) v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_loadu_ps(a.clamp_hi + c));
    if (a.out_q.y) requantize_store_avx2(v, a.out_q, a.out_q.y + pix * a.C + c);
    else _mm256_storeu_ps(a.y + pix * a.C + c, v);
  }
  dw_pixel_scalar(a, img, t, pix, c, a.C);
}

// ------------------------------------------------------------- 3x3 depthwise (stride 1 or 2) on column quads
// vpdpbusd multiplies 4 u8 by 4 s8 and adds the 4 products into one int32 lane: with a lane holding 3 adjacent
// input columns of one channel (and a 4th byte whose weight is 0) one instruction does a kernel row's 3 taps of
// 16 channels, a third of the vpdpwssd of the per-tap kernels. Input rows are first rearranged into column quads
// (dw_quad_row: the 4 bytes of columns o + 4g .. o + 4g + 3 of each channel in one dword); the windows of 4
// adjacent output pixels are then quad g itself and its funnel shifts with the neighbouring quads (stride 2: two
// pixels per quad, the quad and its shift by 2 columns). Columns and
// rows outside the image hold the zero-point code, so every pixel, border or not, is sum(x * w) - offset * sum(w):
// the same int32 as the other kernels' sum over the in-image taps of (x - offset) * w.
#define VBMI2_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx512vbmi2,fma")))

inline bool dw_quads_case(const DwArgs& a) {
  return a.kh == 3 && a.kw == 3 && (a.sh == 1 || a.sh == 2) && (a.sw == 1 || a.sw == 2) && a.dh == 1 &&
         a.dw == 1 && a.C >= 16;
}

// Input row ih of image img as quads g = -1 .. G (at dst + (g + 1) * 4C): quad g holds columns o + 4g .. + 3.
// Stride 1, o = 1 - pw: the windows of output pixels 4g .. 4g + 3 come from quad g and its neighbours; stride 2,
// o = -pw: those of pixels 2g and 2g + 1.
VBMI2_TARGET void dw_quad_row(const DwArgs& a, const uint8_t* img, int64_t ih, int64_t G, uint8_t* dst) {
  const int64_t C = a.C, o = a.sw == 1 ? 1 - a.pw : -a.pw;
  const uint8_t zp = (uint8_t)a.offset;
  if (ih < 0 || ih >= a.H) {
    std::memset(dst, zp, (size_t)((G + 2) * C * 4));
    return;
  }
  const uint8_t* row = img + ih * a.W * C;
  const __m128i zv = _mm_set1_epi8((char)zp);
  const __m512i zw = _mm512_set1_epi8((char)zp);
  const int64_t C16 = C / 16 * 16;
  for (int64_t g = -1; g <= G; ++g) {
    uint8_t* d = dst + (g + 1) * C * 4;
    const uint8_t* src[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t col = o + 4 * g + k;
      src[k] = col >= 0 && col < a.W ? row + col * C : nullptr;
    }
    int64_t c = 0;
    for (; c + 64 <= C; c += 64) {  // the same transpose per 128-bit lane, then the lanes put in channel order
      __m512i p[4];
      for (int k = 0; k < 4; ++k) p[k] = src[k] ? _mm512_loadu_si512((const void*)(src[k] + c)) : zw;
      const __m512i t0 = _mm512_unpacklo_epi8(p[0], p[1]), t1 = _mm512_unpackhi_epi8(p[0], p[1]);
      const __m512i t2 = _mm512_unpacklo_epi8(p[2], p[3]), t3 = _mm512_unpackhi_epi8(p[2], p[3]);
      // z[j] lane L: channels 16 L + 4 j .. + 3
      const __m512i z0 = _mm512_unpacklo_epi16(t0, t2), z1 = _mm512_unpackhi_epi16(t0, t2);
      const __m512i z2 = _mm512_unpacklo_epi16(t1, t3), z3 = _mm512_unpackhi_epi16(t1, t3);
      const __m512i u0 = _mm512_shuffle_i64x2(z0, z1, 0x44), u1 = _mm512_shuffle_i64x2(z2, z3, 0x44);
      const __m512i u2 = _mm512_shuffle_i64x2(z0, z1, 0xEE), u3 = _mm512_shuffle_i64x2(z2, z3, 0xEE);
      _mm512_storeu_si512((void*)(d + c * 4), _mm512_shuffle_i64x2(u0, u1, 0x88));
      _mm512_storeu_si512((void*)(d + c * 4 + 64), _mm512_shuffle_i64x2(u0, u1, 0xDD));
      _mm512_storeu_si512((void*)(d + c * 4 + 128), _mm512_shuffle_i64x2(u2, u3, 0x88));
      _mm512_storeu_si512((void*)(d + c * 4 + 192), _mm512_shuffle_i64x2(u2, u3, 0xDD));
    }
    for (; c < C16; c += 16) {
      __m128i p[4];
      for (int k = 0; k < 4; ++k) p[k] = src[k] ? _mm_loadu_si128((const __m128i*)(src[k] + c)) : zv;
      // a 4 x 16 byte transpose: bytes of columns 0..3 of channel c + j at 4 j
      const __m128i t0 = _mm_unpacklo_epi8(p[0], p[1]), t1 = _mm_unpackhi_epi8(p[0], p[1]);
      const __m128i t2 = _mm_unpacklo_epi8(p[2], p[3]), t3 = _mm_unpackhi_epi8(p[2], p[3]);
      _mm_storeu_si128((__m128i*)(d + c * 4), _mm_unpacklo_epi16(t0, t2));
      _mm_storeu_si128((__m128i*)(d + c * 4 + 16), _mm_unpackhi_epi16(t0, t2));
      _mm_storeu_si128((__m128i*)(d + c * 4 + 32), _mm_unpacklo_epi16(t1, t3));
      _mm_storeu_si128((__m128i*)(d + c * 4 + 48), _mm_unpackhi_epi16(t1, t3));
    }
    for (; c < C; ++c)
      for (int k = 0; k < 4; ++k) d[c * 4 + k] = src[k] ? src[k][c] : zp;
  }
}

// dw_quad_blocks' epilogue arguments as values of their own: a byte store may alias any memory, so fields read
// through a DwArgs reference were reloaded after every output store (measured: most of the kernel's time).
struct QuadEpilogue {
  const int32_t* ofs;  // offset * sum(w) - bias_q (DwConsts::off_bias)
  const float* scale;  // in_scale * col_scale
  const float* lo;     // codes: the bounds of round(v)
  const float* hi;
  const float* bias;   // float output: bias, fused clamp (or null)
  const float* clamp;
  uint8_t* codes;      // codes (N, Ho, Wo, C), or null: float y
  float* y;
  int32_t add;
  int64_t C;
};

// dw_store_avx512's operations for 4 pixels' accumulators of dw_quad_blocks (bias_q joined to offset * sum(w):
// int32 sums wrap alike in either order), the pixels [0, np) stored
template <int NB, bool CODES>
VBMI2_TARGET inline void dw_quad_store(const QuadEpilogue& e, __m512i (&acc)[4][NB], int64_t pix, int np, int64_t c) {
  __m512i ofs[NB];
  __m512 sc[NB], lo[NB], hi[NB];
#pragma GCC unroll 2
  for (int b = 0; b < NB; ++b) {
    ofs[b] = _mm512_loadu_si512((const void*)(e.ofs + c + 16 * b));
    sc[b] = _mm512_loadu_ps(e.scale + c + 16 * b);
    if (CODES) {
      lo[b] = _mm512_loadu_ps(e.lo + c + 16 * b);
      hi[b] = _mm512_loadu_ps(e.hi + c + 16 * b);
    } else {
      lo[b] = e.bias ? _mm512_loadu_ps(e.bias + c + 16 * b) : _mm512_setzero_ps();
      hi[b] = e.clamp ? _mm512_loadu_ps(e.clamp + c + 16 * b) : _mm512_setzero_ps();
    }
  }
  const __m512i add = _mm512_set1_epi32(e.add);
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    if (p >= np) break;
#pragma GCC unroll 2
    for (int b = 0; b < NB; ++b) {
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[p][b], ofs[b])), sc[b]);
      const int64_t at = (pix + p) * e.C + c + 16 * b;
      if (CODES) {
        __m512 r = _mm512_min_ps(_mm512_max_ps(v, lo[b]), hi[b]);
        __m512i iv = _mm512_cvt_roundps_epi32(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i*)(e.codes + at), _mm512_cvtepi32_epi8(_mm512_add_epi32(iv, add)));
      } else {
        if (e.bias) v = _mm512_add_ps(v, lo[b]);
        if (e.clamp) v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), hi[b]);
        _mm512_storeu_ps(e.y + at, v);
      }
    }
  }
}

// Output pixels 4q .. 4q + np - 1 of one output row (the first at index pix), channels [c, c + 16 NB), from the
// quads g0, g0 + 1, g0 + 2 of rows[i], the input row ho * sh - ph + i. Stride 1 (g0 = q - 1): the windows of the 4
// pixels are quad g0 + 1 shifted by -1, 0, 1, 2 columns; stride 2 (g0 = 2q): quads g0 and g0 + 1, each as it is and
// shifted by 2 columns.
template <int S, int NB, bool CODES>
VBMI2_TARGET inline void dw_quad_blocks(const QuadEpilogue e, const int8_t* wq, uint8_t* const* rows, int64_t g0,
                                        int64_t pix, int np, int64_t c) {
  const int64_t C4 = e.C * 4;
  __m512i acc[4][NB];
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p)
#pragma GCC unroll 2
    for (int b = 0; b < NB; ++b) acc[p][b] = _mm512_setzero_si512();
#pragma GCC unroll 3
  for (int i = 0; i < 3; ++i) {
    const uint8_t* r = rows[i] + (g0 + 1) * C4 + c * 4;  // (quad g at (g + 1) * 4C: g = -1 is the first)
#pragma GCC unroll 2
    for (int b = 0; b < NB; ++b) {
      const __m512i q0 = _mm512_loadu_si512((const void*)(r + 64 * b));
      const __m512i q1 = _mm512_loadu_si512((const void*)(r + C4 + 64 * b));
      const __m512i q2 = _mm512_loadu_si512((const void*)(r + 2 * C4 + 64 * b));
      const __m512i w = _mm512_loadu_si512((const void*)(wq + (i * e.C + c + 16 * b) * 4));
      if constexpr (S == 1) {
        acc[0][b] = _mm512_dpbusd_epi32(acc[0][b], _mm512_shldi_epi32(q1, q0, 8), w);   // columns -1, 0, 1
        acc[1][b] = _mm512_dpbusd_epi32(acc[1][b], q1, w);                              // 0, 1, 2
        acc[2][b] = _mm512_dpbusd_epi32(acc[2][b], _mm512_shrdi_epi32(q1, q2, 8), w);   // 1, 2, 3
        acc[3][b] = _mm512_dpbusd_epi32(acc[3][b], _mm512_shrdi_epi32(q1, q2, 16), w);  // 2, 3, 4
      } else {
        acc[0][b] = _mm512_dpbusd_epi32(acc[0][b], q0, w);
        acc[1][b] = _mm512_dpbusd_epi32(acc[1][b], _mm512_shrdi_epi32(q0, q1, 16), w);
        acc[2][b] = _mm512_dpbusd_epi32(acc[2][b], q1, w);
        acc[3][b] = _mm512_dpbusd_epi32(acc[3][b], _mm512_shrdi_epi32(q1, q2, 16), w);
      }
    }
  }
  dw_quad_store<NB, CODES>(e, acc, pix, np, c);
}

// Work units (output row, pixel quad) [lo, hi): each input row rearranged once per thread and run (3 row slots,
// reused while the output rows move down), then every channel block of each quad.
VBMI2_TARGET void dw_quads(const DwArgs& a, int64_t lo, int64_t hi, int64_t* key) {
  const int64_t Q = (a.Wo + 3) / 4, G = a.sw == 1 ? Q : 2 * Q, row_bytes = (G + 2) * a.C * 4;
  const QuadEpilogue e{a.off_bias, a.static_scale, a.q_lo, a.q_hi, a.bias, a.clamp_hi, a.out_q.y, a.y,
                       a.out_q.add, a.C};
  const bool codes = a.out_q.y != nullptr;
  auto blocks2 = a.sw == 1 ? (codes ? dw_quad_blocks<1, 2, true> : dw_quad_blocks<1, 2, false>)
                           : (codes ? dw_quad_blocks<2, 2, true> : dw_quad_blocks<2, 2, false>);
  auto blocks1 = a.sw == 1 ? (codes ? dw_quad_blocks<1, 1, true> : dw_quad_blocks<1, 1, false>)
                           : (codes ? dw_quad_blocks<2, 1, true> : dw_quad_blocks<2, 1, false>);
  thread_local std::vector<uint8_t> ring;
  if (ring.size() < (size_t)(3 * row_bytes)) ring.resize((size_t)(3 * row_bytes));
  // key: the input row in each of this thread's ring slots (n * H + ih; above / below the image: -2 / -3; none:
  // -1), kept by the caller from one chunk of this call to the next
  for (int64_t u = lo; u < hi;) {
    const int64_t r = u / Q, q0 = u % Q, q1 = std::min(Q, q0 + (hi - u));
    const int64_t n = r / a.Ho, ho = r % a.Ho;
    const uint8_t* img = a.x + n * a.H * a.W * a.C;
    uint8_t* rows[3];
    int64_t ih[3], want[3];
    for (int i = 0; i < 3; ++i) {
      ih[i] = ho * a.sh - a.ph + i;
      want[i] = ih[i] < 0 ? -2 : ih[i] >= a.H ? -3 : n * a.H + ih[i];  // out of the image: one shared key each
    }
    for (int i = 0; i < 3; ++i) {
      int slot = -1;
      for (int s = 0; s < 3; ++s)
        if (key[s] == want[i]) slot = s;
      if (slot < 0) {  // a slot no row of this output row needs
        for (int s = 0; s < 3 && slot < 0; ++s)
          if (key[s] != want[0] && key[s] != want[1] && key[s] != want[2]) slot = s;
        dw_quad_row(a, img, ih[i], G, ring.data() + slot * row_bytes);
        key[slot] = want[i];
      }
      rows[i] = ring.data() + slot * row_bytes;
    }
    const int64_t C32 = a.C / 32 * 32, C16 = a.C / 16 * 16;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t pix = r * a.Wo + 4 * q;
      const int np = (int)std::min<int64_t>(4, a.Wo - 4 * q);
      int64_t c = 0;
      const int64_t at = a.sw == 1 ? q - 1 : 2 * q;  // the kernel's first quad
      for (; c < C32; c += 32) blocks2(e, a.wq, rows, at, pix, np, c);
      if (c < C16) {
        blocks1(e, a.wq, rows, at, pix, np, c);
        c += 16;
      }
      if (c < a.C)
        for (int p = 0; p < np; ++p) dw_pixel_scalar(a, img, taps_of(a, ho, 4 * q + p), pix + p, c, a.C);
    }
    u += q1 - q0;
  }
}

// depthwise()'s per-channel constants (see DwArgs), worked out once per call, or once by a kernel program
struct DwConsts {
  std::vector<float> static_scale, q_lo, q_hi;
  std::vector<int32_t> off_wsum, off_bias;
  std::vector<int8_t> wq;

  DwConsts(DwArgs& a, bool codes) : static_scale((size_t)a.C), off_wsum((size_t)a.C, 0) {
    for (int64_t c = 0; c < a.C; ++c) static_scale[c] = a.in_scale * a.col_scale[c];
    a.static_scale = static_scale.data();
    if (codes) {
      q_lo.resize((size_t)a.C);
      q_hi.resize((size_t)a.C);
      EpilogueConsts::fold_clamp(a.out_q, a.clamp_hi, a.C, q_lo.data(), q_hi.data());
      a.q_lo = q_lo.data();
      a.q_hi = q_hi.data();
    }
    for (int64_t k = 0; k < a.kh * a.kw; ++k)
      for (int64_t c = 0; c < a.C; ++c) off_wsum[c] += (int32_t)(int16_t)a.w[k * a.C + c];
    for (int64_t c = 0; c < a.C; ++c) off_wsum[c] *= a.offset;
    a.off_wsum = off_wsum.data();
    a.wq = nullptr;
    if (dw_quads_case(a) && has_avx512vbmi2() && a.offset >= 0 && a.offset <= 255) {
      wq.assign((size_t)(3 * a.C * 4), 0);
      for (int64_t i = 0; i < 3; ++i)
        for (int64_t j = 0; j < 3; ++j)
          for (int64_t c = 0; c < a.C; ++c) {
            const int32_t v = (int16_t)a.w[(i * 3 + j) * a.C + c];
            if (v < -128 || v > 127) {  // not int8 (vpdpbusd's operand): the per-tap kernels
              wq.clear();
              return;
            }
            wq[(size_t)((i * a.C + c) * 4 + j)] = (int8_t)v;
          }
      a.wq = wq.data();
      off_bias = off_wsum;
      if (a.bias_q)
        for (int64_t c = 0; c < a.C; ++c) off_bias[c] = add_wrap(off_bias[c], -a.bias_q[c]);
      a.off_bias = off_bias.data();
    }
  }
};

void depthwise(const DwArgs& args, int isa, int nthreads) {
  DwArgs a = args;
  std::unique_ptr<DwConsts> consts;  // (a kernel program gives them)
  if (!a.static_scale) consts = std::make_unique<DwConsts>(a, a.out_q.y != nullptr);
  int64_t rows = a.N * a.Ho;
  int t = threads_for(rows * a.Wo * a.C * a.kh * a.kw * 8, rows * a.Wo, nthreads);
  const bool row_sharing = a.kw == 3 && a.sw == 1 && a.dw == 1;  // dw_blocks_s1k3_avx512's case
  NoGil nogil;
  if (isa == ISA_AVX512VNNI && a.wq) {  // (DwConsts set wq only where the CPU has VBMI2)
    const int64_t units = rows * ((a.Wo + 3) / 4);
    // each thread's row slots, kept from one claimed chunk to the next (dw_quads)
    std::vector<std::array<int64_t, 3>> keys((size_t)t, {-1, -1, -1});
    run_claimed(t, units, 4, [&](int i, int64_t lo, int64_t hi) { dw_quads(a, lo, hi, keys[(size_t)i].data()); });
    return;
  }
  // threads claim ranges of output pixels (not of rows: a 7-row map split 4 / 3 left a thread idle 1/8)
  const int64_t pixels = rows * a.Wo;
  run_claimed(t, pixels, 4, [&](int, int64_t lo, int64_t hi) {
    for (int64_t pix = lo; pix < hi; ++pix) {
      const int64_t r = pix / a.Wo, wo = pix % a.Wo, n = r / a.Ho, ho = r % a.Ho;
      const uint8_t* img = a.x + n * a.H * a.W * a.C;
      Taps tp = taps_of(a, ho, wo);
      if (isa == ISA_AVX512VNNI) {
        // 4 interior pixels of this row and range at once (all taps in the image for the first and the last)
        bool full = tp.i0 == 0 && tp.i1 == a.kh && tp.j0 == 0 && tp.j1 == a.kw;
        if (full && wo + 3 < a.Wo && pix + 3 < hi && taps_of(a, ho, wo + 3).j1 == a.kw) {
          if (row_sharing) dw_pixels_avx512<4, true, true>(a, img, tp, pix);
          else dw_pixels_avx512<4, true>(a, img, tp, pix);
          pix += 3;
        } else if (full) {
          dw_pixels_avx512<1, true>(a, img, tp, pix);
        } else {
          dw_pixels_avx512<1, false>(a, img, tp, pix);
        }
      }
      else if (isa == ISA_AVX2) dw_pixel_avx2(a, img, tp, pix);
      else dw_pixel_scalar(a, img, tp, pix, 0, a.C);
    }
  });
}

// Rows of x (M, K; row stride ldx) -> u8 codes (row stride ldo; columns [K, ldo) set to `pad`), threads over rows
// for large inputs. Dynamic: per-row symmetric int8, each row's scale written to scales[m]; static: the rule of
// quantize_static_* with one scale / zero-point.
struct RowQuant {
  bool dynamic;
  float scale;  // static
  int32_t zp, qmin, qmax, shift;
};

void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, uint8_t* out, int64_t ldo, uint8_t pad,
                   const RowQuant& rq, float* scales, int isa, int nthreads) {
  int t = M * K < (1 << 16) ? 1 : (int)std::min<int64_t>(nthreads, M);
  pool().run(t, [&](int i) {
    int64_t lo, hi;
    split(M, t, i, &lo, &hi);
    for (int64_t m = lo; m < hi; ++m) {
      const float* xr = x + m * ldx;
      uint8_t* o = out + m * ldo;
      if (ldo > K) std::memset(o + K, pad, (size_t)(ldo - K));
      if (rq.dynamic) {
        if (isa == ISA_AVX512VNNI) quantize_row_dynamic_avx512(xr, K, o, scales + m);
        else if (isa == ISA_AVX2) quantize_row_dynamic_avx2(xr, K, o, scales + m);
        else quantize_row_dynamic_scalar(xr, K, o, scales + m);
      } else if (isa == ISA_AVX512VNNI) {
        quantize_static_avx512(xr, K, rq.scale, rq.zp, rq.qmin, rq.qmax, rq.shift, o);
      } else if (isa == ISA_AVX2) {
        quantize_static_avx2(xr, K, rq.scale, rq.zp, rq.qmin, rq.qmax, rq.shift, o);
      } else {
        for (int64_t k = 0; k < K; ++k) o[k] = q_u8(xr[k], rq.scale, rq.zp, rq.qmin, rq.qmax, rq.shift);
      }
    }
  });
}

// The fused quantized linear: x (M, K) float rows quantized into this thread's buffer, then the GEMM (a small
// decode layer spent more time in Python between two kernel calls than in the kernels).
void linear_u8s8(const float* x, int64_t ldx, int64_t M, int64_t K, const RowQuant& rq, GemmArgs g, int isa,
                 int nthreads) {
  NoGil nogil;  // once for both kernels (gemm's own then finds it released)
  thread_local std::vector<uint8_t> codes;
  thread_local std::vector<float> scales;
  codes.resize((size_t)(M * g.Kp));
  if (rq.dynamic) {
    scales.resize((size_t)M);
    g.row_scale = scales.data();
  }
  quantize_rows(x, ldx, M, K, codes.data(), g.Kp, (uint8_t)g.offset, rq, scales.data(), isa, nthreads);
  g.a = codes.data();
  g.lda = g.Kp;
  gemm(g, isa, nthreads);
}

// linear_u8s8 of one layer with every argument but the data worked out once, the epilogue's constants included:
// a call passes 4 values instead of 19 (a decode step calls ~200 small layers; at 384 x 1536 the arguments and the
// constants were a third of the kernel call's time).
class LinearPlan {
 public:
  LinearPlan(int64_t K, int64_t N, int64_t Kp, float row_scale0, int32_t zp, int32_t qmin, int32_t qmax,
             int32_t shift, uintptr_t w, uintptr_t colsum, uintptr_t col_scale, uintptr_t bias, int isa)
      : isa_(check_isa(isa)), K_(K), rq_{row_scale0 < 0.0f, row_scale0, zp, qmin, qmax, shift} {
    if (K <= 0 || N <= 0 || Kp < K || Kp % 4) throw std::invalid_argument("LinearPlan: bad shape");
    g_ = GemmArgs{nullptr, Kp, (const int8_t*)w, (const int32_t*)colsum, rq_.dynamic ? 128 : zp + shift, nullptr,
                  rq_.dynamic ? 1.0f : row_scale0, (const float*)col_scale, (const float*)bias, nullptr, nullptr,
                  nullptr, N, 0, N, Kp, OutQ{nullptr, 1.0f, 0.0f, 0.0f, 0}};
    if (isa_ == ISA_AVX512VNNI) consts_ = std::make_unique<EpilogueConsts>(g_, padded_columns(N), false, !rq_.dynamic);
  }
  // x (M, K) float32 rows, y (M, N) float32
  void run(uintptr_t x, int64_t M, uintptr_t y, int nthreads) const {
    if (M < 0) throw std::invalid_argument("LinearPlan: negative row count");
    GemmArgs g = g_;
    g.M = M;
    g.y = (float*)y;
    linear_u8s8((const float*)x, K_, M, K_, rq_, g, isa_, nthreads);
  }

 private:
  int isa_;
  int64_t K_;
  RowQuant rq_;
  GemmArgs g_;
  std::unique_ptr<EpilogueConsts> consts_;
};

// ------------------------------------------------------------------------------------------------ im2col
// NHWC u8 (N, H, W, C) -> cols (N*Ho*Wo, ldc): row = output pixel, columns (i, j, c) for the channels
// [c0, c0 + cg) of tap (i, j); taps outside the image and the columns [kh*kw*cg, ldc) hold `pad` (the
// zero-point, real 0). One pass, no padded copy of the input.
// memcpy for the short runs of im2col (a stem's 3x3x3 patch row is 9 bytes): two overlapping loads and stores
// for 4..16 bytes instead of a library call per run; reads and writes exactly [0, n).
inline void copy_short(uint8_t* dst, const uint8_t* src, int64_t n) {
  if (n >= 8 && n <= 16) {
    uint64_t a, b;
    std::memcpy(&a, src, 8);
    std::memcpy(&b, src + n - 8, 8);
    std::memcpy(dst, &a, 8);
    std::memcpy(dst + n - 8, &b, 8);
  } else if (n >= 4 && n < 8) {
    uint32_t a, b;
    std::memcpy(&a, src, 4);
    std::memcpy(&b, src + n - 4, 4);
    std::memcpy(dst, &a, 4);
    std::memcpy(dst + n - 4, &b, 4);
  } else {
    std::memcpy(dst, src, (size_t)n);
  }
}

// Rows [lo, hi) of im2col. Every size is a by-value parameter: byte stores may alias anything in memory, so
// sizes read through a reference (a lambda's captures) would be reloaded after every store (measured 2x slower).
// Rows [lo, hi) go to cols + (r - row0) * ldc.
void im2col_rows(const uint8_t* x, int64_t H, int64_t W, int64_t C, int64_t c0, int64_t cg, int64_t kh, int64_t kw,
                 int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t Ho, int64_t Wo,
                 uint8_t pad, uint8_t* cols, int64_t ldc, int64_t lo, int64_t hi, int64_t row0) {
  const int64_t K = kh * kw * cg, row = kw * cg;
  const bool runs = dw == 1 && cg == C;  // taps (i, 0..kw) of all channels are adjacent in NHWC memory
  int64_t n = lo / (Ho * Wo), ho = (lo / Wo) % Ho, wo = lo % Wo - 1;  // advanced at the top of each row
  for (int64_t r = lo; r < hi; ++r) {
    if (++wo == Wo) {
      wo = 0;
      if (++ho == Ho) ho = 0, ++n;
    }
    uint8_t* dst = cols + (r - row0) * ldc;
    const int64_t iw0 = wo * sw - pw;
    for (int64_t i = 0; i < kh; ++i, dst += row) {
      const int64_t ih = ho * sh - ph + i * dh;
      if (ih < 0 || ih >= H) {
        std::memset(dst, pad, (size_t)row);
      } else if (runs) {  // the row's in-image taps are one contiguous run of the input: one copy
        const int64_t j0 = std::min<int64_t>(kw, std::max<int64_t>(0, -iw0));
        const int64_t j1 = std::max<int64_t>(j0, std::min<int64_t>(kw, W - iw0));
        if (j0 > 0) std::memset(dst, pad, (size_t)(j0 * cg));
        copy_short(dst + j0 * cg, x + ((n * H + ih) * W + iw0 + j0) * C, (j1 - j0) * cg);
        if (j1 < kw) std::memset(dst + j1 * cg, pad, (size_t)((kw - j1) * cg));
      } else {
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t iw = iw0 + j * dw;
          if (iw < 0 || iw >= W) std::memset(dst + j * cg, pad, (size_t)cg);
          else std::memcpy(dst + j * cg, x + ((n * H + ih) * W + iw) * C + c0, (size_t)cg);
        }
      }
    }
    for (int64_t k = K; k < ldc; ++k) cols[(r - row0) * ldc + k] = pad;  // 0..3 bytes: no library call
  }
}

void im2col(const uint8_t* x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t c0, int64_t cg, int64_t kh,
            int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t Ho, int64_t Wo,
            uint8_t pad, uint8_t* cols, int64_t ldc, int nthreads) {
  int64_t rows = N * Ho * Wo;
  int t = rows * ldc < (1 << 16) ? 1 : (int)std::min<int64_t>(nthreads, rows);
  NoGil nogil;
  pool().run(t, [&](int ti) {
    int64_t lo, hi;
    split(rows, t, ti, &lo, &hi);
    im2col_rows(x, H, W, C, c0, cg, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, pad, cols, ldc, lo, hi, 0);
  });
}

// A convolution's im2col + GEMM. When threads split the rows (a conv's tall-thin GEMM), each thread writes the
// im2col rows of one GEMM row block (<= 256 rows, <= 256 KiB, the block gemm_vnni keeps in L2) into its own buffer
// and multiplies them while they are in cache, instead of writing all N*Ho*Wo rows to memory and reading them back
// (a 3x3 conv's columns are 9x its input). Otherwise (few rows, many column tiles) im2col into `cols`, then gemm.
// c: the 17 im2col arguments (N, H, W, C, c0, cg, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, pad); g.a unused.
void conv_gemm(const uint8_t* x, const int64_t* c, const GemmArgs& args, uint8_t* cols, int isa, int nthreads) {
  GemmArgs g = args;
  const int64_t NB = (g.N + 15) / 16, units = (NB + TILE_BLOCKS - 1) / TILE_BLOCKS;
  constexpr int64_t ROW_UNIT = 4;
  const int64_t row_units = (g.M + ROW_UNIT - 1) / ROW_UNIT;
  if (!split_by_rows(units, row_units, nthreads)) {
    im2col(x, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15],
           (uint8_t)c[16], cols, g.Kp, nthreads);
    g.a = cols;
    gemm(g, isa, nthreads);
    return;
  }
  std::unique_ptr<EpilogueConsts> consts;
  if (isa == ISA_AVX512VNNI && !g.off_colsum) consts = std::make_unique<EpilogueConsts>(g, padded_columns(g.N));
  const int64_t mc = std::min<int64_t>(256, std::max<int64_t>(ROW_UNIT, (256 * 1024 / g.Kp) / ROW_UNIT * ROW_UNIT));
  int t = threads_for(g.M * g.N * g.Kp, row_units, nthreads);
  NoGil nogil;
  run_claimed(t, row_units, 8, [&](int, int64_t lo, int64_t hi) {
    const int64_t m_lo = lo * ROW_UNIT, m_hi = std::min(g.M, hi * ROW_UNIT);
    thread_local std::vector<uint8_t> block;
    block.resize((size_t)(mc * g.Kp));
    for (int64_t m0 = m_lo; m0 < m_hi; m0 += mc) {
      const int64_t m1 = std::min(m_hi, m0 + mc);
      im2col_rows(x, c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15],
                  (uint8_t)c[16], block.data(), g.Kp, m0, m1, m0);
      GemmArgs b = g;  // rows [m0, m1) as a GEMM of their own: A from the block, outputs from row m0 on
      b.a = block.data();
      b.lda = g.Kp;
      b.M = m1 - m0;
      if (g.row_scale) b.row_scale = g.row_scale + m0;
      if (g.y) b.y = g.y + m0 * g.ldy;
      if (g.acc_out) b.acc_out = g.acc_out + m0 * g.ldy;
      if (g.out_q.y) b.out_q.y = g.out_q.y + m0 * g.ldy;
      gemm_part(b, isa, 0, NB, 0, b.M);
    }
  });
}

// Codes out take the requantization's int32 bias, float out the float bias (see OutQ)
void check_requantization(bool codes, const float* bias, const int32_t* bias_q) {
  if (codes ? bias != nullptr : bias_q != nullptr)
    throw std::invalid_argument("requantized output takes the int32 bias (bias_q), float output the float bias");
}

// (u8 address, scale, zero-point, qmin, qmax, shift), or () for float output
OutQ out_q_of(const py::tuple& t) {
  if (t.size() == 0) return OutQ{nullptr, 1.0f, 0.0f, 0.0f, 0};
  if (t.size() != 6) throw std::invalid_argument("out_q: expected (address, scale, zero_point, qmin, qmax, shift)");
  int32_t zp = t[2].cast<int32_t>(), qmin = t[3].cast<int32_t>(), qmax = t[4].cast<int32_t>();
  return OutQ{(uint8_t*)t[0].cast<uintptr_t>(), t[1].cast<float>(), (float)(qmin - zp), (float)(qmax - zp),
              zp + t[5].cast<int32_t>()};
}

// A run of chained convolutions in one call: the steps of CpuBackend.conv_plan for each layer, parsed once;
// only the activation buffers are given per run (buffer 0: the input codes, 1 and 2: the codes handed between
// layers, in turn, 3: the last layer's output, 4: im2col columns). One Python call per chain instead of one per
// layer (at batch 1 the per-layer Python cost more than the convolutions of the small late layers).
struct ChainGroup {
  bool cols;
  int64_t im[17];  // N, H, W, C, c0, cg, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, pad
  GemmArgs g;      // a / y / out_q.y filled per run
  int64_t column;  // byte offset of this group's columns in the output rows
};

struct ChainStep {
  int kind;  // 0: GEMM groups, 1: depthwise, 2: add-and-quantize (a residual add and / or the next layer's codes)
  int src, dst;
  bool codes_out;
  DwArgs dw;
  std::vector<ChainGroup> groups;
  // kind 2: y[dst] = x[src] (+ r[res]) (then ReLU) over n floats; codes[cdst] = quantize(y) with q (cdst < 0: none)
  int res, cdst;
  bool relu;
  int64_t n;
  float scale;
  int32_t zp, qmin, qmax, shift;
};

constexpr int CHAIN_BUFFERS = 8;

OutQ out_q_from(const py::tuple& t) {  // (scale, zero_point, qmin, qmax, shift) or ()
  if (t.size() == 0) return OutQ{nullptr, 1.0f, 0.0f, 0.0f, 0};
  int32_t zp = t[1].cast<int32_t>(), qmin = t[2].cast<int32_t>(), qmax = t[3].cast<int32_t>();
  return OutQ{nullptr, t[0].cast<float>(), (float)(qmin - zp), (float)(qmax - zp), zp + t[4].cast<int32_t>()};
}

class ChainProgram {
 public:
  explicit ChainProgram(const py::list& specs) {
    for (const auto& item : specs) {
      py::tuple sp = item.cast<py::tuple>();
      ChainStep st{};
      std::string kind = sp[0].cast<std::string>();
      st.kind = kind == "dw" ? 1 : (kind == "addq" ? 2 : 0);
      st.src = sp[1].cast<int>();
      st.dst = sp[2].cast<int>();
      if (st.src < 0 || st.src >= CHAIN_BUFFERS || st.dst < 0 || st.dst >= CHAIN_BUFFERS || st.src == st.dst &&
          st.kind != 2)
        throw std::invalid_argument("ChainProgram: bad buffer indices in a step");
      if (st.kind == 2) {  // ("addq", src, dst, res, cdst, n, (scale, zp, qmin, qmax, shift) or (), relu)
        st.res = sp[3].cast<int>();
        st.cdst = sp[4].cast<int>();
        st.n = sp[5].cast<int64_t>();
        st.relu = sp.size() > 7 && sp[7].cast<bool>();
        py::tuple q = sp[6].cast<py::tuple>();
        if (st.res >= CHAIN_BUFFERS || st.cdst >= CHAIN_BUFFERS || (st.cdst >= 0) != (q.size() == 5))
          throw std::invalid_argument("ChainProgram: bad add-and-quantize step");
        if (q.size() == 5) {
          st.scale = q[0].cast<float>();
          st.zp = q[1].cast<int32_t>();
          st.qmin = q[2].cast<int32_t>();
          st.qmax = q[3].cast<int32_t>();
          st.shift = q[4].cast<int32_t>();
        }
        steps_.push_back(st);
        continue;
      }
      py::tuple q = sp[3].cast<py::tuple>();
      st.codes_out = q.size() > 0;  // requantized codes for the next layer, else float
      OutQ oq = out_q_from(q);
      if (st.kind == 1) {
        py::tuple a = sp[4].cast<py::tuple>(), t = sp[5].cast<py::tuple>();
        st.dw = DwArgs{nullptr, a[0].cast<int64_t>(), a[1].cast<int64_t>(), a[2].cast<int64_t>(),
                       a[3].cast<int64_t>(), (const int32_t*)a[4].cast<uintptr_t>(), a[5].cast<int64_t>(),
                       a[6].cast<int64_t>(), a[7].cast<int64_t>(), a[8].cast<int64_t>(), a[9].cast<int64_t>(),
                       a[10].cast<int64_t>(), a[11].cast<int64_t>(), a[12].cast<int64_t>(), a[13].cast<int64_t>(),
                       a[14].cast<int64_t>(), a[15].cast<int32_t>(), t[0].cast<float>(),
                       (const float*)t[1].cast<uintptr_t>(), (const float*)t[2].cast<uintptr_t>(),
                       (const float*)t[3].cast<uintptr_t>(), nullptr, oq};
        st.dw.bias_q = (const int32_t*)t[4].cast<uintptr_t>();
        check_requantization(st.codes_out, st.dw.bias, st.dw.bias_q);
        dw_consts_.push_back(std::make_unique<DwConsts>(st.dw, st.codes_out));
      } else {
        for (const auto& gi : sp[4].cast<py::list>()) {
          py::tuple gt = gi.cast<py::tuple>();
          ChainGroup cg{};
          py::object cols = gt[0];
          cg.cols = !cols.is_none();
          if (cg.cols) {
            py::tuple c = cols.cast<py::tuple>();
            for (int k = 0; k < 17; ++k) cg.im[k] = c[k].cast<int64_t>();
          }
          py::tuple w = gt[2].cast<py::tuple>(), tail = gt[3].cast<py::tuple>(), dims = gt[4].cast<py::tuple>();
          cg.g = GemmArgs{nullptr, gt[1].cast<int64_t>(), (const int8_t*)w[0].cast<uintptr_t>(),
                          (const int32_t*)w[1].cast<uintptr_t>(), w[2].cast<int32_t>(),
                          (const float*)w[3].cast<uintptr_t>(), w[4].cast<float>(),
                          (const float*)w[5].cast<uintptr_t>(), (const float*)tail[0].cast<uintptr_t>(),
                          (const float*)tail[1].cast<uintptr_t>(), nullptr, nullptr, gt[6].cast<int64_t>(),
                          dims[0].cast<int64_t>(), dims[1].cast<int64_t>(), dims[2].cast<int64_t>(), oq};
          cg.g.bias_q = (const int32_t*)tail[2].cast<uintptr_t>();
          check_requantization(st.codes_out, cg.g.bias, cg.g.bias_q);
          gemm_consts_.push_back(std::make_unique<EpilogueConsts>(cg.g, padded_columns(cg.g.N), st.codes_out, true));
          cg.column = gt[5].cast<int64_t>();
          st.groups.push_back(cg);
        }
      }
      steps_.push_back(st);
    }
  }

  void run(const py::tuple& buffers, int isa, int nthreads) {
    uintptr_t buf[CHAIN_BUFFERS] = {};
    if (buffers.size() > CHAIN_BUFFERS) throw std::invalid_argument("ChainProgram: too many buffers");
    for (size_t k = 0; k < buffers.size(); ++k) buf[k] = buffers[k].cast<uintptr_t>();
    const int given = (int)buffers.size();  // (an empty batch has null data pointers: not a missing buffer)
    for (const ChainStep& st : steps_) {
      bool missing = st.src >= given || st.dst >= given || (st.kind == 2 && (st.res >= given || st.cdst >= given));
      if (missing) throw std::invalid_argument("ChainProgram: a step uses a buffer that was not given");
    }
    isa = check_isa(isa);
    if (profile_) step_ns_.resize(steps_.size(), 0);
    py::gil_scoped_release nogil;
    for (size_t i = 0; i < steps_.size(); ++i) {
      auto t0 = profile_ ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
      run_step(steps_[i], buf, isa, nthreads);
      if (profile_) step_ns_[i] += (std::chrono::steady_clock::now() - t0).count();
    }
  }

  // Per-step wall time, summed over the runs since profiling was switched on (a diagnostic: benchmarks compare
  // it layer by layer with another runtime's profile).
  void set_profile(bool on) {
    profile_ = on;
    step_ns_.assign(steps_.size(), 0);
  }
  py::list step_ns() const {
    py::list out;
    for (int64_t v : step_ns_) out.append(v);
    return out;
  }

 private:
  void run_step(const ChainStep& st, const uintptr_t* buf, int isa, int nthreads) {
    const uint8_t* src = (const uint8_t*)buf[st.src];
    if (st.kind == 2) {
      add_quantize(st, buf, isa, nthreads);
      return;
    }
    if (st.kind == 1) {
      DwArgs a = st.dw;
      a.x = src;
      set_output(a.out_q, a.y, st, buf);
      depthwise(a, isa, nthreads);
      return;
    }
    for (const ChainGroup& cg : st.groups) {
      GemmArgs g = cg.g;
      set_output(g.out_q, g.y, st, buf, cg.column);
      if (cg.cols) {
        conv_gemm(src, cg.im, g, (uint8_t*)buf[4], isa, nthreads);
      } else {
        g.a = src;
        gemm(g, isa, nthreads);
      }
    }
  }

  // add_quantize's loop in one pass over memory: the add, torch.relu's max(0, y) (MAXPS returns its second operand
  // for a NaN or a pair of zeros: NaN and -0.0 stay, as in `y < 0 ? 0 : y`), the float store, and
  // quantize_static_avx512's Quant16 on the same register (bit-identical to the two passes it replaces)
  VNNI_TARGET static void add_quantize_avx512(const float* x, const float* r, float* y, uint8_t* c, int64_t n,
                                              const ChainStep& st) {
    const __m512 zero = _mm512_setzero_ps();
    const Quant16 q(st.scale, st.zp, st.qmin, st.qmax, st.shift);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      __m512 v = _mm512_loadu_ps(x + i);
      if (r != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(r + i));
      if (st.relu) v = _mm512_max_ps(zero, v);
      _mm512_storeu_ps(y + i, v);
      if (c != nullptr) q.store(v, c + i);
    }
    for (; i < n; ++i) {
      float v = r != nullptr ? x[i] + r[i] : x[i];
      if (st.relu) v = v < 0.0f ? 0.0f : v;
      y[i] = v;
      if (c != nullptr) c[i] = q_u8(v, st.scale, st.zp, st.qmin, st.qmax, st.shift);
    }
  }

  // y = x (+ r), then codes = quantize(y): a residual add fused with the quantization of the next block's input,
  // in the order the unchained layers compute them (float add, then quantize_static's rounding)
  static void add_quantize(const ChainStep& st, const uintptr_t* buf, int isa, int nthreads) {
    const float* x = (const float*)buf[st.src];
    const float* r = st.res >= 0 ? (const float*)buf[st.res] : nullptr;
    float* y = (float*)buf[st.dst];
    uint8_t* c = st.cdst >= 0 ? (uint8_t*)buf[st.cdst] : nullptr;
    const int64_t n = st.n;
    int t = n < (1 << 16) ? 1 : nthreads;
    NoGil nogil;
    run_claimed(t, (n + 63) / 64, 8, [&](int, int64_t u_lo, int64_t u_hi) {  // units of 64 values
      const int64_t lo = u_lo * 64, hi = std::min(n, u_hi * 64);
      if (isa == ISA_AVX512VNNI) {
        add_quantize_avx512(x + lo, r ? r + lo : nullptr, y + lo, c ? c + lo : nullptr, hi - lo, st);
        return;
      }
      if (r != nullptr)
        for (int64_t j = lo; j < hi; ++j) y[j] = x[j] + r[j];
      else if (y != x)
        std::copy(x + lo, x + hi, y + lo);
      if (st.relu)  // torch.relu: negatives to 0 (NaN stays NaN: a comparison with NaN is false)
        for (int64_t j = lo; j < hi; ++j) y[j] = y[j] < 0.0f ? 0.0f : y[j];
      if (c != nullptr) quantize_static_any(y + lo, hi - lo, st.scale, st.zp, st.qmin, st.qmax, st.shift, c + lo, isa);
    });
  }

  // codes (out_q set by the spec: scale > 0 marks it) go to out_q.y, float results to y
  template <class Y>
  static void set_output(OutQ& q, Y*& y, const ChainStep& st, const uintptr_t* buf, int64_t column = 0) {
    if (st.codes_out) {
      q.y = (uint8_t*)(buf[st.dst] + column);
      y = nullptr;
    } else {
      q.y = nullptr;
      y = (Y*)(buf[st.dst] + column);
    }
  }
  std::vector<ChainStep> steps_;
  // the epilogues' per-channel constants, worked out once here (the steps' arguments point into them)
  std::vector<std::unique_ptr<EpilogueConsts>> gemm_consts_;
  std::vector<std::unique_ptr<DwConsts>> dw_consts_;
  bool profile_ = false;
  std::vector<int64_t> step_ns_;
};

}  // namespace

// ------------------------------------------------------------------------------------------------ bindings
PYBIND11_MODULE(_C, m) {
  m.doc() = "octoquant CPU int8 kernels (raw-pointer interface; see octoquant/kernels/cpu.py)";

  m.def("cpu_features", [] {
    py::dict d;
    d["avx2"] = has_avx2();
    d["avx512vnni"] = has_avx512vnni();
    d["avx512vbmi2"] = has_avx512vbmi2();  // the 3x3 depthwise kernel on column quads
    return d;
  });
  m.def("best_isa", &best_isa);
  m.def("use_openmp", [](uintptr_t gomp_parallel, uintptr_t omp_get_thread_num) {
    // 0, 0 returns to octoquant's own thread pool
    g_gomp_parallel = (GompParallel)gomp_parallel;
    g_omp_thread_num = (OmpThreadNum)omp_get_thread_num;
  });
  m.def("threading", [] { return std::string(g_gomp_parallel ? "openmp" : "own-pool"); });

  m.def("pack_weight_u8s8", [](uintptr_t w_ptr, int64_t N, int64_t K, uintptr_t out_ptr, int64_t Kp) {
    // w (N, K) s8 row-major -> (T, Kp/4, 4, 16, 4) with T = ceil(N / 64); padding (n >= N or k >= K) is 0.
    const int8_t* w = (const int8_t*)w_ptr;
    int8_t* out = (int8_t*)out_ptr;
    int64_t T = (N + 63) / 64, K4 = Kp / 4;
    std::memset(out, 0, (size_t)(T * K4 * 256));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        out[(((n / 64) * K4 + k / 4) * 4 + (n % 64) / 16) * 64 + (n % 16) * 4 + (k % 4)] = w[n * K + k];
  });

  m.def("pack_weight_wo", [](uintptr_t w_ptr, int64_t N, int64_t K, uintptr_t out_ptr) {
    // w (N, K) s8 -> (NB, K, 16); padding columns 0.
    const int8_t* w = (const int8_t*)w_ptr;
    int8_t* out = (int8_t*)out_ptr;
    int64_t NB = (N + 15) / 16;
    std::memset(out, 0, (size_t)(NB * K * 16));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) out[((n / 16) * K + k) * 16 + (n % 16)] = w[n * K + k];
  });

  m.def(
      "gemm_u8s8",
      [](uintptr_t a, int64_t lda, uintptr_t w, uintptr_t colsum, int32_t offset, uintptr_t row_scale, float row_scale0,
         uintptr_t col_scale, uintptr_t bias, uintptr_t clamp_hi, uintptr_t bias_q, uintptr_t y, uintptr_t acc_out,
         int64_t ldy, int64_t M, int64_t N, int64_t Kp, int isa, int nthreads, py::tuple out_q) {
        GemmArgs g{(const uint8_t*)a, lda, (const int8_t*)w, (const int32_t*)colsum, offset,
                   (const float*)row_scale, row_scale0, (const float*)col_scale, (const float*)bias,
                   (const float*)clamp_hi, (float*)y, (int32_t*)acc_out, ldy, M, N, Kp, out_q_of(out_q)};
        g.bias_q = (const int32_t*)bias_q;
        check_requantization(out_q.size() > 0, g.bias, g.bias_q);
        gemm(g, check_isa(isa), nthreads);
      });

  m.def("quantize_rows_dynamic", [](uintptr_t x, int64_t ldx, int64_t M, int64_t K, uintptr_t out, int64_t ldo,
                                    uintptr_t scales, int isa) {
    isa = check_isa(isa);
    py::gil_scoped_release nogil;
    quantize_rows((const float*)x, ldx, M, K, (uint8_t*)out, ldo, 128, RowQuant{true, 1.0f, 0, 0, 0, 0},
                  (float*)scales, isa, 1);
  });

  // x (M, K) float rows -> y (M, N) float: per-token (row_scale0 < 0) or static (scale row_scale0, zero-point zp,
  // codes shifted by `shift`) int8 activations x the packed weights, in one call
  m.def("linear_u8s8", [](uintptr_t x, int64_t ldx, int64_t M, int64_t K, float row_scale0, int32_t zp, int32_t qmin,
                          int32_t qmax, int32_t shift, uintptr_t w, uintptr_t colsum, uintptr_t col_scale,
                          uintptr_t bias, uintptr_t y, int64_t ldy, int64_t N, int64_t Kp, int isa, int nthreads) {
    isa = check_isa(isa);
    bool dynamic = row_scale0 < 0.0f;
    RowQuant rq{dynamic, row_scale0, zp, qmin, qmax, shift};
    GemmArgs g{nullptr, Kp, (const int8_t*)w, (const int32_t*)colsum, dynamic ? 128 : zp + shift, nullptr,
               dynamic ? 1.0f : row_scale0, (const float*)col_scale, (const float*)bias, nullptr, (float*)y, nullptr,
               ldy, M, N, Kp, OutQ{nullptr, 1.0f, 0.0f, 0.0f, 0}};
    linear_u8s8((const float*)x, ldx, M, K, rq, g, isa, nthreads);
  });

  m.def("quantize_nchw_nhwc", [](uintptr_t x, int64_t N, int64_t C, int64_t HW, float scale, int32_t zp, int32_t qmin,
                                 int32_t qmax, int32_t shift, uintptr_t out, int isa, int nthreads) {
    isa = check_isa(isa);
    const int64_t blocks = (HW + 63) / 64, units = N * blocks;  // work unit: 64 pixels of one image
    int t = N * C * HW < (1 << 16) ? 1 : (int)std::min<int64_t>(nthreads, units);
    py::gil_scoped_release nogil;
    pool().run(t, [&, isa](int i) {
      int64_t lo, hi;
      split(units, t, i, &lo, &hi);
      std::vector<uint8_t> tmp((size_t)(C * 64));
      for (int64_t u = lo; u < hi; ++u) {
        int64_t n = u / blocks, b = u % blocks;
        quantize_nchw_block((const float*)x, C, HW, n, b * 64, std::min(HW, (b + 1) * 64), scale, zp, qmin, qmax,
                            shift, (uint8_t*)out, isa, tmp.data());
      }
    });
  });

  m.def("quantize_static", [](uintptr_t x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax,
                              int32_t shift, uintptr_t out, int isa, int nthreads) {
    // u8 out = clamp(round_half_even(x / scale) + zp, qmin, qmax) + shift   (shift 128 stores int8 as u8)
    isa = check_isa(isa);
    const float* xf = (const float*)x;
    uint8_t* o = (uint8_t*)out;
    int t = n < (1 << 16) ? 1 : nthreads;
    py::gil_scoped_release nogil;
    pool().run(t, [&](int i) {
      int64_t lo, hi;
      split64(n, t, i, &lo, &hi);
      quantize_static_any(xf + lo, hi - lo, scale, zp, qmin, qmax, shift, o + lo, isa);
    });
  });

  py::class_<LinearPlan>(m, "LinearPlan")
      .def(py::init<int64_t, int64_t, int64_t, float, int32_t, int32_t, int32_t, int32_t, uintptr_t, uintptr_t,
                    uintptr_t, uintptr_t, int>())
      .def("run", &LinearPlan::run);

  py::class_<ChainProgram>(m, "ChainProgram")
      .def(py::init<const py::list&>())
      .def("run", &ChainProgram::run)
      .def("set_profile", &ChainProgram::set_profile)
      .def("step_ns", &ChainProgram::step_ns);

  m.def("linear_wo", [](uintptr_t x, int64_t ldx, int64_t M, int64_t K, uintptr_t w, uintptr_t scales,
                        int64_t group_size, uintptr_t bias, uintptr_t y, int64_t ldy, int64_t N, int isa,
                        int nthreads) {
    isa = check_isa(isa);
    int64_t NB = (N + 15) / 16, G = K / group_size;
    int t = threads_for(M * N * K, NB, nthreads);
    py::gil_scoped_release nogil;
    pool().run(t, [&](int i) {
      int64_t lo, hi;
      split(NB, t, i, &lo, &hi);
      for (int64_t nb = lo; nb < hi; ++nb) {
        const int8_t* wb = (const int8_t*)w + nb * K * 16;
        const float* sb = (const float*)scales + nb * G * 16;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          int64_t mr = std::min<int64_t>(4, M - m0);
          const float* xr = (const float*)x + m0 * ldx;
          float* yr = (float*)y + m0 * ldy;
          const float* b = (const float*)bias;
          if (isa == ISA_AVX512VNNI) {
            switch (mr) {
              case 1: wo_tile_avx512<1>(xr, ldx, wb, sb, b, yr, ldy, K, group_size, nb * 16, N); break;
              case 2: wo_tile_avx512<2>(xr, ldx, wb, sb, b, yr, ldy, K, group_size, nb * 16, N); break;
              case 3: wo_tile_avx512<3>(xr, ldx, wb, sb, b, yr, ldy, K, group_size, nb * 16, N); break;
              default: wo_tile_avx512<4>(xr, ldx, wb, sb, b, yr, ldy, K, group_size, nb * 16, N); break;
            }
          } else if (isa == ISA_AVX2) {
            switch (mr) {
              case 1: wo_tile_avx2<1>(xr, ldx, wb, sb, b, yr, ldy, K, group_size, nb * 16, N); break;
              case 2: wo_tile_avx2<2>(xr, ldx, wb, sb, b, yr, ldy, K, group_size, nb * 16, N); break;
              case 3: wo_tile_avx2<3>(xr, ldx, wb, sb, b, yr, ldy, K, group_size, nb * 16, N); break;
              default: wo_tile_avx2<4>(xr, ldx, wb, sb, b, yr, ldy, K, group_size, nb * 16, N); break;
            }
          } else {
            wo_block_scalar(xr, ldx, mr, wb, sb, b, yr, ldy, K, group_size, nb * 16, N);
          }
        }
      }
    });
  });
}
