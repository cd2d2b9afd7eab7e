// Training-mode batch normalization on the CPU: the forward and the closed-form backward of
// normlab.nn.BatchNormFunction, each one call, for float32 and float64 of any rank and layout,
// and the backward's own backward (a Hessian-vector product's), also one call.
//
// The input is viewed as (outer, C, inner): C channels at channel_dim, the dimensions before it
// folded into outer and those after into inner, so (N, C) and (N, T, C) with channel_dim = -1
// have inner = 1, and (N, C, L), (N, C, H, W) have inner = L, H·W. The forward reads the data
// three times (the mean, the deviations, y), the backward twice (its two sums, then the
// input's gradient). Sums
// run over blocks of values in the input's dtype and in double across blocks, each channel's
// in a fixed order: threads split the channels for the sums and the rows for the elementwise
// passes, so the results do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

void check_dtypes(const at::Tensor& x, std::initializer_list<at::Tensor> others) {
  for (const at::Tensor& t : others) {
    TORCH_CHECK(!t.defined() || (t.scalar_type() == x.scalar_type() && t.is_contiguous() &&
                                 t.device() == x.device()),
                "normlab::batch_norm: the gain, bias and running statistics must be contiguous "
                "and of the input's dtype and device");
  }
}

struct Layout {
  int64_t outer, C, inner;
};

Layout layout_of(const at::Tensor& x, int64_t channel_dim) {
  Layout l{1, x.size(channel_dim), 1};
  for (int64_t d = 0; d < channel_dim; ++d) l.outer *= x.size(d);
  for (int64_t d = channel_dim + 1; d < x.dim(); ++d) l.inner *= x.size(d);
  return l;
}

// For each channel c, the two sums Σ first(c, k) and Σ second(c, k) over the indices k of its
// outer·inner values, in one read of the data; with second = NoSecond{}, the first alone (out2
// unused). Runs of kBlock values are summed in scalar_t (full SIMD width), the runs' sums in
// double; each channel in one fixed order, whichever thread computes it.
constexpr int64_t kBlock = 64;

struct NoSecond {};

template <typename scalar_t, typename First, typename Second>
void channel_sums(const Layout& l, double* __restrict out1, double* __restrict out2,
                  const First& first, const Second& second) {
  constexpr bool two = !std::is_same_v<Second, NoSecond>;
  // threads only where each gets ATen's grain of values, and a slice of a row in whole cache
  // lines: below that, starting them costs more than it saves
  const int64_t per_channel = std::max<int64_t>(1, l.outer * l.inner);
  const int64_t grain = std::max<int64_t>(16, at::internal::GRAIN_SIZE / per_channel);
  at::parallel_for(0, l.C, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      out1[c] = 0.0;
      if constexpr (two) out2[c] = 0.0;
    }
    if (l.inner == 1) {  // rows of C: sum kBlock rows at a time, across the channels
      std::vector<scalar_t> run1(c1 - c0), run2(two ? c1 - c0 : 0);
      scalar_t* __restrict r1 = run1.data() - c0;
      scalar_t* __restrict r2 = run2.data() - c0;
      for (int64_t o0 = 0; o0 < l.outer; o0 += kBlock) {
        std::fill(run1.begin(), run1.end(), scalar_t(0));
        std::fill(run2.begin(), run2.end(), scalar_t(0));  // empty without a second term
        for (int64_t o = o0; o < std::min(o0 + kBlock, l.outer); ++o) {
#pragma omp simd
          for (int64_t c = c0; c < c1; ++c) {
            r1[c] += first(c, o * l.C + c);
            if constexpr (two) r2[c] += second(c, o * l.C + c);
          }
        }
        for (int64_t c = c0; c < c1; ++c) {
          out1[c] += r1[c];
          if constexpr (two) out2[c] += r2[c];
        }
      }
      return;
    }
    for (int64_t o = 0; o < l.outer; ++o) {  // runs of inner values, one channel each
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t start = (o * l.C + c) * l.inner;
        for (int64_t i0 = 0; i0 < l.inner; i0 += kBlock) {
          scalar_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t i = i0; i < std::min(i0 + kBlock, l.inner); ++i) {
            s1 += first(c, start + i);
            if constexpr (two) s2 += second(c, start + i);
          }
          out1[c] += s1;
          if constexpr (two) out2[c] += s2;
        }
      }
    }
  });
}

