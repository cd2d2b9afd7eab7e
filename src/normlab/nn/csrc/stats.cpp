// Per-tensor statistics for normlab.diagnostics on the CPU: the moments, histograms and
// fractions of a whole recording's tensors, each one call over the list.
//
// A recording measures every layer's output, gradient and parameter. As ATen operators, each
// statistic costs a dozen operators per group of same-shaped tensors, and a model of many small
// layers in many shapes spends most of a recording on their fixed cost. Here each statistic is
// one pass over each tensor's values, the tensors split among the threads whole, so that every
// tensor's numbers come from one fixed order of operations whatever the thread count. Sums run
// in double. The histograms and fractions compute in float as the ATen version
// (normlab/diagnostics/stats.py) does, so their counts are the same.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// The passes over every value run in the widest SIMD the processor has: GCC compiles them once
// per instruction set and picks one at load time (the build's own target is plain x86-64,
// SSE2). Which one runs changes the order of a sum's lanes, so a std's last bits, never a
// count.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NORMLAB_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NORMLAB_SIMD_CLONES
#endif

constexpr int64_t kBlock = 64;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

void check_input(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cpu() && t.is_contiguous() &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              "normlab::", op, ": every tensor must be a contiguous float32 or float64 CPU tensor");
}

// Each tensor's statistics on its own thread: the list split among the threads whole.
template <typename Body>
void per_tensor(int64_t count, const Body& body) {
  at::parallel_for(0, count, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) body(g);
  });
}

// Partial sums a pass keeps apart: each addition waits for the one before it in the same sum
// (4 cycles), so one SIMD register of sums would add a register's lanes every 4 cycles; 32
// independent ones fill the pipeline.
constexpr int64_t kLanes = 32;

// mean, sample std, min and max of x - minus (Minus: x itself without it); a NaN anywhere makes
// them all NaN, as the ATen reductions do. One pass over the values, each value v summed as
// v - c and (v - c)², in double, with c the first value: the shift keeps the sum of squares from
// cancelling (its error is a double's rounding times ((mean - c) / std)², and c is one of the
// values), and a constant tensor's mean is its value and its std exactly 0. kLanes partial sums.
template <typename scalar_t, bool Minus>
NORMLAB_SIMD_CLONES void moments_of(const scalar_t* __restrict x,
                                    const scalar_t* __restrict minus, int64_t n, double* out) {
  auto value = [&](int64_t i) {
    if constexpr (Minus) {
      return scalar_t(x[i] - minus[i]);  // the difference in the tensors' dtype, as ATen's
    } else {
      return x[i];
    }
  };
  if (n == 0) {
    std::fill(out, out + 4, kNaN);
    return;
  }
  const double first = double(value(0));
  const double shift = std::isfinite(first) ? first : 0.0;  // an inf stays in the sums as ATen's
  const int64_t whole = n - n % kLanes;  // the values the lanes take; the rest, one by one
  double sums[kLanes] = {}, squares[kLanes] = {};
  scalar_t lows[kLanes], highs[kLanes];
  std::fill(lows, lows + kLanes, std::numeric_limits<scalar_t>::infinity());
  std::fill(highs, highs + kLanes, -std::numeric_limits<scalar_t>::infinity());
  auto add = [&](int64_t j, scalar_t v) {
    const double d = double(v) - shift;
    sums[j] += d;
    squares[j] += d * d;
    lows[j] = std::min(lows[j], v);
    highs[j] = std::max(highs[j], v);
  };
  for (int64_t i = 0; i < whole; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) add(j, value(i + j));
  }
  for (int64_t i = whole; i < n; ++i) add(i - whole, value(i));
  double sum = 0, square_sum = 0;
  scalar_t lo = lows[0], hi = highs[0];
  for (int64_t j = 0; j < kLanes; ++j) {
    sum += sums[j];
    square_sum += squares[j];
    lo = std::min(lo, lows[j]);
    hi = std::max(hi, highs[j]);
  }
  // sum · (sum / n), not sum² / n: sum² can overflow where the result does not
  const double centered = std::max(square_sum - sum * (sum / double(n)), 0.0);
  // a NaN reaches the sums (min and max may skip it); so does inf - inf, where ATen's mean is
  // NaN as well
  const bool undefined = std::isnan(sum) || std::isnan(square_sum);
  out[0] = undefined ? kNaN : double(scalar_t(shift + sum / double(n)));
  out[1] = undefined ? kNaN : std::sqrt(centered / double(std::max<int64_t>(n - 1, 1)));
  out[2] = undefined ? kNaN : double(lo);
  out[3] = undefined ? kNaN : double(hi);
}

