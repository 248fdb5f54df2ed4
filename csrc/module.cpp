// The entry point of one extension module (PyInit_<TORCH_EXTENSION_NAME>), compiled
// once per module: sophon_fast._C (CPU only) and sophon_fast._C_cuda (with
// SOPHON_FAST_WITH_CUDA). Only pybind11 here, so the per-module cost stays small;
// the bindings themselves (extension.cpp) compile once and link into both.
#include <pybind11/pybind11.h>

namespace sophon_fast {
void define_bindings(pybind11::module_& m);
}  // namespace sophon_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sophon_fast compiled kernels (C++ CPU, and CUDA when built with it)";
#ifdef SOPHON_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  sophon_fast::define_bindings(m);
}
