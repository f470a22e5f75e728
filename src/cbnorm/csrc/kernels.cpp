// Native CPU kernels of cbnorm. cbnorm/_kernels.py holds the math, the pure-PyTorch twin of each
// kernel and the autograd formulas that call them; this file only makes them fast.
//
// Mixture passes (UCB-Norm, MN, SCB-Norm with unknown clusters). Activations x are (N, C, L),
// channels-first (L contiguous) or channels-last (C contiguous). Channel c has K components with
// coefficients (K, C):
//     d_k = x - mean[k, c],   logit_k = log_coef[k, c] + quad_coef[k, c] * p_k^2,   tau = softmax_k(logit)
// with p_k = clamp(x, lo_c, hi_c) - mean[k, c] (= d_k for any x short of ~1e19 sigma in float): within [lo_c, hi_c]
// no logit overflows, and beyond it the posteriors are those at the bound, which are their limit as |x| grows.
// Every kernel is one pass over x that recomputes tau per entry; nothing of size K x N x C x L is
// ever stored. With q_k = a_k + b_k d_k + c_k d_k^2 and a per-entry weight omega (1 if absent):
//     value:        out = sum_k tau_k q_k                                  (c = 0)
//     grad:         out = omega * d/dx sum_k tau_k q_k
//                       = omega * sum_k [tau_k q_k' + u_k logit_k'],   u_k = tau_k (q_k - sum_j tau_j q_j)
//                   (logit_k' = 2 quad_coef p_k within [lo, hi], 0 beyond)
//     tau moments:  sum_{n,l} omega tau_k d_k^r,   r = 0, 1, 2 (forward) or 0, 1 (backward)
//     u moments:    sum_{n,l} omega u_k p_k^r,     r = 0, 1, 2
//     mixed grad:   d/dx sum_k tau_k (omega (wa_k + wb_k d_k) + q_k): the whole input gradient of a
//                   transform (wa, wb) whose coefficients depend on the moments of x (q: their gradient)
// Sums accumulate in x's dtype within a work item (a few thousand entries), then in double across
// items and threads.
//
// Per-sample affine map (SCB-Norm with known clusters): the one-pass backward of
//     y[n, c, l] = x[n, c, l] * scale[n, c] + shift[n, c].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace {

using at::vec::Vectorized;

constexpr int64_t kMaxComponents = 16;
constexpr int64_t kBlock = 4096;          // entries per work item
constexpr int64_t kMaxRows = 6;           // accumulated moments: 3 of tau, 3 of u
constexpr int64_t kPrefetchRows = 2;      // channels-first: prefetch the row this many samples ahead,
constexpr int64_t kPrefetchEntries = 64;  // its first entries

struct Flags {
  bool value = false;
  bool grad = false;
  int64_t tau_rows = 0;  // moments of tau: r = 0, ..., tau_rows - 1
  bool u_moments = false;
  bool mixed = false;    // grad of omega (wa + wb d) + q, not of omega q
  int64_t rows() const { return tau_rows + 3 * u_moments; }
};

// Per-lane coefficients of every component for one vector of entries. After derive(), log_coef and
// quad_coef are in base 2 (times log2(e)), so that the posteriors take exp2: no range reduction.
template <typename T>
struct Lanes {
  using Vec = Vectorized<T>;
  Vec mean[kMaxComponents], log_coef[kMaxComponents], quad_coef[kMaxComponents];
  Vec a[kMaxComponents], b[kMaxComponents], c[kMaxComponents];
  Vec wa[kMaxComponents], wb[kMaxComponents];            // the omega-weighted terms of a mixed grad
  Vec two_quad[kMaxComponents], two_c[kMaxComponents];  // derivatives of the logits and of q
  Vec low[kMaxComponents], high[kMaxComponents];         // the bounds of p_k: [lo, hi] - mean_k
  bool quadratic;                                        // c present: q has its d^2 term

