import numpy as np
import pytest

from biovfm.data.medmnist import NpzFormatError, TASKS, load_npz, task_info
from biovfm.data.preprocess import evaluation_hashes, preprocess_corpus, preprocess_task, resize_images
from biovfm.data.store import load_store, write_store
from biovfm.data.synthetic import generate_task
from biovfm.io import write_npz


def _task(flag="pathmnist", size=16):
    return generate_task(flag, 30, 20, 30, size=size, seed=0)


def test_all_twelve_tasks_follow_the_medmnist_metadata():
    assert len(TASKS) == 12
    assert [f for f, t in TASKS.items() if t.n_channels == 3] == ["pathmnist", "dermamnist", "retinamnist", "bloodmnist"]
    assert task_info("chestmnist").label_columns == 14 and task_info("breastmnist").n_outputs == 2


@pytest.mark.parametrize(
    "corrupt, needle",
    [
        (lambda d: d.pop("val_labels"), "missing ['val_labels']"),
        (lambda d: d.update(test_images=d["test_images"].astype(np.float32)), "test_images has dtype float32, expected uint8"),
        (lambda d: d.update(train_labels=d["train_labels"] + 20), "train_labels has values in"),
        (lambda d: d.update(val_labels=d["val_labels"][:5]), "val_labels has shape (5, 1), expected (20, L)"),
        (lambda d: d.update(train_images=d["train_images"][..., 0]), "train_images has 1 channel(s), task pathmnist expects 3"),
    ],
)
def test_bad_npz_gets_a_clear_error_naming_the_file(tmp_path, corrupt, needle):
    data = _task()
    corrupt(data)
    path = tmp_path / "pathmnist.npz"
    write_npz(path, **data)
    with pytest.raises(NpzFormatError) as e:
        load_npz(path, task_info("pathmnist"))
    assert str(path) in str(e.value) and needle in str(e.value)


def test_truncated_npz_is_detected(tmp_path):
    path = tmp_path / "x.npz"
    write_npz(path, **_task())
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(NpzFormatError, match="not a readable npz"):
        load_npz(path)
    with pytest.raises(FileNotFoundError, match="run the download/preprocess stage"):
        load_npz(tmp_path / "absent.npz")


@pytest.mark.parametrize("size", [28, 64, 128, 224])
def test_tasks_resize_to_any_study_size(tmp_path, size):
    raw = tmp_path / "raw.npz"
    write_npz(raw, **_task("octmnist"))
    out = tmp_path / f"octmnist_{size}.npz"
    preprocess_task(raw, out, "octmnist", size)
    data = load_npz(out, task_info("octmnist"))
    assert data["train_images"].shape[1:] == (size, size) and data["train_images"].dtype == np.uint8
    assert np.array_equal(data["train_labels"], _task("octmnist")["train_labels"])