// out[index] = term(c, index) for every value, c its channel; threads split the rows.
template <typename scalar_t, typename Term>
void channel_map(const Layout& l, scalar_t* __restrict out, const Term& term) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (l.C * l.inner));
  at::parallel_for(0, l.outer, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t row = o * l.C * l.inner;
      if (l.inner == 1) {
#pragma omp simd
        for (int64_t c = 0; c < l.C; ++c) out[row + c] = term(c, row + c);
      } else {
        for (int64_t c = 0; c < l.C; ++c) {
          const int64_t start = row + c * l.inner;
#pragma omp simd
          for (int64_t i = 0; i < l.inner; ++i) out[start + i] = term(c, start + i);
        }
      }
    }
  });
}

// Counts the batch in num_batches_tracked (one int64 on the CPU) when there is one, as torch's
// BatchNorm does; returns the count, or 0 without one.
int64_t count_batch(const at::Tensor& num_batches_tracked) {
  if (!num_batches_tracked.defined()) return 0;
  TORCH_CHECK(num_batches_tracked.scalar_type() == at::kLong &&
                  num_batches_tracked.numel() == 1 && num_batches_tracked.is_cpu(),
              "normlab::batch_norm: num_batches_tracked must be one int64 on the CPU");
  const int64_t count = ++num_batches_tracked.mutable_data_ptr<int64_t>()[0];
  torch::autograd::impl::bump_version(num_batches_tracked);  // written in place
  return count;
}

// The running statistics' factor: momentum, or without one 1/count (a cumulative average).
double running_factor(std::optional<double> momentum, int64_t count) {
  if (momentum.has_value()) return *momentum;
  TORCH_CHECK(count > 0, "normlab::batch_norm: momentum=None needs num_batches_tracked");
  return 1.0 / double(count);
}

