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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int VL = Vec::size();
constexpr int NB = 2;                  // vectors per micro tile (keys: NB * VL)
constexpr int MR = 4;                  // query rows per micro tile
constexpr int KT = 4 * NB * VL;        // keys per key tile (128 with AVX-512, 64 with AVX2)
constexpr int ROWS_PER_TILE = 32;      // query rows per tile (all query heads of a key head)
constexpr float INF = std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (Cephes' single-precision polynomial on a Cody-Waite reduction, ~1 ulp):
// ATen's exp_u20 is 20 ulp and its clamps turn NaN into a finite number; here a NaN input stays
// NaN, and x below -87.3 gives 0 (exp underflows there; such keys add nothing to sums >= 1).
inline Vec exp_nonpositive(Vec x) {
  const Vec lo(-87.33654f), log2e(1.44269504088896341f), half(0.5f);
  const Vec c1(0.693359375f), c2(-2.12194440e-4f);
  const Vec p0(1.9875691500e-4f), p1(1.3981999507e-3f), p2(8.3334519073e-3f), p3(4.1665795894e-2f),
      p4(1.6666665459e-1f), p5(5.0000001201e-1f), one(1.0f);
  Vec under = x < lo;  // all-ones where x underflows (false for NaN)
  Vec xc = at::vec::maximum(x, lo);  // NaN-propagating
  Vec fx = at::vec::fmadd(xc, log2e, half).floor();
  Vec r = xc - fx * c1;
  r = r - fx * c2;
  Vec y = at::vec::fmadd(p0, r, p1);
  y = at::vec::fmadd(y, r, p2);
  y = at::vec::fmadd(y, r, p3);
  y = at::vec::fmadd(y, r, p4);
  y = at::vec::fmadd(y, r, p5);
  y = at::vec::fmadd(y, r * r, r + one);
  // 2^fx through the exponent bits; fx in [-126, 0] here
  IVec n = at::vec::convert_to_int_of_same_size(fx);
  Vec pow2 = at::vec::cast<float>((n + IVec(127)) << IVec(23));
  return Vec::blendv(y * pow2, Vec(0.0f), under);
}

// Lanes of the vector of keys starting at local key j0 that fall in [a, b).
inline Vec lane_mask(int j0, int a, int b) {
  Vec j = Vec::arange(static_cast<float>(j0), 1.0f);
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
struct RowState {
  float m = -INF;  // largest raw score so far
  bool any = false;
  Vec vmin = Vec(INF), check = Vec(0.0f), z = Vec(0.0f), a = Vec(0.0f), s2 = Vec(0.0f), dist = Vec(0.0f);
};

inline float reduce_max(Vec v) {
  alignas(64) float tmp[VL];
  v.store(tmp);
  float m = tmp[0];
  for (int i = 1; i < VL; ++i) m = std::max(m, tmp[i]);
  return m;
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

// Fold the scores of keys [a, b) of one key tile (local indices; key tile starts at key k0) into a row.
inline void fold(RowState& st, const float* s, int a, int b, int k0, float scale, float pos) {
  const Vec ninf(-INF), pinf(INF), zero(0.0f);
  Vec vmax(-INF);
  for (int j0 = a & ~(VL - 1); j0 < b; j0 += VL) {
    Vec x = Vec::loadu(s + j0);
    if (j0 >= a && j0 + VL <= b) {
      vmax = at::vec::clamp_min(vmax, x);  // max(x, vmax); a NaN shows in check
      st.vmin = at::vec::clamp_max(st.vmin, x);
      st.check = st.check + x;
    } else {
      Vec mask = lane_mask(j0, a, b);
      vmax = at::vec::clamp_min(vmax, Vec::blendv(ninf, x, mask));
      st.vmin = at::vec::clamp_max(st.vmin, Vec::blendv(pinf, x, mask));
      st.check = st.check + Vec::blendv(zero, x, mask);
    }
  }
  float tile_max = reduce_max(vmax);
  if (tile_max > st.m) {
    if (st.any) {  // rescale the sums from the old max to the new one
      float shift = (tile_max - st.m) * scale;  // m' - m, > 0
      Vec c(std::exp(-shift)), sh(shift);
      st.a = c * at::vec::fmadd(st.z, sh, st.a);
      st.z = st.z * c;
      st.s2 = st.s2 * (c * c);
      st.dist = st.dist * c;
    }
    st.m = tile_max;
  }
  if (!(st.m > -INF)) {  // NaN or -inf max: the sums are meaningless; check / x_max say so
    st.any = true;
    return;
  }
  st.any = true;
  const Vec sc(scale), neg_m(-st.m * scale), vpos(pos);
  for (int j0 = a & ~(VL - 1); j0 < b; j0 += VL) {
    Vec x = Vec::loadu(s + j0);
    Vec d = at::vec::fmadd(x, sc, neg_m);  // s - m <= 0
    Vec jv = Vec::arange(static_cast<float>(k0 + j0), 1.0f);
    Vec e;
    if (j0 >= a && j0 + VL <= b) {
      e = exp_nonpositive(d);
    } else {
      Vec mask = lane_mask(j0, a, b);
      d = Vec::blendv(zero, d, mask);
      e = Vec::blendv(zero, exp_nonpositive(d), mask);
    }
    st.z = st.z + e;
    st.a = at::vec::fnmadd(e, d, st.a);  // a - e * d
    st.s2 = at::vec::fmadd(e, e, st.s2);
    st.dist = at::vec::fmadd(e, (vpos - jv).abs(), st.dist);
  }
}

inline float dot(const float* x, const float* y, int D) {
  float acc = 0.0f;
  for (int d = 0; d < D; ++d) acc = std::fma(x[d], y[d], acc);
  return acc;
}

}  // namespace

// q: (B, H, R, D), k: (B, Hkv, K, D), any float dtype (H a multiple of Hkv: query head h reads key
// head h / (H / Hkv)); lo, hi, pos: (B * H * R,) int64. Returns (9, B * H * R) float32: x_max,
// x_min, Z, A, S2, D, e_first, e_own, check.
torch::Tensor qk_row_sums(torch::Tensor q_in, torch::Tensor k_in, double scale_d, torch::Tensor lo_t,
                          torch::Tensor hi_t, torch::Tensor pos_t) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4, "q and k must be 4-d");
  const int64_t B = q_in.size(0), H = q_in.size(1), R = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), K = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D && Hkv > 0 && H % Hkv == 0, "q and k shapes do not match");
  const int64_t N = B * H * R;
  TORCH_CHECK(lo_t.numel() == N && hi_t.numel() == N && pos_t.numel() == N, "lo, hi, pos: one per row");
  const int64_t G = H / Hkv;
  const float scale = static_cast<float>(scale_d);
  torch::Tensor q = q_in.to(torch::kFloat).contiguous();
  torch::Tensor k = k_in.to(torch::kFloat).contiguous();
  torch::Tensor lo_c = lo_t.to(torch::kLong).contiguous(), hi_c = hi_t.to(torch::kLong).contiguous(),
                pos_c = pos_t.to(torch::kLong).contiguous();
  const int64_t* lo = lo_c.data_ptr<int64_t>();
  const int64_t* hi = hi_c.data_ptr<int64_t>();
  const int64_t* pos = pos_c.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();

  // Keys packed tile by tile, transposed: kt[b, h, tile, d, jj] = k[b, h, tile * KT + jj, d] (0 past K).
  const int64_t tiles = (K + KT - 1) / KT;
  torch::Tensor kt = torch::empty({B, Hkv, tiles, D, KT}, q.options());
  float* ktp = kt.data_ptr<float>();
  at::parallel_for(0, B * Hkv * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / tiles, t = i % tiles;
      const float* src = kp + (bh * K + t * KT) * D;
      float* dst = ktp + i * D * KT;
      const int64_t n = std::min<int64_t>(KT, K - t * KT);
      for (int64_t jj = 0; jj < KT; ++jj)
        for (int64_t d = 0; d < D; ++d) dst[d * KT + jj] = jj < n ? src[jj * D + d] : 0.0f;
    }
  });

  torch::Tensor out = torch::empty({9, N}, q.options());
  float* op = out.data_ptr<float>();
  // Work items: (row tile, b, key head), the row tiles holding the most keys (the last, under a
  // causal mask) first, handed out one at a time so that threads finish together.
  const int64_t rows_per_group = std::max<int64_t>(1, ROWS_PER_TILE / G);
  const int64_t row_tiles = (R + rows_per_group - 1) / rows_per_group;
  const int64_t items = row_tiles * B * Hkv;
  std::atomic<int64_t> next{0};
  const int threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int64_t tile_rows = ((G * rows_per_group + MR - 1) / MR) * MR;
    std::vector<float> qbuf(tile_rows * D), sbuf(tile_rows * KT);
    std::vector<int64_t> row_of(tile_rows);
    std::vector<int> rlo(tile_rows), rhi(tile_rows);
    std::vector<RowState> st(tile_rows);
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
        const int64_t l = std::max<int64_t>(lo[row], 0), h = std::min<int64_t>(hi[row], K);
        rlo[t] = static_cast<int>(l);
        rhi[t] = static_cast<int>(std::max(l, h));
        if (h > l) {
          kmin = std::min(kmin, l);
          kmax = std::max(kmax, h);
        }
        std::copy(qp + row * D, qp + (row + 1) * D, qbuf.begin() + t * D);
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
            if (a < e) fold(st[t], sbuf.data() + t * KT, a, e, k0, scale, static_cast<float>(pos[row_of[t]]));
          }
        }
      }
      for (int64_t t = 0; t < n_rows; ++t) {
        const RowState& s = st[t];
        const int64_t row = row_of[t];
        float* o = op + row;
        if (rhi[t] <= rlo[t]) {  // sees nothing
          o[0] = -INF, o[N] = INF;
          for (int i = 2; i < 9; ++i) o[i * N] = 0.0f;
          continue;
        }
        const float m = s.m * scale;
        const float* qrow = qbuf.data() + t * D;
        const float* kh = kp + (b * Hkv + hk) * K * D;
        auto e_at = [&](int64_t j) -> float {
          if (j < rlo[t] || j >= rhi[t]) return 0.0f;
          return std::exp(dot(qrow, kh + j * D, static_cast<int>(D)) * scale - m);
        };
        o[0] = s.m;
        o[N] = reduce_min(s.vmin);
        o[2 * N] = static_cast<float>(reduce_sum(s.z));
        o[3 * N] = static_cast<float>(std::max(0.0, reduce_sum(s.a)));
        o[4 * N] = static_cast<float>(reduce_sum(s.s2));
        o[5 * N] = static_cast<float>(reduce_sum(s.dist));
        o[6 * N] = e_at(rlo[t]);
        o[7 * N] = e_at(pos[row]);
        o[8 * N] = static_cast<float>(reduce_sum(s.check));
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qk_row_sums", &qk_row_sums, "Per-row softmax sums of q.k over key intervals, one pass");
}
