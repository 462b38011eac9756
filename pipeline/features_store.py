"""The feature cache: one Zarr v3 group of patch tokens per (dataset, backbone key), written shard by shard.

Layout of ``<cache_root>/features/<dataset>/<backbone_key>.zarr``:

- ``tokens`` (n_images, Hp, Wp, C) float16: one image per chunk, ``shard_size`` images per shard file;
  every chunk ends with a crc32c checksum (and so does each shard's index), so a corrupted chunk fails to
  read instead of returning wrong numbers. Unwritten chunks read as NaN (the fill value), so a missing
  shard file is caught too.
- ``tokens_flipped`` (same shape), only in a store created with ``flipped=True``: features of the mirrored
  images on the original patch grid.
- ``valid`` (n_images, Hp, Wp) bool: patches that cover the image rather than the canvas padding.
- ``done`` (n_shards,) int32, one chunk per shard: how many leading rows of each shard are committed.
- attributes: ``image_ids`` (row order), ``transforms`` (one canvas-transform dict per row), ``backbone``
  (the store's key parameters, ``FeatureStore.key_params``), ``random_weights``, ``flipped``, ``grid``,
  ``dim``, ``shard_size`` and ``format_version`` (written last: a store without it was interrupted while
  being created).

Concurrency: the driver alone creates the store and appends images (it writes all metadata); Dask tasks
then each write whole shards (one shard file per array) and their own ``done`` chunk, so writers never
touch the same object. A task writes the data first and ``done`` last, so a reader never sees a shard
counted as done before its data are in place. Every object is replaced atomically by the local store.

Shards hold 32 images by default: a task of 32 images amortises the model load over several GPU batches,
and a shard file stays between ~90 MB (ViT-S, 840-px canvas) and ~350 MB (ViT-g) in memory and on disk.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.cache import atomic_write_bytes
from pipeline.damage import repairing, report_damage, set_aside
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 32
TOKEN_ARRAYS = ("tokens", "tokens_flipped")
SETTINGS = ("grid", "dim", "backbone", "random_weights", "flipped")  # the attributes a store is made for


class FeatureStoreError(PipelineError):
    """A feature store does not match the request, or holds no features yet for the requested images."""


class CorruptFeaturesError(FeatureStoreError):
    """Stored features fail their checksum or are missing: ``verify()`` marks the shard for recomputation."""

    def __init__(self, message: str, shard: int):
        super().__init__(message)
        self.shard = shard

    def __reduce__(self):  # pickled by Dask from the worker that read the shard
        return type(self), (str(self), self.shard)


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from Zarr attributes (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


class FeatureStore:
    """Patch tokens of one dataset under one backbone; see the module docstring for the layout."""

    def __init__(self, group: zarr.Group, path: str | Path):
        self._group = group
        self.path = str(path)
        attrs = group.attrs
        if attrs.get("format_version") != FORMAT_VERSION:
            raise FeatureStoreError(
                f"{self.path}: not a complete feature store of format {FORMAT_VERSION} (its creation may "
                "have been interrupted); delete it or run the features stage again"
            )
        try:
            self.image_ids: list[str] = list(attrs["image_ids"])
            self.transforms: list[dict[str, Any]] = list(attrs["transforms"])
            self.grid: tuple[int, int] = tuple(attrs["grid"])
            self.dim: int = attrs["dim"]
            self.key_params: dict[str, Any] = dict(attrs["backbone"])
            self.random_weights: bool = attrs["random_weights"]
            self.flipped: bool = attrs["flipped"]
            self.shard_size: int = attrs["shard_size"]
        except (KeyError, TypeError, ValueError) as error:
            raise _DamagedMetadata(
                f"{self.path}/zarr.json", f"the group's attributes are damaged ({error!r})"
            ) from None
        self._rows = {image_id: row for row, image_id in enumerate(self.image_ids)}
        # Handles opened once: each group lookup re-reads the array's metadata.
        self._arrays: dict[str, zarr.Array] = {
            name: self._open_array(name) for name in (*self._token_arrays(), "valid", "done")
        }

    def _open_array(self, name: str) -> zarr.Array:
        """The array ``name``; damaged metadata is rebuilt from the group's attributes during a run."""
        metadata = f"{self.path}/{name}/zarr.json"
        try:
            return self._group[name]
        except (ValueError, KeyError, TypeError, OSError) as error:
            problem = f"unreadable array metadata ({type(error).__name__}: {error})"
        if not _is_local(self.path):
            raise _DamagedMetadata(metadata, problem)
        report_damage(metadata, problem, "rebuilds it from the group's attributes (the chunks keep their checksums)")
        if not repairing():
            raise FeatureStoreError(f"{metadata}: unreadable array metadata; the next run rebuilds it")
        shape = (len(self.shards()),) if name == "done" else (self.n_images,)
        with tempfile.TemporaryDirectory() as folder:
            template = zarr.open_group(folder, mode="w")
            _create_arrays(template, self._settings(), self.shard_size)
            template[name].resize((*shape, *template[name].shape[1:]))
            atomic_write_bytes(metadata, (Path(folder) / name / "zarr.json").read_bytes())
        return self._group[name]

    def _settings(self) -> dict[str, Any]:
        return {name: self._group.attrs[name] for name in SETTINGS}

    @property
    def n_images(self) -> int:
        """Number of images (rows)."""
        return len(self.image_ids)

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open an existing store (for workers that write shards and for readers).

        A store whose group metadata is damaged is reported (and set aside during a run, so the features
        stage computes it afresh) and raises FeatureStoreError.
        """
        try:
            return cls(zarr.open_group(str(path), mode="r+"), path)
        except FileNotFoundError as error:
            raise FeatureStoreError(f"{path}: no feature store here; run the features stage first") from error
        except (_DamagedMetadata, ValueError, KeyError, TypeError) as error:
            _report_damaged_store(path, error)
            raise FeatureStoreError(
                f"{path}: the feature store's metadata is damaged; run the features stage to compute it afresh"
            ) from None

    @classmethod
    def create_or_open(
        cls,
        path: str | Path,
        *,
        image_ids: Sequence[str],
        transforms: Sequence[Mapping[str, Any]],
        grid: tuple[int, int],
        dim: int,
        key_params: Mapping[str, Any],
        random_weights: bool = False,
        flipped: bool = False,
        shard_size: int = DEFAULT_SHARD_SIZE,
    ) -> FeatureStore:
        """Create the store, or open it and append the images it lacks (driver only, before any task runs).

        ``transforms[i]`` is image ``image_ids[i]``'s canvas transform as a plain dict. An existing store
        must have been made with the same grid, dim, key parameters, random_weights and flipped, and
        its images' transforms must agree; its ``shard_size`` is kept. New images get new rows at the end.
        """
        if len(image_ids) != len(transforms):
            raise FeatureStoreError(f"{path}: {len(image_ids)} image ids but {len(transforms)} transforms")
        if len(set(image_ids)) != len(image_ids):
            duplicates = sorted(image_id for image_id, count in Counter(image_ids).items() if count > 1)
            raise FeatureStoreError(f"{path}: duplicate image ids {duplicates[:5]}")
        if shard_size < 1:
            raise FeatureStoreError(f"{path}: shard_size must be at least 1, got {shard_size}")
        settings = {
            "grid": list(grid),
            "dim": dim,
            "backbone": _as_json(dict(key_params)),
            "random_weights": random_weights,
            "flipped": flipped,
        }
        try:
            store = cls.open(path)
        except FeatureStoreError:  # absent, interrupted while created, or damaged (and now set aside)
            store = cls(_create(path, settings, shard_size), path)
        store._remove_partials("zarr.json", "*/zarr.json")  # the driver alone writes metadata
        store._check_settings(settings)
        store._append(list(image_ids), [_as_json(dict(t)) for t in transforms])
        return store

    def _check_settings(self, settings: Mapping[str, Any]) -> None:
        mismatched = [
            f"{name}: stored {self._group.attrs[name]!r}, requested {value!r}"
            for name, value in settings.items()
            if _as_json(self._group.attrs[name]) != value
        ]
        if mismatched:
            raise FeatureStoreError(
                f"{self.path}: this feature store was made with other settings ({'; '.join(mismatched)}); "
                "features of other settings belong in a store of their own backbone key"
            )

    def _append(self, image_ids: list[str], transforms: list[Any]) -> None:
        new_ids, new_transforms = [], []
        for image_id, transform in zip(image_ids, transforms, strict=True):
            row = self._rows.get(image_id)
            if row is None:
                new_ids.append(image_id)
                new_transforms.append(transform)
            elif self.transforms[row] != transform:
                raise FeatureStoreError(
                    f"{self.path}: image {image_id!r} is stored with canvas transform {self.transforms[row]} "
                    f"but the request has {transform}; the canvas settings must not change within a store"
                )
        self.image_ids += new_ids
        self.transforms += new_transforms
        self._rows = {image_id: row for row, image_id in enumerate(self.image_ids)}
        # Arrays first, attributes last: an append killed in between leaves spare rows that the next
        # append resizes away, never rows without an image id.
        for name in (*self._token_arrays(), "valid"):
            array = self._arrays[name]
            if array.shape[0] != self.n_images:
                array.resize((self.n_images, *array.shape[1:]))
        if self._arrays["done"].shape[0] != len(self.shards()):
            self._arrays["done"].resize((len(self.shards()),))
        if new_ids:
            self._group.attrs.update({"image_ids": self.image_ids, "transforms": self.transforms})

    def _token_arrays(self) -> tuple[str, ...]:
        return TOKEN_ARRAYS if self.flipped else TOKEN_ARRAYS[:1]

    def shards(self) -> list[tuple[int, range]]:
        """Every shard: (shard index, its rows)."""
        return [
            (index, range(start, min(start + self.shard_size, self.n_images)))
            for index, start in enumerate(range(0, self.n_images, self.shard_size))
        ]

    def missing_shards(self) -> list[tuple[int, range]]:
        """The work left: (shard index, the rows of that shard still to compute), for incomplete shards.

        After images were appended only the new rows are listed; after ``verify`` found a shard corrupt,
        all of its rows.
        """
        done = self._done()
        return [(index, rows[done[index] :]) for index, rows in self.shards() if done[index] < len(rows)]

    def _done(self) -> np.ndarray:
        """Committed rows per shard; a count that fails its checksum is reported and read as 0 (reset to 0
        during a run), so its shard is computed again."""
        array = self._arrays["done"]
        try:
            return array[:]
        except ValueError:
            pass
        done = np.zeros(array.shape, dtype=array.dtype)
        for index in range(array.shape[0]):
            try:
                done[index] = array[index]
            except ValueError as error:
                self._report_shard(index, ("done",), f"its done count fails its checksum ({error})")
                if repairing():
                    array[index] = 0
        return done

    def _report_shard(self, shard: int, names: Sequence[str], problem: str) -> None:
        """Report shard ``shard`` as damaged and, during a run of a local store, set its files of the
        arrays ``names`` aside (a damaged shard index would otherwise fail every later write)."""
        files = [f"{self.path}/{name}/{self._chunk_key(name, shard)}" for name in names]
        redo = f"recomputes shard {shard} (images {self.image_ids[shard * self.shard_size]!r}...)"
        local = _is_local(self.path)
        for file in files:
            if not local or os.path.lexists(file):
                report_damage(file, problem, redo, move=local)

    def _remove_partials(self, *patterns: str) -> None:
        """Remove the temporaries (``<file>.<uuid>.partial``) that a killed writer of the files matching
        ``patterns`` left in a local store."""
        if _is_local(self.path):
            for pattern in patterns:
                for partial in Path(self.path).glob(f"{Path(pattern).with_suffix('')}.*.partial"):
                    partial.unlink(missing_ok=True)

    def _chunk_key(self, name: str, shard: int) -> str:
        return self._arrays[name].metadata.encode_chunk_key((shard,) + (0,) * (self._arrays[name].ndim - 1))

    def write_shard(
        self,
        shard_index: int,
        tokens: np.ndarray,
        valid: np.ndarray,
        *,
        tokens_flipped: np.ndarray | None = None,
    ) -> None:
        """Write the last ``n = len(tokens)`` rows of a shard, then record the whole shard as done.

        tokens [n, Hp, Wp, C] (stored as float16), valid [n, Hp, Wp] bool, tokens_flipped like tokens and
        required exactly when the store is ``flipped``. The rows before the written ones must already be
        done: pass the rows ``missing_shards`` lists, or the whole shard.
        """
        shards = self.shards()
        if not 0 <= shard_index < len(shards):
            raise FeatureStoreError(f"{self.path}: no shard {shard_index} (the store has {len(shards)})")
        shard_rows = shards[shard_index][1]
        rows = shard_rows[len(shard_rows) - len(tokens) :]
        done = int(self._done()[shard_index])
        if not 0 < len(tokens) <= len(shard_rows) or rows.start > shard_rows.start + done:
            raise FeatureStoreError(
                f"{self.path}: shard {shard_index} has rows {shard_rows.start}-{shard_rows.stop - 1}, "
                f"{done} of them done; got {len(tokens)} rows, expected {len(shard_rows) - done} to "
                f"{len(shard_rows)}"
            )
        if (tokens_flipped is not None) != self.flipped:
            raise FeatureStoreError(
                f"{self.path}: the store is {'' if self.flipped else 'not '}flipped, so tokens_flipped must "
                f"{'' if self.flipped else 'not '}be given"
            )
        names = (*self._token_arrays(), "valid", "done")
        self._remove_partials(*(f"{name}/{self._chunk_key(name, shard_index)}" for name in names))
        arrays = {"tokens": tokens, "tokens_flipped": tokens_flipped}
        data = {name: self._checked_tokens(arrays[name], name, rows) for name in self._token_arrays()}
        data["valid"] = self._checked(np.asarray(valid), "valid", (len(rows), *self.grid)).astype(bool)
        for name, values in data.items():
            try:
                self._arrays[name][rows.start : rows.stop] = values
            except ValueError as error:  # the shard file's index is damaged: set it aside, write afresh
                self._report_shard(shard_index, (name,), f"its shard file fails its checksum ({error})")
                self._arrays[name][rows.start : rows.stop] = values
        self._arrays["done"][shard_index] = len(shard_rows)  # the commit: after the data are in place

    def _checked(self, values: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if values.shape != shape:
            raise FeatureStoreError(f"{self.path}: {name} must have shape {list(shape)}, got {list(values.shape)}")
        return values

    def _checked_tokens(self, tokens: np.ndarray, name: str, rows: range) -> np.ndarray:
        with np.errstate(over="ignore"):  # overflow is reported below, with the image ids
            values = self._checked(np.asarray(tokens), name, (len(rows), *self.grid, self.dim)).astype(np.float16)
        if not np.isfinite(values).all():
            bad = sorted({self.image_ids[rows[i]] for i in np.nonzero(~np.isfinite(values))[0]})
            raise FeatureStoreError(
                f"{self.path}: {name} of images {bad[:5]} are not finite in float16 (NaN, or beyond +-65504)"
            )
        return values

    def rows_for(self, image_ids: Sequence[str]) -> list[int]:
        """The rows of ``image_ids``, in order."""
        unknown = [image_id for image_id in image_ids if image_id not in self._rows]
        if unknown:
            raise FeatureStoreError(f"{self.path}: unknown image ids {unknown[:5]} ({len(unknown)} in all)")
        return [self._rows[image_id] for image_id in image_ids]

    def read(
        self, images: str | int | Sequence[str] | Sequence[int], *, flipped: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens float16 and valid mask of one image (id or row), [Hp, Wp, C] and [Hp, Wp], or of several.

        Several images (ids or rows) give [n, Hp, Wp, C] and [n, Hp, Wp], in the order asked.
        ``flipped`` reads the features of the mirrored images instead. Raises ``CorruptFeaturesError``
        (naming the image) when a chunk fails its checksum or was never written.
        """
        single = isinstance(images, (str, int, np.integer))
        items = [images] if single else list(images)
        rows = [self.rows_for([item])[0] if isinstance(item, str) else int(item) for item in items]
        if any(not 0 <= row < self.n_images for row in rows):
            raise FeatureStoreError(f"{self.path}: rows must be in 0-{self.n_images - 1}, got {rows}")
        if flipped and not self.flipped:
            raise FeatureStoreError(f"{self.path}: this store holds no flipped features")
        self._require_done(rows)
        name = "tokens_flipped" if flipped else "tokens"
        try:
            tokens = self._arrays[name].get_orthogonal_selection((rows,))
            valid = self._arrays["valid"].get_orthogonal_selection((rows,))
        except ValueError:  # a checksum mismatch; find the first culprit to name it
            for row in rows:
                self._read_row(name, row)
            raise
        missing = np.isnan(tokens.reshape(len(rows), -1)).any(axis=1)
        if missing.any():
            self._raise_corrupt(rows[int(np.argmax(missing))], "was never written (the chunk is missing)")
        return (tokens[0], valid[0]) if single else (tokens, valid)

    def _require_done(self, rows: list[int]) -> None:
        shard_of = {row: row // self.shard_size for row in rows}
        shards = sorted(set(shard_of.values()))
        done = dict(zip(shards, self._done()[shards], strict=True))
        pending = [row for row in rows if row - shard_of[row] * self.shard_size >= done[shard_of[row]]]
        if pending:
            names = [self.image_ids[row] for row in pending[:5]]
            raise FeatureStoreError(
                f"{self.path}: the features of images {names} are not computed yet; run the features stage"
            )

    def _read_row(self, name: str, row: int) -> None:
        try:
            self._arrays[name][row]
            self._arrays["valid"][row]
        except ValueError as error:
            self._raise_corrupt(row, f"fails its checksum ({error})")

    def _raise_corrupt(self, row: int, problem: str) -> None:
        shard = row // self.shard_size
        raise CorruptFeaturesError(
            f"{self.path}: the stored features of image {self.image_ids[row]!r} (row {row}, shard {shard}) "
            f"{problem}; run `pipeline run --stage features --verify` to recompute the shard",
            shard,
        )

    def verify(self) -> list[int]:
        """Read every committed chunk; mark the shards that fail a checksum (or lack data) as not done.

        Returns the corrupt shards' indices; the next features run recomputes them.
        """
        done = self._done()
        corrupt = []
        for index, rows in self.shards():
            committed = slice(rows.start, rows.start + int(done[index]))
            if committed.start == committed.stop:
                continue
            try:
                tokens = [self._arrays[name][committed] for name in self._token_arrays()]
                self._arrays["valid"][committed]
                intact = not any(np.isnan(values).any() for values in tokens)
            except ValueError:
                intact = False
            if not intact:
                names = (*self._token_arrays(), "valid")
                self._report_shard(index, names, "its features fail their checksum or were never written")
                if repairing():
                    self._arrays["done"][index] = 0
                corrupt.append(index)
        return corrupt


def _create(path: str | Path, settings: Mapping[str, Any], shard_size: int) -> zarr.Group:
    """A new, empty store; ``format_version`` is written last, marking it complete."""
    group = zarr.open_group(str(path), mode="w")
    _create_arrays(group, settings, shard_size)
    group.attrs.update(
        {
            **settings,
            "image_ids": [],
            "transforms": [],
            "shard_size": shard_size,
            "format_version": FORMAT_VERSION,
        }
    )
    return group


def _create_arrays(group: zarr.Group, settings: Mapping[str, Any], shard_size: int) -> None:
    """The store's empty arrays (no rows yet) for ``settings``."""
    grid = tuple(settings["grid"])
    image_arrays = {"tokens": ((*grid, settings["dim"]), "float16", np.nan), "valid": (grid, "bool", False)}
    if settings["flipped"]:
        image_arrays["tokens_flipped"] = image_arrays["tokens"]
    for name, (shape, dtype, fill) in image_arrays.items():
        group.create_array(
            name,
            shape=(0, *shape),
            chunks=(1, *shape),
            shards=(shard_size, *shape),
            dtype=dtype,
            fill_value=fill,
            compressors=[Crc32cCodec()],
            dimension_names=("image", "row", "col", "channel")[: 1 + len(shape)],
        )
    group.create_array(
        "done", shape=(0,), chunks=(1,), dtype="int32", fill_value=0, compressors=[Crc32cCodec()],
        dimension_names=("shard",),
    )  # fmt: skip


class _DamagedMetadata(Exception):
    """A store's metadata file cannot be read or lacks a required attribute."""

    def __init__(self, path: str, problem: str):
        super().__init__(problem)
        self.path = path


def _is_local(path: str) -> bool:
    return "://" not in path


def _report_damaged_store(path: str | Path, error: Exception) -> None:
    """Report a store whose group metadata is unreadable; during a run set the whole store aside."""
    problem = str(error) if isinstance(error, _DamagedMetadata) else f"{type(error).__name__}: {error}"
    where = error.path if isinstance(error, _DamagedMetadata) else f"{path}/zarr.json"
    local = _is_local(str(path))
    report_damage(where, f"unreadable feature store metadata ({problem})", "computes the store afresh", move=False)
    if local and repairing() and Path(path).exists():
        log.warning("damaged feature store %s moved to %s", path, set_aside(path))
