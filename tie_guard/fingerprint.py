"""Fingerprints of frozen shared weights: one full read at capture, near-zero cost per check.

A check reads, in this order (cheapest first): the storage pointer, the autograd version counter
(``Tensor._version``: bumped by in-place ops through the parameter, not through ``.data``), ``SAMPLES`` fixed
elements, and one ``CHUNK_ELEMS``-element chunk whose xxh3 hash is compared with the one taken at capture; the
chunk rotates, so every element is re-read every ``n_chunks`` checks. Per-check cost is constant in the tensor's
size. :meth:`Fingerprint.full_check` re-hashes everything (capture and merge time).
"""

from __future__ import annotations

import torch
import xxhash

CHUNK_ELEMS = 1 << 18
SAMPLES = 256


def _local(t: torch.Tensor) -> torch.Tensor:
    """The locally held values (FSDP2 DTensor shard, ZeRO-3 partition), detached and flattened."""
    from .distributed import local_tensor

    return local_tensor(t).detach().reshape(-1)


def _hash_bytes(flat: torch.Tensor) -> int:
    data = flat.contiguous().view(torch.uint8)
    if data.device.type != "cpu":
        data = data.cpu()
    return xxhash.xxh3_64_intdigest(memoryview(data.numpy()))


class Fingerprint:
    """Fingerprint of one tensor's values and storage.

    Args:
        tensor: the weight to fingerprint (any shape/dtype/device; for a DTensor, the local shard).
        seed: seed for the sampled positions.
    Attributes:
        digest: xxh3-64 hash over the per-chunk hashes (hex), identifying the full value.
        n_chunks: number of rotating chunks (full coverage period, in checks).
    """

    def __init__(self, tensor: torch.Tensor, seed: int = 0):
        flat = _local(tensor)
        self.numel = flat.numel()
        self.ptr = flat.data_ptr() if flat.device.type != "meta" else 0
        self.version = tensor._version
        self.chunk_hashes = [
            _hash_bytes(flat[i : i + CHUNK_ELEMS]) for i in range(0, self.numel, CHUNK_ELEMS)
        ]
        self.n_chunks = len(self.chunk_hashes)
        gen = torch.Generator().manual_seed(seed)
        k = min(SAMPLES, self.numel)
        self.sample_idx = torch.randint(0, max(self.numel, 1), (k,), generator=gen).to(flat.device)
        self.sample_vals = flat[self.sample_idx].clone()
        self.cursor = 0
        h = xxhash.xxh3_64()
        for c in self.chunk_hashes:
            h.update(c.to_bytes(8, "little"))
        self.digest = h.hexdigest()

    def quick_check(self, tensor: torch.Tensor) -> str | None:
        """Constant-cost check. Returns ``None`` when nothing changed, else the reason in words."""
        flat = _local(tensor)
        if flat.numel() != self.numel:
            return f"size changed ({self.numel} → {flat.numel()} elements)"
        if flat.device.type != "meta" and flat.data_ptr() != self.ptr:
            return "storage replaced (data_ptr changed)"
        if not torch.equal(flat[self.sample_idx], self.sample_vals):
            return "values changed (sampled elements differ)"
        i = self.cursor
        self.cursor = (self.cursor + 1) % max(self.n_chunks, 1)
        if self.n_chunks and _hash_bytes(flat[i * CHUNK_ELEMS : (i + 1) * CHUNK_ELEMS]) != self.chunk_hashes[i]:
            return f"values changed (chunk {i} of {self.n_chunks} hashes differently)"
        if tensor._version != self.version:
            # Written in place; the values we read match so far. Settle it with a full read.
            reason = self.full_check(tensor)
            if reason is None:
                self.version = tensor._version
            return reason
        return None

    def full_check(self, tensor: torch.Tensor) -> str | None:
        """Re-hash every chunk. Returns ``None`` when the values are bit-identical to capture time."""
        flat = _local(tensor)
        if flat.numel() != self.numel:
            return f"size changed ({self.numel} → {flat.numel()} elements)"
        for i, want in enumerate(self.chunk_hashes):
            if _hash_bytes(flat[i * CHUNK_ELEMS : (i + 1) * CHUNK_ELEMS]) != want:
                return f"values changed (chunk {i} of {self.n_chunks} hashes differently)"
        return None
