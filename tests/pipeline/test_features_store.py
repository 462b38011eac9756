"""Tests of the Zarr feature store: round trips, shard-wise writers, appends, and corruption handling."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from pipeline.features_store import CorruptFeaturesError, FeatureStore, FeatureStoreError
from stages.features.canvas import CanvasTransform

GRID, DIM = (2, 3), 5
PARAMS = {"model": "vit_small_patch14_dinov2.lvd142m", "weights": "random:0", "image_size": 28, "flip": False}


def transforms(count: int, start: int = 0) -> list[dict[str, int]]:
    return [CanvasTransform.fit(20 + i, 10 + i, canvas_size=28).as_dict() for i in range(start, start + count)]


def ids(count: int, start: int = 0) -> list[str]:
    return [f"img{i:03d}" for i in range(start, start + count)]


def features(rows: range, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic tokens [n, 2, 3, 5] float32 and valid [n, 2, 3] of ``rows``: row r is made from r."""
    tokens = np.stack([np.random.default_rng([seed, row]).normal(size=(*GRID, DIM)) for row in rows])
    valid = np.stack([np.arange(6).reshape(GRID) % (2 + row % 3) == 0 for row in rows])
    return tokens.astype(np.float32), valid


def create(path: Path, count: int, **options) -> FeatureStore:
    settings = {"grid": GRID, "dim": DIM, "key_params": PARAMS, "shard_size": 2} | options
    return FeatureStore.create_or_open(path, image_ids=ids(count), transforms=transforms(count), **settings)


def write_missing(store: FeatureStore, seed: int = 0) -> None:
    for shard, rows in store.missing_shards():
        store.write_shard(shard, *features(rows, seed))


def all_tokens(store: FeatureStore) -> np.ndarray:
    return store.read(list(range(store.n_images)))[0]


