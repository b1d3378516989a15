"""The data-set store: validate a submitted data set once, store it in one canonical form.

A task's data set arrives (DESIGN.md, data flow step 1) as an ImageFolder tree (a local
folder, or one inside a zip or tar archive) or as an ``.npz`` with ``x_train, y_train,
x_test, y_test, classes``. `ingest` decodes and checks every image, converts the whole set
to one canonical ``.npz`` (uint8 images [N,H,W,C] with C 1 or 3, int64 labels, a unicode
class array; never pickled objects) and stores it in the data-set store
(``MUNET_DATA_URL``, any fsspec URL) as ``<sha256>.npz``, so evolvers on other machines can
read it with `load`, which verifies the hash first.

Uploads are hostile input. Archives are checked entry by entry before anything is
extracted (no links, devices, absolute names or ``..``; declared sizes within the limit)
and are extracted only into a fresh temporary folder, with a running byte count that stops
lying headers. Images are opened only by a short list of PIL plugins, their pixel count is
checked before they are decoded, and ``.npy`` headers are checked before any array is
allocated. Every refusal is a `DatasetError` whose message is one sentence a user can act
on, and nothing reaches the store unless the whole data set passed.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import lzma
import os
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from .fsio import atomic_write, filesystem

__all__ = ["DatasetError", "DatasetInfo", "MAX_PIXELS", "delete", "ingest", "load"]

# Per-image cap, checked on the header's size before any pixel is decoded. PIL's own
# Image.MAX_IMAGE_PIXELS is left alone: it is a process-wide setting that other code (the
# server's /predict decoding) relies on, and its default (about 89M, error at twice that)
# is already above this cap, so it only acts as a backstop here.
MAX_PIXELS = 50_000_000

KEYS = ("x_train", "y_train", "x_test", "y_test", "classes")
TEST_FRACTION = 0.2

# Only common raster formats: some PIL plugins (EPS runs Ghostscript, for one) are no
# place for untrusted bytes. (The JPEG plugin also opens multi-picture MPO files.)
_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA")
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}  # more than 8 bits per pixel
_GREY_MODES = {"1", "L", "LA", "La"} | _WIDE_MODES
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_JUNK_FILES = {"thumbs.db", "desktop.ini"}  # written by Windows Explorer into any folder
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_EXTRA_ENTRIES = 10_000  # archive entries allowed beyond max_images: folders, ignored files
_CHUNK = 1 << 20
# Fixed zip timestamps make the canonical bytes, hence the digest, depend on content only.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# What zipfile, tarfile and their decompressors raise on damaged or hostile archives.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError,
                   OSError, zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError)


class DatasetError(ValueError):
    """A data set the store refuses; the message is one sentence a user can act on."""


@dataclass(frozen=True)
class DatasetInfo:
    """What `ingest` stored: the digest that names the file and the data set's shape."""

    digest: str
    classes: list[str]
    n_train: int
    n_test: int
    image_shape: tuple[int, int, int]
    train_counts: list[int]

    def to_json(self) -> dict:
        return {
            "digest": self.digest,
            "classes": list(self.classes),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "image_shape": list(self.image_shape),
            "train_counts": list(self.train_counts),
        }


@dataclass(frozen=True)
class _Options:
    max_bytes: int
    max_images: int
    max_side: int
    seed: int

    @property
    def max_entries(self) -> int:
        return self.max_images + _EXTRA_ENTRIES


# ---------------------------------------------------------------------------- public API


def ingest(source: str | os.PathLike | bytes, data_url: str, *, filename: str | None = None,
           max_bytes: int = 2 * 1024**3, max_images: int = 200_000, max_side: int = 224,
           seed: int = 0) -> DatasetInfo:
    """Validate `source`, store it canonically under `data_url` and describe it.

    `source` is a local ImageFolder folder, a path to a zip/tar/npz file, or the raw bytes
    of one (`filename`, when given, names the format; otherwise the bytes are sniffed).
    Ingesting the same content twice gives the same digest and writes nothing new.
    """
    opts = _Options(max_bytes, max_images, max_side, seed)
    arrays = _read_source(source, filename, opts)
    _check_arrays(arrays, opts)
    data = _canonical_npz(arrays)
    digest = hashlib.sha256(data).hexdigest()
    fs, root = filesystem(os.fspath(data_url))
    path = f"{root}/{digest}.npz"
    if not fs.exists(path):  # content-addressed: an existing file already holds these bytes
        atomic_write(fs, path, data)
    return _describe(digest, arrays)


