"""The data-set store: what it accepts, what it converts, and every archive it must refuse."""
from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import tempfile
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from munet.storage import datasets
from munet.storage.datasets import DatasetError, DatasetInfo, delete, ingest, load

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}
MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


# --------------------------------------------------------------------------- helpers


def make_tree(root: Path, counts=None, size=(8, 8), mode="RGB") -> Path:
    """root/<class>/<i>.png, each class one flat colour so labels can be checked."""
    counts = counts or {"cat": 5, "dog": 5}
    for name, n in counts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = COLOURS[name] if mode == "RGB" else sum(COLOURS[name]) // 3
        for i in range(n):
            Image.new(mode, size, colour).save(folder / f"{i}.png")
    return root


def zip_bytes(tree: Path, top: str = "top") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                zf.write(path, f"{top}/{path.relative_to(tree).as_posix()}")
    return buf.getvalue()


def tar_bytes(tree: Path, mode: str = "w:gz", top: str = "top") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        tar.add(tree, arcname=top)
    return buf.getvalue()


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def synthetic_arrays(n_train=12, n_test=4, k=3, shape=(6, 5)):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": (np.arange(n_train) % k).astype(np.int16),
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": (np.arange(n_test) % k).astype(np.int16),
        "classes": np.array([f"c{i}" for i in range(k)]),
    }


def stored_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file()] if store.exists() else []


def assert_refused(source, store: Path, match: str, **kwargs) -> DatasetError:
    """The upload is refused with a message naming the problem, and the store stays empty."""
    with pytest.raises(DatasetError, match=match) as caught:
        ingest(source, str(store), **kwargs)
    assert stored_files(store) == []
    return caught.value


def assert_colour_labels(arrays, classes):
    for x, y in (("x_train", "y_train"), ("x_test", "y_test")):
        for image, label in zip(arrays[x], arrays[y]):
            assert tuple(image[0, 0]) == COLOURS[classes[label]]


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


# ------------------------------------------------------------------------ round trips


def test_folder_round_trip_keeps_counts_classes_shapes_and_labels(tmp_path, store):
    tree = make_tree(tmp_path / "data", {"cat": 5, "dog": 10})
    info = ingest(tree, str(store))
    assert info.classes == ["cat", "dog"]
    assert (info.n_train, info.n_test) == (12, 3)
    assert info.train_counts == [4, 8]
    assert info.image_shape == (8, 8, 3)
    stored = store / f"{info.digest}.npz"
    assert stored_files(store) == [stored]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == info.digest
    arrays = load(str(store), info.digest)
    assert arrays["x_train"].shape == (12, 8, 8, 3) and arrays["x_train"].dtype == np.uint8
    assert arrays["y_train"].dtype == np.int64 and arrays["y_test"].dtype == np.int64
    assert arrays["classes"].dtype.kind == "U" and arrays["classes"].tolist() == ["cat", "dog"]
    assert_colour_labels(arrays, info.classes)


def test_carved_split_is_stratified_with_a_test_image_per_class(tmp_path, store):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 3, "eel": 10})
    info = ingest(tree, str(store))
    arrays = load(str(store), info.digest)
    assert np.bincount(arrays["y_test"]).tolist() == [1, 1, 2]
    assert info.train_counts == [1, 2, 8]


def test_carved_split_depends_on_the_seed_only(tmp_path, store):
    tree = tmp_path / "data"
    for name in ("cat", "dog"):
        (tree / name).mkdir(parents=True)
        for i in range(10):  # distinct images, so the split shows in the pixels
            Image.new("L", (4, 4), i * 20).save(tree / name / f"{i}.png")
    first = ingest(tree, str(store), seed=1)
    assert ingest(tree, str(store), seed=1).digest == first.digest
    assert ingest(tree, str(store), seed=2).digest != first.digest


def test_train_and_test_folders_are_kept_as_given(tmp_path, store):
    make_tree(tmp_path / "data" / "train", {"cat": 3, "dog": 4})
    make_tree(tmp_path / "data" / "test", {"cat": 2, "dog": 1})
    info = ingest(tmp_path / "data", str(store))
    assert (info.n_train, info.n_test, info.train_counts) == (7, 3, [3, 4])
    assert_colour_labels(load(str(store), info.digest), info.classes)