  void derive(int64_t K, bool has_c) {
    quadratic = has_c;
    // [lo, hi]: where |quad_coef_k| (x - mean_k)^2 stays below max / 8 for every k (infinite where quad_coef is 0)
    // (the root of the room over the root of |quad_coef|: their quotient overflows where |quad_coef| < 1/8)
    const Vec root_room(std::sqrt(std::numeric_limits<T>::max() / T(8)));
    Vec lo, hi;
    for (int64_t k = 0; k < K; ++k) {
      const Vec reach = root_room / quad_coef[k].abs().sqrt();
      lo = k == 0 ? mean[k] - reach : at::vec::maximum(lo, mean[k] - reach);
      hi = k == 0 ? mean[k] + reach : at::vec::minimum(hi, mean[k] + reach);
    }
    const Vec log2e(T(1.44269504088896340736));
    for (int64_t k = 0; k < K; ++k) {
      low[k] = lo - mean[k];
      high[k] = hi - mean[k];
      two_quad[k] = quad_coef[k] + quad_coef[k];
      two_c[k] = c[k] + c[k];
      log_coef[k] = log_coef[k] * log2e;
      quad_coef[k] = quad_coef[k] * log2e;
    }
  }
};

// The (K, C) coefficient arrays; a, b, c, wa, wb may be null (zero).
template <typename T>
struct Coefficients {
  using Vec = Vectorized<T>;
  const T *mean, *log_coef, *quad_coef, *a, *b, *c, *wa, *wb;
  int64_t K, C;

  // Channels-first: every lane is channel `ch`.
  void broadcast(Lanes<T>& lanes, int64_t ch) const {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = k * C + ch;
      lanes.mean[k] = Vec(mean[i]);
      lanes.log_coef[k] = Vec(log_coef[i]);
      lanes.quad_coef[k] = Vec(quad_coef[i]);
      lanes.a[k] = Vec(a ? a[i] : T(0));
      lanes.b[k] = Vec(b ? b[i] : T(0));
      lanes.c[k] = Vec(c ? c[i] : T(0));
      lanes.wa[k] = Vec(wa ? wa[i] : T(0));
      lanes.wb[k] = Vec(wb ? wb[i] : T(0));
    }
    lanes.derive(K, c != nullptr);
  }

  // Channels-last: lane j is channel ch + j, for the first `count` lanes.
  void load(Lanes<T>& lanes, int64_t ch, int64_t count) const {
    auto row = [&](const T* t, int64_t k) { return t ? Vec::loadu(t + k * C + ch, count) : Vec(0); };
    for (int64_t k = 0; k < K; ++k) {
      lanes.mean[k] = row(mean, k);
      lanes.log_coef[k] = row(log_coef, k);
      lanes.quad_coef[k] = row(quad_coef, k);
      lanes.a[k] = row(a, k);
      lanes.b[k] = row(b, k);
      lanes.c[k] = row(c, k);
      lanes.wa[k] = row(wa, k);
      lanes.wb[k] = row(wb, k);
    }
    lanes.derive(K, c != nullptr);
  }
};

template <typename T>
using Accumulators = Vectorized<T>[kMaxRows][kMaxComponents];

// 2^x for x <= 0, inline: the posteriors take K of them per entry, and a call into Sleef per
// vector costs about twice the rest of the kernel. In float, 2^n times a degree-5 minimax polynomial
// in r = x - n on [-1/2, 1/2], n = round(x) (relative error below 2.4e-7 in float arithmetic, as
// Sleef's u10); in double, Sleef. Arguments below -126 give 0, as Sleef's do: a posterior off by less
// than 1.2e-38, and one-hot posteriors exactly one-hot.
inline Vectorized<float> exp2_nonpositive(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  using Int = Vectorized<int32_t>;
  const Vec clamped = at::vec::maximum(x, Vec(-126.0f));
  const Vec n = clamped.round();
  const Vec r = clamped - n;
  Vec p(1.327647097e-3f);
  for (const float coefficient : {9.675541596e-3f, 5.550713279e-2f, 2.402211972e-1f, 6.931469671e-1f, 1.000000072f}) {
    p = at::vec::fmadd(p, r, Vec(coefficient));
  }
  const Int exponent = (at::vec::convert_to_int_of_same_size(n) + Int(127)) << Int(23);  // the bits of 2^n
  return Vec::blendv(p * at::vec::cast<float>(exponent), Vec(0), x < Vec(-126.0f));
}

