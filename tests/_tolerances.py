"""Tolerances from one table, per dtype (docs/STYLE.md rule 8).

Element-wise ops that compute in float32 (float64 for float64) and round once to the storage dtype
differ from the reference by at most one rounding of the storage dtype plus float32 reassociation.
The float16/bfloat16 rows are one unit in the last place of the storage dtype (2^-10, 2^-7): a
fused kernel must round like the reference, no looser.
"""

import torch

# dtype -> (rtol, atol) for fused-vs-reference comparisons of one op application.
ELEMENTWISE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (2**-10, 2**-14),
    torch.bfloat16: (2**-7, 2**-10),
}


def elementwise(dtype: torch.dtype) -> dict:
    rtol, atol = ELEMENTWISE[dtype]
    return {"rtol": rtol, "atol": atol}
