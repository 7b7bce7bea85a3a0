"""Reader for dlib's serialised ``shape_predictor`` (``shape_predictor_68_face_landmarks.dat``).

dlib writes integers as one header byte (bit 7: negative, low nibble: byte count) followed by
that many little-endian magnitude bytes, and floats as two such integers, a mantissa and a
base-2 exponent. Matrices carry their (negated) row and column counts, ``std::vector`` its
length. A shape predictor is ``version, initial_shape, forests, anchor_idx, deltas``; each
regression tree is its split features ``(idx1, idx2, thresh)`` then its leaf vectors.

The reader checks that it consumed the whole file and that every tree is complete, so a wrong
guess about the layout fails loudly instead of loading garbage.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DlibFormatError(ValueError):
    """The bytes are not a dlib shape predictor of the layout this reader knows."""


@dataclass(frozen=True)
class ShapePredictorArrays:
    """A dlib shape predictor as dense arrays; every tree has the same depth.

    ``initial_shape``: (P, 2) mean shape in box-normalised coordinates.
    ``split_idx``: (C, T, S, 2) int64 feature-pixel pairs of each split node, heap order.
    ``split_thresh``: (C, T, S) float32. ``leaves``: (C, T, S + 1, P, 2) float32 shape updates.
    ``anchor_idx``: (C, F) int64 landmark each feature pixel hangs off; ``deltas``: (C, F, 2).
    """

    initial_shape: np.ndarray
    split_idx: np.ndarray
    split_thresh: np.ndarray
    leaves: np.ndarray
    anchor_idx: np.ndarray
    deltas: np.ndarray

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: services started side by side on a fresh checkout build the same cache
        # at once, and a shared temporary name let one process's rename pull the file from under another's
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **{k: getattr(self, k) for k in self.__dataclass_fields__})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ShapePredictorArrays:
        with np.load(path) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__})


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def integer(self) -> int:
        data, pos = self.data, self.pos
        if pos >= len(data):
            raise DlibFormatError(f"unexpected end of data at byte {pos}")
        head = data[pos]
        size = head & 0x0F
        if size > 8 or head & 0x70:
            raise DlibFormatError(f"bad integer header 0x{head:02x} at byte {pos}")
        value = int.from_bytes(data[pos + 1 : pos + 1 + size], "little")
        self.pos = pos + 1 + size
        return -value if head & 0x80 else value

    def real(self) -> float:
        return self.floats(1)[0]

    def floats(self, n: int) -> list[float]:
        """``n`` floats, each a mantissa and a base-2 exponent integer. This is the reader's hot loop
        (about 16 million floats), so :meth:`integer` is inlined and bounds are caught, not checked."""
        data, pos = self.data, self.pos
        out = [0.0] * n
        ldexp = math.ldexp
        from_bytes = int.from_bytes
        try:
            for k in range(n):
                h = data[pos]
                e = pos + 1 + (h & 0x0F)
                m = from_bytes(data[pos + 1 : e], "little")
                if h & 0x80:
                    m = -m
                h = data[e]
                pos = e + 1 + (h & 0x0F)
                x = from_bytes(data[e + 1 : pos], "little")
                out[k] = ldexp(m, -x if h & 0x80 else x)
        except IndexError:
            raise DlibFormatError(f"unexpected end of data inside a float run at byte {pos}") from None
        except OverflowError:  # dlib's encoding of inf / nan: never in a usable predictor
            raise DlibFormatError(f"non-finite value at byte {pos}") from None
        if pos > len(data):
            raise DlibFormatError("unexpected end of data inside a float run")
        self.pos = pos
        return out

    def column(self) -> list[float]:
        """A ``matrix<float,0,1>``: dlib writes -rows, -cols (new format), then the values."""
        rows, cols = -self.integer(), -self.integer()
        if rows < 0 or cols != 1:
            raise DlibFormatError(f"expected a column vector, got {rows} x {cols} at byte {self.pos}")
        return self.floats(rows)


def read_shape_predictor(path: Path) -> ShapePredictorArrays:
    """Parse a dlib ``shape_predictor`` file into dense arrays (about a minute for the 68-point model)."""
    r = _Reader(Path(path).read_bytes())
    version = r.integer()
    if version != 1:
        raise DlibFormatError(f"unsupported shape_predictor version {version}")
    initial = np.asarray(r.column(), dtype=np.float32)
    n_points = initial.size // 2
    n_cascades = r.integer()
    split_idx: list[list[list[tuple[int, int]]]] = []
    split_thresh: list[list[list[float]]] = []
    leaves: list[np.ndarray] = []
    for _ in range(n_cascades):
        n_trees = r.integer()
        c_idx, c_thr, c_leaves = [], [], []
        for _ in range(n_trees):
            n_splits = r.integer()
            t_idx, t_thr = [], []
            for _ in range(n_splits):
                t_idx.append((r.integer(), r.integer()))
                t_thr.append(r.real())
            n_leaves = r.integer()
            if n_leaves != n_splits + 1:
                raise DlibFormatError(f"tree with {n_splits} splits has {n_leaves} leaves")
            values = [r.column() for _ in range(n_leaves)]
            c_idx.append(t_idx)
            c_thr.append(t_thr)
            c_leaves.append(values)
        split_idx.append(c_idx)
        split_thresh.append(c_thr)
        leaves.append(np.asarray(c_leaves, dtype=np.float32))
    anchors = [[r.integer() for _ in range(r.integer())] for _ in range(r.integer())]
    deltas = []
    for _ in range(r.integer()):
        n = r.integer()
        deltas.append([(r.real(), r.real()) for _ in range(n)])
    if r.pos != len(r.data):
        raise DlibFormatError(f"{len(r.data) - r.pos} bytes left after the shape predictor")
    if not (len(anchors) == len(deltas) == n_cascades):
        raise DlibFormatError("cascade counts of forests, anchors and deltas differ")
    try:
        arrays = ShapePredictorArrays(
            initial_shape=initial.reshape(n_points, 2),
            split_idx=np.asarray(split_idx, dtype=np.int64),
            split_thresh=np.asarray(split_thresh, dtype=np.float32),
            leaves=np.stack(leaves).reshape(n_cascades, -1, len(split_idx[0][0]) + 1, n_points, 2),
            anchor_idx=np.asarray(anchors, dtype=np.int64),
            deltas=np.asarray(deltas, dtype=np.float32),
        )
    except ValueError as e:  # ragged: trees of different depths or cascades of different sizes
        raise DlibFormatError(f"shape predictor is not uniform: {e}") from e
    n_feat = arrays.anchor_idx.shape[1]
    if arrays.split_idx.max() >= n_feat or arrays.anchor_idx.max() >= n_points:
        raise DlibFormatError("split or anchor index out of range")
    return arrays
