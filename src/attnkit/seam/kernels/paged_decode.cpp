// One decoding step of block-sparse attention over a KV cache's pages (key blocks), on the CPU.
//
// quest_step_pages: the pages a step keeps, from the pages' element-wise key max and min (Quest):
//   per KV head, up = sum over the group's query heads of max(q, 0), down = sum of min(q, 0), and
//   page p's score = up . kmax_p + down . kmin_p (the upper bound of q.k over the page, summed over
//   the group); the forced pages first (the last `local`, latest first; then the first `first`,
//   latest first), then the best-scored free pages up to `budget`, ties to the later page, NaN
//   last; with a padding mask `seen` (B, K), a page it hides whole below NaN too. The same order as
//   paged_decode.py's select_step_pages. MoBA calls it with each page's mean as both max and min.
// pool_pages: the (mean, max, min) of each page of keys from page `start` on, into a buffer kept
//   across steps (the mean summed in double), and the last key of each full page (its mark); from
//   page 0 instead when the key that ends page start - 1 is not its mark (another cache).
// paged_attention: softmax(q k^T * scale) v over the kept pages only (and of them, with a padding
//   mask `seen`, the keys the batch row may see; a row that sees none is zero), read in place from the
//   cache (any strides; no gather, no copy of the cache), the G query heads of a KV group against
//   that group's pages, flash-style: one page of scores at a time, folded into each row's running
//   max, sum and output (online softmax); one (batch row, KV head) per thread of torch's intra-op
//   threads when the kept keys are many. float32 / bfloat16 / float16 inputs accumulate in
//   float32 (the half types converted a page at a time), float64 in double.
//
// Built by torch.utils.cpp_extension on the machine it runs on (-O3 -march=native).

#include "../../metrics/vec_math.h"  // first: CPU_CAPABILITY for ATen's Vectorized; exp_nonpositive

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/NumericUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();
// Kept keys (over batch rows and KV heads) below which a step runs on one thread: starting a
// thread costs tens of microseconds, about what 16k keys of attention cost.
constexpr int64_t MIN_KEYS_THREADED = 1 << 14;

// Accumulation type: double for double inputs, float otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t d = 0;
  float s = 0.0f;
  if (n >= VL) {
    Vec acc(0.0f);
    for (; d + VL <= n; d += VL) acc = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc);
    s = attnkit_vec::reduce_sum(acc);
  }
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

inline double dot(const double* a, const double* b, int64_t n) {
  double s = 0.0;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// x[i] = exp(x[i] - m) for x[i] <= m, returning their sum.
inline float exp_sum(float* x, int64_t n, float m) {
  int64_t i = 0;
  Vec sum(0.0f);
  for (; i + VL <= n; i += VL) {
    Vec e = attnkit_vec::exp_nonpositive(Vec::loadu(x + i) - Vec(m));
    e.store(x + i);
    sum = sum + e;
  }
  float s = attnkit_vec::reduce_sum(sum);
  for (; i < n; ++i) s += (x[i] = std::exp(x[i] - m));
  return s;
}

inline double exp_sum(double* x, int64_t n, double m) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - m));
  return s;
}

// y += sum over j < n of w[j] x_j (the rows x_j of length m): each chunk of y held in a register
// over all n rows (read and written once a page, not once a key)
inline void add_weighted_rows(float* y, const float* w, const float* const* x, int64_t n, int64_t m) {
  int64_t d = 0;
  for (; d + VL <= m; d += VL) {
    Vec a = Vec::loadu(y + d);
    for (int64_t j = 0; j < n; ++j) a = at::vec::fmadd(Vec(w[j]), Vec::loadu(x[j] + d), a);
    a.store(y + d);
  }
  for (; d < m; ++d) {
    float a = y[d];
    for (int64_t j = 0; j < n; ++j) a += w[j] * x[j][d];
    y[d] = a;
  }
}

inline void add_weighted_rows(double* y, const double* w, const double* const* x, int64_t n, int64_t m) {
  for (int64_t d = 0; d < m; ++d) {
    double a = y[d];
    for (int64_t j = 0; j < n; ++j) a += w[j] * x[j][d];
    y[d] = a;
  }
}

