// flat optimizer family, CPU: the accumulate (acc += weight * grad), which
// every optimizer's gradient accumulation shares. The optimizers' own CPU
// kernels: flat_momentum_cpu.cpp, flat_adam_cpu.cpp (with the clip norm),
// flat_rmsprop_cpu.cpp, flat_adagrad_cpu.cpp, flat_adadelta_cpu.cpp, over the
// helpers of flat_optim_cpu.h.
#include "flat_optim_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "flat_optim.h"

namespace sophon_fast {

void flat_accumulate_cpu(at::Tensor& acc, const at::Tensor& grad, double weight) {
  using namespace optim_cpu;  // NOLINT(build/namespaces): the shared CPU helpers
  SF_DISPATCH(grad.scalar_type(), "flat_accumulate_cpu", [&] {
    using C = compute_t<scalar_t>;
    const C w = static_cast<C>(weight);
    C* out = outp<C>(acc);
    const scalar_t* g = in<scalar_t>(grad);
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] += w * static_cast<C>(g[i]);
    });
  });
}

}  // namespace sophon_fast
