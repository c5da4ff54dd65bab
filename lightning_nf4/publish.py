"""Export folders that readers never see half-written, and that keep what users put in them.

An export is a set of folders (``adapter/`` and ``merged/``) at fixed paths in one root folder, plus
``export.json``, the manifest naming the step and every file of the set with its size. ``publish`` writes
each folder under a temporary name beside its place, then writes a journal, then moves the folders in by
renames and writes the manifest last. A set is complete and matching exactly when ``export.json`` is there
and lists it (``read_export`` checks); while the renames run the manifest is absent.

The journal makes the renames restartable: ``recover`` (run at the start of every publish, and by
``LoRACallback`` when fit starts) finishes a swap that a kill cut short, so the previous set is never lost
and a new one never left half in place, then removes what killed runs left: temporaries without a journal
and the previous folders of finished swaps. It only removes names this module makes
(``.<name>.tmp-<id>``, ``.<name>.old-<id>``, ``.export.json.*-<id>``, ``.publish-<id>.json``). Files found
in a folder being replaced that the package did not write (not listed by the manifest, not written now)
are moved into the new folder. One writer per root folder at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

MANIFEST = "export.json"
FORMAT = "lightning-nf4 export 1"

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<id>[0-9a-f]{12})$")
_JOURNAL = re.compile(r"^\.publish-(?P<id>[0-9a-f]{12})\.json$")
_JOURNAL_TMP = re.compile(r"^\.publish-[0-9a-f]{12}\.json\.tmp$")

Writer = Callable[[Path], None]
PathLike = Union[str, os.PathLike]


class ExportIncompleteError(RuntimeError):
    """The folder holds no complete export: no manifest, or files missing or of another size than it lists."""


def _stage(name: str) -> None:
    """Called at each step of a publish; tests replace it to stop a publish there, as a kill would."""


def publish(root: PathLike, writers: Mapping[str, Writer], manifest: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    """Write ``writers[name](folder)`` for each name and move the folders to ``root/<name>`` together.

    With ``manifest`` (extra fields: step, epoch, source ...) the set gets ``export.json``, written last.
    Without it a single folder is replaced on its own; a manifest that listed it is withdrawn, since it
    would no longer describe the folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    recover(root)
    for name in writers:
        if not name or "/" in name or name.startswith(".") or name == MANIFEST:
            raise ValueError(f"{name!r} cannot name an export folder.")
    _check_part_folders(root, writers)
    _check_manifest_is_ours(root)
    ident = uuid.uuid4().hex[:12]
    previous = _read_manifest(root)
    listings: dict[str, dict[str, int]] = {}
    try:
        for name, write in writers.items():
            tmp = root / f".{name}.tmp-{ident}"
            tmp.mkdir()
            write(tmp)
            listings[name] = _listing(tmp)
            _carry_over(root / name, tmp, listings[name], _listed(previous, name))
            _stage(f"written:{name}")
        record = None
        if manifest is not None:
            record = {"format": FORMAT, "id": ident, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest,
                      "parts": {name: {"files": files} for name, files in listings.items()}}
        # a set without a part the previous set had (export_merged=False after a merged export): that part's files go,
        # or the folder would hold a pair from two exports; files of yours in it stay
        withdrawn = {} if record is None or previous is None else {
            name: sorted(part["files"]) for name, part in previous.get("parts", {}).items() if name not in writers}
        _write_json(root / f".publish-{ident}.json", {"id": ident, "parts": list(writers), "manifest": record, "withdraw": withdrawn},
                    tmp=root / f".publish-{ident}.json.tmp")
    except BaseException:
        for name in writers:
            shutil.rmtree(root / f".{name}.tmp-{ident}", ignore_errors=True)
        raise
    _stage("journal")
    _roll_forward(root, ident)
    return {name: root / name for name in writers}


def check_writable(root: PathLike, what: str = "export folder", parts: tuple[str, ...] = ()) -> None:
    """Raise now, with the reason, if ``root`` could not be created or written, or a publish of ``parts`` there would
    refuse (a manifest it did not write, a part's name taken by a file): a run checks its export folder before
    training rather than failing at the end with nothing written."""
    root = Path(root).expanduser()
    if root.is_dir():
        _check_manifest_is_ours(root)
        _check_part_folders(root, parts)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"The {what} {str(root)!r} cannot be created: {str(existing)!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"The {what} {str(root)!r} cannot be written: no write permission on {str(existing)!r}.")


def recover(root: PathLike) -> None:
    """Finish swaps that have a journal (a kill after the folders were complete), then remove leftovers of
    killed or finished publishes. Safe to call at any time when no publish is running on ``root``."""
    root = Path(root)
    if not root.is_dir():
        return
    for entry in sorted(os.listdir(root)):
        match = _JOURNAL.match(entry)
        if match:
            _roll_forward(root, match["id"])
    for entry in os.listdir(root):  # every journal is gone now: what is left is stale
        match = _TEMP.match(entry)
        path = root / entry
        if match and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)  # a folder never moved in, or the previous one of a finished swap
        elif (match and match["name"] == MANIFEST) or _JOURNAL_TMP.match(entry):
            path.unlink(missing_ok=True)