// (G, 4) float64: each tensor's mean, sample std, min and max, of xs[g] - subtract[g] where
// subtract is given; an absent tensor's row is NaN.
at::Tensor moments(const c10::List<std::optional<at::Tensor>>& xs,
                   const c10::List<std::optional<at::Tensor>>& subtract) {
  const int64_t G = xs.size();
  TORCH_CHECK(subtract.size() == 0 || subtract.size() == xs.size(),
              "normlab::moments: subtract must be empty or one tensor per tensor");
  std::vector<at::Tensor> x(G), minus(G);
  for (int64_t g = 0; g < G; ++g) {
    std::optional<at::Tensor> t = xs.get(g);
    if (t.has_value() && t->defined()) {
      check_input(*t, "moments");
      x[g] = *t;
    }
    if (subtract.size() > 0) {
      std::optional<at::Tensor> m = subtract.get(g);
      TORCH_CHECK(m.has_value() && m->defined(), "normlab::moments: a tensor to subtract is absent");
      check_input(*m, "moments");
      TORCH_CHECK(x[g].defined() && m->sizes() == x[g].sizes() &&
                      m->scalar_type() == x[g].scalar_type(),
                  "normlab::moments: a tensor to subtract differs in shape or dtype");
      minus[g] = *m;
    }
  }
  at::Tensor out = at::empty({G, 4}, at::kDouble);
  double* o = out.data_ptr<double>();
  per_tensor(G, [&](int64_t g) {
    if (!x[g].defined()) {
      std::fill(o + 4 * g, o + 4 * g + 4, kNaN);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES(x[g].scalar_type(), "normlab::moments", [&] {
      const scalar_t* v = x[g].const_data_ptr<scalar_t>();
      if (minus[g].defined()) {
        moments_of<scalar_t, true>(v, minus[g].const_data_ptr<scalar_t>(), x[g].numel(),
                                   o + 4 * g);
      } else {
        moments_of<scalar_t, false>(v, nullptr, x[g].numel(), o + 4 * g);
      }
    });
  });
  return out;
}

// Adds to counts (bins of them) every stride-th of the n values v, binned over [-r, r] as
// stats.histograms does: (x / r + 1) · bins / 2, NaN → 0, floored, clamped. For the clamped
// value, in [0, bins - 1], truncation is the floor, which lets the binning run in SIMD.
template <typename scalar_t>
NORMLAB_SIMD_CLONES void count_bins(const scalar_t* v, int64_t n, int64_t stride, float r,
                                    int64_t bins, std::vector<int64_t>& counts) {
  // kCopies histograms, value j counted in copy j % kCopies: consecutive values that fall in
  // one bin (most of them, near the middle) then add to different counters, not each to the
  // count the one before it is still storing; int32 counts, added up every 2^30 values
  constexpr int64_t kCopies = 4, kChunk = int64_t(1) << 30;
  const int64_t m = (n + stride - 1) / stride;  // the values sampled
  const float half_bins = float(bins) / 2, last = float(bins - 1);
  std::vector<int32_t> copies(kCopies * bins);
  int32_t bin[kBlock];
  for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, m);
    std::fill(copies.begin(), copies.end(), 0);
    for (int64_t j0 = c0; j0 < c1; j0 += kBlock) {
      const int64_t j1 = std::min(j0 + kBlock, c1);
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        float position = (float(v[j * stride]) / r + 1.0f) * half_bins;
        position = position == position ? position : 0.0f;
        position = position < 0.0f ? 0.0f : (position > last ? last : position);
        bin[j - j0] = int32_t(position) + int32_t((j % kCopies) * bins);
      }
      for (int64_t j = j0; j < j1; ++j) ++copies[bin[j - j0]];
    }
    for (int64_t c = 0; c < kCopies; ++c) {
      for (int64_t b = 0; b < bins; ++b) counts[b] += copies[c * bins + b];
    }
  }
}