// y = (x - mean)·γ/σ + β; returns (y, mean, invstd), and where there are running statistics
// counts the batch and moves them. weight, bias, the running statistics and the batch count
// may each be undefined (absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var,
    const at::Tensor& num_batches_tracked, std::optional<double> momentum, double eps,
    int64_t channel_dim) {
  check_dtypes(input, {weight, bias, running_mean, running_var});
  TORCH_CHECK(input.is_cpu(), "normlab::batch_norm: a CPU operator, got a ", input.device(),
              " tensor");
  TORCH_CHECK(0 <= channel_dim && channel_dim < input.dim(),
              "normlab::batch_norm: channel_dim out of range");
  TORCH_CHECK(input.numel() > 0, "normlab::batch_norm: an empty input");
  for (const at::Tensor& t : {running_mean, running_var}) {
    TORCH_CHECK(!t.defined() || !t.requires_grad(),
                "normlab::batch_norm: running statistics that require grad");
  }
  const at::Tensor x = input.contiguous();
  const Layout l = layout_of(x, channel_dim);
  const int64_t n = l.outer * l.inner;
  TORCH_CHECK(n > 1, "normlab::batch_norm: needs at least 2 values per channel");
  const int64_t count = count_batch(num_batches_tracked);
  const bool running = running_mean.defined() && running_var.defined();
  const double factor = running ? running_factor(momentum, count) : 0.0;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({l.C}, x.options());
  at::Tensor invstd = at::empty({l.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normlab_batch_norm_forward", [&] {
    const scalar_t* __restrict xp = x.const_data_ptr<scalar_t>();
    // two reads, the corrected two-pass algorithm: the mean (summed about the channel's first
    // value x₀, so float blocks keep their precision), then Σ(x - μ)² - (Σ(x - μ))²/n, which
    // does not cancel whatever the data's offset
    std::vector<scalar_t> x0(l.C), m(l.C);
    std::vector<double> sum_d(l.C), sum_d2(l.C), mean64(l.C), var64(l.C);
    for (int64_t c = 0; c < l.C; ++c) x0[c] = xp[c * l.inner];
    const scalar_t* __restrict shift0 = x0.data();
    channel_sums<scalar_t>(
        l, sum_d.data(), nullptr, [=](int64_t c, int64_t k) { return xp[k] - shift0[c]; },
        NoSecond{});
    for (int64_t c = 0; c < l.C; ++c) {
      mean64[c] = x0[c] + sum_d[c] / n;
      m[c] = scalar_t(mean64[c]);
    }
    const scalar_t* __restrict mc = m.data();
    channel_sums<scalar_t>(
        l, sum_d.data(), sum_d2.data(), [=](int64_t c, int64_t k) { return xp[k] - mc[c]; },
        [=](int64_t c, int64_t k) {
          const scalar_t d = xp[k] - mc[c];
          return d * d;
        });
    for (int64_t c = 0; c < l.C; ++c) {
      var64[c] = std::max(0.0, sum_d2[c] - sum_d[c] * sum_d[c] / n);  // n·(biased variance)
    }
    std::vector<scalar_t> scale(l.C), shift(l.C);
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bt = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* ip = invstd.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < l.C; ++c) {
      var64[c] /= n;
      const double inv = 1.0 / std::sqrt(var64[c] + eps);
      const double gamma = weight.defined() ? double(w[c]) : 1.0;
      mp[c] = m[c];
      ip[c] = scalar_t(inv);
      scale[c] = scalar_t(inv * gamma);
      shift[c] = bias.defined() ? bt[c] : scalar_t(0);
    }
    const scalar_t *__restrict sc = scale.data(), *__restrict sh = shift.data();
    channel_map(l, y.mutable_data_ptr<scalar_t>(),
                [=](int64_t c, int64_t k) { return (xp[k] - mc[c]) * sc[c] + sh[c]; });
    if (running) {  // torch's rule, unbiased variance
      scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
      scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < l.C; ++c) {
        rm[c] = scalar_t(rm[c] + factor * (mean64[c] - rm[c]));
        rv[c] = scalar_t(rv[c] + factor * (var64[c] * n / (n - 1) - rv[c]));
      }
      // written in place: tell autograd, as an in-place operator would
      torch::autograd::impl::bump_version(running_mean);
      torch::autograd::impl::bump_version(running_var);
    }
  });
  return {y, mean, invstd};  // y: x's shape, which is the input's
}

