// Per-tensor statistics for normlab.diagnostics on the CPU: the moments, histograms,
// percentiles and fractions of a whole recording's tensors, one call over the list per kind of
// tensor (outputs, gradients, parameters, BatchNorm inputs), each tensor measured whole before
// the next.
//
// A recording measures every layer's output, gradient and parameter. As ATen operators, each
// statistic costs a dozen operators per group of same-shaped tensors, and a model of many small
// layers in many shapes spends most of a recording on their fixed cost. Here each statistic is
// one pass over a tensor's values (an output's four: moments, histogram, saturated, dead), a
// tensor's passes one after another while it is in the cache, the tensors split among the
// threads whole, so that every tensor's numbers come from one fixed order of operations
// whatever the thread count. Sums run in double. The histograms and fractions compute in float
// as the ATen version (normlab/diagnostics/stats.py) does, so their counts are the same.

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
// Copy: each value is also written to copy, in the same pass.
template <typename scalar_t, bool Minus, bool Copy = false>
NORMLAB_SIMD_CLONES void moments_of(const scalar_t* __restrict x,
                                    const scalar_t* __restrict minus, int64_t n, double* out,
                                    scalar_t* __restrict copy = nullptr) {
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
  auto take = [&](int64_t i) {
    const scalar_t v = value(i);
    if constexpr (Copy) copy[i] = v;
    return v;
  };
  for (int64_t i = 0; i < whole; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) add(j, take(i + j));
  }
  for (int64_t i = whole; i < n; ++i) add(i - whole, take(i));
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

// The tensors of a list, each absent (undefined) or a contiguous float32/float64 CPU tensor.
std::vector<at::Tensor> optional_inputs(const c10::List<std::optional<at::Tensor>>& xs,
                                        const char* op) {
  std::vector<at::Tensor> x(xs.size());
  for (size_t g = 0; g < xs.size(); ++g) {
    std::optional<at::Tensor> t = xs.get(g);
    if (t.has_value() && t->defined()) {
      check_input(*t, op);
      x[g] = *t;
    }
  }
  return x;
}

// The larger of a and b, NaN if either is, as torch.amax and torch.maximum.
double nan_max(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? kNaN : std::max(a, b); }

// Adds to counts (bins of them) every stride-th of the n values v, binned over [-r, r] as
// stats.histograms does: (x / r + 1) · bins / 2, NaN → 0, floored, clamped. For the clamped
// value, in [0, bins - 1], truncation is the floor, which lets the binning run in SIMD.
template <typename scalar_t>
NORMLAB_SIMD_CLONES void count_bins(const scalar_t* v, int64_t n, int64_t stride, float r,
                                    int64_t bins, std::vector<int64_t>& counts) {
  // 4 histograms, value j counted in copy j % 4: consecutive values that fall in one bin (most
  // of them, near the middle) then add to different counters, not each to the count the one
  // before it is still storing; one where there are fewer values than counters to clear and
  // add up. int32 counts, added up every 2^30 values
  constexpr int64_t kChunk = int64_t(1) << 30;
  const int64_t m = (n + stride - 1) / stride;  // the values sampled
  const int64_t kCopies = m >= 4 * bins ? 4 : 1;
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
        bin[j - j0] = int32_t(position) + int32_t((j & (kCopies - 1)) * bins);
      }
      for (int64_t j = j0; j < j1; ++j) ++copies[bin[j - j0]];
    }
    for (int64_t c = 0; c < kCopies; ++c) {
      for (int64_t b = 0; b < bins; ++b) counts[b] += copies[c * bins + b];
    }
  }
}

// One tensor's spread, as stats.spread_stats's ATen path computes it: its moments (mean, std,
// min, max), the range r its histogram spans (the largest magnitude, in float32, at least
// 1e-30; NaN where a value is) and the counts of every stride-th value in bins over [-r, r].
// The histogram reads the values right after the moments, while they are in the cache. An
// absent tensor: NaN moments and range, no counts.
void spread_of(const at::Tensor& x, int64_t bins, int64_t sample, double* moments, float* range,
               float* hist) {
  if (!x.defined()) {
    std::fill(moments, moments + 4, kNaN);
    *range = float(kNaN);
    return;
  }
  const int64_t n = x.numel(), stride = std::max<int64_t>(1, n / sample);
  std::vector<int64_t> counts(bins, 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normlab::spread", [&] {
    const scalar_t* v = x.const_data_ptr<scalar_t>();
    moments_of<scalar_t, false>(v, nullptr, n, moments);
    const float largest = float(nan_max(-moments[2], moments[3]));
    *range = std::isnan(largest) ? largest : std::max(largest, 1e-30f);
    count_bins<scalar_t>(v, n, stride, *range, bins, counts);
  });
  for (int64_t b = 0; b < bins; ++b) hist[b] = float(counts[b]);
}

