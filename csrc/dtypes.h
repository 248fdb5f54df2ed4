// Dtype codes shared by the torch-free CUDA launchers and their bindings.
#pragma once

enum SophonFastDtype {
  SOPHON_FAST_DTYPE_FLOAT32 = 0,
  SOPHON_FAST_DTYPE_FLOAT64 = 1,
  SOPHON_FAST_DTYPE_FLOAT16 = 2,
  SOPHON_FAST_DTYPE_BFLOAT16 = 3,
};