// The gradients of x, γ and β (x's only when need_input_grad, else undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool need_input_grad,
    int64_t channel_dim) {
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor x = input.contiguous();
  const Layout l = layout_of(x, channel_dim);
  const int64_t n = l.outer * l.inner;
  at::Tensor grad_x;
  at::Tensor grad_weight = at::empty({l.C}, x.options());
  at::Tensor grad_bias = at::empty({l.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normlab_batch_norm_backward", [&] {
    const scalar_t* __restrict gp = g.const_data_ptr<scalar_t>();
    const scalar_t* __restrict xp = x.const_data_ptr<scalar_t>();
    const scalar_t* __restrict mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* __restrict ip = invstd.const_data_ptr<scalar_t>();
    std::vector<double> sum_g(l.C), sum_g_xc(l.C);
    channel_sums<scalar_t>(
        l, sum_g.data(), sum_g_xc.data(), [=](int64_t, int64_t k) { return gp[k]; },
        [=](int64_t c, int64_t k) { return gp[k] * (xp[k] - mp[c]); });
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    // (γ/σ)(g - Σg/n - x̂·Σg·x̂/n) = g·γ/σ + (x - μ)·a + b, with x̂ = (x - μ)/σ
    std::vector<scalar_t> scale(l.C), a(l.C), b(l.C);
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    for (int64_t c = 0; c < l.C; ++c) {
      const double inv = ip[c];
      const double gamma = weight.defined() ? double(w[c]) : 1.0;
      gb[c] = scalar_t(sum_g[c]);
      gw[c] = scalar_t(sum_g_xc[c] * inv);
      scale[c] = scalar_t(gamma * inv);
      a[c] = scalar_t(-gamma * inv * inv * inv * sum_g_xc[c] / n);
      b[c] = scalar_t(-gamma * inv * sum_g[c] / n);
    }
    if (need_input_grad) {
      grad_x = at::empty_like(x);
      const scalar_t *__restrict sc = scale.data(), *__restrict ac = a.data(),
                                 *__restrict bc = b.data();
      channel_map(l, grad_x.mutable_data_ptr<scalar_t>(), [=](int64_t c, int64_t k) {
        return gp[k] * sc[c] + (xp[k] - mp[c]) * ac[c] + bc[c];
      });
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

// The backward's backward: with u, u_γ and u_β the cotangents of the backward's outputs g_x,
// g_γ = Σ g·x̂ and g_β = Σ g (u_γ, u_β undefined where nothing used them), the gradients of
// <u, g_x> + u_γ·g_γ + u_β·g_β in g, x and γ (γ's only with a gain). The math, per channel,
// is normlab/nn/batchnorm.py's (BatchNormBackward, which writes it in ATen operators);
// here two reads for its sums, and one each for the two gradients of the input's shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& sum_g,
    const at::Tensor& sum_g_xhat, const at::Tensor& u_input, const at::Tensor& u_weight,
    const at::Tensor& u_bias, int64_t channel_dim) {
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor x = input.contiguous();
  // a cotangent may be any strides (a gradient summed is an expanded scalar): read contiguous
  const at::Tensor u = u_input.defined() ? u_input.contiguous() : at::Tensor();
  const at::Tensor u_w = u_weight.defined() ? u_weight.contiguous() : at::Tensor();
  const at::Tensor u_b = u_bias.defined() ? u_bias.contiguous() : at::Tensor();
  const Layout l = layout_of(x, channel_dim);
  const int64_t n = l.outer * l.inner;
  at::Tensor grad_g = at::empty_like(x);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = weight.defined() ? at::empty({l.C}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normlab_batch_norm_backward_backward", [&] {
    const scalar_t* __restrict gp = g.const_data_ptr<scalar_t>();
    const scalar_t* __restrict xp = x.const_data_ptr<scalar_t>();
    const scalar_t* __restrict up = u.defined() ? u.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* __restrict mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* ip = invstd.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* sg = sum_g.const_data_ptr<scalar_t>();
    const scalar_t* sgx = sum_g_xhat.const_data_ptr<scalar_t>();
    const scalar_t* uw = u_w.defined() ? u_w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ub = u_b.defined() ? u_b.const_data_ptr<scalar_t>() : nullptr;
    std::vector<double> sum_u(l.C, 0.0), sum_u_xc(l.C, 0.0), sum_u_g(l.C, 0.0);
    if (up != nullptr) {
      channel_sums<scalar_t>(
          l, sum_u.data(), sum_u_xc.data(), [=](int64_t, int64_t k) { return up[k]; },
          [=](int64_t c, int64_t k) { return up[k] * (xp[k] - mp[c]); });
      channel_sums<scalar_t>(
          l, sum_u_g.data(), nullptr, [=](int64_t, int64_t k) { return up[k] * gp[k]; },
          NoSecond{});
    }
    // grad_g = u·G1 + (x - μ)·G2 + G3;  grad_x = g·G2 + u·X2 + (x - μ)·X3 + X4
    std::vector<scalar_t> G1(l.C), G2(l.C), G3(l.C), X2(l.C), X3(l.C), X4(l.C);
    scalar_t* gw = weight.defined() ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr;
    for (int64_t c = 0; c < l.C; ++c) {
      const double r = ip[c], gamma = w != nullptr ? double(w[c]) : 1.0, gr = gamma * r;
      const double g_mean = sg[c] / double(n), m1 = sgx[c] / double(n);  // ḡ, m₁
      const double u_mean = sum_u[c] / n, m2 = r * sum_u_xc[c] / n;  // ū, m₂
      const double s = sum_u_g[c] / n - g_mean * u_mean - m1 * m2;
      const double u_gamma = uw != nullptr ? double(uw[c]) : 0.0;
      const double u_beta = ub != nullptr ? double(ub[c]) : 0.0;
      const double a_mean = u_gamma * g_mean - gr * (m1 * u_mean + m2 * g_mean);  // ā
      const double a_xhat_mean = u_gamma * m1 - 2.0 * gr * m1 * m2;  // (a x̂)‾
      G1[c] = scalar_t(gr);
      G2[c] = scalar_t(r * (u_gamma - gr * m2));
      G3[c] = scalar_t(u_beta - gr * u_mean);
      X2[c] = scalar_t(-r * gr * m1);
      X3[c] = scalar_t(-r * r * (a_xhat_mean + gr * s));
      X4[c] = scalar_t(-r * a_mean);
      if (gw != nullptr) gw[c] = scalar_t(n * r * s);
    }
    const scalar_t *__restrict g1 = G1.data(), *__restrict g2 = G2.data(),
                               *__restrict g3 = G3.data(), *__restrict x2 = X2.data(),
                               *__restrict x3 = X3.data(), *__restrict x4 = X4.data();
    if (up != nullptr) {
      channel_map(l, grad_g.mutable_data_ptr<scalar_t>(), [=](int64_t c, int64_t k) {
        return up[k] * g1[c] + (xp[k] - mp[c]) * g2[c] + g3[c];
      });
      channel_map(l, grad_x.mutable_data_ptr<scalar_t>(), [=](int64_t c, int64_t k) {
        return gp[k] * g2[c] + up[k] * x2[c] + (xp[k] - mp[c]) * x3[c] + x4[c];
      });
    } else {
      channel_map(l, grad_g.mutable_data_ptr<scalar_t>(),
                  [=](int64_t c, int64_t k) { return (xp[k] - mp[c]) * g2[c] + g3[c]; });
      channel_map(l, grad_x.mutable_data_ptr<scalar_t>(), [=](int64_t c, int64_t k) {
        return gp[k] * g2[c] + (xp[k] - mp[c]) * x3[c] + x4[c];
      });
    }
  });
  return {grad_g, grad_x, grad_weight};
}

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// The backward as an autograd node of its own, (g, x, γ) -> (g_x, g_γ, g_β), for a backward
// that builds a graph (create_graph=True: a Hessian-vector product): its own backward is
// backward_backward(). ``params`` is the gain where there is one; the batch's mean and 1/σ come
// from the forward, and their dependence on x is in backward_backward's math. A third
// derivative is refused.
class BatchNormBackwardNode : public torch::autograd::Function<BatchNormBackwardNode> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& grad_output,
                                                const at::Tensor& x, at::TensorList params,
                                                const at::Tensor& mean,
                                                const at::Tensor& invstd,
                                                int64_t channel_dim) {
    const at::Tensor weight = params.size() > 0 ? params[0] : at::Tensor();
    auto [grad_x, grad_weight, grad_bias] =
        ::backward(grad_output, x, mean, invstd, weight, true, channel_dim);
    ctx->save_for_backward({grad_output, x, mean, invstd, weight, grad_bias, grad_weight});
    ctx->saved_data["channel_dim"] = channel_dim;
    ctx->saved_data["params"] = int64_t(params.size());
    ctx->set_materialize_grads(false);  // an output nothing used: undefined, not zeros
    return {grad_x, grad_weight, grad_bias};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "normlab::batch_norm is differentiable twice: a third derivative through it "
                "is refused");
    const auto saved = ctx->get_saved_variables();
    auto [grad_g, grad_x, grad_weight] = ::backward_backward(
        saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], grads[0],
        grads[1], grads[2], ctx->saved_data["channel_dim"].toInt());
    const at::Tensor none;
    torch::autograd::variable_list out = {grad_g, grad_x};
    if (ctx->saved_data["params"].toInt() > 0) out.push_back(grad_weight);
    out.insert(out.end(), 3, none);  // mean, invstd, channel_dim
    return out;
  }
};