// A row of n values of t (element stride `stride`) as accumulation-type values: the row itself
// when it already is one (contiguous, same type), else converted into `buf`.
template <typename T, typename A = acc_t<T>>
inline const A* row(const T* t, int64_t stride, int64_t n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    if (stride == 1) return t;
  }
  for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<A>(t[d * stride]);
  return buf;
}

at::Tensor quest_step_pages(const at::Tensor& q, const at::Tensor& k_max, const at::Tensor& k_min, int64_t budget,
                            int64_t local, int64_t first, const std::optional<at::Tensor>& seen, int64_t block_size) {
  TORCH_CHECK(q.dim() == 3 && k_max.dim() == 4 && k_min.sizes() == k_max.sizes(),
              "quest_step_pages: q (B, H, D), k_max and k_min (B, Hkv, P, D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hk = k_max.size(1), P = k_max.size(2);
  TORCH_CHECK(k_max.size(0) == B && k_max.size(3) == D && H % Hk == 0, "quest_step_pages: shapes do not match");
  // seen: (B, K) bool, the keys each batch row may see (a padding mask), pages of block_size keys: a
  // page it hides whole ranks below every other (below NaN bounds too), as ``visible_blocks`` ranks it
  TORCH_CHECK(!seen.has_value() || (seen->dim() == 2 && seen->size(0) == B && seen->scalar_type() == at::kBool &&
                                    seen->is_cpu() && block_size > 0 && (seen->size(1) + block_size - 1) / block_size == P),
              "quest_step_pages: seen is (B, K) bool over the pages' keys, on the CPU");
  const bool* sp = seen.has_value() ? seen->const_data_ptr<bool>() : nullptr;
  const int64_t ss0 = seen.has_value() ? seen->stride(0) : 0, ss1 = seen.has_value() ? seen->stride(1) : 0;
  const int64_t K = seen.has_value() ? seen->size(1) : 0;
  TORCH_CHECK(0 <= local && 0 <= first && first + local <= P && first + local <= budget && budget <= P,
              "quest_step_pages: need first + local <= budget <= pages");
  const int64_t G = H / Hk, rest = budget - local - first;
  at::Tensor out = at::empty({B, Hk, budget}, q.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "quest_step_pages", [&] {
    TORCH_CHECK(k_max.scalar_type() == q.scalar_type() && k_min.scalar_type() == q.scalar_type(),
                "quest_step_pages: q, k_max and k_min of one dtype");
    const scalar_t *qp = q.const_data_ptr<scalar_t>(), *hp = k_max.const_data_ptr<scalar_t>(),
                   *lp = k_min.const_data_ptr<scalar_t>();
    const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
    const int64_t hs0 = k_max.stride(0), hs1 = k_max.stride(1), hs2 = k_max.stride(2), hs3 = k_max.stride(3);
    const int64_t ls0 = k_min.stride(0), ls1 = k_min.stride(1), ls2 = k_min.stride(2), ls3 = k_min.stride(3);
    std::vector<double> up(D), down(D), score(P);
    std::vector<int64_t> order(P);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hk = 0; hk < Hk; ++hk) {
        int64_t* dst = o + (b * Hk + hk) * budget;
        for (int64_t i = 0; i < local; ++i) *dst++ = P - 1 - i;  // forced: the latest pages, latest first
        for (int64_t i = 0; i < first; ++i) *dst++ = first - 1 - i;  // then the sinks, latest first
        if (rest == 0) continue;
        std::fill(up.begin(), up.end(), 0.0);
        std::fill(down.begin(), down.end(), 0.0);
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t* qh = qp + b * qs0 + (hk * G + g) * qs1;
          for (int64_t d = 0; d < D; ++d) {
            const double x = static_cast<double>(qh[d * qs2]);
            (x > 0 ? up : down)[d] += x;
          }
        }
        const int64_t lo = first, hi = P - local;  // the free pages
        for (int64_t p = lo; p < hi; ++p) {
          if (sp != nullptr) {
            bool shown = false;
            for (int64_t j = p * block_size, j1 = std::min(j + block_size, K); j < j1 && !shown; ++j)
              shown = sp[b * ss0 + j * ss1];
            if (!shown) {
              score[p] = -std::numeric_limits<double>::infinity();
              continue;
            }
          }
          const scalar_t* mx = hp + b * hs0 + hk * hs1 + p * hs2;
          const scalar_t* mn = lp + b * ls0 + hk * ls1 + p * ls2;
          double s = 0.0;
          for (int64_t d = 0; d < D; ++d)
            s += up[d] * static_cast<double>(mx[d * hs3]) + down[d] * static_cast<double>(mn[d * ls3]);
          score[p] = std::isnan(s) ? -1e30 : s;
        }
        std::iota(order.begin() + lo, order.begin() + hi, lo);
        // best first; of two equal scores the later page first
        std::partial_sort(order.begin() + lo, order.begin() + lo + rest, order.begin() + hi,
                          [&](int64_t a, int64_t c) { return score[a] > score[c] || (score[a] == score[c] && a > c); });
        for (int64_t i = 0; i < rest; ++i) *dst++ = order[lo + i];
      }
    }
  });
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pages,
                           int64_t block_size, double scale, const std::optional<at::Tensor>& seen) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && pages.dim() == 3,
              "paged_attention: q (B, H, D), k and v (B, Hkv, K, D|Dv), pages (B, Hkv, S)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hk = k.size(1), K = k.size(2), Dv = v.size(3);
  const int64_t S = pages.size(2), bs = block_size;
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hk && v.size(2) == K && k.size(3) == D && H % Hk == 0 &&
                  pages.size(0) == B && pages.size(1) == Hk && bs > 0,
              "paged_attention: shapes do not match");
  // seen: (B, K) bool, the keys each batch row may see (a padding mask; any strides), or none = all
  TORCH_CHECK(!seen.has_value() || (seen->dim() == 2 && seen->size(0) == B && seen->size(1) == K &&
                                    seen->scalar_type() == at::kBool && seen->is_cpu()),
              "paged_attention: seen is (B, K) bool, on the CPU");
  const bool* sp = seen.has_value() ? seen->const_data_ptr<bool>() : nullptr;
  const int64_t ss0 = seen.has_value() ? seen->stride(0) : 0, ss1 = seen.has_value() ? seen->stride(1) : 0;
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "paged_attention: one dtype");
  TORCH_CHECK(pages.scalar_type() == at::kLong, "paged_attention: pages are int64");
  const int64_t G = H / Hk;
  at::Tensor out = at::empty({B, H, Dv}, q.options());
  const at::Tensor pg = pages.contiguous();
  const int64_t* pp = pg.const_data_ptr<int64_t>();
  // torch's intra-op threads (1 inside a parallel region), one (batch row, KV head) at a time each,
  // where the kept keys are enough to pay for starting them
  const int64_t items = B * Hk;
  const int threads = (at::in_parallel_region() || items * S * bs < MIN_KEYS_THREADED)
                          ? 1 : static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), items));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t *qp = q.const_data_ptr<scalar_t>(), *kp = k.const_data_ptr<scalar_t>(),
                   *vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2), ks3 = k.stride(3);
    const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2), vs3 = v.stride(3);
    const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
    // rows of keys and values each in one piece (a cache's layout): the next page is prefetched
    const bool rows_contiguous = ks3 == 1 && vs3 == 1;
    const int64_t key_bytes = D * static_cast<int64_t>(sizeof(scalar_t)), value_bytes = Dv * static_cast<int64_t>(sizeof(scalar_t));
    std::atomic<int64_t> next{0};
    std::atomic<bool> bad{false};
    std::atomic<int64_t> bad_page{0};
    attnkit_vec::on_threads(threads, [&]() {
      std::vector<A> qs(G * D), acc(G * Dv), m(G), l(G), s(G * bs), kbuf(D), vbuf(bs * Dv);
      std::vector<int64_t> shown(bs);  // a page's keys the row may see
      std::vector<const A*> vrows(bs);  // their value rows (in the cache, or converted into vbuf)
      for (int64_t item = next++; item < items; item = next++) {
        const int64_t b = item / Hk, hk = item % Hk;
        for (int64_t g = 0; g < G; ++g) {  // the group's queries, scaled
          const scalar_t* qh = qp + b * qs0 + (hk * G + g) * qs1;
          for (int64_t d = 0; d < D; ++d) qs[g * D + d] = static_cast<A>(qh[d * qs2]) * static_cast<A>(scale);
        }
        std::fill(acc.begin(), acc.end(), A(0));
        std::fill(m.begin(), m.end(), -std::numeric_limits<A>::infinity());
        std::fill(l.begin(), l.end(), A(0));
        const scalar_t* kh = kp + b * ks0 + hk * ks1;
        const scalar_t* vh = vp + b * vs0 + hk * vs1;
        const int64_t* kept = pp + item * S;
        const bool* sr = sp == nullptr ? nullptr : sp + b * ss0;
        bool any_shown = false;  // the row sees some key (else its output is zero)
        for (int64_t i = 0; i < S; ++i) {
          const int64_t j0 = kept[i] * bs, j1 = std::min(j0 + bs, K);
          if (kept[i] < 0 || j1 <= j0) {  // reported after the threads are done (no throw inside one)
            bad_page = kept[i];
            bad = true;
            break;
          }
          if (rows_contiguous && i + 1 < S && kept[i + 1] >= 0 && kept[i + 1] * bs < K) {
            // the next kept page lies elsewhere in the cache: ask for its keys and values now, so that
            // they arrive while this page is computed (the hardware prefetcher follows a page, not the jump)
            const int64_t p0 = kept[i + 1] * bs, p1 = std::min(p0 + bs, K);
            for (int64_t j = p0; j < p1; ++j) {
              const char* kr = reinterpret_cast<const char*>(kh + j * ks2);
              const char* vr = reinterpret_cast<const char*>(vh + j * vs2);
              for (int64_t byte = 0; byte < key_bytes; byte += 64) __builtin_prefetch(kr + byte);
              for (int64_t byte = 0; byte < value_bytes; byte += 64) __builtin_prefetch(vr + byte);
            }
          }
          int64_t n = 0;  // the page's keys the row may see: their positions, then their scores (G, n)
          for (int64_t j = j0; j < j1; ++j)
            if (sr == nullptr || sr[j * ss1]) shown[n++] = j;
          if (n == 0) continue;  // a page the mask hides whole
          any_shown = true;
          for (int64_t jj = 0; jj < n; ++jj) {
            const A* kr = row(kh + shown[jj] * ks2, ks3, D, kbuf.data());
            for (int64_t g = 0; g < G; ++g) s[g * bs + jj] = dot(qs.data() + g * D, kr, D);
          }
          for (int64_t g = 0; g < G; ++g) {  // fold into the running max and sum
            A* sg = s.data() + g * bs;
            const A page_max = *std::max_element(sg, sg + n);
            if (page_max > m[g]) {
              const A c = std::exp(m[g] - page_max);  // 0 on the first page
              l[g] *= c;
              for (int64_t d = 0; d < Dv; ++d) acc[g * Dv + d] *= c;
              m[g] = page_max;
            }
            l[g] += exp_sum(sg, n, m[g]);
          }
          for (int64_t jj = 0; jj < n; ++jj) vrows[jj] = row(vh + shown[jj] * vs2, vs3, Dv, vbuf.data() + jj * Dv);
          for (int64_t g = 0; g < G; ++g) add_weighted_rows(acc.data() + g * Dv, s.data() + g * bs, vrows.data(), n, Dv);
        }
        for (int64_t g = 0; g < G; ++g) {  // a row that sees no key is zero, not NaN (a NaN key still gives NaN)
          scalar_t* oh = op + (b * H + hk * G + g) * Dv;
          for (int64_t d = 0; d < Dv; ++d) oh[d] = static_cast<scalar_t>(any_shown ? acc[g * Dv + d] / l[g] : A(0));
        }
      }
    });
    TORCH_CHECK(!bad.load(), "paged_attention: page ", bad_page.load(), " is outside the cache");
  });
  return out;
}

