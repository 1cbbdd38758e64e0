"""The episodic memory store: keyframes, cosine retrieval, rollback targets, persistence.

Retrieval key. With image embedding a, subgoal-text embedding b and text weight w >= 0, a
keyframe's key is the unit vector

    key = concat(a / |a|, sqrt(w) * b / |b|) / sqrt(1 + w)          # (D_img + D_txt,)

and a query (a_q, b_q) is embedded the same way, so its score is the cosine

    score = (cos(a, a_q) + w * cos(b, b_q)) / (1 + w)               in [-1, 1].

A query with only one modality zeroes the other half of the query vector and renormalises
it: score = cos(a, a_q) / sqrt(1 + w) for an image-only query and
sqrt(w) * cos(b, b_q) / sqrt(1 + w) for a text-only one. The ranking is then that
modality's cosine ranking and the score is still the cosine in the combined key space.

Search. Up to `approximate_above` keyframes an exact scan is fast (one matrix-vector
product per modality over float32 rows; ~1.4 ms for 10^4 x 896-d on one thread) and exact,
so it is used. Above it, a FAISS HNSW graph (IndexHNSWFlat, inner product over the unit
keys) answers (~0.15 ms at 10^4). With index "auto" the graph is kept up to date from the
first keyframe on (~0.2 ms per insertion at 896-d), so crossing the threshold never stalls
the control loop with a bulk build (~2 s for 10^4 keyframes).

HNSW because the store grows one keyframe at a time during a run: HNSW needs no training
(an IVF index needs k-means on representative data, which a store that starts empty does
not have, and its coarse quantizer goes stale as new tasks arrive), adds incrementally,
and on CPU gives FAISS's best recall/latency trade-off when memory is not the constraint.
Its cost is ~(4 * D + 8 * M) bytes per keyframe beside the store's own float32 embeddings
(4 * D): for 10^6 keyframes of 896-d keys with M = 32, ~3.9 GB graph + ~3.6 GB embeddings.
M = 32, efConstruction = 80, efSearch = 64 gave recall@10 = 1.0 on clustered 896-d
keys up to 10^4 (runtime/memory/bench.py). Filtered queries run on the graph with an ID
selector, except when the filter leaves at most `approximate_above` keyframes: an exact
scan of that subset is both cheap and exact.

Persistence. A store directory holds `manifest.json` and append-only segments, each a
pair of float32 .npy matrices (image, text embeddings) plus a JSON-lines file of the other
fields. A save writes only the keyframes added since this store last saved to (or loaded
from) that directory, as a new segment, every file through a temp file + fsync +
os.replace; the manifest, written last the same way, is the commit point. A run killed
mid-save therefore leaves the previous manifest and every file it names intact (the new,
unreferenced segment is removed by the next save). The manifest records each file's size
and SHA-256, so truncation or corruption is an error naming the file, never a partial
load. Other files in the directory (keyframe images) are never touched.
"""
from __future__ import annotations

import dataclasses
from array import array
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from runtime.config import load_config
from runtime.memory.keyframe import KINDS, Keyframe

logger = logging.getLogger(__name__)

FORMAT = "helmstack-episodic-memory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SEGMENT_FILE = re.compile(r"^seg-\d{10}-\d{10}-[0-9a-f]{12}\.(image\.npy|text\.npy|jsonl)$")
_TEMP_FILE = re.compile(r"^\.(seg-\d{10}-\d{10}-[0-9a-f]{12}\.(image\.npy|text\.npy|jsonl)|manifest\.json)\.tmp-\d+$")
_BATCH = 65536  # rows per chunk when inserting into the graph: no full (n, D) copy of the keys at once


class MemoryFormatError(ValueError):
    """A saved store is corrupt, truncated or does not match its manifest; names the file."""