// The autograd node: saves x, the batch's mean and 1/σ, and γ, and calls backward(), or where
// the backward builds a graph (create_graph=True), BatchNormBackwardNode. Its differentiable
// inputs are x and ``params``, the gain and the bias that are present (none, the gain, or
// both): an autograd Function cannot take an absent tensor as an input.
class BatchNormNode : public torch::autograd::Function<BatchNormNode> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            at::TensorList params,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked,
                            std::optional<double> momentum, double eps, int64_t channel_dim) {
    const at::Tensor weight = params.size() > 0 ? params[0] : at::Tensor();
    const at::Tensor bias = params.size() > 1 ? params[1] : at::Tensor();
    auto [y, mean, invstd] =
        ::forward(x, weight, bias, value_or_undefined(running_mean),
                  value_or_undefined(running_var), value_or_undefined(num_batches_tracked),
                  momentum, eps, channel_dim);
    ctx->save_for_backward({x, mean, invstd, weight});
    ctx->saved_data["channel_dim"] = channel_dim;
    ctx->saved_data["params"] = int64_t(params.size());
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t channel_dim = ctx->saved_data["channel_dim"].toInt();
    const int64_t params = ctx->saved_data["params"].toInt();
    at::Tensor grad_x, grad_weight, grad_bias;
    if (at::GradMode::is_enabled()) {  // a graph of the backward, for a second derivative
      const std::vector<at::Tensor> gain =
          params > 0 ? std::vector<at::Tensor>{saved[3]} : std::vector<at::Tensor>{};
      const auto out = BatchNormBackwardNode::apply(grads[0], saved[0], at::TensorList(gain),
                                                    saved[1], saved[2], channel_dim);
      grad_x = out[0], grad_weight = out[1], grad_bias = out[2];
    } else {
      std::tie(grad_x, grad_weight, grad_bias) =
          ::backward(grads[0], saved[0], saved[1], saved[2], saved[3], ctx->needs_input_grad(0),
                     channel_dim);
    }
    const at::Tensor none;
    torch::autograd::variable_list out = {ctx->needs_input_grad(0) ? grad_x : none};
    if (params > 0) out.push_back(ctx->needs_input_grad(1) ? grad_weight : none);
    if (params > 1) out.push_back(ctx->needs_input_grad(2) ? grad_bias : none);
    // running_mean, running_var, num_batches_tracked, momentum, eps, channel_dim
    out.insert(out.end(), 6, none);
    return out;
  }
};