def load(data_url: str, digest: str) -> dict[str, np.ndarray]:
    """The stored arrays (x_train, y_train, x_test, y_test, classes), hash verified."""
    fs, path = _blob_path(data_url, digest)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise DatasetError(f"data set {digest} is not in the data-set store") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise DatasetError(f"data set {digest} is corrupt: its bytes no longer match their sha256")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {key: npz[key] for key in KEYS}


def delete(data_url: str, digest: str) -> None:
    """Remove a stored data set; deleting one that is already gone is not an error."""
    fs, path = _blob_path(data_url, digest)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def _blob_path(data_url: str, digest: str):
    # The digest may come from a request: only a bare sha256 may become part of a path.
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise DatasetError(f"{digest!r} is not a data-set digest (64 lowercase hex digits)")
    fs, root = filesystem(os.fspath(data_url))
    return fs, f"{root}/{digest}.npz"


# ------------------------------------------------------------------------- source kinds


def _read_source(source, filename: str | None, opts: _Options) -> dict[str, np.ndarray]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_source_size(len(source), opts)
        return _read_stream(io.BytesIO(source), filename, opts)
    path = Path(source)
    if path.is_dir():
        return _read_tree(path, opts)
    if not path.is_file():
        raise DatasetError(f"'{path}' is neither a file nor a folder")
    _check_source_size(path.stat().st_size, opts)
    with path.open("rb") as f:
        return _read_stream(f, filename or path.name, opts)


def _check_source_size(size: int, opts: _Options) -> None:
    if size > opts.max_bytes:
        raise DatasetError(f"the upload is {size:,} bytes, more than the "
                           f"{opts.max_bytes:,} allowed")


def _read_stream(f: BinaryIO, filename: str | None, opts: _Options) -> dict[str, np.ndarray]:
    kind = _sniff(f, filename)
    with _translate_errors("archive"):
        if kind == "tar":
            with _open_tar(f, filename) as tar:
                return _read_tar(tar, opts)
        with zipfile.ZipFile(f) as zf:
            # An npz is itself a zip; its first array tells it apart from an image archive.
            if kind == "npz" or "x_train.npy" in zf.namelist():
                return _read_npz(zf, f, opts)
            return _read_zip(zf, opts)


def _sniff(f: BinaryIO, filename: str | None) -> str:
    """'npz', 'zip' or 'tar': from the file name's suffix, else from the first bytes."""
    name = (filename or "").lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    head = f.read(8)
    f.seek(0)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    # gzip, bzip2 and xz streams: tarfile's "r:*" finds out whether a tar is inside.
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        return "tar"
    is_tar = tarfile.is_tarfile(f)
    f.seek(0)
    if is_tar:
        return "tar"
    raise DatasetError(f"{filename or 'the upload'} is not a zip, tar or npz archive")


def _open_tar(f: BinaryIO, filename: str | None) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=f, mode="r:*")  # plain, gzip, bzip2 or xz
    except tarfile.ReadError:
        raise DatasetError(f"{filename or 'the upload'} is not a readable tar archive") from None


@contextlib.contextmanager
def _translate_errors(what: str, extra: tuple = ()) -> Iterator[None]:
    """Turn the many exceptions of archive libraries into one DatasetError."""
    try:
        yield
    except DatasetError:
        raise
    except _ARCHIVE_ERRORS + extra as exc:
        raise DatasetError(f"the {what} could not be read: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    # OSError's str() names the temporary path; strerror says what went wrong without it.
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).splitlines()  # some messages go on for lines; the first says enough
    return lines[0].rstrip(":") if lines else type(exc).__name__


# ------------------------------------------------------------------------------ archives


