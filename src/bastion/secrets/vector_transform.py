"""A secret orthogonal transform of a tenant's embedding vectors (keyed rotation).

A stored embedding is a fingerprint of its text: hashing-embedder vectors
invert to a bag of words, MiniLM vectors partly, and anyone holding a
candidate text recognises it by embedding it and comparing. So the index
stores ``R_t·v`` instead of ``v``, where ``R_t`` is a random orthogonal matrix
derived from the tenant's data key, and every query is rotated by the same
``R_t``. An orthogonal map keeps inner products, hence cosine distance: the
nearest neighbours and their scores are those of the plain vectors (up to
float rounding), and the namespace's HNSW graph works unchanged. Without the
key, a backup's vectors are unit vectors in an unknown frame: the public
embedder's output for a candidate text scores at chance against them, and
another tenant's query (rotated by its own key) matches nothing of ours.

What it does not hide: the geometry among the tenant's own vectors (pairwise
similarities, hence near-duplicates and clusters), their number and sizes.
An attacker who knows many of the tenant's texts *and* which stored vector
belongs to which (or who can align the two similarity graphs) could solve for
``R_t`` (orthogonal Procrustes); the rotation is a keyed transform, not a
cipher. The matrix is key material (a function of the data key alone), so it
lives with the keys: :class:`~bastion.secrets.tenant_keys.TenantKeys` derives,
caches and forgets it; the knowledge service only applies it.

Derivation (deterministic, independent of library versions' random streams):
HKDF-SHA256 (RFC 5869) of the data key, info ``bastion/vector-transform/
orthogonal-v1/<dim>``, seeds SHAKE-256 (FIPS 202); its output, as 53-bit
uniforms, gives standard normals by Box-Muller; the ``dim x dim`` Gaussian
matrix's QR factorisation with the signs of R's diagonal moved into Q is the
unique such factorisation, so the result is Haar-distributed on O(dim) and the
same with any LAPACK (Mezzadri, "How to generate random matrices from the
classical compact groups", Notices AMS 54(5), 2007). Only the last bits may
differ across platforms' ``log``/``cos``; stored vectors are float32 anyway.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NAME = "orthogonal-v1"
"""Stored in ``namespaces.vector_transform`` of a namespace whose vectors are rotated."""

FloatArray = np.ndarray[Any, np.dtype[np.float32]]


def _normals(seed: bytes, count: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    """``count`` standard normal deviates from SHAKE-256(``seed``) by Box-Muller."""
    pairs = (count + 1) // 2
    words = np.frombuffer(hashlib.shake_256(seed).digest(16 * pairs), dtype="<u8")
    # 53 random bits each, centred in their interval: exactly representable, never 0 or 1.
    uniforms = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(uniforms[0::2]))
    angle = 2.0 * np.pi * uniforms[1::2]
    out = np.empty(2 * pairs, dtype=np.float64)
    out[0::2] = radius * np.cos(angle)
    out[1::2] = radius * np.sin(angle)
    return out[:count]


def orthogonal_matrix(data_key: bytes, dim: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    """The tenant's ``dim x dim`` orthogonal matrix ``R_t`` for data key ``data_key``."""
    seed = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=f"bastion/vector-transform/{NAME}/{dim}".encode(),
    ).derive(data_key)
    gaussian = _normals(seed, dim * dim).reshape(dim, dim)
    q, r = np.linalg.qr(gaussian)
    # Q·diag(sign(diag R)): the QR factorisation with a positive diagonal is unique.
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


class VectorTransform:
    """``v ↦ R_t·v`` for one tenant and one vector width."""

    def __init__(self, data_key: bytes, dim: int) -> None:
        self.dim = dim
        # Rows are vectors, so R·v for each row is rows @ Rᵀ; kept as float32
        # (the stored precision) and contiguous for the matrix product.
        self._right = np.ascontiguousarray(orthogonal_matrix(data_key, dim).T, dtype=np.float32)

    def apply(self, vectors: np.ndarray[Any, Any]) -> FloatArray:
        """Rotate one vector (shape ``(dim,)``) or a batch (``(n, dim)``)."""
        result: FloatArray = np.asarray(vectors, dtype=np.float32) @ self._right
        return result
