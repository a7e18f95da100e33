// The fused CPU row ops: per token, the loss and dloss/dlogits over one chunk's logit rows, in a
// few passes over a row held in the core's cache (fastkd/cpu_rows.py builds and loads this file
// and documents its interface; docs/math.md derives every formula; the spec every test holds
// these to is fastkd/reference.py, the Triton kernels in kernels/ run the same passes on a GPU).
//
// Dense row (one token; s: V student logits, t: K = min(V, V_t) shared teacher ids):
//   A. load and transform into fp32 scratch: x = head(s) (logit scale, softcap), y = head(t) / T;
//      the maxima m_s (of s over V), m_a (of a = s / T over K), m_b (of b = y). A NaN or +inf
//      makes a maximum NaN, and with it the row's results: a model's NaN reaches the loss.
//   B. the sums l_s = sum exp(s - m_s) (CE), l_a = sum exp(a - m_a), l_b = sum exp(b - m_b), the
//      entropy's h = sum exp(a - m_a)(m_a - a) (H = log l_a + h / l_a), and for the KLs the
//      expectation of u = (a - m_a) - (b - m_b):
//        KL(p||q) = E_p[-u] - log l_b + log l_a,   KL(q||p) = E_q[u] - log l_a + log l_b
//      Each exponential is taken once and kept for the passes after: exp(a - m_a) in z (or, for
//      CE alone, exp(s - m_s)), exp(b - m_b) in y (forward KL: b is not needed again) or in e
//      (the three-pass divergences).
//   C. (jsd, skew KLs, tvd) D = sum d_v and S = E_q[g] from log q = (a - m_a) - log l_a,
//      log p likewise and the mixture m (`terms`); g_v is kept in y for the last pass
//   G. the gradient over x, then x back over the row in the buffer's dtype:
//        r sigma (w_ce (exp(s - m_s) / l_s - [v = y]) + w_kd T k_v [v < K]) (1 - (s / c)^2)
//      k = q - p (forward KL), q (u - E_q[u]) (reverse KL), q (g - S) (the others)
// Sparse row (the teacher as k slots: ids, log-probabilities at T): the Triton kernel
// kernels/sparse.py's passes (see its header): the slots gathered (and, for the bucket tail,
// marked -inf in the row so that pass B sums outside them), the divergence over the k (+1) buckets,
// the dense gradient pass, the fix-up at the slots' ids.
//
// Arithmetic in fp32 with double accumulators (fp32 vector sums over BLOCK vectors, then added in
// double); vectors are GCC vector extensions of 16 floats (split into two or four registers where
// the CPU's are narrower); exp, log and tanh are Cephes' single-precision polynomials (~1 ulp).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

constexpr int W = 16;          // floats per vector
constexpr int64_t BLOCK = 64;  // vectors summed in fp32 before a sum is added in double
constexpr float INF = std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf as_float(vi v) { vf f; std::memcpy(&f, &v, sizeof f); return f; }
inline vi as_int(vf v) { vi i; std::memcpy(&i, &v, sizeof i); return i; }

inline vi iota() {
  vi v;
  for (int k = 0; k < W; ++k) v[k] = k;
  return v;
}
const vi LANE = iota();
inline vi below(int64_t j0, int64_t n) { return (LANE + int32_t(j0)) < int32_t(n); }

// a maximum that keeps a NaN: once a NaN is seen the maximum is NaN
inline vf nanmax(vf m, vf x) { return ((x > m) | (x != x)) ? x : m; }
inline float nanmax(float m, float x) { return (x > m || x != x) ? x : m; }

inline float hmax(vf v) {
  float m = -INF;
  for (int k = 0; k < W; ++k) m = nanmax(m, v[k]);
  return m;
}

inline double hsum(vf v) {
  double s = 0;
  for (int k = 0; k < W; ++k) s += v[k];
  return s;
}

// A running sum: fp32 vector lanes within a block of ids, double across blocks.
struct Sum {
  vf v = vf{};
  double total = 0;
  void flush() { total += hsum(v); v = vf{}; }
};

// 2^n e^r, |r| <= ln2 / 2: Cephes expf's polynomial (x already clamped to [lo, hi])
inline vf exp_core(vf x) {
  vf n = x * 1.44269504088896341f + 12582912.0f;  // round to nearest: 1.5 * 2^23
  n = n - 12582912.0f;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * r * r + r + 1.0f;
  return y * as_float((__builtin_convertvector(n, vi) + 127) << 23);
}

constexpr float EXP_LO = -87.3365478515625f, EXP_HI = 88.3762626647949f;

// exp(x) for x <= 0 (a logit minus its row's maximum): 0 below e^-87.3 (denormals flushed) and at
// -inf; NaN stays NaN
inline vf vexp0(vf x) {
  vf y = exp_core(x < EXP_LO ? splat(EXP_LO) : x);
  return x < EXP_LO ? splat(0.0f) : y;
}

// exp(x) anywhere: as vexp0, and inf above e^88.4
inline vf vexp(vf x) {
  vf xc = x > EXP_HI ? splat(EXP_HI) : x;
  vf y = exp_core(xc < EXP_LO ? splat(EXP_LO) : xc);
  y = x < EXP_LO ? splat(0.0f) : y;
  return x > EXP_HI ? splat(INF) : y;
}