// Each tensor's spread (spread_of): (G, 4) float64 moments, (G,) float32 ranges and (G, bins)
// float32 counts.
std::tuple<at::Tensor, at::Tensor, at::Tensor> spread(
    const c10::List<std::optional<at::Tensor>>& xs, int64_t bins, int64_t sample) {
  TORCH_CHECK(bins > 0 && sample > 0, "normlab::spread: bins and sample must be positive");
  const std::vector<at::Tensor> x = optional_inputs(xs, "spread");
  const int64_t G = x.size();
  at::Tensor moments = at::empty({G, 4}, at::kDouble), range = at::empty({G}, at::kFloat);
  at::Tensor hist = at::zeros({G, bins}, at::kFloat);
  double* m = moments.data_ptr<double>();
  float* r = range.data_ptr<float>();
  float* h = hist.data_ptr<float>();
  per_tensor(G, [&](int64_t g) { spread_of(x[g], bins, sample, m + 4 * g, r + g, h + g * bins); });
  return {moments, range, hist};
}

// Each parameter's copy, taken before the step, contiguous, and the moments of its values (mean,
// std, min, max), measured in the pass that copies them: a list of copies and (G, 4) float64.
std::tuple<std::vector<at::Tensor>, at::Tensor> copy_moments(at::TensorList xs) {
  const int64_t G = xs.size();
  for (const at::Tensor& t : xs) {
    TORCH_CHECK(t.is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                "normlab::copy_moments: every tensor must be a float32 or float64 CPU tensor");
  }
  std::vector<at::Tensor> copies(G);
  for (int64_t g = 0; g < G; ++g) copies[g] = at::empty(xs[g].sizes(), xs[g].options());
  at::Tensor out = at::empty({G, 4}, at::kDouble);
  double* o = out.data_ptr<double>();
  per_tensor(G, [&](int64_t g) {
    const at::Tensor x = xs[g].contiguous();  // a strided parameter: one copy more
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normlab::copy_moments", [&] {
      moments_of<scalar_t, false, true>(x.const_data_ptr<scalar_t>(), nullptr, x.numel(),
                                        o + 4 * g, copies[g].data_ptr<scalar_t>());
    });
  });
  return {copies, out};
}

// Each tensor's moments (mean, std, min, max), as copy_moments measures them without the copies:
// (G, 4) float64. What a traced recording calls on the copies it takes itself.
at::Tensor moments(at::TensorList xs) {
  const int64_t G = xs.size();
  for (const at::Tensor& t : xs) check_input(t, "moments");
  at::Tensor out = at::empty({G, 4}, at::kDouble);
  double* o = out.data_ptr<double>();
  per_tensor(G, [&](int64_t g) {
    const at::Tensor x = xs[g].contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normlab::moments", [&] {
      moments_of<scalar_t, false>(x.const_data_ptr<scalar_t>(), nullptr, x.numel(), o + 4 * g);
    });
  });
  return out;
}

// Each parameter's statistics, the parameter measured whole before the next: the moments of
// the step's update (params[g] - before[g], before[g] its copy from before the step) and the
// spread of its gradient (spread_of; NaN where it has none). Returns the updates' (G, 4) float64
// moments, and the gradients' (G, 4) moments, (G,) ranges and (G, bins) counts.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> param_spread(
    at::TensorList before, at::TensorList params,
    const c10::List<std::optional<at::Tensor>>& grads, int64_t bins, int64_t sample) {
  const int64_t G = before.size();
  TORCH_CHECK(int64_t(params.size()) == G && int64_t(grads.size()) == G,
              "normlab::param_spread: params and grads must be one per tensor before");
  TORCH_CHECK(bins > 0 && sample > 0, "normlab::param_spread: bins and sample must be positive");
  for (int64_t g = 0; g < G; ++g) {
    check_input(before[g], "param_spread");
    check_input(params[g], "param_spread");
    TORCH_CHECK(params[g].sizes() == before[g].sizes() &&
                    params[g].scalar_type() == before[g].scalar_type(),
                "normlab::param_spread: a parameter differs from its copy in shape or dtype");
  }
  const std::vector<at::Tensor> grad = optional_inputs(grads, "param_spread");
  at::Tensor update = at::empty({G, 4}, at::kDouble), moments = at::empty({G, 4}, at::kDouble);
  at::Tensor range = at::empty({G}, at::kFloat), hist = at::zeros({G, bins}, at::kFloat);
  double* u = update.data_ptr<double>();
  double* m = moments.data_ptr<double>();
  float* r = range.data_ptr<float>();
  float* h = hist.data_ptr<float>();
  per_tensor(G, [&](int64_t g) {
    AT_DISPATCH_FLOATING_TYPES(before[g].scalar_type(), "normlab::param_spread", [&] {
      moments_of<scalar_t, true>(params[g].const_data_ptr<scalar_t>(),
                                 before[g].const_data_ptr<scalar_t>(), before[g].numel(),
                                 u + 4 * g);
    });
    spread_of(grad[g], bins, sample, m + 4 * g, r + g, h + g * bins);
  });
  return {update, moments, range, hist};
}

