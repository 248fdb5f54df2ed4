"""A data set's identity: :func:`data_fingerprint` hashes the bytes of its tensors.

Stored in protection checkpoints and in evaluate()'s cells, so that a resume on changed data is
refused. SHA-256 runs at 1.4 GB/s on one EPYC core: 0.44 s for CIFAR-10's 614 MB training images.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["data_fingerprint"]


def data_fingerprint(*tensors: torch.Tensor | None) -> str:
    """SHA-256 (hex, 32 digits) of the tensors' dtypes, shapes and bytes (CPU, contiguous, in
    their own dtype); None hashes as absent. Any change of a value, order, shape or dtype changes
    it, unlike shape + sum + labels, which a flipped image set passes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none;")
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tensor.dtype};{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:32]
