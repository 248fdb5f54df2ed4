// The one binding module, sophon_fast._C. Every op's checks live in its own
// .cpp; this file only exposes them (typed stub: sophon_fast/_C.pyi).
#include <torch/extension.h>

#include "flat_sgd_step/flat_sgd_step.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sophon_fast compiled kernels (C++ CPU, and CUDA when built with it)";
#ifdef SOPHON_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("flat_sgd_step_forward", &sophon_fast::flat_sgd_step_forward, py::arg("params"),
        py::arg("grad"), py::arg("lr"), py::arg("weight_decay"), py::arg("out") = py::none(),
        "params - lr * (grad + weight_decay * params) on flat 1-D buffers, "
        "into out if given");
  m.def("flat_sgd_step_backward", &sophon_fast::flat_sgd_step_backward, py::arg("grad_out"),
        py::arg("lr"), py::arg("weight_decay"),
        "(grad_params, grad_grad) = ((1 - lr * weight_decay) * grad_out, -lr * "
        "grad_out); "
        "grad_params is grad_out itself when weight_decay == 0");
}