inline Vectorized<double> exp2_nonpositive(const Vectorized<double>& x) {
  return x.exp2();
}

// One vector of entries: returns the value or the gradient and adds to the moments. A non-zero
// `KC` fixes the number of components at compile time, so that the loops over k unroll; `Mixed`
// (flags.mixed) is a template parameter too, as its code in the other kernels slows them down.
template <typename T, int64_t KC, bool Mixed>
inline Vectorized<T> entry(
    const Vectorized<T>& x, const Vectorized<T>& omega, const Lanes<T>& cf, int64_t num_components,
    const Flags& flags, Accumulators<T>& acc) {
  using Vec = Vectorized<T>;
  const int64_t K = KC ? KC : num_components;
  // e_k = tau_k * total: posteriors before normalisation, which is deferred to the end of each use
  // so that the division overlaps with the work that does not need it.
  // p_k is recomputed where it is needed: one more array of vectors here costs more than the clamps.
  Vec d[kMaxComponents], e[kMaxComponents];
  Vec top;
  for (int64_t k = 0; k < K; ++k) {
    d[k] = x - cf.mean[k];
    const Vec p = at::vec::clamp(d[k], cf.low[k], cf.high[k]);
    e[k] = at::vec::fmadd(cf.quad_coef[k] * p, p, cf.log_coef[k]);
    top = k == 0 ? e[k] : at::vec::maximum(top, e[k]);
  }
  Vec total(0);
  for (int64_t k = 0; k < K; ++k) {
    e[k] = exp2_nonpositive(e[k] - top);
    total = total + e[k];
  }
  const Vec inverse = Vec(1) / total;
  const Vec weight = Mixed ? inverse : omega * inverse;  // a mixed grad weights only wa, wb

  Vec out(0);
  if (flags.value) {
    for (int64_t k = 0; k < K; ++k) {
      out = at::vec::fmadd(e[k], at::vec::fmadd(cf.b[k], d[k], cf.a[k]), out);
    }
    out = out * inverse;
  }
  if (flags.tau_rows) {
    for (int64_t k = 0; k < K; ++k) {
      const Vec t0 = weight * e[k], t1 = t0 * d[k];
      acc[0][k] = acc[0][k] + t0;
      acc[1][k] = acc[1][k] + t1;
      if (flags.tau_rows == 3) {
        acc[2][k] = at::vec::fmadd(t1, d[k], acc[2][k]);
      }
    }
  }
  if (flags.grad || flags.u_moments) {
    Vec q[kMaxComponents];
    Vec mean_q(0);
    Vec b[Mixed ? kMaxComponents : 1];  // Mixed: b + omega wb, per entry
    for (int64_t k = 0; k < K; ++k) {
      Vec a = cf.a[k];
      if constexpr (Mixed) {
        a = at::vec::fmadd(omega, cf.wa[k], a);
        b[k] = at::vec::fmadd(omega, cf.wb[k], cf.b[k]);
      }
      const Vec& bk = Mixed ? b[k] : cf.b[k];
      const Vec slope = cf.quadratic ? at::vec::fmadd(cf.c[k], d[k], bk) : bk;
      q[k] = at::vec::fmadd(slope, d[k], a);
    }
    // u_k = tau_k (q_k - sum_j tau_j q_j) does not change when every q_k moves alike: taken about q_0,
    // what the q_k share (most of the input gradient's own size) is not rounded into u (K = 1: u = 0).
    for (int64_t k = K - 1; k >= 0; --k) {
      q[k] = q[k] - q[0];
      mean_q = at::vec::fmadd(e[k], q[k], mean_q);
    }
    mean_q = mean_q * inverse;
    const int64_t row = flags.tau_rows;
    // Beyond [lo, hi] the posteriors are one-hot (their exp2 exactly 0 or 1), so u = 0 there exactly.
    Vec grad(0);
    for (int64_t k = 0; k < K; ++k) {
      const Vec p = at::vec::clamp(d[k], cf.low[k], cf.high[k]);
      const Vec eu = e[k] * (q[k] - mean_q);  // u_k * total
      if (flags.grad) {
        const Vec& bk = Mixed ? b[k] : cf.b[k];
        const Vec dq = cf.quadratic ? at::vec::fmadd(cf.two_c[k], d[k], bk) : bk;
        grad = at::vec::fmadd(eu, cf.two_quad[k] * p, at::vec::fmadd(e[k], dq, grad));
      }
      if (flags.u_moments) {
        const Vec u0 = weight * eu, u1 = u0 * p;
        acc[row][k] = acc[row][k] + u0;
        acc[row + 1][k] = acc[row + 1][k] + u1;
        acc[row + 2][k] = at::vec::fmadd(u1, p, acc[row + 2][k]);
      }
    }
    if (flags.grad) {
      out = weight * grad;
    }
  }
  return out;
}