// What a recording keeps of a fine histogram row (F counts over [-r, r]): its counts summed
// into bins coarse bins (F a multiple of bins), and the percentiles q (fractions) read off the
// cumulative counts, interpolated within a bin, in float32 and in the order of operations of
// stats.percentiles, so that both give the same numbers. An empty row's percentiles are NaN.
void summarize_histogram(const int64_t* row, int64_t F, float r, const std::vector<float>& q,
                         int64_t bins, float* coarse, float* at) {
  const int64_t per = F / bins;
  int64_t total = 0;  // whole numbers, exact in float32 below 2^24: what a row holds
  for (int64_t k = 0; k < bins; ++k) {
    int64_t sum = 0;
    for (int64_t j = 0; j < per; ++j) sum += row[k * per + j];
    coarse[k] = float(sum);
    total += sum;
  }
  // the cdf of bin b, float(cumulative count) / float(total), read where a search reaches
  const float whole = float(total);
  int64_t b = 0, cumulative = row[0];
  auto cdf = [&](int64_t count) { return float(count) / whole; };
  for (size_t k = 0; k < q.size(); ++k) {
    if (k > 0 && !(q[k] >= q[k - 1])) b = 0, cumulative = row[0];  // not ascending (or NaN)
    // the first bin whose cdf reaches q (searchsorted, left): the cdf never falls, so a scan
    // from the last one finds it; an empty row's NaN cdf reaches nothing, and stops at bin 0
    while (b < F - 1 && cdf(cumulative) < q[k]) cumulative += row[++b];
    const float below = b > 0 ? cdf(cumulative - row[b]) : 0.0f;
    float within = (q[k] - below) / std::max(cdf(cumulative) - below, 1e-12f);
    within = std::min(std::max(within, 0.0f), 1.0f);
    at[k] = -r + (float(b) + within) * (2.0f * r / float(F));
  }
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

// The share of units that never rise above floor, of the n values v read as (batch, U, P): a
// unit is dead when none of its batch × P values is above it. NaN for no batch.
template <typename scalar_t>
double dead_share(const scalar_t* v, int64_t n, int64_t U, int64_t P, float floor) {
  const int64_t B = n / (U * P);
  std::vector<char> alive(U, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t u = 0; u < U; ++u) {
      const scalar_t* run = v + (b * U + u) * P;
      bool above = false;
      for (int64_t p = 0; p < P; ++p) above |= float(run[p]) > floor;
      alive[u] |= above;
    }
  }
  int64_t living = 0;
  for (char a : alive) living += a;
  return B ? 1.0 - double(living) / double(U) : kNaN;
}