// (G, bins) float32: the counts of each tensor's values in bins equal bins over [-r, r], of
// every stride-th value (stride = max(1, numel / sample)); NaN in bin 0, values beyond ±r in
// the end bins; an absent tensor's row is zero.
at::Tensor histograms(const c10::List<std::optional<at::Tensor>>& xs, const at::Tensor& r,
                      int64_t bins, int64_t sample) {
  const int64_t G = xs.size();
  TORCH_CHECK(r.is_cpu() && r.scalar_type() == at::kFloat && r.numel() == G,
              "normlab::histograms: r must be one float32 per tensor");
  TORCH_CHECK(bins > 0 && sample > 0, "normlab::histograms: bins and sample must be positive");
  std::vector<at::Tensor> x(G);
  for (int64_t g = 0; g < G; ++g) {
    std::optional<at::Tensor> t = xs.get(g);
    if (t.has_value() && t->defined()) {
      check_input(*t, "histograms");
      x[g] = *t;
    }
  }
  const at::Tensor ranges = r.contiguous();
  const float* rr = ranges.const_data_ptr<float>();
  at::Tensor out = at::zeros({G, bins}, at::kFloat);
  float* o = out.data_ptr<float>();
  per_tensor(G, [&](int64_t g) {
    if (!x[g].defined()) return;
    const int64_t n = x[g].numel(), stride = std::max<int64_t>(1, n / sample);
    std::vector<int64_t> counts(bins, 0);
    AT_DISPATCH_FLOATING_TYPES(x[g].scalar_type(), "normlab::histograms", [&] {
      count_bins<scalar_t>(x[g].const_data_ptr<scalar_t>(), n, stride, rr[g], bins, counts);
    });
    for (int64_t b = 0; b < bins; ++b) o[g * bins + b] = float(counts[b]);
  });
  return out;
}

// What a recording keeps of each fine histogram fine[g] (F bins over [-r[g], r[g]]): its
// counts summed into bins coarse bins (F a multiple of bins), and its percentiles read off the
// cumulative counts, interpolated within a bin, in float32 and in the order of operations of
// stats.percentiles, so that both give the same numbers: returns (G, bins) and (G, P).
std::tuple<at::Tensor, at::Tensor> histogram_summary(const at::Tensor& fine, const at::Tensor& r,
                                                     at::ArrayRef<double> percentiles,
                                                     int64_t bins) {
  TORCH_CHECK(fine.is_cpu() && fine.scalar_type() == at::kFloat && fine.dim() == 2,
              "normlab::histogram_summary: fine must be (G, F) float32 on the CPU");
  const int64_t G = fine.size(0), F = fine.size(1), P = percentiles.size();
  TORCH_CHECK(bins > 0 && F % bins == 0,
              "normlab::histogram_summary: the fine bins must be a multiple of bins");
  TORCH_CHECK(r.is_cpu() && r.scalar_type() == at::kFloat && r.numel() == G,
              "normlab::histogram_summary: r must be one float32 per row");
  const at::Tensor counts = fine.contiguous(), ranges = r.contiguous();
  const float* c = counts.const_data_ptr<float>();
  const float* rr = ranges.const_data_ptr<float>();
  at::Tensor coarse = at::zeros({G, bins}, at::kFloat), out = at::empty({G, P}, at::kFloat);
  float* h = coarse.data_ptr<float>();
  float* o = out.data_ptr<float>();
  std::vector<float> q(P);
  for (int64_t k = 0; k < P; ++k) q[k] = float(percentiles[k]) / 100.0f;
  per_tensor(G, [&](int64_t g) {
    const float* row = c + g * F;
    const int64_t per = F / bins;
    for (int64_t b = 0; b < F; ++b) h[g * bins + b / per] += row[b];
    double total = 0;  // whole counts, exact
    for (int64_t b = 0; b < F; ++b) total += row[b];
    std::vector<float> cdf(F);
    double running = 0;
    for (int64_t b = 0; b < F; ++b) {
      running += row[b];
      cdf[b] = float(running) / float(total);
    }
    const float step = 2.0f * rr[g] / float(F);
    for (int64_t k = 0; k < P; ++k) {
      // the first bin whose cdf reaches q (searchsorted, left); NaN rows end at the last bin
      int64_t i = std::lower_bound(cdf.begin(), cdf.end(), q[k]) - cdf.begin();
      i = std::min(i, F - 1);
      const float below = i > 0 ? cdf[i - 1] : 0.0f;
      float within = (q[k] - below) / std::max(cdf[i] - below, 1e-12f);
      within = std::min(std::max(within, 0.0f), 1.0f);
      o[g * P + k] = -rr[g] + (float(i) + within) * step;
    }
  });
  return {coarse, out};
}