def test_train_and_test_folders_must_hold_the_same_classes(tmp_path, store):
    make_tree(tmp_path / "data" / "train", {"cat": 3, "dog": 4})
    make_tree(tmp_path / "data" / "test", {"cat": 2, "eel": 1})
    assert_refused(tmp_path / "data", store, "same classes")


def test_zip_with_tree_under_one_top_folder(tmp_path, store):
    archive = tmp_path / "upload.zip"
    archive.write_bytes(zip_bytes(make_tree(tmp_path / "data")))
    info = ingest(archive, str(store))
    assert info.classes == ["cat", "dog"] and info.n_train + info.n_test == 10
    assert_colour_labels(load(str(store), info.digest), info.classes)


@pytest.mark.parametrize("name, mode", [("upload.tar", "w"), ("upload.tar.gz", "w:gz"),
                                        ("upload.tgz", "w:gz")])
def test_tar_with_tree_under_one_top_folder(tmp_path, store, name, mode):
    archive = tmp_path / name
    archive.write_bytes(tar_bytes(make_tree(tmp_path / "data"), mode))
    info = ingest(archive, str(store))
    assert info.classes == ["cat", "dog"] and info.n_train + info.n_test == 10


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "npz"])
@pytest.mark.parametrize("named", [True, False])
def test_bytes_input_is_read_by_name_or_by_sniffing(tmp_path, store, kind, named):
    if kind == "npz":
        data = npz_bytes(**synthetic_arrays())
    elif kind == "zip":
        data = zip_bytes(make_tree(tmp_path / "data"))
    else:
        data = tar_bytes(make_tree(tmp_path / "data"), "w" if kind == "tar" else "w:gz")
    info = ingest(data, str(store), filename=f"upload.{kind}" if named else None)
    assert info.n_train + info.n_test in (10, 16)
    assert len(stored_files(store)) == 1


def test_npz_round_trip_adds_the_channel_axis(tmp_path, store):
    arrays = synthetic_arrays()
    path = tmp_path / "set.npz"
    np.savez_compressed(path, **arrays)
    info = ingest(path, str(store))
    assert info.image_shape == (6, 5, 1) and info.classes == ["c0", "c1", "c2"]
    assert (info.n_train, info.n_test, info.train_counts) == (12, 4, [4, 4, 4])
    back = load(str(store), info.digest)
    np.testing.assert_array_equal(back["x_train"][..., 0], arrays["x_train"])
    np.testing.assert_array_equal(back["y_test"], arrays["y_test"])
    assert back["y_train"].dtype == np.int64


def test_same_data_gives_the_same_digest_and_one_file(tmp_path, store):
    tree = make_tree(tmp_path / "data")
    first = ingest(tree, str(store))
    again = ingest(tree, str(store))
    zipped = ingest(zip_bytes(tree), str(store))
    assert first.digest == again.digest == zipped.digest
    assert first == again
    assert stored_files(store) == [store / f"{first.digest}.npz"]


def test_info_serialises_to_json(tmp_path, store):
    info = ingest(make_tree(tmp_path / "data"), str(store))
    doc = json.loads(json.dumps(info.to_json()))
    assert doc["classes"] == ["cat", "dog"] and doc["image_shape"] == [8, 8, 3]
    assert DatasetInfo(**{**doc, "image_shape": tuple(doc["image_shape"])}) == info


def test_load_verifies_the_hash(tmp_path, store):
    info = ingest(make_tree(tmp_path / "data"), str(store))
    stored = store / f"{info.digest}.npz"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupt"):
        load(str(store), info.digest)


def test_load_refuses_digests_that_are_not_sha256(store):
    with pytest.raises(DatasetError, match="not a data-set digest"):
        load(str(store), "../../etc/passwd")
    with pytest.raises(DatasetError, match="not in the data-set store"):
        load(str(store), "0" * 64)


def test_delete_removes_the_file_and_can_be_repeated(tmp_path, store):
    info = ingest(make_tree(tmp_path / "data"), str(store))
    delete(str(store), info.digest)
    assert stored_files(store) == []
    delete(str(store), info.digest)
    with pytest.raises(DatasetError):
        delete(str(store), "x/../y")