std::vector<at::Tensor> present(const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias) {
  std::vector<at::Tensor> params;
  if (weight.has_value()) params.push_back(*weight);
  if (bias.has_value()) {
    TORCH_CHECK(weight.has_value(), "normlab::batch_norm: a bias needs a gain");
    params.push_back(*bias);
  }
  return params;
}

at::Tensor batch_norm_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var,
                               const std::optional<at::Tensor>& num_batches_tracked,
                               std::optional<double> momentum, double eps, int64_t channel_dim) {
  const std::vector<at::Tensor> params = present(weight, bias);
  return BatchNormNode::apply(x, at::TensorList(params), running_mean, running_var,
                              num_batches_tracked, momentum, eps, channel_dim);
}

at::Tensor batch_norm_no_grad(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& num_batches_tracked,
                              std::optional<double> momentum, double eps, int64_t channel_dim) {
  return std::get<0>(forward(x, value_or_undefined(weight), value_or_undefined(bias),
                             value_or_undefined(running_mean), value_or_undefined(running_var),
                             value_or_undefined(num_batches_tracked), momentum, eps,
                             channel_dim));
}

}  // namespace

TORCH_LIBRARY(normlab, m) {
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps, "
      "int channel_dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(normlab, Autograd, m) { m.impl("batch_norm", &batch_norm_autograd); }

// under torch.inference_mode, which skips the autograd key
TORCH_LIBRARY_IMPL(normlab, CPU, m) { m.impl("batch_norm", &batch_norm_no_grad); }