template <typename T, int64_t KC, bool Mixed>
struct Pass {
  using Vec = Vectorized<T>;
  static constexpr int64_t V = Vec::size();

  const T* x;
  const T* omega;  // null: weight 1
  T* out;          // null: no elementwise output
  int64_t N, C, L;
  Coefficients<T> coef;
  Flags flags;
  double* partial;  // (threads, rows, K, C) partial sums, or null

  // Entries x[offset], ..., x[offset + count - 1] share the coefficients `lanes`.
  void step(int64_t offset, int64_t count, const Lanes<T>& lanes, Accumulators<T>& acc) const {
    const bool full = count == V;
    const Vec xv = full ? Vec::loadu(x + offset) : Vec::loadu(x + offset, count);
    Vec w = full ? Vec(1) : Vec::set(Vec(0), Vec(1), count);  // zero weight on the padding lanes
    if (omega) {
      w = full ? Vec::loadu(omega + offset) : Vec::loadu(omega + offset, count);
    }
    const Vec y = entry<T, KC, Mixed>(xv, w, lanes, coef.K, flags, acc);
    if (out) {
      full ? y.store(out + offset) : y.store(out + offset, count);
    }
  }

  // Rows of one channel lie C * L apart, too far for the hardware prefetcher: fetch the start of a
  // row a few rows ahead (the prefetcher streams the rest).
  void prefetch(int64_t offset) const {
    for (int64_t i = 0; i < std::min<int64_t>(L, kPrefetchEntries); i += 64 / sizeof(T)) {
      __builtin_prefetch(x + offset + i);
      if (omega) {
        __builtin_prefetch(omega + offset + i);
      }
    }
  }

  void clear(Accumulators<T>& acc) const {
    for (int64_t r = 0; r < flags.rows(); ++r) {
      std::fill(acc[r], acc[r] + coef.K, Vec(0));
    }
  }

  double* thread_partial() const {
    return partial ? partial + at::get_thread_num() * flags.rows() * coef.K * C : nullptr;
  }

  // Adds lane j of every accumulator to channel `channel(j)` of `sums`, for j < count.
  template <typename Channel>
  void flush(const Accumulators<T>& acc, double* sums, int64_t count, Channel channel) const {
    T lanes[V];
    for (int64_t r = 0; r < flags.rows(); ++r) {
      for (int64_t k = 0; k < coef.K; ++k) {
        acc[r][k].store(lanes);
        double* row = sums + (r * coef.K + k) * C;
        for (int64_t j = 0; j < count; ++j) {
          row[channel(j)] += lanes[j];
        }
      }
    }
  }

