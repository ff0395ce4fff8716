// Per-row attention statistics from queries and keys in one pass, flash-style: for each tile of
// query rows, loop over tiles of keys, compute the tile's scores q.k into a buffer that stays in
// the L1/L2 cache, and fold them at once into each row's running sums (online softmax: the sums
// are kept relative to the row's running max and rescaled when it grows). No (rows, keys) tensor
// is ever written out.
//
// Per row, over the visible keys j in [lo, hi), with raw = q.k (float32 dot products of the
// inputs' values), s = raw * scale and m = max s:
//   x_max, x_min  largest / smallest raw
//   Z = sum e, A = sum e (m - s), S2 = sum e^2, D = sum e |pos - j|     with e = exp(s - m)
//   e_first, e_own  e at key lo and at key pos (0 where the row does not see that key)
//   check = sum raw (a NaN or an inf among the visible scores makes it non-finite)
// Rescaling when the max grows from m to m' (c = exp(m - m')):
//   Z' = c Z, A' = c (A + Z (m' - m)), S2' = c^2 S2, D' = c D.
//
// Built by torch.utils.cpp_extension on the machine it runs on, with -O3 -march=native: the
// vector width (AVX-512, AVX2 or scalar) is what that machine's compiler targets.

#include "vec_math.h"  // first: CPU_CAPABILITY for ATen's Vectorized; exp_nonpositive

// Only the headers it needs (not torch/extension.h, nor pybind11): a third of the compile time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using attnkit_vec::exp_nonpositive;
using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int VL = Vec::size();
#ifndef QK_NB
#define QK_NB 2
#endif
#ifndef QK_MR
#define QK_MR 8
#endif
constexpr int NB = QK_NB;              // vectors per micro tile (keys: NB * VL)
constexpr int MR = QK_MR;              // query rows per micro tile
constexpr int KT = 4 * NB * VL;        // keys per key tile (128 with AVX-512, 64 with AVX2)
constexpr int ROWS_PER_TILE = 128;     // query rows per tile (all query heads of a key head): each key tile
                                       // read serves 128 rows (32 made 32k tokens bound by memory traffic)
constexpr float INF = std::numeric_limits<float>::infinity();

// 0, 1, ..., VL - 1
inline Vec iota() { return Vec::arange(0.0f, 1.0f); }

// Lanes of the vector of keys starting at local key j0 that fall in [a, b) (lanes: iota()).
inline Vec lane_mask(const Vec& lanes, int j0, int a, int b) {
  Vec j = lanes + Vec(static_cast<float>(j0));
  return (j >= Vec(static_cast<float>(a))) & (j < Vec(static_cast<float>(b)));
}