def test_round_trip_keeps_tokens_valid_mask_and_attributes(tmp_path):
    path = tmp_path / "features" / "demo" / "key.zarr"
    store = create(path, 5, random_weights=True)
    assert store.shards() == [(0, range(0, 2)), (1, range(2, 4)), (2, range(4, 5))]
    write_missing(store)
    reopened = FeatureStore.open(path)
    expected_tokens, expected_valid = features(range(5))
    tokens, valid = reopened.read(ids(5)[::-1])
    assert tokens.dtype == np.float16 and tokens.shape == (5, *GRID, DIM) and valid.dtype == bool
    np.testing.assert_allclose(tokens, expected_tokens[::-1], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(valid, expected_valid[::-1])
    one_tokens, one_valid = reopened.read("img003")
    np.testing.assert_array_equal(one_tokens, tokens[1])
    np.testing.assert_array_equal(one_valid, expected_valid[3])
    assert reopened.rows_for(["img004", "img000"]) == [4, 0]
    assert reopened.image_ids == ids(5) and reopened.transforms == transforms(5)
    assert [CanvasTransform(**t) for t in reopened.transforms][1] == CanvasTransform.fit(21, 11, canvas_size=28)
    assert (reopened.grid, reopened.dim, reopened.key_params) == (GRID, DIM, PARAMS)
    assert reopened.random_weights and not reopened.flipped and reopened.missing_shards() == []
    group = zarr.open_group(str(path), mode="r")
    assert group["tokens"].chunks == (1, *GRID, DIM) and group["tokens"].shards == (2, *GRID, DIM)
    assert any(isinstance(codec, Crc32cCodec) for codec in group["tokens"].metadata.codecs[0].codecs)


def test_flipped_store_keeps_both_views(tmp_path):
    store = create(tmp_path / "s.zarr", 3, flipped=True)
    for shard, rows in store.missing_shards():
        store.write_shard(shard, *features(rows), tokens_flipped=features(rows, seed=1)[0])
    np.testing.assert_allclose(store.read([2], flipped=True)[0], features(range(2, 3), seed=1)[0], atol=1e-3)
    np.testing.assert_allclose(store.read([2])[0], features(range(2, 3))[0], atol=1e-3)
    with pytest.raises(FeatureStoreError, match="the store is flipped, so tokens_flipped must be given"):
        store.write_shard(0, *features(range(2)))


def test_shards_written_by_two_workers_equal_one_writer(tmp_path):
    single = create(tmp_path / "single.zarr", 5)
    write_missing(single)
    create(tmp_path / "pair.zarr", 5)
    first, second = FeatureStore.open(tmp_path / "pair.zarr"), FeatureStore.open(tmp_path / "pair.zarr")
    second.write_shard(2, *features(range(4, 5)))
    first.write_shard(0, *features(range(0, 2)))
    second.write_shard(1, *features(range(2, 4)))
    pair = FeatureStore.open(tmp_path / "pair.zarr")
    assert pair.missing_shards() == [] and first.missing_shards() == []
    np.testing.assert_array_equal(all_tokens(pair), all_tokens(single))
    files = {p.relative_to(tmp_path / "single.zarr") for p in (tmp_path / "single.zarr").rglob("*") if p.is_file()}
    assert files == {p.relative_to(tmp_path / "pair.zarr") for p in (tmp_path / "pair.zarr").rglob("*") if p.is_file()}


def test_partial_write_leaves_the_rest_missing_and_unreadable(tmp_path):
    store = create(tmp_path / "s.zarr", 5)
    store.write_shard(1, *features(range(2, 4)))
    assert store.missing_shards() == [(0, range(0, 2)), (2, range(4, 5))]
    np.testing.assert_allclose(store.read("img002")[0], features(range(2, 3))[0][0], atol=1e-3)
    with pytest.raises(FeatureStoreError, match=r"the features of images \['img000'\] are not computed yet"):
        store.read(["img002", "img000"])


def test_appending_images_keeps_old_rows_and_computes_only_new_ones(tmp_path):
    path = tmp_path / "s.zarr"
    write_missing(create(path, 3))  # shard 1 holds row 2 and has room for one more
    before = all_tokens(FeatureStore.open(path))
    grown = FeatureStore.create_or_open(
        path, image_ids=ids(3, start=4) + ids(3), transforms=transforms(3, start=4) + transforms(3),
        grid=GRID, dim=DIM, key_params=PARAMS, shard_size=7,
    )  # fmt: skip
    assert grown.image_ids == ids(3) + ids(3, start=4) and grown.shard_size == 2
    assert grown.missing_shards() == [(1, range(3, 4)), (2, range(4, 6))]
    np.testing.assert_array_equal(grown.read([0, 1, 2])[0], before)
    grown.write_shard(1, *features(range(3, 4), seed=7))
    grown.write_shard(2, *features(range(4, 6), seed=7))
    tokens = all_tokens(FeatureStore.open(path))
    np.testing.assert_array_equal(tokens[:3], before)
    np.testing.assert_allclose(tokens[3:], features(range(3, 6), seed=7)[0], atol=1e-3)
    assert (
        FeatureStore.create_or_open(
            path, image_ids=ids(2), transforms=transforms(2), grid=GRID, dim=DIM, key_params=PARAMS
        ).n_images
        == 6
    )


def test_reopening_with_other_settings_or_transforms_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    create(path, 2)
    with pytest.raises(FeatureStoreError, match=r"made with other settings \(dim: stored 5, requested 6\)"):
        create(path, 2, dim=6)
    with pytest.raises(FeatureStoreError, match=r"backbone: stored .*'random:0'.*requested .*'random:1'"):
        create(path, 2, key_params=PARAMS | {"weights": "random:1"})
    with pytest.raises(FeatureStoreError, match=r"image 'img000' is stored with canvas transform \{'width': 20"):
        FeatureStore.create_or_open(
            path,
            image_ids=ids(2),
            transforms=transforms(2, start=1),
            grid=GRID,
            dim=DIM,
            key_params=PARAMS,
        )
    with pytest.raises(FeatureStoreError, match=r"duplicate image ids \['img000'\]"):
        FeatureStore.create_or_open(
            path, image_ids=ids(1) * 2, transforms=transforms(2), grid=GRID, dim=DIM, key_params=PARAMS
        )
    with pytest.raises(FeatureStoreError, match="no feature store here; run the features stage first"):
        FeatureStore.open(tmp_path / "absent.zarr")


def test_write_shard_checks_rows_shapes_and_float16_range(tmp_path):
    store = create(tmp_path / "s.zarr", 5)
    with pytest.raises(FeatureStoreError, match=r"shard 1 has rows 2-3, 0 of them done; got 1 rows, expected 2 to 2"):
        store.write_shard(1, *features(range(3, 4)))
    tokens, valid = features(range(0, 2))
    with pytest.raises(FeatureStoreError, match=r"valid must have shape \[2, 2, 3\], got \[2, 3, 2\]"):
        store.write_shard(0, tokens, valid.reshape(2, 3, 2))
    with pytest.raises(FeatureStoreError, match=r"tokens of images \['img001'\] are not finite in float16"):
        store.write_shard(0, np.concatenate([tokens[:1], tokens[1:] * 1e6]), valid)
    assert store.missing_shards()[0] == (0, range(0, 2))


def shard_file(path: Path, shard: int) -> Path:
    return path / "tokens" / "c" / str(shard) / "0" / "0" / "0"


def test_a_corrupted_chunk_is_reported_then_recomputed(tmp_path):
    path = tmp_path / "s.zarr"
    write_missing(create(path, 5))
    chunk_bytes = 2 * GRID[0] * GRID[1] * DIM + 4  # float16 values, then the crc32c
    with shard_file(path, 1).open("r+b") as file:  # row 3 is the second chunk of shard 1
        file.seek(chunk_bytes + 10)
        file.write(b"\xde\xad\xbe\xef")
    store = FeatureStore.open(path)
    np.testing.assert_allclose(store.read("img002")[0], features(range(2, 3))[0][0], atol=1e-3)
    message = re.escape(str(path)) + r": the stored features of image 'img003' \(row 3, shard 1\) fails its checksum"
    with pytest.raises(CorruptFeaturesError, match=message) as caught:
        store.read(ids(5))
    assert caught.value.shard == 1
    assert store.verify() == [1]
    assert store.missing_shards() == [(1, range(2, 4))]
    with pytest.raises(FeatureStoreError, match="not computed yet"):
        store.read("img003")
    write_missing(store)
    assert store.verify() == []
    np.testing.assert_allclose(all_tokens(FeatureStore.open(path)), features(range(5))[0], atol=1e-3)


def test_a_vanished_shard_file_is_caught_by_read_and_verify(tmp_path):
    path = tmp_path / "s.zarr"
    write_missing(create(path, 5))
    shard_file(path, 2).unlink()
    store = FeatureStore.open(path)
    with pytest.raises(CorruptFeaturesError, match=r"image 'img004' \(row 4, shard 2\) was never written"):
        store.read("img004")
    assert store.verify() == [2] and store.missing_shards() == [(2, range(4, 5))]


def test_an_interrupted_creation_is_redone(tmp_path):
    path = tmp_path / "s.zarr"
    zarr.open_group(str(path), mode="w").create_array("tokens", shape=(1,), dtype="float16")
    with pytest.raises(FeatureStoreError, match="not a complete feature store of format 1"):
        FeatureStore.open(path)
    store = create(path, 3)
    assert store.missing_shards() == [(0, range(0, 2)), (1, range(2, 3))]


@pytest.mark.parametrize("shard", [1, 2])  # a full shard, and the last one (partly outside the array)
def test_a_damaged_shard_index_is_set_aside_when_the_shard_is_rewritten(tmp_path, shard):
    path = tmp_path / "s.zarr"
    write_missing(create(path, 5))
    data = bytearray(shard_file(path, shard).read_bytes())
    data[-6] ^= 0xFF  # inside the index at the end of the shard file
    shard_file(path, shard).write_bytes(bytes(data))
    store = FeatureStore.open(path)
    rows = store.shards()[shard][1]
    store.write_shard(shard, *features(rows, seed=1))  # what --force does: no loop on the damaged index
    aside = shard_file(path, shard).with_name(f".{shard_file(path, shard).name}.damaged")
    assert aside.read_bytes() == bytes(data)
    np.testing.assert_allclose(store.read(list(rows))[0], features(rows, seed=1)[0], atol=1e-3)
    assert store.verify() == []


def test_a_pickled_corrupt_features_error_keeps_its_shard():
    error = pickle.loads(pickle.dumps(CorruptFeaturesError("s.zarr: image 'a' (shard 3) fails", 3)))
    assert (str(error), error.shard) == ("s.zarr: image 'a' (shard 3) fails", 3)