  // (n, c, l) at (n * C + c) * L + l; a work item is one channel of a block of samples.
  void channels_first() const {
    const int64_t per_item = std::clamp<int64_t>(kBlock / std::max<int64_t>(L, 1), 1, N);
    const int64_t blocks = (N + per_item - 1) / per_item;
    at::parallel_for(0, C * blocks, 1, [&](int64_t begin, int64_t end) {
      Lanes<T> lanes;
      Accumulators<T> acc;
      double* sums = thread_partial();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t ch = item / blocks, n0 = item % blocks * per_item, n1 = std::min(N, n0 + per_item);
        coef.broadcast(lanes, ch);
        clear(acc);
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t base = (n * C + ch) * L;
          if (n + kPrefetchRows < n1) {
            prefetch(base + kPrefetchRows * C * L);
          }
          for (int64_t l = 0; l < L; l += V) {
            step(base + l, std::min(V, L - l), lanes, acc);
          }
        }
        if (sums) {
          flush(acc, sums, V, [ch](int64_t) { return ch; });
        }
      }
    });
  }

  // (n, c, l) at (n * L + l) * C + c; a work item is a block of positions, every channel.
  void channels_last() const {
    const int64_t positions = N * L;
    const int64_t per_item = std::max<int64_t>(kBlock / C, 1);
    at::parallel_for(0, (positions + per_item - 1) / per_item, 1, [&](int64_t begin, int64_t end) {
      Lanes<T> lanes;
      Accumulators<T> acc;
      double* sums = thread_partial();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t p0 = item * per_item, p1 = std::min(positions, p0 + per_item);
        for (int64_t ch = 0; ch < C; ch += V) {
          const int64_t count = std::min(V, C - ch);
          coef.load(lanes, ch, count);
          clear(acc);
          for (int64_t p = p0; p < p1; ++p) {
            step(p * C + ch, count, lanes, acc);
          }
          if (sums) {
            flush(acc, sums, count, [ch](int64_t j) { return ch + j; });
          }
        }
      }
    });
  }
};

bool is_channels_last(const at::Tensor& x) {
  // (N, C, L) stored as (N, L, C); a tensor that is both (C == 1 or L == 1) prefers the longer run.
  return x.transpose(1, 2).is_contiguous() && (!x.is_contiguous() || x.size(2) == 1);
}

void check_coefficient(const at::Tensor& t, const at::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == K && t.size(1) == x.size(1) && t.is_contiguous(),
              "cbnorm: ", name, " must be a contiguous (K, C) tensor");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "cbnorm: ", name, " must have the dtype of x");
}

// Runs one pass; returns (elementwise output or an empty tensor, moments (rows, K, C)).
std::tuple<at::Tensor, at::Tensor> run(
    const at::Tensor& x, const std::optional<at::Tensor>& omega, const at::Tensor& mean, const at::Tensor& log_coef,
    const at::Tensor& quad_coef, const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& c, Flags flags, const std::optional<at::Tensor>& wa = std::nullopt,
    const std::optional<at::Tensor>& wb = std::nullopt) {
  TORCH_CHECK(x.dim() == 3, "cbnorm: expected x of shape (N, C, L)");
  TORCH_CHECK(x.is_contiguous() || x.transpose(1, 2).is_contiguous(),
              "cbnorm: x must be contiguous as (N, C, L) or as (N, L, C)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "cbnorm: x must be float32 or float64");
  const int64_t K = mean.size(0), C = x.size(1);
  TORCH_CHECK(K >= 1 && K <= kMaxComponents, "cbnorm: the native kernels take 1 to ", kMaxComponents, " components");
  check_coefficient(mean, x, K, "mean");
  check_coefficient(log_coef, x, K, "log_coef");
  check_coefficient(quad_coef, x, K, "quad_coef");
  for (const auto* t : {&a, &b, &c, &wa, &wb}) {
    if (t->has_value()) {
      check_coefficient(**t, x, K, "a transform coefficient");
    }
  }
  if (omega.has_value()) {
    TORCH_CHECK(omega->sizes() == x.sizes() && omega->strides() == x.strides() &&
                    omega->scalar_type() == x.scalar_type(),
                "cbnorm: omega must have the shape, strides and dtype of x");
  }

  const bool elementwise = flags.value || flags.grad;
  at::Tensor out = elementwise ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t rows = flags.rows();
  at::Tensor partial = at::zeros({rows ? at::get_num_threads() : 0, rows, K, C}, x.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbnorm_mixture", [&] {
    auto ptr = [](const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<scalar_t>() : nullptr; };
    const Coefficients<scalar_t> coef{mean.data_ptr<scalar_t>(), log_coef.data_ptr<scalar_t>(),
                                      quad_coef.data_ptr<scalar_t>(), ptr(a), ptr(b), ptr(c), ptr(wa), ptr(wb), K, C};
    auto launch_as = [&](auto fixed, auto mixed) {
      const Pass<scalar_t, decltype(fixed)::value, decltype(mixed)::value> pass{
          x.data_ptr<scalar_t>(), ptr(omega), elementwise ? out.data_ptr<scalar_t>() : nullptr, x.size(0), C,
          x.size(2), coef, flags, rows ? partial.data_ptr<double>() : nullptr};
      is_channels_last(x) ? pass.channels_last() : pass.channels_first();
    };
    auto launch = [&](auto fixed) {
      flags.mixed ? launch_as(fixed, std::true_type{}) : launch_as(fixed, std::false_type{});
    };
    if (x.numel() == 0) {
      return;
    }
    switch (K) {  // the usual mixtures get unrolled loops
      case 1: return launch(std::integral_constant<int64_t, 1>{});
      case 2: return launch(std::integral_constant<int64_t, 2>{});
      case 3: return launch(std::integral_constant<int64_t, 3>{});
      case 4: return launch(std::integral_constant<int64_t, 4>{});
      case 5: return launch(std::integral_constant<int64_t, 5>{});
      default: return launch(std::integral_constant<int64_t, 0>{});
    }
  });
  return {out, partial.sum(0).to(x.scalar_type())};
}