// How many of the n values v lie beyond limit of mid, |v - mid| > limit, in float.
template <typename scalar_t>
NORMLAB_SIMD_CLONES int64_t count_beyond(const scalar_t* __restrict v, int64_t n, float mid,
                                         float limit) {
  int64_t beyond = 0;
#pragma omp simd reduction(+ : beyond)
  for (int64_t i = 0; i < n; ++i) beyond += std::fabs(float(v[i]) - mid) > limit;
  return beyond;
}

// (G,) float64: each tensor's share of values v with |v - mid| > saturation · half, in float.
at::Tensor saturated(at::TensorList xs, const at::Tensor& mid, const at::Tensor& half,
                     double saturation) {
  const int64_t G = xs.size();
  TORCH_CHECK(mid.is_cpu() && half.is_cpu() && mid.scalar_type() == at::kFloat &&
                  half.scalar_type() == at::kFloat && mid.numel() == G && half.numel() == G,
              "normlab::saturated: mid and half must be one float32 per tensor");
  for (const at::Tensor& t : xs) check_input(t, "saturated");
  const at::Tensor m = mid.contiguous(), h = half.contiguous();
  const float* mm = m.const_data_ptr<float>();
  const float* hh = h.const_data_ptr<float>();
  at::Tensor out = at::empty({G}, at::kDouble);
  double* o = out.data_ptr<double>();
  per_tensor(G, [&](int64_t g) {
    const int64_t n = xs[g].numel();
    const float limit = hh[g] * float(saturation);
    int64_t beyond = 0;
    AT_DISPATCH_FLOATING_TYPES(xs[g].scalar_type(), "normlab::saturated", [&] {
      beyond = count_beyond(xs[g].const_data_ptr<scalar_t>(), n, mm[g], limit);
    });
    o[g] = n ? double(beyond) / double(n) : kNaN;
  });
  return out;
}

// (G,) float64: each tensor's share of units that never rise above floor, the tensor read as
// (batch, units[g], positions[g]): a unit is dead when none of its batch × positions values is
// above it.
at::Tensor dead(at::TensorList xs, const at::Tensor& floor, at::IntArrayRef units,
                at::IntArrayRef positions) {
  const int64_t G = xs.size();
  TORCH_CHECK(floor.is_cpu() && floor.scalar_type() == at::kFloat && floor.numel() == G &&
                  int64_t(units.size()) == G && int64_t(positions.size()) == G,
              "normlab::dead: floor, units and positions must be one per tensor");
  for (int64_t g = 0; g < G; ++g) {
    check_input(xs[g], "dead");
    TORCH_CHECK(units[g] > 0 && positions[g] > 0 && xs[g].numel() % (units[g] * positions[g]) == 0,
                "normlab::dead: a tensor's values are not batch × units × positions");
  }
  const at::Tensor f = floor.contiguous();
  const float* ff = f.const_data_ptr<float>();
  at::Tensor out = at::empty({G}, at::kDouble);
  double* o = out.data_ptr<double>();
  per_tensor(G, [&](int64_t g) {
    const int64_t U = units[g], P = positions[g], B = xs[g].numel() / (U * P);
    std::vector<char> alive(U, 0);
    AT_DISPATCH_FLOATING_TYPES(xs[g].scalar_type(), "normlab::dead", [&] {
      const scalar_t* v = xs[g].const_data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t u = 0; u < U; ++u) {
          const scalar_t* run = v + (b * U + u) * P;
          bool above = false;
          for (int64_t p = 0; p < P; ++p) above |= float(run[p]) > ff[g];
          alive[u] |= above;
        }
      }
    });
    int64_t living = 0;
    for (char a : alive) living += a;
    o[g] = B ? 1.0 - double(living) / double(U) : kNaN;
  });
  return out;
}

// Each channel's batch mean and biased variance of x read as (B, C, P), P positions per
// channel (1 for (B, C)): two passes in double, over each row of P values, or across the C
// channels of a row where P is 1.
template <typename scalar_t>
void channel_moments(const scalar_t* x, int64_t B, int64_t C, int64_t P, double* mean,
                     double* var) {
  std::fill(mean, mean + C, 0.0);
  std::fill(var, var + C, 0.0);
  const double count = double(B * P);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* run = x + (b * C + c) * P;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < P; ++p) s += double(run[p]);
      mean[c] += s;
    }
  }
  for (int64_t c = 0; c < C; ++c) mean[c] /= count;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* run = x + (b * C + c) * P;
      const double m = mean[c];
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < P; ++p) {
        const double d = double(run[p]) - m;
        s += d * d;
      }
      var[c] += s;
    }
  }
  for (int64_t c = 0; c < C; ++c) var[c] /= count;
}

