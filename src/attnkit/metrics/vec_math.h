// What attnkit's C++ kernels share (qk_stats.cpp, seam/kernels/paged_decode.cpp): the
// CPU_CAPABILITY of -march=native for ATen's Vectorized, exp of non-positive arguments, the sum of
// a vector's lanes, and running a worker on several threads.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/cpu/vec/vec.h>

#include <thread>
#include <vector>

namespace attnkit_vec {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;

// exp(t) for t <= 0 (NaN for NaN): t = n ln 2 + r with n the nearest integer to t log2(e) and r
// from a two-part ln 2 (Cody-Waite), e^r by Cephes' single-precision polynomial (~1 ulp), times
// 2^n. (A base-2 form saves two operations but needs scale * log2(e) rounded to float32, which
// moves every logit by up to 6e-8 of itself in one direction: a bias on sharp rows' entropy.)
inline Vec exp_nonpositive(Vec t) {
  const Vec log2e(1.44269504088896341f), ln2_hi(0.693359375f), ln2_lo(-2.12194440e-4f);
  const Vec p0(1.9875691500e-4f), p1(1.3981999507e-3f), p2(8.3334519073e-3f), p3(4.1665795894e-2f),
      p4(1.6666665459e-1f), p5(5.0000001201e-1f), one(1.0f);
#if defined(CPU_CAPABILITY_AVX512)
  // roundscale to nearest; scalef multiplies by 2^n exactly, giving 0 (or a subnormal) far below.
  // A NaN t becomes -104 here (max returns its 2nd operand): its row is flagged by ``check``.
  __m512 x = _mm512_max_ps(t, _mm512_set1_ps(-104.0f));
  Vec xv(x);
  Vec n(_mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  Vec under = t < Vec(-87.0f);  // all-ones where e^t is below float32's normal range (false for NaN)
  Vec xv = at::vec::maximum(t, Vec(-87.0f));  // NaN-propagating
  Vec n = (xv * log2e + Vec(0.5f)).floor();
#endif
  Vec r = at::vec::fnmadd(n, ln2_hi, xv);
  r = at::vec::fnmadd(n, ln2_lo, r);
  Vec y = at::vec::fmadd(p0, r, p1);
  y = at::vec::fmadd(y, r, p2);
  y = at::vec::fmadd(y, r, p3);
  y = at::vec::fmadd(y, r, p4);
  y = at::vec::fmadd(y, r, p5);
  y = at::vec::fmadd(y, r * r, r + one);
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_scalef_ps(y, n));
#else
  IVec ni = at::vec::convert_to_int_of_same_size(n);  // 2^n through the exponent bits, n in [-126, 0]
  Vec pow2 = at::vec::cast<float>((ni + IVec(127)) << IVec(23));
  return Vec::blendv(y * pow2, Vec(0.0f), under);
#endif
}

// Sum of the lanes.
inline float reduce_sum(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.0f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
#endif
}

// Runs worker() on `threads` threads (this one and threads - 1 more) and waits for them all. Not
// at::parallel_for: its OpenMP form is a pragma in a header, which a build without -fopenmp
// quietly runs on one thread, and linking a second OpenMP runtime beside torch's is worse. A
// thread start costs tens of microseconds: callers use one thread for small work.
template <class F>
void on_threads(int threads, const F& worker) {
  std::vector<std::thread> others;
  for (int i = 1; i < threads; ++i) others.emplace_back(worker);
  worker();
  for (auto& t : others) t.join();
}

}  // namespace attnkit_vec
