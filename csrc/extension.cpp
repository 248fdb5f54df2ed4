// The bindings of every op, shared by both extension modules (setup.py):
// sophon_fast._C (CPU only, always) and sophon_fast._C_cuda (the same names with
// CUDA dispatch, optional). module.cpp, compiled once per module, creates the
// module and calls define_bindings; nothing here depends on the CUDA macro, so
// this file compiles once (the slowest one to compile: 177 s of a 290 s CPU
// build on a busy 2-core machine). Every op's checks live in its own .cpp; this
// file only exposes them (typed stub: sophon_fast/_C.pyi).
#include <torch/extension.h>

#include "batch_norm/batch_norm.h"
#include "bn_relu_pool/bn_relu_pool.h"
#include "cpu_cache.h"
#include "flat_optim/flat_optim.h"
#include "flat_sgd_step/flat_sgd_step.h"
#include "losses/losses.h"
#include "relu_pool/relu_pool.h"

namespace sophon_fast {

void define_bindings(pybind11::module_& m) {
  m.def("flat_sgd_step_forward", &sophon_fast::flat_sgd_step_forward, py::arg("params"),
        py::arg("grad"), py::arg("lr"), py::arg("weight_decay"), py::arg("out") = py::none(),
        "params - lr * (grad + weight_decay * params) on flat 1-D buffers, "
        "into out if given");
  m.def("flat_sgd_step_backward", &sophon_fast::flat_sgd_step_backward, py::arg("grad_out"),
        py::arg("lr"), py::arg("weight_decay"),
        "(grad_params, grad_grad) = ((1 - lr * weight_decay) * grad_out, -lr * "
        "grad_out); "
        "grad_params is grad_out itself when weight_decay == 0");
  m.def("flat_momentum_step_forward", &sophon_fast::flat_momentum_step_forward, py::arg("params"),
        py::arg("grad"), py::arg("momentum_buffer"), py::arg("step"), py::arg("lr"),
        py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
        py::arg("out") = py::none(),
        "[new_params, new_momentum_buffer] of momentum SGD on flat buffers, into out if given");
  m.def("flat_momentum_step_backward", &sophon_fast::flat_momentum_step_backward,
        py::arg("grad_new_params"), py::arg("grad_new_buffer"), py::arg("step"), py::arg("lr"),
        py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
        "[grad_params, grad_grad, grad_momentum_buffer]: the fused VJP of the momentum step");
  m.def("flat_adam_step_forward", &sophon_fast::flat_adam_step_forward, py::arg("params"),
        py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("out") = py::none(),
        "[new_params, new_exp_avg, new_exp_avg_sq] of Adam (AdamW when decoupled)");
  m.def("flat_adam_step_backward", &sophon_fast::flat_adam_step_backward,
        py::arg("grad_new_params"), py::arg("grad_new_exp_avg"), py::arg("grad_new_exp_avg_sq"),
        py::arg("params"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled"),
        "[grad_params, grad_grad, grad_exp_avg, grad_exp_avg_sq]: the fused VJP of Adam/AdamW");
  m.def("flat_rmsprop_step_forward", &sophon_fast::flat_rmsprop_step_forward, py::arg("params"),
        py::arg("grad"), py::arg("square_avg"), py::arg("grad_avg"), py::arg("lr"),
        py::arg("alpha"), py::arg("eps"), py::arg("weight_decay"), py::arg("out") = py::none(),
        "[new_params, new_square_avg(, new_grad_avg)] of RMSprop (centered iff grad_avg)");
  m.def("flat_rmsprop_step_backward", &sophon_fast::flat_rmsprop_step_backward,
        py::arg("grad_new_params"), py::arg("grad_new_square_avg"), py::arg("grad_new_grad_avg"),
        py::arg("params"), py::arg("grad"), py::arg("square_avg"), py::arg("grad_avg"),
        py::arg("lr"), py::arg("alpha"), py::arg("eps"), py::arg("weight_decay"),
        "[grad_params, grad_grad, grad_square_avg(, grad_grad_avg)]: the fused VJP of RMSprop");
  m.def("flat_adagrad_step_forward", &sophon_fast::flat_adagrad_step_forward, py::arg("params"),
        py::arg("grad"), py::arg("state_sum"), py::arg("step"), py::arg("lr"), py::arg("lr_decay"),
        py::arg("weight_decay"), py::arg("eps"), py::arg("out") = py::none(),
        "[new_params, new_state_sum] of Adagrad on flat buffers, into out if given");
  m.def("flat_adagrad_step_backward", &sophon_fast::flat_adagrad_step_backward,
        py::arg("grad_new_params"), py::arg("grad_new_state_sum"), py::arg("params"),
        py::arg("grad"), py::arg("state_sum"), py::arg("step"), py::arg("lr"), py::arg("lr_decay"),
        py::arg("weight_decay"), py::arg("eps"),
        "[grad_params, grad_grad, grad_state_sum]: the fused VJP of Adagrad");
  m.def("flat_adadelta_step_forward", &sophon_fast::flat_adadelta_step_forward, py::arg("params"),
        py::arg("grad"), py::arg("square_avg"), py::arg("acc_delta"), py::arg("lr"), py::arg("rho"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("out") = py::none(),
        "[new_params, new_square_avg, new_acc_delta] of Adadelta on flat buffers, into out if "
        "given");
  m.def("flat_adadelta_step_backward", &sophon_fast::flat_adadelta_step_backward,
        py::arg("grad_new_params"), py::arg("grad_new_square_avg"), py::arg("grad_new_acc_delta"),
        py::arg("params"), py::arg("grad"), py::arg("square_avg"), py::arg("acc_delta"),
        py::arg("lr"), py::arg("rho"), py::arg("eps"), py::arg("weight_decay"),
        "[grad_params, grad_grad, grad_square_avg, grad_acc_delta]: the fused VJP of Adadelta");
  m.def("flat_clip_adam_step_", &sophon_fast::flat_clip_adam_step_, py::arg("params"),
        py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("max_norm") = py::none(),
        "clip grad to global L2 norm max_norm, in-place Adam step, step += 1; returns the norm");
  m.def("flat_accumulate_", &sophon_fast::flat_accumulate_, py::arg("acc"), py::arg("grad"),
        py::arg("weight"), "acc += weight * grad in place; returns acc");
  m.def("classification_loss_forward", &sophon_fast::classification_loss_forward, py::arg("logits"),
        py::arg("labels"), py::arg("kind"),
        "(loss, grad) of the batch-mean loss kind (0 ce, 1 ice, 2 ice_paper, 3 klu) on logits "
        "(batch, classes) with int64 labels (batch,), in one pass");
  m.def("mean_square_loss_forward", &sophon_fast::mean_square_loss_forward, py::arg("prediction"),
        py::arg("target"), py::arg("sign"),
        "(loss, grad) of sign * mean((prediction - target)^2) (target None: zeros), one pass");
  m.def("batch_norm_forward", &sophon_fast::batch_norm_forward, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"),
        py::arg("eps"),
        "(y, mean, invstd) of training-mode BatchNorm2d on x (N, C, H, W); updates the running "
        "statistics in place");
  m.def("batch_norm_backward", &sophon_fast::batch_norm_backward, py::arg("x"), py::arg("weight"),
        py::arg("grad_y"), py::arg("mean"), py::arg("invstd"),
        "(grad_x, grad_weight, grad_bias) of training-mode BatchNorm2d");
  m.def("batch_norm_double_backward", &sophon_fast::batch_norm_double_backward, py::arg("x"),
        py::arg("weight"), py::arg("grad_y"), py::arg("mean"), py::arg("invstd"),
        py::arg("grad_dx"), py::arg("grad_dweight"), py::arg("grad_dbias"),
        "(grad_x, grad_weight, grad_grad_y): the fused VJP of batch_norm_backward");
  m.def("bn_relu_pool_forward", &sophon_fast::bn_relu_pool_forward, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"),
        py::arg("eps"),
        "(y, mean, invstd) of max_pool2d(relu(batch_norm(x)), 2, 2), training mode, on x "
        "(N, C, H, W); updates the running statistics in place");
  m.def("bn_relu_pool_backward", &sophon_fast::bn_relu_pool_backward, py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("grad_y"), py::arg("mean"), py::arg("invstd"),
        "(grad_x, grad_weight, grad_bias) of bn_relu_pool from the pooled gradient");
  m.def("relu_maxpool2d_forward", &sophon_fast::relu_maxpool2d_forward, py::arg("x"),
        "(y, code) of max_pool2d(relu(x), 2, 2) on x (N, C, H, W) contiguous, CPU; code: window "
        "position 0..3 of the first maximum, -1 where the ReLU clips (x's dtype)");
  m.def("relu_maxpool2d_scatter", &sophon_fast::relu_maxpool2d_scatter, py::arg("grad"),
        py::arg("code"), py::arg("height"), py::arg("width"),
        "dx (N, C, height, width): grad scattered to the coded positions, zero elsewhere");
  m.def("relu_maxpool2d_gather", &sophon_fast::relu_maxpool2d_gather, py::arg("v"), py::arg("code"),
        "(N, C, H/2, W/2): v at the coded positions, 0 where code is -1");
  m.def(
      "cpu_cache_stats",
      [] {
        const auto s = sophon_fast::cpu_cache_stats();
        py::dict d;
        d["live_bytes"] = s.live_bytes;
        d["cached_bytes"] = s.cached_bytes;
        d["peak_bytes"] = s.peak_bytes;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        d["limit_bytes"] = s.limit_bytes;
        return d;
      },
      "counters of the large-buffer CPU cache (csrc/cpu_cache.h)");
  m.def("cpu_cache_release", &sophon_fast::cpu_cache_release,
        "unmap every cached CPU buffer; the peak restarts from the live bytes");
  m.def("cpu_cache_set_limit", &sophon_fast::cpu_cache_set_limit, py::arg("bytes"),
        "cap the cached bytes (0: cache nothing, -1: no cap)");
}

}  // namespace sophon_fast