// The columns of stats.output_stats, each layer's output measured whole before the next: per
// output xs[g], its mean and std; the range r its histogram spans (a saturating layer's end[g],
// else its largest magnitude, at least 1e-12, in float32); the share of its values beyond
// saturation · half[g] of mid[g] (a saturating layer; else NaN); the share of its units dead
// over the batch at floor[g] with units[g] units of positions[g] values (a rectifying layer,
// floor not NaN; else NaN); and the percentiles, read off fine_bins counts of every stride-th
// value over [-r, r] (stride = max(1, numel / sample)), which are also summed into bins counts.
// Returns (5 + P, G) float64 columns (mean, std, r, saturated, dead, then the percentiles; r and
// the percentiles computed in float32), each contiguous, and (G, bins) float32 counts.
std::tuple<at::Tensor, at::Tensor> output_summary(
    at::TensorList xs, at::ArrayRef<double> mid, at::ArrayRef<double> half,
    at::ArrayRef<double> end, at::ArrayRef<double> floor, at::IntArrayRef units,
    at::IntArrayRef positions, double saturation, at::ArrayRef<double> percentiles,
    int64_t fine_bins, int64_t bins, int64_t sample) {
  const int64_t G = xs.size(), P = percentiles.size(), K = 5 + P;
  TORCH_CHECK(int64_t(mid.size()) == G && int64_t(half.size()) == G && int64_t(end.size()) == G &&
                  int64_t(floor.size()) == G && int64_t(units.size()) == G &&
                  int64_t(positions.size()) == G,
              "normlab::output_summary: every layer's parameters must be one per tensor");
  TORCH_CHECK(bins > 0 && sample > 0 && fine_bins > 0 && fine_bins % bins == 0,
              "normlab::output_summary: the fine bins must be a positive multiple of bins");
  for (int64_t g = 0; g < G; ++g) {
    check_input(xs[g], "output_summary");
    TORCH_CHECK(std::isnan(floor[g]) || (units[g] > 0 && positions[g] > 0 &&
                                         xs[g].numel() % (units[g] * positions[g]) == 0),
                "normlab::output_summary: a tensor's values are not batch × units × positions");
  }
  std::vector<float> q(P);
  for (int64_t k = 0; k < P; ++k) q[k] = float(percentiles[k]) / 100.0f;
  at::Tensor columns = at::empty({K, G}, at::kDouble), coarse = at::empty({G, bins}, at::kFloat);
  double* o = columns.data_ptr<double>();
  float* h = coarse.data_ptr<float>();
  per_tensor(G, [&](int64_t g) {
    const at::Tensor& x = xs[g];
    const int64_t n = x.numel(), stride = std::max<int64_t>(1, n / sample);
    auto column = [&](int64_t k) -> double& { return o[k * G + g]; };
    double moments[4];
    float r = 0;
    std::vector<int64_t> counts(fine_bins, 0);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normlab::output_summary", [&] {
      const scalar_t* v = x.const_data_ptr<scalar_t>();
      moments_of<scalar_t, false>(v, nullptr, n, moments);
      const bool saturating = !std::isnan(end[g]);
      const float largest = float(nan_max(-moments[2], moments[3]));
      r = saturating ? float(end[g]) : std::isnan(largest) ? largest : std::max(largest, 1e-12f);
      count_bins<scalar_t>(v, n, stride, r, fine_bins, counts);
      const float limit = float(half[g]) * float(saturation);
      column(3) = saturating && n ? double(count_beyond(v, n, float(mid[g]), limit)) / double(n)
                                  : kNaN;
      column(4) = std::isnan(floor[g])
                      ? kNaN
                      : dead_share(v, n, units[g], positions[g], float(floor[g]));
    });
    column(0) = moments[0];
    column(1) = moments[1];
    column(2) = r;
    std::vector<float> at(P);
    summarize_histogram(counts.data(), fine_bins, r, q, bins, h + g * bins, at.data());
    for (int64_t k = 0; k < P; ++k) column(5 + k) = at[k];
  });
  return {columns, coarse};
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
  if (P == 1) {  // (B, C): each channel's sum in the same order, a row of channels at a time
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* row = x + b * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) mean[c] += double(row[c]);
    }
    for (int64_t c = 0; c < C; ++c) mean[c] /= count;
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* row = x + b * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double d = double(row[c]) - mean[c];
        var[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) var[c] /= count;
    return;
  }
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

// The values of t, in double.
std::vector<double> doubles(const at::Tensor& t) {
  std::vector<double> out(t.numel());
  const at::Tensor c = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "normlab::doubles",
                                  [&] {
                                    const scalar_t* v = c.const_data_ptr<scalar_t>();
                                    for (size_t i = 0; i < out.size(); ++i) out[i] = double(v[i]);
                                  });
  return out;
}

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
    const std::vector<double> rm = doubles(running_means[g]), rv = doubles(running_vars[g]);
    const double* rmean = rm.data();
    const double* rvar = rv.data();
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
  m.def(
      "output_summary(Tensor[] xs, float[] mid, float[] half, float[] end, float[] floor, "
      "int[] units, int[] positions, float saturation, float[] percentiles, int fine_bins, "
      "int bins, int sample) -> (Tensor, Tensor)");
  m.def(
      "batchnorm_drift(Tensor[] xs, Tensor[] running_means, Tensor[] running_vars, float[] eps) "
      "-> Tensor");
  m.def("spread(Tensor?[] xs, int bins, int sample) -> (Tensor, Tensor, Tensor)");
  m.def(
      "param_spread(Tensor[] before, Tensor[] params, Tensor?[] grads, int bins, int sample) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def("copy_moments(Tensor[] xs) -> (Tensor[], Tensor)");
  m.def("moments(Tensor[] xs) -> Tensor");
}

TORCH_LIBRARY_IMPL(normlab, CPU, m) {
  m.impl("output_summary", output_summary);
  m.impl("batchnorm_drift", batchnorm_drift);
  m.impl("spread", spread);
  m.impl("param_spread", param_spread);
  m.impl("copy_moments", copy_moments);
  m.impl("moments", moments);
}