int64_t pool_pages(const at::Tensor& k, at::Tensor& stats, at::Tensor& marks, int64_t block_size, int64_t start) {
  TORCH_CHECK(k.dim() == 4 && stats.dim() == 5 && stats.size(0) == 3 && marks.dim() == 4,
              "pool_pages: k (B, Hkv, K, D), stats (3, B, Hkv, capacity, D), marks (B, Hkv, capacity, D)");
  const int64_t B = k.size(0), Hk = k.size(1), K = k.size(2), D = k.size(3), bs = block_size;
  const int64_t pages = (K + bs - 1) / bs;
  TORCH_CHECK(stats.size(1) == B && stats.size(2) == Hk && stats.size(4) == D && stats.size(3) >= pages &&
                  marks.size(0) == B && marks.size(1) == Hk && marks.size(2) >= pages && marks.size(3) == D && start >= 0,
              "pool_pages: shapes do not match");
  TORCH_CHECK(stats.scalar_type() == k.scalar_type() && marks.scalar_type() == k.scalar_type(), "pool_pages: one dtype");
  TORCH_CHECK(start <= K / bs, "pool_pages: the pages before start must be full pages of k");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "pool_pages", [&] {
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    scalar_t* sp = stats.data_ptr<scalar_t>();
    scalar_t* mp = marks.data_ptr<scalar_t>();
    const int64_t k0 = k.stride(0), k1 = k.stride(1), k2 = k.stride(2), k3 = k.stride(3);
    const int64_t s0 = stats.stride(0), s1 = stats.stride(1), s2 = stats.stride(2), s3 = stats.stride(3),
                  s4 = stats.stride(4);
    const int64_t m0 = marks.stride(0), m1 = marks.stride(1), m2 = marks.stride(2), m3 = marks.stride(3);
    // the same cache as before if the last page kept still ends in the key it ended in (bit for bit,
    // as torch.equal); else every page is pooled again
    for (int64_t b = 0; b < B && start > 0; ++b)
      for (int64_t hk = 0; hk < Hk && start > 0; ++hk) {
        const scalar_t* key = kp + b * k0 + hk * k1 + (start * bs - 1) * k2;
        const scalar_t* mark = mp + b * m0 + hk * m1 + (start - 1) * m2;
        for (int64_t d = 0; d < D; ++d)
          if (!(key[d * k3] == mark[d * m3])) {
            start = 0;
            break;
          }
      }
    std::vector<double> sum(D);
    std::vector<scalar_t> hi(D), lo(D);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hk = 0; hk < Hk; ++hk) {
        const scalar_t* kh = kp + b * k0 + hk * k1;
        for (int64_t p = start; p < pages; ++p) {
          const int64_t j0 = p * bs, j1 = std::min(j0 + bs, K);
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t x = kh[j0 * k2 + d * k3];
            sum[d] = static_cast<double>(x), hi[d] = x, lo[d] = x;
          }
          for (int64_t j = j0 + 1; j < j1; ++j) {
            const scalar_t* kj = kh + j * k2;
            for (int64_t d = 0; d < D; ++d) {  // a NaN key makes its page's max and min NaN, as amax / amin
              const scalar_t x = kj[d * k3];
              sum[d] += static_cast<double>(x);
              if (x > hi[d] || at::_isnan(x)) hi[d] = at::_isnan(hi[d]) ? hi[d] : x;
              if (x < lo[d] || at::_isnan(x)) lo[d] = at::_isnan(lo[d]) ? lo[d] : x;
            }
          }
          scalar_t* out = sp + b * s1 + hk * s2 + p * s3;
          for (int64_t d = 0; d < D; ++d) {
            out[d * s4] = static_cast<scalar_t>(sum[d] / static_cast<double>(j1 - j0));
            out[s0 + d * s4] = hi[d];
            out[2 * s0 + d * s4] = lo[d];
          }
          if (j1 - j0 == bs) {  // a full page: its last key marks it
            scalar_t* mark = mp + b * m0 + hk * m1 + p * m2;
            for (int64_t d = 0; d < D; ++d) mark[d * m3] = kh[(j1 - 1) * k2 + d * k3];
          }
        }
      }
    }
  });
  return start;
}

}  // namespace

// torch.ops.attnkit_paged.quest_step_pages / paged_attention
TORCH_LIBRARY(attnkit_paged, m) {
  m.def("quest_step_pages(Tensor q, Tensor k_max, Tensor k_min, int budget, int local, int first, Tensor? seen=None, "
        "int block_size=0) -> Tensor",
        &quest_step_pages);
  m.def("pool_pages(Tensor k, Tensor(a!) stats, Tensor(b!) marks, int block_size, int start) -> int", &pool_pages);
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor pages, int block_size, float scale, Tensor? seen=None) "
        "-> Tensor",
        &paged_attention);
}