@dataclass
class MemoryConfig:
    """Schema of the episodic memory's config (YAML through runtime.config.load_config)."""

    image_dim: int = 512  # D_img: image-tower embedding size (open_clip)
    text_dim: int = 512  # D_txt: subgoal-text embedding size
    text_weight: float = 1.0  # w in the combined key; 0 keys on the image only
    # auto: graph maintained, searched above approximate_above; exact: numpy only; hnsw: graph always
    index: Literal["auto", "exact", "hnsw"] = "auto"
    approximate_above: int = 10_000  # keyframes; also the filtered-subset size still scanned exactly
    hnsw_m: int = 32  # graph degree (2 * M links on the base layer)
    hnsw_ef_construction: int = 80  # candidate list while inserting: build time vs graph quality
    hnsw_ef_search: int = 64  # candidate list while searching (raised to k when k is larger)
    threads: int = 1  # FAISS OpenMP threads (process-wide; set before each FAISS call)
    max_segments: int = 16  # a save that would exceed this rewrites the directory as one segment

    def __post_init__(self) -> None:
        for name in ("image_dim", "text_dim", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "threads",
                     "max_segments"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        above = self.approximate_above
        if isinstance(above, bool) or not isinstance(above, int) or above < 0:
            raise ValueError(f"approximate_above must be an integer >= 0, got {above!r}")
        if not isinstance(self.text_weight, (int, float)) or not np.isfinite(self.text_weight) or self.text_weight < 0:
            raise ValueError(f"text_weight must be a finite number >= 0, got {self.text_weight!r}")
        if self.index not in ("auto", "exact", "hnsw"):
            raise ValueError(f"index must be one of ['auto', 'exact', 'hnsw'], got {self.index!r}")

    @property
    def key_dim(self) -> int:
        return self.image_dim + self.text_dim


def load_faiss() -> Any:
    """FAISS, imported on first use so an exact-only store needs numpy alone."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("the approximate (HNSW) index needs FAISS: pip install faiss-cpu") from exc
    return faiss


def _unit_query(value: ArrayLike, name: str, dim: int) -> NDArray[np.float32]:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (dim,):
        raise ValueError(f"{name} must have shape ({dim},), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    norm = float(np.linalg.norm(array))
    if norm == 0.0:
        raise ValueError(f"{name} must be non-zero (cosine similarity needs a direction)")
    return (array / norm).astype(np.float32)


def _check_rows(rows: NDArray, name: str, dim: int) -> NDArray[np.float64]:
    """Squared row norms of a validated (m, dim) embedding matrix; errors name the row."""
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(f"{name} must have shape (m, {dim}), got {rows.shape}")
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        raise ValueError(f"{name} row {int(np.argmin(finite))} is not finite")
    squared = np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
    if not (squared > 0).all():
        raise ValueError(f"{name} row {int(np.argmin(squared > 0))} is zero (cosine similarity needs a direction)")
    return squared


class EmbeddingIndex:
    """Cosine top-k over combined (image, text) keys; exact numpy scan or a FAISS HNSW graph.

    Rows are numbered 0..n-1 in insertion order and never removed. The raw float32
    embeddings are kept (bit-exact round trips) with their inverse norms, so the exact scan
    needs no normalised copy; the HNSW graph stores the normalised combined keys itself.
    """

    def __init__(self, config: MemoryConfig) -> None:
        self.config = config
        self._image = np.empty((0, config.image_dim), np.float32)  # (capacity, D_img)
        self._text = np.empty((0, config.text_dim), np.float32)  # (capacity, D_txt)
        self._inv_image_norm = np.empty(0, np.float32)  # (capacity,)
        self._inv_text_norm = np.empty(0, np.float32)  # (capacity,)
        self._n = 0
        self._hnsw: Any = None  # faiss.IndexHNSWFlat over rows [0, ntotal)
        w = float(config.text_weight)
        # Key scale of each half: key = [c_img * a/|a|, c_txt * b/|b|].
        self._c_image = 1.0 / np.sqrt(1.0 + w)
        self._c_text = np.sqrt(w) / np.sqrt(1.0 + w)

    def __len__(self) -> int:
        return self._n

    @property
    def image(self) -> NDArray[np.float32]:
        return self._image[: self._n]

    @property
    def text(self) -> NDArray[np.float32]:
        return self._text[: self._n]

    def _grow(self, needed: int) -> None:
        capacity = self._image.shape[0]
        if needed <= capacity:
            return
        # Doubling keeps appends amortised O(1) while a run adds keyframes one by one.
        new_capacity = max(needed, 2 * capacity, 256)
        for name in ("_image", "_text", "_inv_image_norm", "_inv_text_norm"):
            old = getattr(self, name)
            new = np.empty((new_capacity, *old.shape[1:]), np.float32)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def add(self, image: ArrayLike, text: ArrayLike) -> range:
        """Append rows: image (m, D_img), text (m, D_txt), each row finite and non-zero."""
        image = np.asarray(image, dtype=np.float32)
        text = np.asarray(text, dtype=np.float32)
        image_sq = _check_rows(image, "image_embedding", self.config.image_dim)
        text_sq = _check_rows(text, "text_embedding", self.config.text_dim)
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"image_embedding has {image.shape[0]} rows but text_embedding has {text.shape[0]}")
        start, stop = self._n, self._n + image.shape[0]
        self._grow(stop)
        self._image[start:stop] = image
        self._text[start:stop] = text
        self._inv_image_norm[start:stop] = 1.0 / np.sqrt(image_sq)
        self._inv_text_norm[start:stop] = 1.0 / np.sqrt(text_sq)
        self._n = stop
        if self._hnsw is not None or self.config.index != "exact":
            self.build_approximate()
        return range(start, stop)

    def _searches_graph(self) -> bool:
        kind = self.config.index
        return kind == "hnsw" or (kind == "auto" and self._n > self.config.approximate_above)

    def keys(self, start: int, stop: int) -> NDArray[np.float32]:
        """Normalised combined keys of rows [start, stop): (stop - start, D_img + D_txt)."""
        out = np.empty((stop - start, self.config.key_dim), np.float32)
        d = self.config.image_dim
        out[:, :d] = self._image[start:stop] * (self._inv_image_norm[start:stop, None] * self._c_image)
        out[:, d:] = self._text[start:stop] * (self._inv_text_norm[start:stop, None] * self._c_text)
        return out

    def build_approximate(self) -> float:
        """Create the HNSW graph if needed and insert every row it lacks; returns seconds spent."""
        faiss = load_faiss()
        started = time.perf_counter()
        faiss.omp_set_num_threads(self.config.threads)
        if self._hnsw is None:
            index = faiss.IndexHNSWFlat(self.config.key_dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.config.hnsw_ef_construction
            self._hnsw = index
        for start in range(self._hnsw.ntotal, self._n, _BATCH):
            self._hnsw.add(self.keys(start, min(start + _BATCH, self._n)))
        elapsed = time.perf_counter() - started
        if elapsed > 1.0:
            logger.info("HNSW index now holds %d keyframes (%.1f s)", self._n, elapsed)
        return elapsed

    def query_vector(self, image: ArrayLike | None, text: ArrayLike | None) -> NDArray[np.float32]:
        """The unit query in key space: (D_img + D_txt,); a missing modality is zero."""
        if image is None and text is None:
            raise ValueError("a query needs image_embedding, text_embedding or both")
        d = self.config.image_dim
        query = np.zeros(self.config.key_dim, np.float32)
        if image is not None and text is not None:
            query[:d] = self._c_image * _unit_query(image, "image_embedding", d)
            query[d:] = self._c_text * _unit_query(text, "text_embedding", self.config.text_dim)
        elif image is not None:
            query[:d] = _unit_query(image, "image_embedding", d)
        else:
            if self.config.text_weight == 0:
                raise ValueError("text_embedding-only query, but text_weight = 0 keys ignore the text")
            query[d:] = _unit_query(text, "text_embedding", self.config.text_dim)
        return query

    def search(self, image: ArrayLike | None = None, text: ArrayLike | None = None, k: int = 10,
               mask: NDArray[np.bool_] | None = None,
               method: Literal["auto", "exact", "approximate"] = "auto",
               ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Top-k rows by cosine in key space, best first (ties: lower id first).

        mask: (n,) bool, rows allowed. method "auto" follows the config; "exact" and
        "approximate" force a path (benchmarks), building the graph if needed.
        Returns ids (k',) int64 and scores (k',) float32 with k' = min(k, allowed rows).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if method not in ("auto", "exact", "approximate"):
            raise ValueError(f"method must be 'auto', 'exact' or 'approximate', got {method!r}")
        query = self.query_vector(image, text)
        if mask is not None and mask.shape != (self._n,):
            raise ValueError(f"mask must have shape ({self._n},), got {mask.shape}")
        allowed = self._n if mask is None else int(np.count_nonzero(mask))
        if allowed == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        approximate = method == "approximate" or (method == "auto" and self._searches_graph())
        # A filter leaving few rows: scanning them exactly is cheaper than a filtered graph walk.
        if mask is not None and allowed <= self.config.approximate_above and method != "approximate":
            approximate = False
        if approximate:
            return self._search_hnsw(query, int(k), mask)
        return self._search_exact(query, int(k), mask, allowed)

    def _search_exact(self, query: NDArray[np.float32], k: int, mask: NDArray[np.bool_] | None,
                      allowed: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        d, n = self.config.image_dim, self._n
        # Gathering a small subset is cheaper than scoring all rows; a large one is not.
        rows = np.flatnonzero(mask) if mask is not None and allowed * 4 <= n else None
        take = slice(0, n) if rows is None else rows
        scores = np.zeros(n if rows is None else rows.size, np.float32)
        # Each half: (raw rows @ scaled unit query) * 1/|row| = key half . query half.
        for matrix, inv_norm, q, scale in ((self._image, self._inv_image_norm, query[:d], self._c_image),
                                           (self._text, self._inv_text_norm, query[d:], self._c_text)):
            if scale > 0 and np.any(q):
                scores += (matrix[take] @ (q * np.float32(scale))) * inv_norm[take]
        if rows is None:
            rows = np.arange(n)
            if mask is not None:
                rows, scores = rows[mask], scores[mask]
        kk = min(k, rows.size)
        top = np.argpartition(-scores, kk - 1)[:kk] if kk < rows.size else np.arange(rows.size)
        order = top[np.lexsort((rows[top], -scores[top]))]
        return rows[order].astype(np.int64), scores[order]

    def _search_hnsw(self, query: NDArray[np.float32], k: int,
                     mask: NDArray[np.bool_] | None) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        faiss = load_faiss()
        if self._hnsw is None or self._hnsw.ntotal < self._n:
            self.build_approximate()
        faiss.omp_set_num_threads(self.config.threads)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.config.hnsw_ef_search, k)
        if mask is not None:
            bitmap = np.packbits(mask, bitorder="little")  # FAISS reads bit i at byte i >> 3, bit i & 7
            params.sel = faiss.IDSelectorBitmap(self._n, faiss.swig_ptr(bitmap))
        scores, ids = self._hnsw.search(query[None, :], k, params=params)
        keep = ids[0] >= 0  # FAISS pads with -1 when fewer than k rows are reachable
        ids, scores = ids[0][keep].astype(np.int64), scores[0][keep]
        order = np.lexsort((ids, -scores))
        return ids[order], scores[order]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held for the used rows: raw embeddings + norms, and the HNSW graph with its keys."""
        exact = self._n * (self.config.key_dim + 2) * 4
        hnsw = 0
        if self._hnsw is not None:
            graph = self._hnsw.hnsw
            hnsw = (self._hnsw.ntotal * self.config.key_dim * 4 + graph.neighbors.size() * 4
                    + graph.levels.size() * 4 + graph.offsets.size() * 8)
        return {"embeddings": exact, "hnsw": hnsw}


class Match(NamedTuple):
    id: int
    score: float  # cosine in the combined key space (module docstring)
    keyframe: Keyframe


def _names(value: str | Iterable[str] | None, field: str) -> set[str] | None:
    if value is None:
        return None
    names = {value} if isinstance(value, str) else set(value)
    if not all(isinstance(name, str) for name in names):
        raise ValueError(f"{field} filter must be a string or strings, got {value!r}")
    return names


def _column(values: array, dtype: type) -> NDArray:
    """A numpy copy of a typed array column. A copy, not a view: a live buffer view would
    make the next append raise BufferError."""
    return np.frombuffer(values, dtype=dtype).copy() if len(values) else np.empty(0, dtype)


class _HashingWriter:
    """File wrapper that hashes what passes through (np.save writes in chunks through it)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.bytes += view.nbytes
        return self.file.write(view)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> dict[str, Any]:
    """Write through `write(writer)` into a temp file, fsync, rename onto `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            writer = _HashingWriter(file)
            write(writer)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"name": path.name, "bytes": writer.bytes, "sha256": writer.sha256.hexdigest()}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class EpisodicMemory:
    """HELM's episodic memory: add keyframes, retrieve by cosine, find rollback targets, persist."""

    def __init__(self, config: MemoryConfig | None = None) -> None:
        self.config = config if config is not None else MemoryConfig()
        self._index = EmbeddingIndex(self.config)
        self._records: list[str] = []  # id -> the keyframe's JSON record (compact: no Python objects per field)
        # Per-id filter columns as compact typed arrays (a few bytes per keyframe).
        self._episode_codes = array("i")  # id -> code in _episodes
        self._kind_codes = array("b")  # id -> index in KINDS
        self._verified = array("b")  # id -> 0/1
        self._episodes: dict[str, int] = {}
        self._verified_ids: dict[str, list[int]] = {}  # episode -> verified ids, ascending
        self._saved: dict[str, tuple[str, int]] = {}  # resolved dir -> (manifest sha256, keyframes in it)

    # -- adding and reading ------------------------------------------------------------
    def add(self, keyframe: Keyframe) -> int:
        """Store `keyframe`; returns its id (0, 1, 2, ... in insertion order)."""
        if not isinstance(keyframe, Keyframe):
            raise ValueError(f"keyframe must be a Keyframe, got {type(keyframe).__name__}")
        for name, dim, field in (("image_embedding", self.config.image_dim, "image_dim"),
                                 ("text_embedding", self.config.text_dim, "text_dim")):
            size = getattr(keyframe, name).shape[0]
            if size != dim:
                raise ValueError(f"{name} must have {dim} elements (MemoryConfig.{field}), got {size}")
        record = json.dumps(keyframe.to_record(), separators=(",", ":"), allow_nan=False)
        (new_id,) = self._index.add(keyframe.image_embedding[None, :], keyframe.text_embedding[None, :])
        self._append_columns(keyframe.episode, keyframe.kind, keyframe.verified, record)
        return new_id

    def _append_columns(self, episode: str, kind: str, verified: bool, record: str) -> None:
        new_id = len(self._records)
        self._records.append(record)
        self._episode_codes.append(self._episodes.setdefault(episode, len(self._episodes)))
        self._kind_codes.append(KINDS.index(kind))
        self._verified.append(int(verified))
        if verified:
            self._verified_ids.setdefault(episode, []).append(new_id)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Keyframe]:
        return (self.get(i) for i in range(len(self)))

    def get(self, keyframe_id: int) -> Keyframe:
        """The keyframe stored under `keyframe_id` (embeddings are float32 copies)."""
        if isinstance(keyframe_id, bool) or not isinstance(keyframe_id, (int, np.integer)) \
                or not 0 <= keyframe_id < len(self):
            raise KeyError(f"unknown keyframe id {keyframe_id!r}; ids are 0..{len(self) - 1}")
        i = int(keyframe_id)
        return Keyframe.from_record(json.loads(self._records[i]), self._index.image[i].copy(),
                                    self._index.text[i].copy())

    # -- retrieval ---------------------------------------------------------------------
    def query(self, image_embedding: ArrayLike | None = None, text_embedding: ArrayLike | None = None, k: int = 5,
              *, episode: str | Iterable[str] | None = None, kind: str | Iterable[str] | None = None,
              verified: bool | None = None) -> list[Match]:
        """Top-k keyframes by cosine of the combined key (module docstring), best first.

        Either embedding may be omitted (one-modality query). Filters: episode name(s),
        keyframe kind(s), verified flag; a filter matching nothing gives [].
        """
        mask = self._filter_mask(episode, kind, verified)
        ids, scores = self._index.search(image_embedding, text_embedding, k, mask)
        return [Match(int(i), float(s), self.get(int(i))) for i, s in zip(ids, scores)]

    def _filter_mask(self, episode: str | Iterable[str] | None, kind: str | Iterable[str] | None,
                     verified: bool | None) -> NDArray[np.bool_] | None:
        if episode is None and kind is None and verified is None:
            return None
        n = len(self)
        mask = np.ones(n, bool)
        episodes = _names(episode, "episode")
        if episodes is not None:
            codes = [self._episodes[name] for name in episodes if name in self._episodes]
            mask &= np.isin(_column(self._episode_codes, np.int32), codes)
        kinds = _names(kind, "kind")
        if kinds is not None:
            unknown = sorted(kinds - set(KINDS))
            if unknown:
                raise ValueError(f"kind filter must name kinds in {list(KINDS)}, got {unknown}")
            mask &= np.isin(_column(self._kind_codes, np.int8), [KINDS.index(name) for name in kinds])
        if verified is not None:
            if not isinstance(verified, bool):
                raise ValueError(f"verified filter must be a bool or None, got {verified!r}")
            mask &= _column(self._verified, np.int8) == int(verified)
        return mask

    def last_verified(self, episode: str, before: int | None = None) -> tuple[int, Keyframe] | None:
        """The most recently added verified keyframe of `episode` (the rollback target).

        Recency is insertion order, not step index: after a rollback the episode's step
        counter repeats, and the newest confirmed state is the one to return to. `before`
        (an id) walks further back: the latest verified keyframe added before it.
        """
        ids = self._verified_ids.get(episode, [])
        if before is not None:
            ids = ids[: int(np.searchsorted(ids, before))]
        return (ids[-1], self.get(ids[-1])) if ids else None

    def memory_bytes(self) -> dict[str, int]:
        return self._index.memory_bytes()

    # -- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Persist to `directory` (created if needed); see the module docstring.

        Appends one segment when the directory holds this store's previous save; a save
        of another store there is refused unless `overwrite`. Returns the manifest path.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        manifest_path = path / MANIFEST
        key = str(path.resolve())
        segments: list[dict[str, Any]] = []
        start = 0
        if manifest_path.exists():
            data = manifest_path.read_bytes()
            owned = self._saved.get(key, ("", -1))[0] == hashlib.sha256(data).hexdigest()
            if owned:
                segments = _parse_manifest(data, manifest_path)["segments"]
                start = self._saved[key][1]
                if start == len(self):
                    return manifest_path
                if len(segments) >= self.config.max_segments:
                    segments, start = [], 0  # compact: one segment with everything
            elif not overwrite:
                raise FileExistsError(f"{manifest_path} is not this store's last save (another store, or "
                                      "changed since); pass overwrite=True to replace it")
        if start < len(self):
            segments = [*segments, self._write_segment(path, start, len(self))]
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "count": len(self),
                    "image_dim": self.config.image_dim, "text_dim": self.config.text_dim,
                    "embedding_dtype": "float32", "config": dataclasses.asdict(self.config), "segments": segments}
        text = (json.dumps(manifest, indent=1) + "\n").encode()
        _write_atomic(manifest_path, lambda writer: writer.write(text))
        _fsync_dir(path)
        self._saved[key] = (hashlib.sha256(text).hexdigest(), len(self))
        self._remove_unreferenced(path, segments)
        logger.debug("saved %d keyframes to %s (%d segments)", len(self), path, len(segments))
        return manifest_path

    def _write_segment(self, path: Path, start: int, stop: int) -> dict[str, Any]:
        # A fresh token per segment: a new file never replaces one a committed manifest names.
        stem = f"seg-{start:010d}-{stop:010d}-{uuid.uuid4().hex[:12]}"
        image, text = self._index.image[start:stop], self._index.text[start:stop]

        def write_records(writer: _HashingWriter) -> None:
            for i in range(start, stop):
                writer.write(f'{{"id":{i},"keyframe":{self._records[i]}}}\n'.encode())

        files = {
            "image": _write_atomic(path / f"{stem}.image.npy", lambda w: np.save(w, image, allow_pickle=False)),
            "text": _write_atomic(path / f"{stem}.text.npy", lambda w: np.save(w, text, allow_pickle=False)),
            "records": _write_atomic(path / f"{stem}.jsonl", write_records),
        }
        return {"start": start, "count": stop - start, "files": files}

    @staticmethod
    def _remove_unreferenced(path: Path, segments: Sequence[dict[str, Any]]) -> None:
        """Delete segment and temp files of ours that the committed manifest does not name
        (left by an overwritten save, a compaction or a killed save); nothing else."""
        referenced = {f["name"] for segment in segments for f in segment["files"].values()}
        for entry in path.iterdir():
            if (_SEGMENT_FILE.match(entry.name) and entry.name not in referenced) or _TEMP_FILE.match(entry.name):
                entry.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | Path, config: MemoryConfig | None = None, *, verify: bool = True) -> EpisodicMemory:
        """Restore a store saved by `save`, rebuilding the index.

        `config` defaults to the saved one; one given must have the saved dims (index and
        search parameters may differ). verify: check each file's SHA-256 (sizes, shapes and
        every record are always checked). Any mismatch is a MemoryFormatError naming the file.
        """
        path = Path(directory)
        manifest_path = path / MANIFEST
        try:
            data = manifest_path.read_bytes()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{manifest_path}: no saved episodic memory here") from exc
        manifest = _parse_manifest(data, manifest_path)
        if config is None:
            try:
                config = load_config(MemoryConfig, manifest["config"], origin=str(manifest_path))
            except ValueError as exc:
                raise MemoryFormatError(str(exc)) from exc
        for field in ("image_dim", "text_dim"):
            if getattr(config, field) != manifest[field]:
                raise ValueError(f"MemoryConfig.{field} = {getattr(config, field)} but {manifest_path} "
                                 f"holds {field} = {manifest[field]}")
        memory = cls(config)
        images, texts, records = [], [], []
        for segment in manifest["segments"]:
            image, text, segment_records = _read_segment(path, segment, config, verify)
            images.append(image)
            texts.append(text)
            records.extend(segment_records)
        if images:
            memory._index.add(np.concatenate(images), np.concatenate(texts))
        for keyframe, record in records:
            memory._append_columns(keyframe.episode, keyframe.kind, keyframe.verified, record)
        memory._saved[str(path.resolve())] = (hashlib.sha256(data).hexdigest(), len(memory))
        logger.debug("loaded %d keyframes from %s", len(memory), path)
        return memory


def _parse_manifest(data: bytes, manifest_path: Path) -> dict[str, Any]:
    """Parse and check a manifest's structure; MemoryFormatError naming the file otherwise."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemoryFormatError(f"{manifest_path}: not valid JSON ({exc})") from exc

    def bad(message: str) -> MemoryFormatError:
        return MemoryFormatError(f"{manifest_path}: {message}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"not an episodic-memory manifest (format must be {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise bad(f"unsupported version {manifest.get('version')!r} (this code reads {FORMAT_VERSION})")
    for field in ("count", "image_dim", "text_dim"):
        value = manifest.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(f"{field} must be an integer >= 0, got {value!r}")
    if manifest.get("embedding_dtype") != "float32":
        raise bad(f"embedding_dtype must be 'float32', got {manifest.get('embedding_dtype')!r}")
    if not isinstance(manifest.get("config"), dict):
        raise bad("config must be a mapping")
    segments = manifest.get("segments")
    if not isinstance(segments, list):
        raise bad("segments must be a list")
    expected_start = 0
    for i, segment in enumerate(segments):
        try:
            start, count, files = segment["start"], segment["count"], segment["files"]
            entries = [files[role] for role in ("image", "text", "records")]
            ok = (start == expected_start and isinstance(count, int) and count > 0
                  and all(_SEGMENT_FILE.match(str(f["name"])) and isinstance(f["bytes"], int)
                          and isinstance(f["sha256"], str) for f in entries))
        except (KeyError, TypeError) as exc:
            raise bad(f"segments[{i}] is malformed ({exc!r})") from exc
        if not ok:
            raise bad(f"segments[{i}] must start at {expected_start} with count > 0 and name its three files")
        expected_start += count
    if expected_start != manifest["count"]:
        raise bad(f"count = {manifest['count']} but the segments hold {expected_start} keyframes")
    return manifest


def _check_file(path: Path, entry: dict[str, Any], verify: bool) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise MemoryFormatError(f"{path}: missing (named by {MANIFEST})") from exc
    if size != entry["bytes"]:
        raise MemoryFormatError(f"{path}: {size} bytes, {MANIFEST} says {entry['bytes']} (truncated or rewritten)")
    if verify and _file_sha256(path) != entry["sha256"]:
        raise MemoryFormatError(f"{path}: SHA-256 differs from {MANIFEST} (corrupt)")


def _read_matrix(path: Path, rows: int, dim: int) -> NDArray[np.float32]:
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise MemoryFormatError(f"{path}: unreadable .npy ({exc})") from exc
    if matrix.dtype != np.float32 or matrix.shape != (rows, dim):
        raise MemoryFormatError(f"{path}: expected float32 ({rows}, {dim}), got {matrix.dtype} {matrix.shape}")
    try:
        _check_rows(matrix, "embedding", dim)
    except ValueError as exc:
        raise MemoryFormatError(f"{path}: {exc}") from exc
    return matrix


def _read_segment(path: Path, segment: dict[str, Any], config: MemoryConfig,
                  verify: bool) -> tuple[NDArray[np.float32], NDArray[np.float32], list[tuple[Keyframe, str]]]:
    files = {role: path / entry["name"] for role, entry in segment["files"].items()}
    for role, file in files.items():
        _check_file(file, segment["files"][role], verify)
    start, count = segment["start"], segment["count"]
    image = _read_matrix(files["image"], count, config.image_dim)
    text = _read_matrix(files["text"], count, config.text_dim)
    records: list[tuple[Keyframe, str]] = []
    with open(files["records"], "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            i = start + line_no - 1
            try:
                if line_no > count:
                    raise ValueError(f"more lines than the {count} the manifest lists")
                entry = json.loads(line)
                if not isinstance(entry, dict) or entry.get("id") != i or set(entry) != {"id", "keyframe"}:
                    raise ValueError(f"expected {{\"id\": {i}, \"keyframe\": {{...}}}}")
                keyframe = Keyframe.from_record(entry["keyframe"], image[line_no - 1], text[line_no - 1])
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                raise MemoryFormatError(f"{files['records']}:{line_no}: {exc}") from exc
            records.append((keyframe, json.dumps(keyframe.to_record(), separators=(",", ":"), allow_nan=False)))
    if len(records) != count:
        raise MemoryFormatError(f"{files['records']}: {len(records)} records, {MANIFEST} says {count}")
    return image, text, records