// The larger of a and b, NaN if either is, as torch.amax and torch.maximum.
double nan_max(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? kNaN : std::max(a, b); }

// (G, 2) float64: for each BatchNorm's input xs[g] (B, C, *) and its running statistics before
// the batch, the largest over channels of the mean drift |running_mean - mean| / sqrt(var + eps)
// and of the variance ratio max(r, 1 / r), r = (running_var + eps) / (var + eps), where mean and
// var (biased) are the batch's, what the BatchNorm normalizes with.
at::Tensor batchnorm_drift(at::TensorList xs, at::TensorList running_means,
                           at::TensorList running_vars, at::ArrayRef<double> eps) {
  const int64_t G = xs.size();
  TORCH_CHECK(int64_t(running_means.size()) == G && int64_t(running_vars.size()) == G &&
                  int64_t(eps.size()) == G,
              "normlab::batchnorm_drift: running statistics and eps must be one per tensor");
  for (int64_t g = 0; g < G; ++g) {
    check_input(xs[g], "batchnorm_drift");
    TORCH_CHECK(xs[g].dim() >= 2, "normlab::batchnorm_drift: an input must be (B, C, *)");
    const int64_t C = xs[g].size(1);
    for (const at::Tensor& r : {running_means[g], running_vars[g]}) {
      TORCH_CHECK(r.is_cpu() && r.numel() == C,
                  "normlab::batchnorm_drift: running statistics must be (C,) CPU tensors");
    }
  }
  at::Tensor out = at::empty({G, 2}, at::kDouble);
  double* o = out.data_ptr<double>();
  per_tensor(G, [&](int64_t g) {
    const at::Tensor& x = xs[g];
    const int64_t B = x.size(0), C = x.size(1);
    if (B * C == 0) {  // no batch, or no channel: nothing to measure, as the ATen path's NaN
      o[2 * g] = o[2 * g + 1] = kNaN;
      return;
    }
    const int64_t P = x.numel() / (B * C);
    std::vector<double> mean(C), var(C);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normlab::batchnorm_drift", [&] {
      channel_moments(x.const_data_ptr<scalar_t>(), B, C, P, mean.data(), var.data());
    });
    const at::Tensor rm = running_means[g].to(at::kDouble).contiguous();
    const at::Tensor rv = running_vars[g].to(at::kDouble).contiguous();
    const double* rmean = rm.const_data_ptr<double>();
    const double* rvar = rv.const_data_ptr<double>();
    double drift = -std::numeric_limits<double>::infinity(), ratio = drift;
    for (int64_t c = 0; c < C; ++c) {
      const double r = (rvar[c] + eps[g]) / (var[c] + eps[g]);
      drift = nan_max(drift, std::fabs(rmean[c] - mean[c]) / std::sqrt(var[c] + eps[g]));
      ratio = nan_max(ratio, nan_max(r, 1.0 / r));
    }
    o[2 * g] = drift;
    o[2 * g + 1] = ratio;
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normlab, m) {
  m.def("moments(Tensor?[] xs, Tensor?[] subtract) -> Tensor");
  m.def("histograms(Tensor?[] xs, Tensor r, int bins, int sample) -> Tensor");
  m.def("saturated(Tensor[] xs, Tensor mid, Tensor half, float saturation) -> Tensor");
  m.def("dead(Tensor[] xs, Tensor floor, int[] units, int[] positions) -> Tensor");
  m.def(
      "batchnorm_drift(Tensor[] xs, Tensor[] running_means, Tensor[] running_vars, float[] eps) "
      "-> Tensor");
  m.def(
      "histogram_summary(Tensor fine, Tensor r, float[] percentiles, int bins) -> (Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(normlab, CPU, m) {
  m.impl("moments", moments);
  m.impl("histograms", histograms);
  m.impl("saturated", saturated);
  m.impl("dead", dead);
  m.impl("batchnorm_drift", batchnorm_drift);
  m.impl("histogram_summary", histogram_summary);
}
