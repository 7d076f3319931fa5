"""PCA from the teacher's 384 dimensions to the few (32–64) that travel with every example.

Why PCA, fitted once: every joined example carries the item's and the user's vector, so the
stream pays for each dimension on every record (``reduced_dim`` int8 bytes each, see
:mod:`livectr.semantic_cache.codec`). A linear projection keeps cosine structure better than random
projection at this size, needs no training loop, and, crucially, is *frozen*: the student
learns on these coordinates, so refitting would silently change their meaning. The
projection is therefore fitted once on the first few hundred items (or all there are),
persisted under ``data_dir/semantic/reducers`` and identified by a hash that is part of the
vector version string; a new projection is a new version, never a mutation.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livectr.semantic_cache.codec import to_bytes


@dataclass(frozen=True)
class PCAReducer:
    """``reduce(x) = (x - mean) @ components.T`` with ``components`` of shape ``[k, d]``."""

    mean: np.ndarray
    components: np.ndarray
    #: Share of the fitting set's variance the ``k`` components keep.
    explained_variance: float
    fitted_on: int

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def hash(self) -> str:
        """Content hash of the projection (12 hex digits)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.mean, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(self.components, dtype=np.float32).tobytes())
        return digest.hexdigest()[:12]

    def version(self, teacher_version: str) -> str:
        """The version string published with every reduced vector."""
        return f"{teacher_version}/pca{self.dim}-{self.hash}"

    @classmethod
    def fit(cls, vectors: np.ndarray, dim: int) -> PCAReducer:
        """Fit on ``[n, d]`` vectors (``n >= 2``).

        With fewer than ``dim`` informative directions (a tiny catalogue) the missing components
        are zero rows: those coordinates stay 0 rather than carrying noise. Component signs are
        fixed (largest-magnitude loading positive) so a refit on the same data is identical.
        """
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"PCA needs at least 2 vectors, got shape {x.shape}")
        if dim > x.shape[1]:
            raise ValueError(f"cannot reduce {x.shape[1]}-d vectors to {dim} dimensions")
        mean = x.mean(axis=0)
        centred = x - mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        keep = min(dim, vt.shape[0])
        components = np.zeros((dim, x.shape[1]), dtype=np.float64)
        components[:keep] = vt[:keep]
        signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
        components *= np.where(signs == 0, 1.0, signs)[:, None]
        variance = singular**2
        explained = float(variance[:keep].sum() / variance.sum()) if variance.sum() > 0 else 1.0
        return cls(mean.astype(np.float32), components.astype(np.float32), explained, int(x.shape[0]))

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Project ``[n, d]`` (or ``[d]``) teacher vectors to ``[n, k]`` float32 (not normalised)."""
        v = np.asarray(vectors, dtype=np.float32)
        return (v - self.mean) @ self.components.T

    def reduce_bytes(self, vectors: np.ndarray) -> list[bytes]:
        """Project and int8-encode each row as the bytes an example carries."""
        return [to_bytes(row) for row in np.atleast_2d(self.transform(vectors))]

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename) so a crash never leaves half a projection."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                mean=self.mean,
                components=self.components,
                explained_variance=np.float64(self.explained_variance),
                fitted_on=np.int64(self.fitted_on),
            )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PCAReducer:
        with np.load(path) as data:
            return cls(
                data["mean"].astype(np.float32),
                data["components"].astype(np.float32),
                float(data["explained_variance"]),
                int(data["fitted_on"]),
            )


def reducer_path(semantic_dir: Path, teacher_version: str, dim: int) -> Path:
    """Where the projection for a teacher version and target dimension lives."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", teacher_version)
    return semantic_dir / "reducers" / f"{safe}-pca{dim}.npz"


def load_reducer(semantic_dir: Path, teacher_version: str, dim: int) -> PCAReducer | None:
    """The persisted projection, or ``None`` if it has not been fitted yet."""
    path = reducer_path(semantic_dir, teacher_version, dim)
    return PCAReducer.load(path) if path.exists() else None


def bytes_per_example(dim: int) -> int:
    """Semantic payload a joined example carries: item + user int8 vectors."""
    return 2 * dim