def _check_entry_name(name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise DatasetError(f"archive entry '{name}' has an absolute path, which could write "
                           "outside the extraction folder")
    if ".." in parts:
        raise DatasetError(f"archive entry '{name}' climbs out of the archive with '..'")


def _check_expanded(total: int, opts: _Options) -> None:
    if total > opts.max_bytes:
        raise DatasetError(f"the archive expands to more than {opts.max_bytes:,} bytes, the limit")


def _check_entry_count(count: int, opts: _Options) -> None:
    if count > opts.max_entries:
        raise DatasetError(f"the archive has more than {opts.max_entries:,} entries")


def _read_zip(zf: zipfile.ZipFile, opts: _Options) -> dict[str, np.ndarray]:
    infos = zf.infolist()
    _check_zip_entries(infos, opts)
    with tempfile.TemporaryDirectory(prefix="munet-data-") as tmp:
        _extract_zip(zf, infos, Path(tmp), opts)
        return _read_tree(Path(tmp), opts)


def _check_zip_entries(infos: list[zipfile.ZipInfo], opts: _Options) -> None:
    """Refuse unsafe entries and zip bombs before a single byte is extracted."""
    _check_entry_count(len(infos), opts)
    for info in infos:
        _check_entry_name(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DatasetError(f"archive entry '{info.filename}' is a symbolic link; only "
                               "plain files and folders are allowed")
        if info.flag_bits & 0x1:
            raise DatasetError(f"archive entry '{info.filename}' is encrypted, which is not "
                               "supported")
    _check_expanded(sum(info.file_size for info in infos), opts)


def _extract_zip(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path,
                 opts: _Options) -> None:
    # Headers can lie about sizes, so the limit is also counted on the bytes written.
    written = 0
    for info in infos:
        target = _entry_target(dest, info.filename)
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            dst = open(target, "xb")
        except FileExistsError:
            raise DatasetError(f"archive entry '{info.filename}' appears twice") from None
        with zf.open(info) as src, dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                _check_expanded(written, opts)
                dst.write(chunk)


def _entry_target(dest: Path, name: str) -> Path:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    target = dest.joinpath(*parts)
    # The name checks already rule this out; resolving catches anything they missed.
    if not target.resolve().is_relative_to(dest.resolve()):
        raise DatasetError(f"archive entry '{name}' points outside the archive")
    return target


def _read_tar(tar: tarfile.TarFile, opts: _Options) -> dict[str, np.ndarray]:
    members = _checked_tar_members(tar, opts)
    with tempfile.TemporaryDirectory(prefix="munet-data-") as tmp:
        # The 'data' filter repeats the checks above inside tarfile itself.
        tar.extractall(tmp, members=members, filter="data")
        return _read_tree(Path(tmp), opts)


def _checked_tar_members(tar: tarfile.TarFile, opts: _Options) -> list[tarfile.TarInfo]:
    """Refuse links, devices and oversized archives before extracting anything."""
    members, total = [], 0
    for member in tar:
        _check_entry_count(len(members) + 1, opts)
        _check_entry_name(member.name)
        if not member.isdir():
            if not member.isreg() or member.issparse():
                raise DatasetError(f"archive entry '{member.name}' is a {_tar_kind(member)}; "
                                   "only plain files and folders are allowed")
            total += member.size
            _check_expanded(total, opts)
        members.append(member)
    return members


def _tar_kind(member: tarfile.TarInfo) -> str:
    kinds = [(member.issym, "symbolic link"), (member.islnk, "hard link"),
             (member.ischr, "character device"), (member.isblk, "block device"),
             (member.isfifo, "FIFO"), (member.issparse, "sparse file")]
    return next((name for test, name in kinds if test()), "special entry")


# ----------------------------------------------------------------------------------- npz


def _read_npz(zf: zipfile.ZipFile, f: BinaryIO, opts: _Options) -> dict[str, np.ndarray]:
    with _translate_errors("npz", extra=(ValueError,)):
        total = sum(_npy_nbytes(zf, key) for key in KEYS)
        if total > opts.max_bytes:
            raise DatasetError(f"the npz's arrays take {total:,} bytes, more than the "
                               f"{opts.max_bytes:,} allowed")
        f.seek(0)
        with np.load(f, allow_pickle=False) as npz:
            raw = {key: npz[key] for key in KEYS}
    return _normalise_npz(raw)


def _npy_nbytes(zf: zipfile.ZipFile, key: str) -> int:
    """Size of one array, read from its .npy header: np.load allocates that much at once."""
    name = f"{key}.npy"
    if name not in zf.namelist():
        raise DatasetError(f"the npz has no '{key}' array; it needs {', '.join(KEYS)}")
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    with zf.open(name) as fp:
        version = np.lib.format.read_magic(fp)
        if version not in readers:
            raise DatasetError(f"'{key}' uses .npy format version {version}, which is not "
                               "supported")
        shape, _, dtype = readers[version](fp)
    if dtype.hasobject:
        raise DatasetError(f"'{key}' holds Python objects, which would need unpickling; "
                           "store plain numbers and strings instead")
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * dtype.itemsize


def _normalise_npz(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    classes = _class_names(raw["classes"])
    x_train = _images(raw["x_train"], "x_train")
    x_test = _images(raw["x_test"], "x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"x_train images are {list(x_train.shape[1:])} but x_test images "
                           f"are {list(x_test.shape[1:])}")
    return {
        "x_train": x_train,
        "y_train": _labels(raw["y_train"], "y_train", len(x_train), "x_train", len(classes)),
        "x_test": x_test,
        "y_test": _labels(raw["y_test"], "y_test", len(x_test), "x_test", len(classes)),
        "classes": _class_array(classes),
    }


def _images(x: np.ndarray, key: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DatasetError(f"{key} must hold uint8 pixels, not {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or 0 in x.shape[1:]:
        raise DatasetError(f"{key} must have shape [N,H,W] or [N,H,W,C] with C 1 or 3, "
                           f"not {list(x.shape)}")
    return x


def _labels(y: np.ndarray, key: str, n: int, x_key: str, k: int) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DatasetError(f"{key} must be a 1-D array of integer labels, not {y.dtype} "
                           f"with shape {list(y.shape)}")
    if len(y) != n:
        raise DatasetError(f"{x_key} has {n} images but {key} has {len(y)} labels")
    bad = y[(y < 0) | (y >= k)]
    if bad.size:
        raise DatasetError(f"{key} holds label {bad[0]}, but with {k} classes labels must "
                           f"lie in 0..{k - 1}")
    return y.astype("<i8")


def _class_names(classes: np.ndarray) -> list[str]:
    if classes.ndim != 1 or classes.dtype.kind not in "US":
        raise DatasetError(f"classes must be a 1-D array of strings, not {classes.dtype} "
                           f"with shape {list(classes.shape)}")
    try:
        names = [c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()]
    except UnicodeDecodeError:
        raise DatasetError("classes holds names that are not UTF-8 text") from None
    seen = set()
    for name in names:
        if not name.strip():
            raise DatasetError("classes holds an empty class name")
        if name in seen:
            raise DatasetError(f"class name '{name}' appears twice in classes")
        seen.add(name)
    return names


def _class_array(names: list[str]) -> np.ndarray:
    # An explicit little-endian dtype keeps the canonical bytes the same on every machine.
    return np.array(names, dtype=f"<U{max(map(len, names), default=1)}")


# ---------------------------------------------------------------------- ImageFolder trees


def _read_tree(base: Path, opts: _Options) -> dict[str, np.ndarray]:
    root = _unwrap(base)
    if _is_split_layout(root):
        train = _class_files(root / "train", base)
        test = _class_files(root / "test", base)
        if set(train) != set(test):
            odd = sorted(set(train) ^ set(test))[0]
            where = "train" if odd in train else "test"
            raise DatasetError(f"the train and test folders must hold the same classes, but "
                               f"'{odd}' is only in {where}")
        prefix = "train/"
    else:
        train, test = _split(_class_files(root, base), opts.seed)
        prefix = ""
    classes = sorted(train)
    n_images = sum(map(len, train.values())) + sum(map(len, test.values()))
    _check_counts(classes, [len(train[c]) for c in classes], n_images, opts,
                  empty=f"class folder '{prefix}{{}}' holds no images")
    train_items = [(path, label) for label, c in enumerate(classes) for path in train[c]]
    test_items = [(path, label) for label, c in enumerate(classes) for path in test[c]]
    x_train, x_test = _decode_images([p for p, _ in train_items], [p for p, _ in test_items],
                                     base, opts)
    return {
        "x_train": x_train,
        "y_train": np.array([label for _, label in train_items], dtype="<i8"),
        "x_test": x_test,
        "y_test": np.array([label for _, label in test_items], dtype="<i8"),
        "classes": _class_array(classes),
    }


def _ignored(name: str) -> bool:
    # Hidden files (.DS_Store, ._x AppleDouble), macOS's zip side folder and Windows junk.
    return name.startswith(".") or name == "__MACOSX" or name.lower() in _JUNK_FILES


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not _ignored(p.name))


def _unwrap(root: Path) -> Path:
    """Step into single top folders that hold only folders (archives usually have one)."""
    while True:
        entries = _visible(root)
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        if not all(p.is_dir() for p in _visible(entries[0])):
            return root  # the single folder holds images itself: it is a class
        root = entries[0]


def _is_split_layout(root: Path) -> bool:
    entries = _visible(root)
    if {p.name for p in entries} != {"train", "test"} or not all(p.is_dir() for p in entries):
        return False
    # Two classes that happen to be called train and test hold images directly.
    return all(p.is_dir() for p in _visible(root / "train"))


def _class_files(folder: Path, base: Path) -> dict[str, list[Path]]:
    classes = {}
    for entry in _visible(folder):
        if not entry.is_dir():
            raise DatasetError(f"'{_rel(entry, base)}' is a file outside any class folder; "
                               "images must sit in one folder per class")
        classes[entry.name] = _files_under(entry)
    return classes


def _files_under(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        files += [Path(dirpath, name) for name in sorted(filenames) if not _ignored(name)]
    return files


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def _split(files: dict[str, list[Path]], seed: int):
    """Seeded stratified split: about TEST_FRACTION of each class, at least one if it can."""
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for name in sorted(files):
        paths = files[name]
        n = len(paths)
        n_test = 0 if n < 2 else min(n - 1, max(1, int(n * TEST_FRACTION + 0.5)))
        chosen = set(rng.permutation(n)[:n_test].tolist())
        train[name] = [p for i, p in enumerate(paths) if i not in chosen]
        test[name] = [p for i, p in enumerate(paths) if i in chosen]
    return train, test


# -------------------------------------------------------------------------------- images


def _decode_images(train: list[Path], test: list[Path], base: Path, opts: _Options):
    """Decode every image into uint8 arrays of one mode and one size.

    A first pass reads only headers (size, colour), so the target mode and size are known
    before any pixel is decoded and memory holds just the final arrays plus one image.
    """
    probes = [_probe(path, base) for path in train + test]
    mode = "L" if all(grey for _, grey in probes) else "RGB"
    size = _target_size([size for size, _ in probes], opts.max_side)
    return _decode_all(train, base, mode, size), _decode_all(test, base, mode, size)


@functools.cache
def _image_formats() -> tuple[str, ...]:
    # Image.open fails outright on a format it does not know (a Pillow build without
    # WebP, say), so ask only for the plugins this Pillow has.
    Image.init()
    return tuple(f for f in _IMAGE_FORMATS if f in Image.OPEN)


def _open_image(path: Path, base: Path) -> Image.Image:
    if path.stat().st_size == 0:
        raise DatasetError(f"image file '{_rel(path, base)}' is empty")
    try:
        return Image.open(path, formats=_image_formats())
    except UnidentifiedImageError:
        raise DatasetError(f"'{_rel(path, base)}' is not an image in a supported format "
                           "(PNG, JPEG, GIF, BMP, TIFF, WebP, PPM or TGA)") from None
    except Exception as exc:  # PIL's header parsers raise many types on hostile input
        raise DatasetError(f"'{_rel(path, base)}' is not a readable image: "
                           f"{_reason(exc)}") from None


def _probe(path: Path, base: Path) -> tuple[tuple[int, int], bool]:
    with _open_image(path, base) as im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise DatasetError(f"image '{_rel(path, base)}' has {w}x{h} pixels, more than the "
                               f"{MAX_PIXELS:,} allowed")
        return (w, h), _is_grey(im)


def _is_grey(im: Image.Image) -> bool:
    if im.mode in _GREY_MODES:
        return True
    if im.mode in ("P", "PA"):
        palette = im.getpalette()
        if palette:
            rgb = np.asarray(palette).reshape(-1, 3)
            return bool((rgb == rgb[:, :1]).all())
    return False


def _target_size(sizes: list[tuple[int, int]], max_side: int) -> tuple[int, int]:
    """(W, H) for every image: a shared size is kept, mixed sizes become one square side."""
    if len(set(sizes)) == 1:
        w, h = sizes[0]
        if max(w, h) <= max_side:
            return w, h
        # Kept aspect, but no larger than max_side: the canonical file is held in memory.
        scale = max_side / max(w, h)
        return max(1, round(w * scale)), max(1, round(h * scale))
    side = int(min(np.median([max(size) for size in sizes]), max_side))
    return max(side, 1), max(side, 1)


def _decode_all(paths: list[Path], base: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    x = np.empty((len(paths), h, w, 1 if mode == "L" else 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        x[i] = _decode(path, base, mode, size)
    return x


def _decode(path: Path, base: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    with _open_image(path, base) as im:
        try:
            im.load()  # decodes the first frame only of an animation
            flat = flatten_image(im, mode)
            if flat.size != size:
                flat = flat.resize(size, Image.Resampling.BICUBIC)
            pixels = np.asarray(flat, dtype=np.uint8)
        except Exception as exc:  # truncated or corrupt data surfaces here, in many types
            raise DatasetError(f"image '{_rel(path, base)}' could not be decoded: "
                               f"{_reason(exc)}") from None
    return pixels[..., None] if pixels.ndim == 2 else pixels


def flatten_image(im: Image.Image, mode: str) -> Image.Image:
    """8-bit `mode` ('L' or 'RGB') without alpha: transparency is composited on black."""
    if im.mode in _WIDE_MODES:
        im = _wide_to_l(im)
    elif im.mode in _ALPHA_MODES or "transparency" in im.info:
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, im.convert("RGBA"))
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")  # palette, 1-bit, CMYK, YCbCr, composited RGBA
    return im if im.mode == mode else im.convert(mode)


def _wide_to_l(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale scaled to 8 bits."""
    a = np.nan_to_num(np.asarray(im, dtype=np.float64))
    top = a.max(initial=0)
    if im.mode == "F":
        scale = 255.0 if top <= 1 else 1.0  # floats in [0, 1] or already in [0, 255]
    elif im.mode == "I" and top <= 255:
        scale = 1.0  # 32-bit container holding 8-bit values
    else:
        scale = 255 / 65535
    return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8))


# ------------------------------------------------------------------ checks and the file


def _check_counts(classes: list[str], train_counts: list[int], n_images: int, opts: _Options,
                  empty: str = "class '{}' has no training images") -> None:
    if n_images == 0:
        raise DatasetError("the data set holds no images")
    if n_images > opts.max_images:
        raise DatasetError(f"the data set holds {n_images:,} images, more than the "
                           f"{opts.max_images:,} allowed")
    if len(classes) < 2:
        raise DatasetError(f"a task needs at least 2 classes, but this data set has {len(classes)}")
    for name, count in zip(classes, train_counts):
        if count == 0:
            raise DatasetError(empty.format(name))


def _check_arrays(arrays: dict[str, np.ndarray], opts: _Options) -> None:
    classes = arrays["classes"].tolist()
    counts = np.bincount(arrays["y_train"], minlength=len(classes)).tolist()
    _check_counts(classes, counts, len(arrays["x_train"]) + len(arrays["x_test"]), opts)


def _canonical_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """The npz that np.savez_compressed would write, but byte-for-byte reproducible.

    savez_compressed stamps each entry with the current time, so the same data would get
    a new digest every second; fixed timestamps make the digest a function of content.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in KEYS:
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[key]), allow_pickle=False)
    return buf.getvalue()


def _describe(digest: str, arrays: dict[str, np.ndarray]) -> DatasetInfo:
    classes = arrays["classes"].tolist()
    x_train = arrays["x_train"]
    return DatasetInfo(
        digest=digest,
        classes=classes,
        n_train=int(len(x_train)),
        n_test=int(len(arrays["x_test"])),
        image_shape=tuple(int(d) for d in x_train.shape[1:]),
        train_counts=np.bincount(arrays["y_train"], minlength=len(classes)).tolist(),
    )