at::Tensor mixture_moments(
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_coef, const at::Tensor& quad_coef) {
  Flags flags;
  flags.tau_rows = 3;
  return std::get<1>(run(x, std::nullopt, mean, log_coef, quad_coef, std::nullopt, std::nullopt, std::nullopt, flags));
}

at::Tensor mixture_transform(
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_coef, const at::Tensor& quad_coef,
    const at::Tensor& a, const at::Tensor& b) {
  Flags flags;
  flags.value = true;
  return std::get<0>(run(x, std::nullopt, mean, log_coef, quad_coef, a, b, std::nullopt, flags));
}

std::tuple<at::Tensor, at::Tensor> mixture_transform_backward(
    const at::Tensor& x, const std::optional<at::Tensor>& omega, const at::Tensor& mean, const at::Tensor& log_coef,
    const at::Tensor& quad_coef, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c,
    bool grad_x, bool tau_moments, bool u_moments) {
  Flags flags;
  flags.grad = grad_x;
  flags.tau_rows = tau_moments ? 2 : 0;  // the gradients of a and b; that of c is never needed
  flags.u_moments = u_moments;
  return run(x, omega, mean, log_coef, quad_coef, a, b, c, flags);
}

// The input gradient of y = sum_k tau_k (a_k + b_k d_k) with (a, b) functions of the moments
// S = mixture_moments(x): omega is dL/dy and sums_grad (3, K, C) is dL/dS, both paths in one pass.
at::Tensor mixture_normalize_backward(
    const at::Tensor& x, const at::Tensor& omega, const at::Tensor& mean, const at::Tensor& log_coef,
    const at::Tensor& quad_coef, const at::Tensor& a, const at::Tensor& b, const at::Tensor& sums_grad) {
  TORCH_CHECK(sums_grad.dim() == 3 && sums_grad.size(0) == 3, "cbnorm: sums_grad must be (3, K, C)");
  const at::Tensor g = sums_grad.contiguous();
  Flags flags;
  flags.grad = true;
  flags.mixed = true;
  return std::get<0>(run(x, omega, mean, log_coef, quad_coef, g[0], g[1], g[2], flags, a, b));
}