// log(x), Cephes logf: x = f 2^e with f in [sqrt(1/2), sqrt(2)), a polynomial in f - 1.
// log 0 = -inf; negative or NaN: NaN; +inf: +inf. (Denormals lose precision: used on mixtures of
// probabilities, whose terms there weigh < 1e-38.)
inline vf vlog(vf x) {
  vi bits = as_int(x);
  vi e = ((bits >> 23) & 0xff) - 126;
  vf f = as_float((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  vi small = f < 0.707106781186547524f;
  e = small ? e - 1 : e;
  f = (small ? f + f : f) - 1.0f;
  vf z = f * f;
  vf p = splat(7.0376836292e-2f);
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  vf ef = __builtin_convertvector(e, vf);
  vf y = p * f * z + ef * -2.12194440e-4f - 0.5f * z;
  y = f + y + ef * 0.693359375f;
  y = x == 0.0f ? splat(-INF) : y;
  y = x == INF ? splat(INF) : y;
  return (x < 0.0f) | (x != x) ? splat(NAN) : y;
}

// tanh, Cephes tanhf: an odd polynomial for |x| < 0.625, else 1 - 2 / (exp(2|x|) + 1)
inline vf vtanh(vf x) {
  vf ax = x < 0.0f ? -x : x;
  vf z = x * x;
  vf p = splat(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  vf small = p * z * x + x;
  vf big = 1.0f - 2.0f / (vexp(ax + ax) + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}

inline vf zero_unless(vi keep, vf x) { return keep ? x : splat(0.0f); }

// ---- rows in and out: fp32, bf16 or fp16 buffers, fp32 scratch -------------------------------

enum Dtype : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

inline int64_t itemsize(int32_t dtype) { return dtype == F32 ? 4 : 2; }

void widen(const void* src, int32_t dtype, float* dst, int64_t n) {
  if (dtype == F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dtype == BF16) {
    const uint16_t* h = static_cast<const uint16_t*>(src);
    for (int64_t v = 0; v < n; ++v) {
      uint32_t u = uint32_t(h[v]) << 16;
      std::memcpy(dst + v, &u, sizeof u);
    }
  } else {
    const _Float16* h = static_cast<const _Float16*>(src);
    for (int64_t v = 0; v < n; ++v) dst[v] = float(h[v]);
  }
}

void narrow(const float* src, void* dst, int32_t dtype, int64_t n) {
  if (dtype == F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dtype == BF16) {  // round to nearest even; NaN stays a (quiet) NaN
    uint16_t* h = static_cast<uint16_t*>(dst);
    for (int64_t v = 0; v < n; ++v) {
      uint32_t u;
      std::memcpy(&u, src + v, sizeof u);
      uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
      h[v] = uint16_t(src[v] != src[v] ? ((u >> 16) | 0x40u) : rounded);
    }
  } else {
    _Float16* h = static_cast<_Float16*>(dst);
    for (int64_t v = 0; v < n; ++v) h[v] = _Float16(src[v]);
  }
}

// x <- cap tanh(scale x / cap) (cap > 0) or scale x, then times post (1/T for the teacher)
void head(float* x, int64_t n, float scale, float cap, float post) {
  int64_t v = 0;
  if (cap > 0) {
    const float inv = scale / cap, out = cap * post;
    for (; v + W <= n; v += W) store(x + v, vtanh(load(x + v) * inv) * out);
    for (; v < n; ++v) x[v] = std::tanh(x[v] * inv) * out;
  } else if (scale * post != 1.0f) {
    for (; v < n; ++v) x[v] = x[v] * scale * post;
  }
}

typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
typedef _Float16 vf16 __attribute__((vector_size(W * sizeof(_Float16))));

// W values of a buffer from index v on, as fp32 (bf16: a 16-bit shift)
inline vf load_as_float(const void* src, int32_t dtype, int64_t v) {
  if (dtype == F32) return load(static_cast<const float*>(src) + v);
  if (dtype == BF16) {
    vh h;
    std::memcpy(&h, static_cast<const uint16_t*>(src) + v, sizeof h);
    const vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  vf16 h;
  std::memcpy(&h, static_cast<const _Float16*>(src) + v, sizeof h);
  return __builtin_convertvector(h, vf);
}

// W fp32 values into a buffer from index v on, rounded as `narrow` rounds
inline void store_as(void* dst, int32_t dtype, int64_t v, vf x) {
  if (dtype == F32) {
    store(static_cast<float*>(dst) + v, x);
  } else if (dtype == BF16) {
    vu u;
    std::memcpy(&u, &x, sizeof u);
    const vu bits = (x != x) ? ((u >> 16) | 0x40u) : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const vh h = __builtin_convertvector(bits, vh);
    std::memcpy(static_cast<uint16_t*>(dst) + v, &h, sizeof h);
  } else {
    const vf16 h = __builtin_convertvector(x, vf16);
    std::memcpy(static_cast<_Float16*>(dst) + v, &h, sizeof h);
  }
}

// x[0:n) = head(src[0:n)) in one pass (`widen`, then `head`, with the same roundings); returns
// their maximum (a NaN or +inf makes it NaN or +inf)
float load_row(const void* src, int32_t dtype, float* x, int64_t n, float scale, float cap,
               float post) {
  const bool capped = cap > 0, scaled = !capped && scale * post != 1.0f;
  const float inv = capped ? scale / cap : scale, out = cap * post;
  vf m = splat(-INF);
  int64_t v = 0;
  for (; v + W <= n; v += W) {
    vf val = load_as_float(src, dtype, v);
    if (capped) val = vtanh(val * inv) * out;
    else if (scaled) val = val * inv * post;
    store(x + v, val);
    m = nanmax(m, val);
  }
  float top = hmax(m);
  if (v < n) {
    widen(static_cast<const char*>(src) + v * itemsize(dtype), dtype, x + v, n - v);
    head(x + v, n - v, scale, cap, post);
    for (; v < n; ++v) top = nanmax(top, x[v]);
  }
  return top;
}

// ---- options, divergence terms ------------------------------------------------------------

enum Divergence : int32_t { FORWARD_KL, REVERSE_KL, JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL, TVD,
                            NONE };
enum Tail : int32_t { BUCKET, RENORMALIZE, IGNORE };

// Mirrors fastkd.cpu_rows._Options (ctypes): DistillOptions, and which terms to compute.
struct Options {
  int32_t divergence, ce, kd, values, grad, tail;
  int64_t ignore_index;
  double temperature, mix, ce_weight, kd_weight;  // mix: beta (jsd) or alpha (skew KLs)
  double s_scale, t_scale, s_cap, t_cap;          // cap 0: none
};

inline vf xlogr(vf x, vf lx, vf ly) {  // x (log x - log y), 0 where x = 0 (NaN stays NaN)
  return x != 0.0f ? x * (lx - ly) : splat(0.0f);
}

// Per-id terms of D = sum d_v and g_v = dD/dq_v up to a constant (docs/math.md, section 3) from
// log q, log p, q, p; the mixture m's log directly from the probabilities (they are exact to an
// ulp: no small sums to cancel; where both underflow, m = 0 and the guards below give 0).
// forward_kl's g is never used (its gradient is q - p).
struct Terms { vf d, g; };

template <int DIV>
inline Terms terms(vf lq, vf lp, vf q, vf p, float w) {
  if (DIV == FORWARD_KL) return {xlogr(p, lp, lq), splat(0.0f)};
  if (DIV == REVERSE_KL) return {xlogr(q, lq, lp), lq - lp};
  if (DIV == JSD) {  // w = beta: m = beta p + (1 - beta) q
    vf lm = vlog(w * p + (1.0f - w) * q);
    return {w * xlogr(p, lp, lm) + (1.0f - w) * xlogr(q, lq, lm), (1.0f - w) * (lq - lm)};
  }
  if (DIV == SKEW_FORWARD_KL) {  // w = alpha: m = alpha p + (1 - alpha) q
    vf lm = vlog(w * p + (1.0f - w) * q);
    return {xlogr(p, lp, lm), -(1.0f - w) * vexp(lp - lm)};
  }
  if (DIV == SKEW_REVERSE_KL) {  // m = (1 - alpha) p + alpha q
    vf ratio = lq - vlog((1.0f - w) * p + w * q);
    return {zero_unless(q != 0.0f, q * ratio), ratio - w * vexp(ratio)};
  }
  // TVD: 1/2 |p - q|, g = sign(q - p) / 2 with sign(0) = 0 (and NaN for a NaN, as torch.sign)
  vf d = p - q;
  vf g = d < 0.0f ? splat(0.5f) : (d > 0.0f ? splat(-0.5f) : splat(0.0f));
  return {0.5f * (d < 0.0f ? -d : d), d != d ? d : g};
}

// ---- the dense row -------------------------------------------------------------------------

struct Dense {
  void* s; int64_t ld_s; int32_t s_dtype; int64_t V;        // (n, V) logits in, G out
  const void* t; int64_t ld_t; int32_t t_dtype; int64_t K;  // (n, K) teacher logits, or null
  const int64_t* labels;                                   // (n,) or null
  const float* row_scale;                                  // (n,)
  float* out;                                              // (n, 4): loss, ce, kd, entropy
  const Options* o;
};

// Writes out[0:4] for an ignored row and zeroes its gradient: it counts for nothing.
void ignored_row(float* out, void* s_row, int64_t V, int32_t dtype, bool grad) {
  std::fill(out, out + 4, 0.0f);
  if (grad) std::memset(s_row, 0, V * itemsize(dtype));
}

// One dense row through the passes (see the file's header); x (V) and y (K) are fp32 scratch,
// padded with -inf past their width; z (V) and e (K) keep the exponentials of pass B.
template <int DIV>
struct DenseRow {
  static constexpr bool KD = DIV != NONE;
  static constexpr bool THREE = DIV >= JSD && DIV < NONE;  // pass C
  const Options& o;
  float *x, *y, *z, *e_b;
  int64_t V, K, nk, label;
  bool ce, ent, share, z_ce = false;  // z_ce: z holds exp(s - m_s) over V (CE alone)
  float inv_t, s_label = 0.0f, m_s = 0.0f, m_a = 0.0f, m_b = 0.0f;
  double l_s = 0, l_a = 0, l_b = 0, h = 0, e = 0;    // B's sums
  double log_la = 0, log_lb = 0, kd = 0, s_kd = 0;  // S = E_q[g] (three-pass); e_q (reverse KL)

  // A. load and transform the rows into x, y; the maxima
  void load(const void* s_row, int32_t s_dtype, const void* t_row, int32_t t_dtype) {
    const float scale = float(o.s_scale), cap = float(o.s_cap);
    const float m_sk = load_row(s_row, s_dtype, x, K, scale, cap, 1.0f);  // the shared ids
    const float m_r = load_row(static_cast<const char*>(s_row) + K * itemsize(s_dtype), s_dtype,
                               x + K, V - K, scale, cap, 1.0f);
    std::fill(x + V, x + V + 2 * W, -INF);
    m_b = -INF;
    if (KD) {
      m_b = load_row(t_row, t_dtype, y, K, float(o.t_scale), float(o.t_cap), inv_t);
      std::fill(y + K, y + K + 2 * W, -INF);
    }
    if (ce) s_label = x[label];
    m_s = nanmax(m_sk, m_r);
    m_a = m_sk * inv_t;
    share = ce && inv_t == 1.0f && K == V;  // then exp(s - m_s) = exp(a - m_a)
    z_ce = ce && !KD && !share;
  }

  vf load_x(int64_t j) const { return ::load(x + j * W); }
  vf a_at(int64_t j) const { return (below(j * W, K) ? load_x(j) : splat(-INF)) * inv_t; }

  // B. l_s, l_a, l_b, h, and the KLs' expectation of u = (a - m_a) - (b - m_b)
  void sums() {
    Sum ls, la, lb, hs, es;
    for (int64_t j0 = 0; j0 < nk; j0 += BLOCK) {
      for (int64_t j = j0; j < std::min(j0 + BLOCK, nk); ++j) {
        vf xs = below(j * W, K) ? load_x(j) : splat(-INF);
        vf a = xs * inv_t, ea = splat(0.0f);
        if (ent || share) {
          ea = vexp0(a - m_a);
          la.v += ea;
          hs.v += zero_unless(ea > 0.0f, ea * (m_a - a));
          if (KD || share) store(z + j * W, ea);  // q's numerators, for C and G
        }
        if (ce) {
          vf es_ = share ? ea : vexp0(xs - m_s);
          ls.v += es_;
          if (z_ce) store(z + j * W, es_);
        }
        if (!KD) continue;
        vf b = ::load(y + j * W), eb = vexp0(b - m_b);
        lb.v += eb;
        vf u = (a - m_a) - (b - m_b);
        if (DIV == FORWARD_KL) {
          es.v += zero_unless(eb > 0.0f, eb * u);
          store(y + j * W, eb);  // p's numerators, for the gradient
        }
        if (DIV == REVERSE_KL) es.v += zero_unless(ea > 0.0f, ea * u);
        if (THREE) store(e_b + j * W, eb);  // p's numerators, for C
      }
      ls.flush(); la.flush(); lb.flush(); hs.flush(); es.flush();
    }
    for (int64_t v0 = K; ce && v0 < V; v0 += W * BLOCK) {
      for (int64_t v = v0; v < std::min(v0 + W * BLOCK, V); v += W) {
        vf es_ = vexp0(::load(x + v) - m_s);
        ls.v += es_;
        if (z_ce) store(z + v, es_);
      }
      ls.flush();
    }
    l_s = ls.total; l_a = la.total; l_b = lb.total; h = hs.total; e = es.total;
    log_la = std::log(l_a);
    log_lb = std::log(l_b);
    if (DIV == FORWARD_KL) kd = -e / l_b - log_lb + log_la;
    if (DIV == REVERSE_KL) kd = e / l_a - log_la + log_lb;
  }

  // C. the three-pass divergences: D and S = E_q[g], g kept in y for the gradient. log q =
  // (a - m_a) - log l_a: a - m_a is exact near the maximum, only log l_a rounds.
  void three_pass() {
    const float lla = float(log_la), llb = float(log_lb), w = float(o.mix);
    const float inv_la = float(1.0 / l_a), inv_lb = float(1.0 / l_b);
    Sum d_sum, s_sum;
    for (int64_t j0 = 0; j0 < nk; j0 += BLOCK) {
      for (int64_t j = j0; j < std::min(j0 + BLOCK, nk); ++j) {
        vf a = a_at(j), b = ::load(y + j * W);
        vf q = ::load(z + j * W) * inv_la, p = ::load(e_b + j * W) * inv_lb;
        Terms tm = terms<DIV>((a - m_a) - lla, (b - m_b) - llb, q, p, w);
        d_sum.v += tm.d;
        s_sum.v += zero_unless(q != 0.0f, q * tm.g);
        store(y + j * W, tm.g);
      }
      d_sum.flush(); s_sum.flush();
    }
    kd = d_sum.total;
    s_kd = s_sum.total;
  }

  // out: loss, ce, kd, entropy (NaN for a term skipped: not computed, never read)
  void values(float* out, bool labelled) const {
    const double ce_value = ce ? double(m_s) + std::log(l_s) - s_label : 0.0;
    const double w_kd_t2 = o.kd_weight * o.temperature * o.temperature;
    out[0] = float((ce ? o.ce_weight * ce_value : 0.0) + (KD ? w_kd_t2 * kd : 0.0));
    out[1] = ce || !labelled ? float(ce_value) : NAN;
    out[2] = KD ? float(kd) : NAN;
    out[3] = ent ? float(log_la + h / l_a) : NAN;
  }

  // G. the gradient, r sigma (w_ce (softmax(s) - [v = y]) + w_kd T k) (1 - (s / c)^2), written
  // over the row in its dtype
  void gradient(double row_scale, void* s_row, int32_t dtype) {
    const double r = row_scale * o.s_scale;
    const float c_ce = float(r * o.ce_weight / l_s), c_kd = float(r * o.kd_weight * o.temperature);
    const float inv_cap = o.s_cap > 0 ? float(1.0 / o.s_cap) : 0.0f;
    const float inv_la = float(1.0 / l_a), inv_lb = float(1.0 / l_b);
    const float e_q = float(e / l_a), big_s = float(s_kd);
    const float z_label = s_label * inv_cap;  // the label's -r w_ce, through the softcap
    const float c_label = float(r * o.ce_weight) * (1.0f - z_label * z_label);
    const int64_t nv = (V + W - 1) / W;
    for (int64_t j = 0; j < nv; ++j) {
      vf xs = load_x(j), g = splat(0.0f), ea = splat(0.0f), a = splat(-INF);
      if ((KD || share) && j < nk) {
        a = a_at(j);
        ea = ::load(z + j * W);
      }
      if (KD && j < nk) {
        vf q = ea * inv_la, yj = ::load(y + j * W), k;
        if (DIV == FORWARD_KL) k = q - yj * inv_lb;
        else if (DIV == REVERSE_KL) k = zero_unless(ea > 0.0f, q * ((a - m_a) - (yj - m_b) - e_q));
        else k = zero_unless(q > 0.0f, q * (yj - big_s));
        g = c_kd * k;
      }
      if (ce) g += c_ce * (share && j < nk ? ea : z_ce ? ::load(z + j * W) : vexp0(xs - m_s));
      if (inv_cap > 0) {
        vf z = xs * inv_cap;
        g *= 1.0f - z * z;
      }
      if (ce) g = (LANE + int32_t(j * W)) == int32_t(label) ? g - c_label : g;
      if ((j + 1) * W <= V) {
        store_as(s_row, dtype, j * W, g);
      } else {  // the row's last, partial vector
        alignas(64) float tail[W];
        store(tail, g);
        narrow(tail, static_cast<char*>(s_row) + j * W * itemsize(dtype), dtype, V - j * W);
      }
    }
  }
};

template <int DIV>
void dense_row(const Dense& c, int64_t i, float* x, float* y, float* z, float* e) {
  const Options& o = *c.o;
  float* out = c.out + 4 * i;
  const bool labelled = c.labels != nullptr;
  const int64_t label = labelled ? c.labels[i] : -1;
  void* s_row = static_cast<char*>(c.s) + i * c.ld_s * itemsize(c.s_dtype);
  if (labelled && label == o.ignore_index) return ignored_row(out, s_row, c.V, c.s_dtype, o.grad);
  constexpr bool KD = DIV != NONE;
  const bool ce = labelled && o.ce;
  DenseRow<DIV> row{o, x, y, z, e, c.V, c.K, (c.K + W - 1) / W, label, ce, KD || o.values,
                    false, false, float(1.0 / o.temperature)};
  const void* t_row = KD ? static_cast<const char*>(c.t) + i * c.ld_t * itemsize(c.t_dtype)
                         : nullptr;
  row.load(s_row, c.s_dtype, t_row, c.t_dtype);
  row.sums();
  if (DenseRow<DIV>::THREE) row.three_pass();
  row.values(out, labelled);
  if (!o.grad) return;
  row.gradient(c.row_scale[i], s_row, c.s_dtype);
}

// ---- the sparse row ------------------------------------------------------------------------

// logsumexp of n floats (-inf if all are -inf, NaN if one is), in double
double lse(const float* x, int64_t n) {
  float m = -INF;
  for (int64_t j = 0; j < n; ++j) m = nanmax(m, x[j]);
  const double ref = m == -INF ? 0.0 : m;
  double l = 0;
  for (int64_t j = 0; j < n; ++j) l += std::exp(double(x[j]) - ref);
  return ref + std::log(l);
}

double logaddexp(double u, double v) {
  if (u == -INFINITY && v == -INFINITY) return -INFINITY;
  const double m = std::max(u, v);
  return m + std::log1p(std::exp(-std::fabs(u - v)));
}

// D over n buckets given as log-probabilities lq, lp (padded to a multiple of W with -inf), and
// into grad the gradient over the student's bucket logits: q - p (forward_kl), else q (g - S)
template <int DIV>
double bucket_divergence(const float* lq, const float* lp, float* grad, int64_t n, float w) {
  Sum d, s;
  for (int64_t j = 0; j < n; j += W) {
    vf q = vexp0(load(lq + j)), p = vexp0(load(lp + j));
    Terms tm = terms<DIV>(load(lq + j), load(lp + j), q, p, w);
    d.v += tm.d;
    s.v += zero_unless(q != 0.0f, q * tm.g);
    store(grad + j, DIV == FORWARD_KL ? q - p : tm.g);
  }
  d.flush(); s.flush();
  if (DIV != FORWARD_KL) {
    const float big_s = float(s.total);
    for (int64_t j = 0; j < n; j += W) {
      vf q = vexp0(load(lq + j));
      store(grad + j, zero_unless(q != 0.0f, q * (load(grad + j) - big_s)));
    }
  }
  return d.total;
}

// The slots' divergence (tails as fastkd.reference.sparse_token_losses): D, and per slot the
// gradient g_k over a_id (0 at unused slots); coef and lse_dense give the KD gradient outside
// the slots, coef exp(a_v - lse_dense).
struct SlotResult { double kd, coef, lse_dense; };

template <int DIV>
SlotResult slots(int32_t tail, const int64_t* ids, const float* lpr, const float* a_k, int64_t k,
                 double lse_a, double lse_out, float w, float* lq, float* lp, float* g_k) {
  const int64_t kp = (k + 1 + W - 1) / W * W;
  std::fill(lq, lq + kp, -INF);
  std::fill(lp, lp + kp, -INF);
  if (tail == IGNORE) {  // forward_kl: D = sum_j p_j (log M_j - log q_id_j), M_j merged masses
    double kd = 0, big_p = 0;
    for (int64_t j = 0; j < k; ++j) big_p += ids[j] >= 0 ? std::exp(double(lpr[j])) : 0.0;
    for (int64_t j = 0; j < k; ++j) {
      g_k[j] = 0.0f;
      if (ids[j] < 0) continue;
      double m_j = 0;
      for (int64_t l = 0; l < k; ++l) m_j += ids[l] == ids[j] ? std::exp(double(lpr[l])) : 0.0;
      const double p = std::exp(double(lpr[j])), log_q = double(a_k[j]) - lse_a;
      if (p != 0) kd += p * (std::log(m_j) - log_q);
      g_k[j] = float(big_p * std::exp(log_q) - m_j);
    }
    return {kd, big_p, lse_a};
  }
  double lse_p = -INFINITY;
  for (int64_t j = 0; j < k; ++j)
    if (ids[j] >= 0) lse_p = logaddexp(lse_p, lpr[j]);
  if (tail == RENORMALIZE) {  // p / P against softmax(a) over the slots; P = 0: no divergence
    std::fill(g_k, g_k + k, 0.0f);
    if (lse_p == -INFINITY) return {0.0, 0.0, 0.0};
    double lse_in = -INFINITY;
    for (int64_t j = 0; j < k; ++j)
      if (ids[j] >= 0) lse_in = logaddexp(lse_in, a_k[j]);
    for (int64_t j = 0; j < k; ++j) {
      if (ids[j] < 0) continue;
      lq[j] = float(a_k[j] - lse_in);
      lp[j] = float(lpr[j] - lse_p);
    }
    const double kd = bucket_divergence<DIV>(lq, lp, g_k, kp, w);
    for (int64_t j = 0; j < k; ++j) g_k[j] = ids[j] >= 0 ? g_k[j] : 0.0f;
    return {kd, 0.0, 0.0};
  }
  // bucket: slot k is the rest (1 - P, 1 - Q), dropped when the slots cover the vocabulary
  const bool no_rest = lse_out == -INFINITY;
  for (int64_t j = 0; j < k; ++j) {
    if (ids[j] < 0) continue;
    lq[j] = float(a_k[j] - lse_a);
    lp[j] = lpr[j];
  }
  if (!no_rest) {
    lq[k] = float(lse_out - lse_a);
    lp[k] = float(std::log(-std::expm1(std::min(lse_p, 0.0))));  // log(1 - P) in double
  }
  const double kd = bucket_divergence<DIV>(lq, lp, g_k, kp, w);
  const double coef = no_rest ? 0.0 : g_k[k];
  for (int64_t j = 0; j < k; ++j) g_k[j] = ids[j] >= 0 ? g_k[j] : 0.0f;
  return {kd, coef, no_rest ? 0.0 : lse_out};
}

struct Sparse {
  void* s; int64_t ld_s; int32_t s_dtype; int64_t V;  // (n, V) logits in, G out
  const int64_t* ids; const float* lp; int64_t k;     // (n, k) slots: ids (-1: unused), log p
  const int64_t* labels;                              // (n,) or null
  const float* row_scale;                             // (n,)
  float* out;                                         // (n, 4)
  const Options* o;
};

// One sparse row through the passes; x (V) fp32 scratch, the slot arrays k (+1) long.
struct SparseState {
  const Options& o;
  float* x;
  int64_t V, k, label;
  const int64_t* ids;
  bool ce, ent, mark;  // mark: the bucket tail's pass B sums outside the slots
  float inv_t, s_label = 0.0f, m_s = 0.0f, m_a = 0.0f;
  double lse_s = 0, lse_out = 0, lse_a = 0, entropy = 0;

  // 0, A, B. load and transform, gather the slots (s_k, a_k) and mark them; the row's maximum
  // and sums: CE's log-normaliser, a's (outside the slots if marked) and the entropy's h
  void load_and_sum(const void* s_row, int32_t dtype, float* s_k, float* a_k) {
    widen(s_row, dtype, x, V);
    head(x, V, float(o.s_scale), float(o.s_cap), 1.0f);
    std::fill(x + V, x + V + 2 * W, -INF);
    if (ce) s_label = x[label];
    for (int64_t j = 0; j < k; ++j) {
      s_k[j] = ids[j] >= 0 ? x[ids[j]] : -INF;
      a_k[j] = s_k[j] * inv_t;
    }
    for (int64_t j = 0; mark && j < k; ++j)
      if (ids[j] >= 0) x[ids[j]] = -INF;
    const int64_t nv = (V + W - 1) / W;
    vf mv = splat(-INF);
    for (int64_t j = 0; j < nv; ++j) mv = nanmax(mv, load(x + j * W));
    m_s = hmax(mv) == -INF ? 0.0f : hmax(mv);
    m_a = m_s * inv_t;
    const bool share = ce && inv_t == 1.0f;
    Sum l_s, l_a, h;
    for (int64_t j0 = 0; j0 < nv; j0 += BLOCK) {
      for (int64_t j = j0; j < std::min(j0 + BLOCK, nv); ++j) {
        vf xs = load(x + j * W), a = xs * inv_t, ea = splat(0.0f);
        if (ent || share) {
          ea = vexp0(a - m_a);
          l_a.v += ea;
          h.v += zero_unless(ea > 0.0f, ea * (m_a - a));
        }
        if (ce) l_s.v += share ? ea : vexp0(xs - m_s);
      }
      l_s.flush(); l_a.flush(); h.flush();
    }
    lse_s = m_s + std::log(l_s.total);
    lse_out = lse_a = m_a + std::log(l_a.total);
    entropy = std::log(l_a.total) + h.total / l_a.total;
    if (mark) merge_slots(s_k, a_k, l_a.total, h.total);
  }

  // the marked slots merged back into CE's and a's log-normalisers and the entropy's state
  void merge_slots(const float* s_k, const float* a_k, double l_a, double h) {
    lse_s = logaddexp(lse_s, lse(s_k, k));
    lse_a = logaddexp(lse_out, lse(a_k, k));
    float top = m_a;
    for (int64_t j = 0; j < k; ++j) top = nanmax(top, a_k[j]);
    const double ref = top == -INF ? 0.0 : top;
    const double alpha = l_a > 0 ? std::exp(m_a - ref) : 0.0;
    double l = l_a * alpha, hh = alpha * (h + (ref - m_a) * l_a);
    for (int64_t j = 0; j < k; ++j) {
      if (ids[j] < 0) continue;
      const double e = std::exp(a_k[j] - ref);
      l += e;
      hh += e > 0 ? e * (ref - a_k[j]) : 0.0;
    }
    entropy = l > 0 ? std::log(l) + hh / l : 0.0;
  }

  // G. the dense term over the row (as if every id were outside the slots: the KD part coef
  // exp(a - lse_dense)), then the label's -w_ce and the slots' full values over it
  void gradient(double row_scale, const SlotResult& kd, const float* s_k, const float* g_k) {
    const double r = row_scale * o.s_scale, wt = o.kd_weight * o.temperature;
    const float c_ce = float(r * o.ce_weight * std::exp(m_s - lse_s));
    const float c_kd =  // 0 without a dense term (renormalize, no KD), never 0 x inf
        kd.coef == 0.0 ? 0.0f : float(r * wt * kd.coef * std::exp(m_a - kd.lse_dense));
    const float inv_cap = o.s_cap > 0 ? float(1.0 / o.s_cap) : 0.0f;
    const bool share = ce && inv_t == 1.0f;
    for (int64_t j = 0; j < (V + W - 1) / W; ++j) {
      vf xs = load(x + j * W), g = splat(0.0f), ea = splat(0.0f);
      if (c_kd != 0.0f || share) ea = vexp0(xs * inv_t - m_a);
      if (ce) g = c_ce * (share ? ea : vexp0(xs - m_s));
      g += c_kd * ea;
      if (inv_cap > 0) {
        vf z = xs * inv_cap;
        g = zero_unless(xs > -INF, g * (1.0f - z * z));  // 0 at the marks: rewritten below
      }
      store(x + j * W, g);
    }
    auto cap_factor = [&](double z) { return 1.0 - (z * inv_cap) * (z * inv_cap); };
    if (ce) x[label] -= float(r * o.ce_weight * cap_factor(s_label));
    for (int64_t j = 0; g_k != nullptr && j < k; ++j) {
      if (ids[j] < 0) continue;
      double g = wt * g_k[j];
      if (ce) g += o.ce_weight * (std::exp(s_k[j] - lse_s) - (ids[j] == label ? 1.0 : 0.0));
      x[ids[j]] = float(r * g * cap_factor(s_k[j]));
    }
  }
};

template <int DIV>
void sparse_row(const Sparse& c, int64_t i, float* x, float* work) {
  constexpr bool KD = DIV != NONE;
  const Options& o = *c.o;
  const int64_t k = c.k, kp = (k + 1 + W - 1) / W * W;
  float* out = c.out + 4 * i;
  const bool labelled = c.labels != nullptr;
  const int64_t label = labelled ? c.labels[i] : -1;
  void* s_row = static_cast<char*>(c.s) + i * c.ld_s * itemsize(c.s_dtype);
  if (labelled && label == o.ignore_index) return ignored_row(out, s_row, c.V, c.s_dtype, o.grad);
  const int64_t* ids = c.ids + i * k;
  float *s_k = work, *a_k = work + kp, *lq = work + 2 * kp, *lp = work + 3 * kp;
  float* g_k = work + 4 * kp;
  const bool ce = labelled && o.ce;
  SparseState row{o, x, c.V, k, label, ids, ce, KD || o.values, KD && o.tail == BUCKET,
                  float(1.0 / o.temperature)};
  row.load_and_sum(s_row, c.s_dtype, s_k, a_k);
  SlotResult kd{0.0, 0.0, 0.0};
  if (KD) {
    kd = slots<DIV>(o.tail, ids, c.lp + i * k, a_k, k, row.lse_a, row.lse_out, float(o.mix), lq,
                    lp, g_k);
  }
  const double ce_value = ce ? row.lse_s - row.s_label : 0.0;
  const double w_kd_t2 = o.kd_weight * o.temperature * o.temperature;
  out[0] = float((ce ? o.ce_weight * ce_value : 0.0) + (KD ? w_kd_t2 * kd.kd : 0.0));
  out[1] = ce || !labelled ? float(ce_value) : NAN;
  out[2] = KD ? float(kd.kd) : NAN;
  out[3] = KD || o.values ? float(row.entropy) : NAN;
  if (!o.grad) return;
  row.gradient(c.row_scale[i], kd, s_k, KD ? g_k : nullptr);
  narrow(x, s_row, c.s_dtype, c.V);
}

float* scratch(int64_t n) {  // n floats, 64-byte aligned, or null
  return static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
}

// Rows [0, n) over `threads` threads (the caller's included), each taking the next row as it
// finishes one: a thread the OS preempts on a shared machine holds up one row, not a block of
// them. Each thread gets `width` floats of scratch (64-byte aligned).
template <typename Body>
int parallel_rows(int64_t n, int threads, int64_t width, Body body) {
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  std::vector<int> failed(threads, 0);
  std::atomic<int64_t> next{0};
  auto work = [&](int part) {
    float* buf = scratch(width);
    if (buf == nullptr) { failed[part] = 1; return; }
    for (int64_t i = next++; i < n; i = next++) body(i, buf);
    std::free(buf);
  };
  std::vector<std::thread> pool;
  for (int part = 1; part < threads; ++part) pool.emplace_back(work, part);
  work(0);
  for (auto& th : pool) th.join();
  return *std::max_element(failed.begin(), failed.end());
}

// call(std::integral_constant<int, DIV>) for the divergence (NONE: no KD term)
template <typename Call>
int dispatch(int32_t div, Call call) {
  switch (div) {
    case FORWARD_KL: return call(std::integral_constant<int, FORWARD_KL>{});
    case REVERSE_KL: return call(std::integral_constant<int, REVERSE_KL>{});
    case JSD: return call(std::integral_constant<int, JSD>{});
    case SKEW_FORWARD_KL: return call(std::integral_constant<int, SKEW_FORWARD_KL>{});
    case SKEW_REVERSE_KL: return call(std::integral_constant<int, SKEW_REVERSE_KL>{});
    case TVD: return call(std::integral_constant<int, TVD>{});
    default: return call(std::integral_constant<int, NONE>{});
  }
}

}  // namespace

// The dense row op over rows [0, n): see the header; returns 0, or 1 if a scratch buffer could
// not be allocated.
extern "C" int fastkd_dense_rows(void* s, int64_t ld_s, int32_t s_dtype, int64_t V,
                                 const void* t, int64_t ld_t, int32_t t_dtype, int64_t K,
                                 const int64_t* labels, const float* row_scale, float* out,
                                 int64_t n, const Options* o, int32_t threads) {
  const Dense c{s, ld_s, s_dtype, V, t, ld_t, t_dtype, K, labels, row_scale, out, o};
  const int32_t div = t != nullptr && o->kd ? o->divergence : NONE;
  // x, z: V (+ pad) floats; y, e: K (+ pad); every array starts on a 64-byte boundary
  const int64_t wv = (V + 2 * W + 15) / 16 * 16, wk = (K + 2 * W + 15) / 16 * 16;
  return dispatch(div, [&](auto d) {
    return parallel_rows(n, threads, 2 * wv + 2 * wk, [&](int64_t i, float* buf) {
      dense_row<decltype(d)::value>(c, i, buf, buf + wv, buf + wv + wk, buf + 2 * wv + wk);
    });
  });
}

// The sparse row op over rows [0, n); ids (n, k) int64, lp (n, k) fp32, both contiguous.
extern "C" int fastkd_sparse_rows(void* s, int64_t ld_s, int32_t s_dtype, int64_t V,
                                  const int64_t* ids, const float* lp, int64_t k,
                                  const int64_t* labels, const float* row_scale, float* out,
                                  int64_t n, const Options* o, int32_t threads) {
  const Sparse c{s, ld_s, s_dtype, V, ids, lp, k, labels, row_scale, out, o};
  const int64_t kp = (k + 1 + W - 1) / W * W;
  return dispatch(o->kd ? o->divergence : NONE, [&](auto d) {
    const int64_t wv = (V + 2 * W + 15) / 16 * 16;
    return parallel_rows(n, threads, wv + 5 * kp, [&](int64_t i, float* buf) {
      sparse_row<decltype(d)::value>(c, i, buf, buf + wv);
    });
  });
}