// scores[MR][KT] = q[MR][D] . kt[D][KT] for one key tile (kt: the tile's keys, transposed).
inline void micro_tile(const float* q, const float* kt, int D, float* scores) {
  for (int c = 0; c < KT; c += NB * VL) {
    Vec acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NB; ++v) acc[r][v] = Vec(0.0f);
    for (int d = 0; d < D; ++d) {
      Vec kv[NB];
      for (int v = 0; v < NB; ++v) kv[v] = Vec::loadu(kt + d * KT + c + v * VL);
      for (int r = 0; r < MR; ++r) {
        Vec qv(q[r * D + d]);
        for (int v = 0; v < NB; ++v) acc[r][v] = at::vec::fmadd(qv, kv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NB; ++v) acc[r][v].store(scores + r * KT + c + v * VL);
  }
}

// The running state of one query row.
// Z is kept in three parts: the keys at the running max (e = 1 exactly: counted in n_max), the
// others (z, lane by lane), and what earlier maxima left after a rescale (z_old, double). A 1 in a
// float32 lane would swallow the terms below 6e-8 added to it, the whole tail of a sharp row:
// its entropy would come out low by up to ~1e-6.
struct RowState {
  float m = -INF;  // largest raw score so far
  bool any = false;
  double z_old = 0.0, a_old = 0.0;
  Vec vmin = Vec(INF), check = Vec(0.0f), n_max = Vec(0.0f), z = Vec(0.0f), a = Vec(0.0f), s2 = Vec(0.0f),
      dist = Vec(0.0f);
};

inline float reduce_max(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(v);
#else
  alignas(64) float tmp[VL];
  v.store(tmp);
  float m = tmp[0];
  for (int i = 1; i < VL; ++i) m = std::max(m, tmp[i]);
  return m;
#endif
}
inline float reduce_min(Vec v) {
  alignas(64) float tmp[VL];
  v.store(tmp);
  float m = tmp[0];
  for (int i = 1; i < VL; ++i) m = std::min(m, tmp[i]);
  return m;
}
inline double reduce_sum(Vec v) {
  alignas(64) float tmp[VL];
  v.store(tmp);
  double s = 0.0;
  for (int i = 0; i < VL; ++i) s += tmp[i];
  return s;
}

// Fold the scores of keys [a, b) of one key tile (local indices; the tile starts at key k0) into a row.
inline void fold(RowState& st, const float* s, int a, int b, int k0, float scale, float pos, const Vec& lanes) {
  const Vec ninf(-INF), pinf(INF), zero(0.0f);
  Vec vmax(-INF);
  const int start = a & ~(VL - 1);
  for (int j0 = start; j0 < b; j0 += VL) {
    Vec x = Vec::loadu(s + j0);
    if (j0 >= a && j0 + VL <= b) {
      vmax = at::vec::clamp_min(vmax, x);  // max(x, vmax); a NaN shows in check
      st.vmin = at::vec::clamp_max(st.vmin, x);
      st.check = st.check + x;
    } else {
      Vec mask = lane_mask(lanes, j0, a, b);
      vmax = at::vec::clamp_min(vmax, Vec::blendv(ninf, x, mask));
      st.vmin = at::vec::clamp_max(st.vmin, Vec::blendv(pinf, x, mask));
      st.check = st.check + Vec::blendv(zero, x, mask);
    }
  }
  float tile_max = reduce_max(vmax);
  if (tile_max > st.m) {
    if (st.any) {  // rescale the sums from the old max to the new one
      float shift = tile_max * scale - st.m * scale;  // m' - m (as the terms use them), > 0
      const double c_d = std::exp(-static_cast<double>(shift)), ones = reduce_sum(st.n_max);
      st.a_old = c_d * (st.a_old + (st.z_old + ones) * shift);  // the old maxima's terms had A = 0
      st.z_old = c_d * (st.z_old + ones);
      st.n_max = Vec(0.0f);
      Vec c(static_cast<float>(c_d)), sh(shift);
      st.a = c * at::vec::fmadd(st.z, sh, st.a);
      st.z = st.z * c;
      st.s2 = st.s2 * (c * c);
      st.dist = st.dist * c;
    }
    st.m = tile_max;
  }
  st.any = true;
  if (!(st.m > -INF)) return;  // NaN or -inf max: the sums are meaningless; check / x_max say so
  const Vec sc(scale), neg_m(-(st.m * scale)), step(static_cast<float>(VL)), one(1.0f), below(-1.0f);
  // |pos - j| for the lanes of the first vector; one subtraction a vector after that
  Vec to_pos = Vec(pos - static_cast<float>(k0 + start)) - lanes;
  for (int j0 = start; j0 < b; j0 += VL, to_pos = to_pos - step) {
    Vec x = Vec::loadu(s + j0);
    // s - m <= 0, the product rounded before the subtraction (no fused multiply-add):
    // exactly 0 at the max, where e = 1, as m is that same rounded product.
    Vec t = x * sc + neg_m;
    Vec e;
    if (j0 >= a && j0 + VL <= b) {
      e = exp_nonpositive(t);
    } else {
      Vec mask = lane_mask(lanes, j0, a, b);
      t = Vec::blendv(below, t, mask);  // not 0: not taken for the max below
      e = Vec::blendv(zero, exp_nonpositive(t), mask);
    }
#if defined(CPU_CAPABILITY_AVX512)
    const __mmask16 at_max = _mm512_cmp_ps_mask(t, zero, _CMP_EQ_OQ);  // e = 1 exactly
    st.n_max = Vec(_mm512_mask_add_ps(st.n_max, at_max, st.n_max, one));
    st.z = Vec(_mm512_mask_add_ps(st.z, static_cast<__mmask16>(~at_max), st.z, e));
#else
    Vec at_max = t == zero;  // all-ones lanes: e = 1 exactly
    st.n_max = st.n_max + (at_max & one);
    st.z = st.z + Vec::blendv(e, zero, at_max);
#endif
    st.a = at::vec::fnmadd(e, t, st.a);  // a - e * t
    st.s2 = at::vec::fmadd(e, e, st.s2);
    st.dist = at::vec::fmadd(e, to_pos.abs(), st.dist);
  }
}


}  // namespace

