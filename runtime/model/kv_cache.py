"""Past keys/values between decoding steps, kept as ONNX Runtime values so present becomes past without a copy."""

from __future__ import annotations

import numpy as np

from .session import import_onnxruntime


class KVCache:
    """Maps each past input name of a graph to the OrtValue that feeds it.

    `device` is where the tensors live ("cpu" or "cuda"); outputs are bound there too, so on CUDA the keys and
    values never visit the host between steps.
    """

    def __init__(self, device: str = "cpu", device_id: int = 0) -> None:
        self._ort = import_onnxruntime()
        self.device = device
        self.device_id = device_id
        self.values: dict[str, object] = {}

    def set_numpy(self, name: str, array: np.ndarray) -> None:
        self.values[name] = self._ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(array), self.device, self.device_id
        )

    def set_value(self, name: str, value: object) -> None:
        self.values[name] = value

    def bind(self, binding) -> None:
        for name, value in self.values.items():
            binding.bind_ortvalue_input(name, value)

    def sequence_length(self, name: str) -> int:
        return int(self.values[name].shape()[2])

    def select(self, rows: np.ndarray, first_position: int = 0) -> None:
        """Gather rows of every tensor (beam reordering, expansion, dropping finished rows), keeping positions
        from `first_position` on."""
        # A host round trip on CUDA: device-side reordering is the GPU issue's job.
        for name, value in self.values.items():
            self.set_numpy(name, value.numpy()[rows, :, first_position:])

    def extend(self, other: KVCache, length: int) -> None:
        """Append `other`'s rows; both caches are left-padded with zeros to `length` positions (the attention
        mask hides the padding)."""
        for name, value in self.values.items():
            mine, theirs = value.numpy(), other.values[name].numpy()
            self.set_numpy(name, np.concatenate([_pad_positions(mine, length), _pad_positions(theirs, length)]))


def _pad_positions(array: np.ndarray, length: int) -> np.ndarray:
    """(R, H, T, D) -> (R, H, length, D), zeros in front."""
    missing = length - array.shape[2]
    if missing == 0:
        return array
    pad = np.zeros(array.shape[:2] + (missing,) + array.shape[3:], dtype=array.dtype)
    return np.concatenate([pad, array], axis=2)