# ------------------------------------------------------------------- image conversion


def test_mixed_sizes_are_resized_to_the_median_side(tmp_path, store):
    tree = tmp_path / "data"
    for name, sizes in {"cat": [(8, 8), (12, 12)], "dog": [(16, 10), (20, 4), (12, 6)]}.items():
        (tree / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.new("RGB", size, COLOURS[name]).save(tree / name / f"{i}.png")
    info = ingest(tree, str(store))
    assert info.image_shape == (12, 12, 3)  # median of the longer sides 8, 12, 16, 20, 12
    assert_colour_labels(load(str(store), info.digest), info.classes)


def test_mixed_sizes_are_capped_at_max_side(tmp_path, store):
    tree = make_tree(tmp_path / "data", {"cat": 2}, size=(30, 30))
    make_tree(tree, {"dog": 2}, size=(40, 20))
    assert ingest(tree, str(store), max_side=16).image_shape == (16, 16, 3)


def test_shared_size_above_max_side_is_scaled_down_keeping_its_aspect(tmp_path, store):
    tree = make_tree(tmp_path / "data", size=(40, 20))
    assert ingest(tree, str(store), max_side=16).image_shape == (8, 16, 3)


def test_greyscale_images_keep_one_channel(tmp_path, store):
    info = ingest(make_tree(tmp_path / "data", mode="L"), str(store))
    assert info.image_shape == (8, 8, 1)


def test_greyscale_mixed_with_colour_becomes_rgb(tmp_path, store):
    tree = make_tree(tmp_path / "data", {"cat": 3}, mode="L")
    make_tree(tree, {"dog": 3})
    arrays = load(str(store), ingest(tree, str(store)).digest)
    assert arrays["x_train"].shape[-1] == 3
    grey = sum(COLOURS["cat"]) // 3
    cats = arrays["x_train"][arrays["y_train"] == 0]
    assert (cats == grey).all()


def test_one_pixel_images_are_accepted(tmp_path, store):
    info = ingest(make_tree(tmp_path / "data", size=(1, 1)), str(store))
    assert info.image_shape == (1, 1, 3)


def test_unusual_image_modes_are_converted(tmp_path, store):
    """CMYK JPEG, 16-bit PNG, RGBA PNG, palette PNG and animated GIF become 8-bit RGB."""
    tree = make_tree(tmp_path / "data", {"dog": 2})
    odd = tree / "cat"
    odd.mkdir()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(odd / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(odd / "deep.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(odd / "alpha.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).convert("P").save(odd / "palette.png")
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(odd / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(odd / "deep.png") as im:
        assert im.mode.startswith("I")  # the file really is 16-bit
    info = ingest(tree, str(store), seed=3)
    assert info.image_shape == (8, 8, 3)
    arrays = load(str(store), info.digest)
    x = np.concatenate([arrays["x_train"], arrays["x_test"]])
    y = np.concatenate([arrays["y_train"], arrays["y_test"]])
    pixels = sorted(tuple(int(v) for v in image[0, 0]) for image in x[y == 0])
    # alpha.png on black, anim.gif's first frame, cmyk.jpg (lossy), deep.png, palette.png
    expected = sorted([(128, 0, 0), (255, 0, 0), (255, 0, 0), (156, 156, 156), (0, 255, 0)])
    np.testing.assert_allclose(pixels, expected, atol=12)


def test_hidden_files_and_macos_folders_are_ignored(tmp_path, store):
    tree = make_tree(tmp_path / "data")
    (tree / ".DS_Store").write_bytes(b"\0junk")
    (tree / "cat" / "._0.png").write_bytes(b"appledouble")
    (tree / "__MACOSX" / "cat").mkdir(parents=True)
    (tree / "__MACOSX" / "cat" / "._0.png").write_bytes(b"appledouble")
    info = ingest(tree, str(store))
    assert info.classes == ["cat", "dog"] and info.n_train + info.n_test == 10


def test_mnist_from_shared_data(store):
    if not MNIST.exists():
        pytest.skip(f"{MNIST} is absent")
    info = ingest(MNIST, str(store))
    assert info.n_train == 5000 and len(info.classes) == 10
    assert info.image_shape == (32, 32, 1)
    assert sum(info.train_counts) == 5000


# ------------------------------------------------------------- archives that must fail


def zip_with(tmp_path, name: str, data: bytes = b"x", attr: int | None = None) -> bytes:
    """A valid image zip plus one extra entry written verbatim."""
    tree = make_tree(tmp_path / "data")
    buf = io.BytesIO(zip_bytes(tree))
    with zipfile.ZipFile(buf, "a") as zf:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        if attr is not None:
            info.create_system = 3
            info.external_attr = attr << 16
        zf.writestr(info, data)
    return buf.getvalue()


def test_zip_slip_name_is_refused(tmp_path, store):
    name = f"evil-{uuid.uuid4().hex}.png"
    data = zip_with(tmp_path, f"top/cat/../../../{name}")
    assert_refused(data, store, r"climbs out .*'\.\.'")
    assert not (Path(tempfile.gettempdir()) / name).exists()


def test_absolute_zip_name_is_refused(tmp_path, store):
    target = tmp_path / f"evil-{uuid.uuid4().hex}.png"
    assert_refused(zip_with(tmp_path, str(target)), store, "absolute path")
    assert not target.exists()


def test_zip_symlink_entry_is_refused(tmp_path, store):
    data = zip_with(tmp_path, "top/cat/link.png", b"/etc/passwd", stat.S_IFLNK | 0o777)
    assert_refused(data, store, "symbolic link")


def test_zip_bomb_is_refused_before_extraction(tmp_path, store):
    data = zip_with(tmp_path, "top/cat/big.png", bytes(10 * 1024**2))
    assert len(data) < 1024**2  # small on the wire, 10 MB when expanded
    assert_refused(data, store, "expands to more than", max_bytes=1024**2)


def test_zip_whose_headers_understate_sizes_is_refused(tmp_path, store):
    data = bytearray(zip_with(tmp_path, "top/cat/big.png", bytes(200_000)))
    # Rewrite the central directory's uncompressed size of the big entry to 10 bytes.
    at = data.rfind(b"PK\x01\x02")
    assert data[at + 46:at + 46 + 15] == b"top/cat/big.png"
    data[at + 24:at + 28] = (10).to_bytes(4, "little")
    assert_refused(bytes(data), store, "could not be read", max_bytes=100_000)


@pytest.mark.parametrize("kind, match", [
    (tarfile.CHRTYPE, "character device"),
    (tarfile.SYMTYPE, "symbolic link"),
    (tarfile.LNKTYPE, "hard link"),
    (tarfile.FIFOTYPE, "FIFO"),
])
def test_tar_with_special_entries_is_refused(tmp_path, store, kind, match):
    buf = io.BytesIO(tar_bytes(make_tree(tmp_path / "data"), "w"))
    with tarfile.open(fileobj=buf, mode="a") as tar:
        info = tarfile.TarInfo("top/cat/special.png")
        info.type = kind
        info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "top/cat/0.png"
        info.devmajor, info.devminor = 1, 3
        tar.addfile(info)
    assert_refused(buf.getvalue(), store, match, filename="upload.tar")


def test_tar_entry_climbing_out_is_refused(tmp_path, store):
    buf = io.BytesIO(tar_bytes(make_tree(tmp_path / "data"), "w"))
    name = f"evil-{uuid.uuid4().hex}.png"
    with tarfile.open(fileobj=buf, mode="a") as tar:
        tar.addfile(tarfile.TarInfo(f"top/../../{name}"), io.BytesIO(b""))
    assert_refused(buf.getvalue(), store, r"'\.\.'")
    assert not (Path(tempfile.gettempdir()) / name).exists()


def test_tar_bigger_than_max_bytes_is_refused(tmp_path, store):
    tree = make_tree(tmp_path / "data")
    (tree / "cat" / "big.png").write_bytes(bytes(300_000))
    assert_refused(tar_bytes(tree), store, "expands to more than", max_bytes=200_000)


def test_bytes_that_are_no_archive_are_refused(store):
    assert_refused(b"hello, world" * 100, store, "not a zip, tar or npz")


# ----------------------------------------------------------------- trees that must fail


def test_non_image_file_in_a_class_folder_is_refused(tmp_path, store):
    tree = make_tree(tmp_path / "data")
    (tree / "cat" / "README.txt").write_text("these are cats\n")
    assert_refused(tree, store, "cat/README.txt")


def test_file_beside_the_class_folders_is_refused(tmp_path, store):
    tree = make_tree(tmp_path / "data")
    (tree / "labels.csv").write_text("a,b\n")
    assert_refused(tree, store, "labels.csv' is a file outside any class folder")


def test_truncated_png_is_refused(tmp_path, store):
    tree = make_tree(tmp_path / "data")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    (tree / "dog" / "broken.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert_refused(tree, store, "dog/broken.png")


def test_zero_byte_image_is_refused(tmp_path, store):
    tree = make_tree(tmp_path / "data")
    (tree / "dog" / "empty.png").write_bytes(b"")
    assert_refused(tree, store, "dog/empty.png' is empty")


def test_images_with_too_many_pixels_are_refused(tmp_path, store, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_PIXELS", 50)
    assert_refused(make_tree(tmp_path / "data"), store, "8x8 pixels, more than")


def test_single_class_is_refused(tmp_path, store):
    tree = make_tree(tmp_path / "data", {"cat": 5})
    assert_refused(tree, store, "at least 2 classes")
    assert_refused(zip_bytes(tree), store, "at least 2 classes")


def test_empty_class_folder_is_refused(tmp_path, store):
    tree = make_tree(tmp_path / "data")
    (tree / "eel").mkdir()
    assert_refused(tree, store, "class folder 'eel' holds no images")


def test_zero_images_are_refused(tmp_path, store):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "dog").mkdir()
    assert_refused(tmp_path / "data", store, "holds no images")
    arrays = synthetic_arrays(n_train=0, n_test=0)
    assert_refused(npz_bytes(**arrays), store, "holds no images")


def test_more_images_than_max_images_are_refused(tmp_path, store):
    assert_refused(make_tree(tmp_path / "data"), store, "more than the 9 allowed", max_images=9)


# ------------------------------------------------------------------- npz that must fail


def test_npz_label_count_must_match_image_count(store):
    arrays = synthetic_arrays()
    arrays["y_train"] = arrays["y_train"][:-1]
    assert_refused(npz_bytes(**arrays), store, "x_train has 12 images but y_train has 11 labels")


def test_npz_label_out_of_range_is_refused(store):
    arrays = synthetic_arrays()
    arrays["y_test"][1] = 7
    assert_refused(npz_bytes(**arrays), store, "y_test holds label 7")


class _Booby:
    """Unpickling this creates a file: proof that nothing was unpickled if it is absent."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path, store):
    trap = tmp_path / "unpickled"
    arrays = synthetic_arrays()
    arrays["x_train"] = np.array([_Booby(trap)] * 12, dtype=object)
    assert_refused(npz_bytes(**arrays), store, "Python objects")
    arrays = synthetic_arrays()
    arrays["classes"] = np.array([_Booby(trap), "a", "b"], dtype=object)
    assert_refused(npz_bytes(**arrays), store, "Python objects")
    assert not trap.exists()


def test_npz_missing_an_array_is_refused(store):
    arrays = synthetic_arrays()
    del arrays["x_test"]
    assert_refused(npz_bytes(**arrays), store, "no 'x_test' array")


def test_npz_float_images_are_refused(store):
    arrays = synthetic_arrays()
    arrays["x_train"] = arrays["x_train"].astype(np.float32) / 255
    assert_refused(npz_bytes(**arrays), store, "uint8")


def test_npz_duplicate_class_names_are_refused(store):
    arrays = synthetic_arrays()
    arrays["classes"] = np.array(["a", "b", "a"])
    assert_refused(npz_bytes(**arrays), store, "'a' appears twice")


def test_npz_class_without_training_images_is_refused(store):
    arrays = synthetic_arrays()
    arrays["y_train"][:] = 0
    assert_refused(npz_bytes(**arrays), store, "class 'c1' has no training images")


def test_npz_images_of_different_shapes_are_refused(store):
    arrays = synthetic_arrays()
    arrays["x_test"] = arrays["x_test"][:, :3]
    assert_refused(npz_bytes(**arrays), store, "x_test images are")
