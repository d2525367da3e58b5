"""Image folders: listing by Keras's conventions, checking every file, and the recorded lists.

A folder holds one sub-folder per class, as `keras.utils.image_dataset_from_directory` reads
it: class names are the sub-folders' names in sorted order (hidden ones skipped), and every
.bmp/.gif/.jpeg/.jpg/.png file below a class folder, walked in sorted order, belongs to it.
A run records the files of each split (`<run>/files/`), so it can be explained later from
those lists alone, reading only the files asked for.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnviz.data.images import IMAGE_SUFFIXES, image_files_in, image_problem, undecodable_files
from cnnviz.errors import CnnvizError

FILES_DIR = "files"
SPLITS = ("train", "val", "test")
_SHOWN = 5  # bad files named in a message


@dataclass
class FolderListing:
    """The image files of a class folder.

    Attributes:
        root: the folder.
        files: paths relative to `root` (POSIX style), class by class.
        labels: (N,) int32 class index of each file.
        class_names: sub-folder names, sorted.
        ignored: files with other suffixes, left out as Keras leaves them out.
        skipped: [(relative path, reason)] of bad files left out (data.skip_bad_files).
    """

    root: Path
    files: list[str]
    labels: np.ndarray
    class_names: list[str]
    ignored: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def paths(self, indices=None) -> list[str]:
        chosen = self.files if indices is None else [self.files[i] for i in indices]
        return [str(self.root / name) for name in chosen]


def list_class_folder(root: str | Path) -> FolderListing:
    """Every image file of a class folder, with its class, in Keras's order.

    Raises:
        CnnvizError: no such folder, fewer than two class sub-folders, or a class folder
            without images.
    """
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise CnnvizError(f"data.path: {root} {what}")
    classes = sorted(entry.name for entry in os.scandir(root)
                     if entry.is_dir() and not entry.name.startswith("."))
    loose = [entry.name for entry in os.scandir(root) if entry.is_file()
             and entry.name.lower().endswith(IMAGE_SUFFIXES)]
    if len(classes) < 2:
        found = f"found only {classes[0]!r}" if classes else "found none"
        hint = (f" ({len(loose)} images lie directly in it; move them into class folders)"
                if loose else "")
        raise CnnvizError(
            f"data.path {root}: a classification folder needs one sub-folder per class, at "
            f"least two; {found}{hint}")
    files: list[str] = []
    labels: list[int] = []
    ignored = 0
    empty = []
    for index, name in enumerate(classes):
        found = image_files_in(root / name)
        ignored += sum(len(names) for _, _, names in os.walk(root / name)) - len(found)
        if not found:
            empty.append(name)
        files.extend(path.relative_to(root).as_posix() for path in found)
        labels.extend([index] * len(found))
    if empty:
        raise CnnvizError(
            f"data.path {root}: class folder(s) {', '.join(repr(name) for name in empty)} hold "
            f"no image ({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder")
    return FolderListing(root, files, np.asarray(labels, np.int32), classes, ignored)


def check_listing(listing: FolderListing, *, max_pixels: int, skip_bad_files: bool,
                  log=print) -> FolderListing:
    """Refuse (or, with `skip_bad_files`, leave out) files that cannot be read.

    Every file's header is checked (format, pixel count, truncation); with `skip_bad_files`
    every file is also decoded once, so damage inside a file is found before training too.
    """
    bad = [(name, problem) for name, problem in
           ((name, image_problem(listing.root / name, max_pixels=max_pixels))
            for name in listing.files) if problem]
    if bad and not skip_bad_files:
        raise CnnvizError(_bad_files_message(listing.root, bad))
    if skip_bad_files:
        known = {name for name, _ in bad}
        rest = [name for name in listing.files if name not in known]
        root = str(listing.root)
        bad += [(os.path.relpath(path, root), reason)
                for path, reason in undecodable_files([str(listing.root / name) for name in rest])]
    if not bad:
        return listing
    names = {name for name, _ in bad}
    keep = [index for index, name in enumerate(listing.files) if name not in names]
    kept = FolderListing(listing.root, [listing.files[i] for i in keep], listing.labels[keep],
                         listing.class_names, listing.ignored, sorted(bad))
    shown = ", ".join(name for name, _ in kept.skipped[:_SHOWN])
    more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    log(f"skipped {len(bad)} unreadable file(s) of {len(listing.files)} (data.skip_bad_files): "
        f"{shown}{more}")
    empty = [name for index, name in enumerate(kept.class_names)
             if not np.any(kept.labels == index)]
    if empty:
        raise CnnvizError(f"data.path {listing.root}: no readable image left in class folder(s) "
                          f"{', '.join(repr(name) for name in empty)}")
    return kept


def _bad_files_message(root: Path, bad: list[tuple[str, str]]) -> str:
    name, problem = bad[0]
    others = f" ({len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
    return (f"data.path {root}: {name} {problem}{others}; remove it, or set "
            "data.skip_bad_files: true to skip unreadable files")


def bad_files_error(root: Path, paths: list[str]) -> CnnvizError | None:
    """After TensorFlow failed inside the pipeline: which of `paths` cannot be decoded."""
    bad = undecodable_files(paths)
    if not bad:
        return None
    named = [(os.path.relpath(path, root), reason) for path, reason in bad]
    return CnnvizError(_bad_files_message(root, named))


# ------------------------------------------------------------------------- recorded lists
def write_split_files(run_dir: Path, root: Path, splits: dict, class_names: list[str]) -> None:
    """`<run>/files/{train,val,test}.csv` (file relative to data.path, label, class) and
    classes.txt, written atomically."""
    from cnnviz.io.atomic import atomic_write_text

    folder = Path(run_dir) / FILES_DIR
    for name, (files, labels) in splits.items():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "label", "class"])
        writer.writerows((file, int(label), class_names[int(label)])
                         for file, label in zip(files, labels))
        atomic_write_text(folder / f"{name}.csv", buffer.getvalue())
    atomic_write_text(folder / "classes.txt", "".join(f"{name}\n" for name in class_names))


def write_skipped_files(run_dir: Path, skipped: list[tuple[str, str]]) -> None:
    from cnnviz.io.atomic import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "problem"])
    writer.writerows(skipped)
    atomic_write_text(Path(run_dir) / FILES_DIR / "skipped.csv", buffer.getvalue())


def has_split_files(run_dir: Path | None) -> bool:
    return run_dir is not None and (Path(run_dir) / FILES_DIR / "classes.txt").is_file()


def read_split_files(run_dir: Path) -> tuple[dict, list[str]]:
    """The recorded lists: ({split: (files, labels)}, class_names)."""
    folder = Path(run_dir) / FILES_DIR
    class_names = (folder / "classes.txt").read_text().splitlines()
    splits = {}
    for name in SPLITS:
        path = folder / f"{name}.csv"
        if not path.is_file():
            raise CnnvizError(f"{path} is missing; the run's file lists are incomplete")
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        splits[name] = ([row["file"] for row in rows],
                        np.asarray([int(row["label"]) for row in rows], np.int32))
    return splits, class_names