using attnkit_vec::on_threads;

// The rows of the result (each (B * H * R,) float32, rows in (b, h, r) order).
enum Field { N_VISIBLE, LOGIT_MAX, LOGIT_MIN, QK_ABSMAX, ENTROPY, MAX_PROB, SUM_SQ, SINK, DIAGONAL, DISTANCE, SUSPECT, FIELDS };

// q: (B, H, R, D), k: (B, Hkv, K, D), float32, bfloat16 or float16, any strides (H a multiple of
// Hkv: query head h reads key head h / (H / Hkv)); lo, hi, pos: (B, H, R) int64, any strides
// (expanded views welcome). Row (b, h, r) sees keys lo <= j < hi and sits at key pos.
// max_finite: the largest finite value of the model's dtype; a |q.k| beyond it marks the row SUSPECT
// (as does any NaN or inf among its scores or logits), for the caller to redo in that dtype.
// Returns (FIELDS, B * H * R) float32.
at::Tensor qk_row_stats(at::Tensor q_in, at::Tensor k_in, double scale_d, at::Tensor lo_t,
                           at::Tensor hi_t, at::Tensor pos_t, double max_finite_d) {
  const float max_finite = static_cast<float>(max_finite_d);
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4, "q and k must be 4-d");
  const int64_t B = q_in.size(0), H = q_in.size(1), R = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), K = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D && Hkv > 0 && H % Hkv == 0, "q and k shapes do not match");
  const int64_t N = B * H * R;
    const int64_t G = H / Hkv;
  const float scale = static_cast<float>(scale_d);
  // q and k are read in place, any strides (a model's transposed views need no copy), each value
  // converted to float32 as it is read.
  const at::ScalarType dtype = q_in.scalar_type();
  TORCH_CHECK(k_in.scalar_type() == dtype, "q and k must have one dtype");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "q, k: float32, bfloat16 or float16");
  const char* qbase = static_cast<const char*>(q_in.data_ptr());
  const char* kbase = static_cast<const char*>(k_in.data_ptr());
  const int64_t esize = q_in.element_size();
  const auto qs = q_in.strides(), ks = k_in.strides();
  // n values at base + i * stride (elements), as float32, into dst
  auto read = [dtype, esize](const char* base, int64_t offset, int64_t stride, int64_t n, float* dst, int64_t dst_stride) {
    const char* p = base + offset * esize;
    if (dtype == at::kFloat) {
      for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = reinterpret_cast<const float*>(p)[i * stride];
    } else if (dtype == at::kBFloat16) {
      for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = static_cast<float>(reinterpret_cast<const c10::BFloat16*>(p)[i * stride]);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = static_cast<float>(reinterpret_cast<const c10::Half*>(p)[i * stride]);
    }
  };
  for (const auto& t : {lo_t, hi_t, pos_t})
    TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == H && t.size(2) == R && t.scalar_type() == at::kLong,
                "lo, hi, pos: (B, H, R) int64");
  // value of a (B, H, R) index tensor at (b, h, r)
  auto at3 = [](const at::Tensor& t, int64_t b, int64_t h, int64_t r) {
    return t.data_ptr<int64_t>()[b * t.stride(0) + h * t.stride(1) + r * t.stride(2)];
  };
  const auto f32 = q_in.options().dtype(at::kFloat);
  // a float32 value rounded to the inputs' dtype (to nearest even; beyond float16's range: inf)
  auto to_dtype = [dtype](float x) -> float {
    if (dtype == at::kBFloat16) return static_cast<float>(static_cast<c10::BFloat16>(x));
    if (dtype == at::kHalf) return static_cast<float>(static_cast<c10::Half>(x));
    return x;
  };

  // Keys packed tile by tile, transposed, float32: kt[b, h, tile, d, jj] = k[b, h, tile * KT + jj, d]
  // (0 past K). The only copy of anything (rows, keys) or (keys, D) the kernel makes.
  const int64_t tiles = (K + KT - 1) / KT;
  at::Tensor kt = at::empty({B, Hkv, tiles, D, KT}, f32);
  float* ktp = kt.data_ptr<float>();
  // torch's intra-op threads (1 inside a parallel region, where more would oversubscribe)
  const int threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  std::atomic<int64_t> next_pack{0};
  on_threads(threads, [&]() {
    for (int64_t i = next_pack++; i < B * Hkv * tiles; i = next_pack++) {
      const int64_t b = i / (Hkv * tiles), h = (i / tiles) % Hkv, t = i % tiles;
      float* dst = ktp + i * D * KT;
      const int64_t n = std::min<int64_t>(KT, K - t * KT);
      std::fill(dst, dst + D * KT, 0.0f);
      for (int64_t jj = 0; jj < n; ++jj)
        read(kbase, b * ks[0] + h * ks[1] + (t * KT + jj) * ks[2], ks[3], D, dst + jj, KT);
    }
  });

  at::Tensor out = at::empty({FIELDS, N}, f32);
  float* op = out.data_ptr<float>();
  // Work items: (row tile, b, key head), the row tiles holding the most keys (the last, under a
  // causal mask) first, handed out one at a time so that threads finish together.
  const int64_t rows_per_group = std::max<int64_t>(1, ROWS_PER_TILE / G);
  const int64_t row_tiles = (R + rows_per_group - 1) / rows_per_group;
  const int64_t items = row_tiles * B * Hkv;
  std::atomic<int64_t> next{0};
  on_threads(threads, [&]() {
    const int64_t tile_rows = ((G * rows_per_group + MR - 1) / MR) * MR;
    std::vector<float> qbuf(tile_rows * D), sbuf(tile_rows * KT);
    std::vector<int64_t> row_of(tile_rows);
    std::vector<int> rlo(tile_rows), rhi(tile_rows);
    std::vector<float> rpos(tile_rows);
    std::vector<RowState> st(tile_rows);
    const Vec lanes = iota();
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t rt = row_tiles - 1 - item / (B * Hkv);
      const int64_t b = (item / Hkv) % B, hk = item % Hkv;
      const int64_t r0 = rt * rows_per_group, nr = std::min(rows_per_group, R - r0);
      const int64_t n_rows = G * nr;
      int64_t kmin = K, kmax = 0;
      for (int64_t t = 0; t < tile_rows; ++t) {
        st[t] = RowState();
        if (t >= n_rows) {
          rlo[t] = rhi[t] = 0;
          std::fill(qbuf.begin() + t * D, qbuf.begin() + (t + 1) * D, 0.0f);
          continue;
        }
        const int64_t g = t / nr, r = r0 + t % nr;
        const int64_t row = ((b * H + hk * G + g) * R + r);
        row_of[t] = row;
        const int64_t h_q = hk * G + g;
        const int64_t l = std::max<int64_t>(at3(lo_t, b, h_q, r), 0), h = std::min<int64_t>(at3(hi_t, b, h_q, r), K);
        rpos[t] = static_cast<float>(at3(pos_t, b, h_q, r));
        rlo[t] = static_cast<int>(l);
        rhi[t] = static_cast<int>(std::max(l, h));
        if (h > l) {
          kmin = std::min(kmin, l);
          kmax = std::max(kmax, h);
        }
        read(qbase, b * qs[0] + (hk * G + g) * qs[1] + r * qs[2], qs[3], D, qbuf.data() + t * D, 1);
      }
      const float* ktile0 = ktp + (b * Hkv + hk) * tiles * D * KT;
      for (int64_t tile = kmin / KT; kmin < kmax && tile * KT < kmax; ++tile) {
        const int k0 = static_cast<int>(tile * KT), k1 = k0 + KT;
        for (int64_t t0 = 0; t0 < tile_rows; t0 += MR) {
          bool needed = false;
          for (int t = t0; t < t0 + MR; ++t) needed |= rlo[t] < k1 && rhi[t] > k0 && rhi[t] > rlo[t];
          if (!needed) continue;
          micro_tile(qbuf.data() + t0 * D, ktile0 + tile * D * KT, static_cast<int>(D), sbuf.data() + t0 * KT);
          for (int t = t0; t < t0 + MR; ++t) {
            const int a = std::max(rlo[t], k0) - k0, e = std::min(rhi[t], k1) - k0;
            if (a < e) fold(st[t], sbuf.data() + t * KT, a, e, k0, scale, rpos[t], lanes);
          }
        }
      }
      for (int64_t t = 0; t < n_rows; ++t) {
        const RowState& s = st[t];
        const int64_t row = row_of[t];
        float* o = op + row;
        const int64_t n_vis = rhi[t] - rlo[t];
        o[N_VISIBLE * N] = static_cast<float>(n_vis);
        if (n_vis <= 0) {  // sees nothing: what the eager path's formulas give for Z = 0
          const float nan = std::numeric_limits<float>::quiet_NaN();
          o[LOGIT_MAX * N] = -INF, o[LOGIT_MIN * N] = INF, o[MAX_PROB * N] = INF, o[QK_ABSMAX * N] = 0.0f;
          o[ENTROPY * N] = o[SUM_SQ * N] = o[SINK * N] = o[DIAGONAL * N] = o[DISTANCE * N] = nan;
          o[SUSPECT * N] = 0.0f;
          continue;
        }
        const float m = s.m * scale;
        const float* qrow = qbuf.data() + t * D;
        auto e_at = [&](int64_t j) -> double {  // q.k summed in the order micro_tile sums it
          if (j < rlo[t] || j >= rhi[t]) return 0.0;
          const float* kj = ktile0 + (j / KT) * D * KT + j % KT;
          float acc = 0.0f;
          for (int64_t d = 0; d < D; ++d) acc = std::fma(qrow[d], kj[d * KT], acc);
          return std::exp(static_cast<double>(acc * scale - m));
        };
        const float x_min = reduce_min(s.vmin);
        const double z = s.z_old + reduce_sum(s.n_max) + reduce_sum(s.z);
        const double a = std::max(0.0, s.a_old + reduce_sum(s.a));
        const double check = reduce_sum(s.check);
        // The extremes in the model's dtype, as its matmul rounds q.k (rounding is monotone, so the
        // rounded max is the max of the rounded scores): qk_absmax is a number of that dtype.
        const float r_max = to_dtype(s.m), r_min = to_dtype(x_min);
        o[LOGIT_MAX * N] = r_max * scale;
        o[LOGIT_MIN * N] = r_min * scale;
        o[QK_ABSMAX * N] = std::abs(std::max(0.0f, std::max(r_max, -r_min)));
        o[ENTROPY * N] = static_cast<float>(std::log(z) + a / z);
        o[MAX_PROB * N] = static_cast<float>(1.0 / z);  // e = 1 at the max
        o[SUM_SQ * N] = static_cast<float>(reduce_sum(s.s2) / (z * z));
        o[SINK * N] = static_cast<float>(e_at(rlo[t]) / z);
        o[DIAGONAL * N] = static_cast<float>(e_at(static_cast<int64_t>(rpos[t])) / z);
        o[DISTANCE * N] = static_cast<float>(reduce_sum(s.dist) / z);
        // Not all finite (NaN, inf, a logit that overflows), or beyond the model dtype's range.
        const bool finite = std::isfinite(s.m * scale) && std::isfinite(x_min * scale) && std::isfinite(z) &&
                            std::isfinite(check) && s.m <= max_finite && -x_min <= max_finite;
        o[SUSPECT * N] = finite ? 0.0f : 1.0f;
      }
    }
  });
  return out;
}

// torch.ops.attnkit.qk_row_stats
TORCH_LIBRARY(attnkit, m) {
  m.def("qk_row_stats(Tensor q, Tensor k, float scale, Tensor lo, Tensor hi, Tensor pos, float max_finite) -> Tensor",
        &qk_row_stats);
}