// Per-sample affine map y[n, c, l] = x[n, c, l] * scale[n, c] + shift[n, c] (SCB-Norm, Eq. 10),
// backward in one pass: grad_x = g * scale, grad_scale[n, c] = sum_l g x, grad_shift[n, c] = sum_l g.
template <typename T>
void scale_shift_backward_kernel(
    const T* x, const T* g, const T* scale, T* grad_x, T* grad_scale, T* grad_shift, int64_t N, int64_t C,
    int64_t L, bool channels_last) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  auto load = [](const T* p, int64_t count) { return count == V ? Vec::loadu(p) : Vec::loadu(p, count); };
  if (!channels_last) {  // row n * C + c holds the L entries of (n, c)
    const int64_t grain = std::max<int64_t>(kBlock / std::max<int64_t>(L, 1), 1);
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const Vec s(scale[row]);
        Vec gx(0), gsum(0);
        for (int64_t l = 0; l < L; l += V) {
          const int64_t i = row * L + l, count = std::min(V, L - l);
          const Vec gv = load(g + i, count);
          const Vec out = gv * s;
          count == V ? out.store(grad_x + i) : out.store(grad_x + i, count);
          gx = at::vec::fmadd(gv, load(x + i, count), gx);
          gsum = gsum + gv;
        }
        T lanes[2][V];
        gx.store(lanes[0]);
        gsum.store(lanes[1]);
        double sums[2] = {0, 0};
        for (int64_t j = 0; j < V; ++j) {
          sums[0] += lanes[0][j];
          sums[1] += lanes[1][j];
        }
        grad_scale[row] = sums[0];
        grad_shift[row] = sums[1];
      }
    });
    return;
  }
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {  // sample n: L positions of C entries
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t ch = 0; ch < C; ch += V) {
        const int64_t count = std::min(V, C - ch);
        const Vec s = load(scale + n * C + ch, count);
        Vec gx(0), gsum(0);
        for (int64_t l = 0; l < L; ++l) {
          const int64_t i = (n * L + l) * C + ch;
          const Vec gv = load(g + i, count);
          const Vec out = gv * s;
          count == V ? out.store(grad_x + i) : out.store(grad_x + i, count);
          gx = at::vec::fmadd(gv, load(x + i, count), gx);
          gsum = gsum + gv;
        }
        gx.store(grad_scale + n * C + ch, count);
        gsum.store(grad_shift + n * C + ch, count);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift_backward(
    const at::Tensor& x, const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 3 && (x.is_contiguous() || x.transpose(1, 2).is_contiguous()),
              "cbnorm: x must be (N, C, L), contiguous as (N, C, L) or as (N, L, C)");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.strides() == x.strides() && grad.scalar_type() == x.scalar_type(),
              "cbnorm: grad must have the shape, strides and dtype of x");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == x.size(0) && scale.size(1) == x.size(1) && scale.is_contiguous() &&
                  scale.scalar_type() == x.scalar_type(),
              "cbnorm: scale must be a contiguous (N, C) tensor with the dtype of x");
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_scale = at::empty_like(scale), grad_shift = at::empty_like(scale);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbnorm_scale_shift_backward", [&] {
    scale_shift_backward_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
        grad_scale.data_ptr<scalar_t>(), grad_shift.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2),
        is_channels_last(x));
  });
  return {grad_x, grad_scale, grad_shift};
}

}  // namespace

TORCH_LIBRARY(cbnorm_native, m) {
  m.def("mixture_moments(Tensor x, Tensor mean, Tensor log_coef, Tensor quad_coef) -> Tensor");
  m.def("mixture_transform(Tensor x, Tensor mean, Tensor log_coef, Tensor quad_coef, Tensor a, Tensor b) -> Tensor");
  m.def(
      "mixture_transform_backward(Tensor x, Tensor? omega, Tensor mean, Tensor log_coef, Tensor quad_coef, "
      "Tensor a, Tensor b, Tensor? c, bool grad_x, bool tau_moments, bool u_moments) -> (Tensor, Tensor)");
  m.def(
      "mixture_normalize_backward(Tensor x, Tensor omega, Tensor mean, Tensor log_coef, Tensor quad_coef, "
      "Tensor a, Tensor b, Tensor sums_grad) -> Tensor");
  m.def("scale_shift_backward(Tensor x, Tensor grad, Tensor scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cbnorm_native, CPU, m) {
  m.impl("mixture_moments", &mixture_moments);
  m.impl("mixture_transform", &mixture_transform);
  m.impl("mixture_transform_backward", &mixture_transform_backward);
  m.impl("mixture_normalize_backward", &mixture_normalize_backward);
  m.impl("scale_shift_backward", &scale_shift_backward);
}