def read_export(root: PathLike) -> dict[str, Any]:
    """The manifest of the complete export in ``root``, each listed file checked to be there with its size;
    its parts' paths under ``"paths"``. Raises ``ExportIncompleteError`` otherwise."""
    root = Path(root)
    manifest = _read_manifest(root)
    if manifest is None:
        raise ExportIncompleteError(
            f"{root} holds no complete export: {MANIFEST} is missing (no export finished here, or one is being written; "
            "a cut-short one is completed or cleaned up by the next export or fit with this folder)."
        )
    for name, part in manifest["parts"].items():
        for rel, size in part["files"].items():
            path = root / name / rel
            if not path.is_file() or path.stat().st_size != size:
                raise ExportIncompleteError(f"{path} is missing or not the {size} bytes {MANIFEST} lists: the export in {root} was altered.")
    return {**manifest, "paths": {name: root / name for name in manifest["parts"]}}


# -- the swap -------------------------------------------------------------------------------------------
def _roll_forward(root: Path, ident: str) -> None:
    journal_path = root / f".publish-{ident}.json"
    try:
        journal = json.loads(journal_path.read_text())
    except (OSError, ValueError):  # cut short while being written: nothing was moved yet
        journal_path.unlink(missing_ok=True)
        return
    record = journal["manifest"]
    current = _read_manifest(root)
    if current is not None and current.get("id") != ident and (record is not None or set(current["parts"]) & set(journal["parts"])):
        os.replace(root / MANIFEST, root / f".{MANIFEST}.old-{ident}")  # it no longer describes the folders
        _stage("manifest-withdrawn")
    for name in journal["parts"]:
        tmp, old, final = root / f".{name}.tmp-{ident}", root / f".{name}.old-{ident}", root / name
        if tmp.exists():
            if final.exists():
                os.replace(final, old)
                _stage(f"moved-aside:{name}")
            os.replace(tmp, final)
            _stage(f"moved-in:{name}")
    for name, files in journal.get("withdraw", {}).items():
        _withdraw(root / name, files)
    if record is not None and (current is None or current.get("id") != ident):
        _write_json(root / MANIFEST, record, tmp=root / f".{MANIFEST}.tmp-{ident}")
        _stage("manifest")
    journal_path.unlink()
    _stage("journal-removed")
    for name in journal["parts"]:
        shutil.rmtree(root / f".{name}.old-{ident}", ignore_errors=True)
    (root / f".{MANIFEST}.old-{ident}").unlink(missing_ok=True)
    _fsync_dir(root)


# -- helpers --------------------------------------------------------------------------------------------
def _withdraw(folder: Path, files: list[str]) -> None:
    """Remove the listed files of a part no longer in the set, then its folders left empty."""
    for rel in files:
        (folder / rel).unlink(missing_ok=True)
    for path in sorted((p for p in [folder, *folder.rglob("*")] if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
        if not any(path.iterdir()):
            path.rmdir()


def _check_part_folders(root: Path, names: Iterable[str]) -> None:
    for name in names:
        if (root / name).exists() and not (root / name).is_dir():
            raise FileExistsError(f"{root / name} exists and is not a folder; move it away, the export would replace it.")


def _listing(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative path, size): what the writer wrote."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _listed(manifest: Optional[dict[str, Any]], name: str) -> Optional[set[str]]:
    if manifest is None or name not in manifest.get("parts", {}):
        return None
    return set(manifest["parts"][name]["files"])


_WEIGHT_FILE = re.compile(r"(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def _carry_over(old: Path, new: Path, written: dict[str, int], ours: Optional[set[str]]) -> None:
    """Files in the folder being replaced that the package did not write go into the new folder (hard-linked,
    or copied). Ours: what the manifest lists; without one, what is being written now. Weight files never go
    across (a re-sharded copy of the old model beside the new one: loaders would pick either)."""
    if not old.is_dir():
        return
    for path in sorted(old.rglob("*")):
        rel = path.relative_to(old).as_posix()
        if rel in written or (ours is not None and rel in ours) or path.is_dir() and not path.is_symlink():
            continue
        if _WEIGHT_FILE.fullmatch(rel):
            continue
        target = new / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            os.symlink(os.readlink(path), target)
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _check_manifest_is_ours(root: Path) -> None:
    path = root / MANIFEST
    if path.exists() and _read_manifest(root) is None:
        raise FileExistsError(
            f"{path} exists but was not written by lightning-nf4 (or is damaged); the export writes its manifest under "
            f"that name. Move the file away, or export into another folder."
        )


def _read_manifest(root: Path) -> Optional[dict[str, Any]]:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _write_json(path: Path, value: Any, tmp: Path) -> None:
    """Write ``tmp``, flush it to disk, then rename it to ``path``: the file is either absent or complete."""
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