@pytest.mark.parametrize("size", [16, 28])  # resized, and copied at equal size
def test_task_preprocessing_matches_the_in_memory_resize_byte_for_byte_deterministic(tmp_path, size):
    """Streamed output: the arrays of a whole-task resize, stored uncompressed (memory-mappable), the same bytes
    from a stored or a deflated raw file, whatever the chunk."""
    task = generate_task("pathmnist", 50, 20, 30, size=28, seed=0)
    write_npz(tmp_path / "raw.npz", **task)
    np.savez_compressed(tmp_path / "raw_deflated.npz", **task)
    preprocess_task(tmp_path / "raw.npz", tmp_path / "a.npz", "pathmnist", size, chunk=7)
    out = load_npz(tmp_path / "a.npz", task_info("pathmnist"), mmap=True)
    assert all(isinstance(out[f"{s}_images"], np.memmap) for s in ("train", "val", "test"))
    with np.load(tmp_path / "a.npz") as z:
        assert z.files == [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
        for key, ref in task.items():
            want = resize_images(ref, size) if key.endswith("_images") else ref
            assert z[key].dtype == want.dtype and np.array_equal(z[key], want) and np.array_equal(out[key], want), key
    preprocess_task(tmp_path / "raw_deflated.npz", tmp_path / "b.npz", "pathmnist", size)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_streamed_npz_refuses_rows_that_do_not_fit_and_leaves_no_file(tmp_path):
    from biovfm.io import stream_npz

    with pytest.raises(ValueError, match=r"x\.npz: a: 2 of 3 rows written"):
        with stream_npz(tmp_path / "x.npz") as out, out.member("a", (3, 2), np.uint8) as put:
            put(np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"x\.npz: a: got int64 rows \(2, 2\) after 0 rows; the member is declared uint8"):
        with stream_npz(tmp_path / "x.npz") as out, out.member("a", (3, 2), np.uint8) as put:
            put(np.zeros((2, 2), np.int64))
    assert list(tmp_path.iterdir()) == []


def test_task_preprocessing_memory_is_bounded_by_the_chunk(tmp_path):
    """A 41 MB task is resized with a few chunks' worth of memory (PathMNIST-224 holds ~16 GB of pixels)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    splits = {"train": 6_000, "val": 2_000, "test": 2_000}
    raw = tmp_path / "octmnist_64.npz"
    write_npz(raw, **{k: v for s, n in splits.items() for k, v in (
        (f"{s}_images", rng.integers(0, 256, (n, 64, 64), dtype=np.uint8)),
        (f"{s}_labels", rng.integers(0, 4, (n, 1))))})
    task_bytes, chunk_bytes = sum(splits.values()) * 64 * 64, 128 * 64 * 64
    tracemalloc.start()
    try:
        preprocess_task(raw, tmp_path / "out.npz", "octmnist", 32, chunk=128)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < min(task_bytes / 10, 8 * chunk_bytes), f"peak {peak / 1e6:.1f} MB, task {task_bytes / 1e6:.1f} MB"
    assert load_npz(tmp_path / "out.npz", task_info("octmnist"), mmap=True)["train_images"].shape == (6_000, 32, 32)


def test_resize_keeps_rgb_and_identity_at_equal_size():
    x = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert resize_images(x, 16) is x and resize_images(x, 32).shape == (3, 32, 32, 3)


def test_store_drops_exact_duplicates(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    x[3] = x[1]
    counts = write_store(tmp_path, x, np.full(5, "s"), np.array(["ct"] * 5))
    assert counts == {"read": 5, "duplicates": 1, "kept": 4}
    assert len(load_store(tmp_path)) == 4


def test_corpus_leaking_an_evaluation_image_fails_preprocess(tmp_path):
    task = _task("octmnist")
    write_npz(tmp_path / "octmnist_16.npz", **task)
    images = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    images[2] = np.repeat(task["test_images"][4][..., None], 3, axis=-1)  # a test image slipped into the corpus
    write_npz(tmp_path / "corpus.npz", images=images, modality=np.array(["oct"] * 6))
    synthetic = [{"name": "synthetic", "kind": "synthetic", "path": str(tmp_path / "corpus.npz")}]
    with pytest.raises(ValueError, match="1 corpus images are identical to evaluation images"):
        preprocess_corpus(synthetic, tmp_path / "store", 16, [tmp_path / "octmnist_16.npz"])
    assert not (tmp_path / "store").exists()  # nothing written that a scheduler could take as done
    assert len(evaluation_hashes([tmp_path / "octmnist_16.npz"])) == 80


def test_streamed_synthetic_corpus_equals_the_in_memory_store(tmp_path):
    """The default study's store: streaming, sharding and workers change nothing (rows, hashes, pixels, subsets)."""
    from biovfm.data.synthetic import MODALITIES, generate_corpus

    images, modality = generate_corpus(300, MODALITIES, size=16, seed=0)
    images[7] = images[2]
    write_npz(tmp_path / "corpus.npz", images=images, modality=np.asarray(modality, dtype=str))
    synthetic = [{"name": "synthetic", "kind": "synthetic", "path": str(tmp_path / "corpus.npz")}]
    report = preprocess_corpus(synthetic, tmp_path / "streamed", 16, workers=2, shard_size=64)
    assert report["sources"]["synthetic"]["duplicates"] == 1 and report["n_images"] == 299
    write_store(tmp_path / "memory", images, np.full(300, "synthetic"), modality)
    a, b = load_store(tmp_path / "streamed"), load_store(tmp_path / "memory")
    cols = ["source", "modality", "hash"]
    assert a.index[cols].equals(b.index[cols]) and np.array_equal(a.images[:], b.images[:])
    for mix, n in ((list(MODALITIES), 250), (["xray"], 20)):
        assert np.array_equal(a.subset(mix, n, seed=0), b.subset(mix, n, seed=0))
