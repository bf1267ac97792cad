"""The model repository: ``<model_dir>/<name>/<version>/{model.onnx,model.json}``.

Every version is loaded (latest serves by default, every version is addressable). A version whose card
is missing or malformed, whose sha256 differs, or whose ONNX does not load is reported not-ready with
the reason; the others serve. ``scan()`` picks up new versions without a restart and swaps them in
atomically: requests already holding a ``LoadedModel`` finish on it, and the versions it drops are handed
back to be drained (``ScanResult.removed``). Failed versions are retried when their files change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.batcher import DynamicBatcher
from serving.busy import BusyBoard
from serving.errors import InvalidInput, ModelNotFound, ModelNotReady
from serving.metrics import observe_batch, observe_fallback
from serving.model_card import (
    INPUT_NAME,
    PROBS_NAME,
    CardError,
    ModelCard,
    file_sha256,
    read_card,
    write_json_atomic,
)
from serving.settings import Settings
from serving.shared_slots import map_slots, server_dir

log = logging.getLogger("cnnserve.repository")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
CARD_FILE, MODEL_FILE = "model.json", "model.onnx"


class DeviceError(RuntimeError):
    """CUDA was requested explicitly and is not usable."""


@dataclass
class LoadedModel:
    card: ModelCard
    path: Path
    session: ort.InferenceSession
    batcher: DynamicBatcher
    providers: list[str]
    device_note: str | None = None  # set when `auto` fell back to the CPU

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> int:
        return self.card.version


# Triton's state names: a version judged once that may be half copied is LOADING (judged again at the next scan); a
# failed or unloaded version is UNAVAILABLE, with the reason
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"
# a worker's slot in the shared "applied" file: 1 + the generation of the shared load / unload state it last applied
# (1 from its start, before its first scan: generations start at 1); 0: never started
APPLIED = struct.Struct("Q")


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int  # 0 for an unloaded model with no version on disk
    ready: bool
    reason: str = ""
    providers: list[str] = field(default_factory=list)
    state: str = READY  # READY, LOADING (first failure: may be half copied), UNAVAILABLE (failed, or unloaded)


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda":
        if CUDA not in available:
            raise DeviceError(f"CNNSERVE_DEVICE=cuda but onnxruntime offers no CUDA provider (available: {available}); "
                              "install onnxruntime-gpu (the `gpu` extra) and check the CUDA libraries")
        return [CUDA, CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if device == "cpu":
        return [CPU]
    raise DeviceError(f"CNNSERVE_DEVICE must be auto, cpu or cuda, not {device!r}")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """(size, mtime in ns, inode) of ``path``, None when it cannot be read; the inode tells a file replaced by
    another of the same size and time (a version directory swapped in with ``mv``)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


VERSION_NAME = re.compile(r"[1-9][0-9]*", re.ASCII)
# a version named by more digits than this is no version here (int() refuses past 4,300 digits, and an outside
# probe's 5,000-digit version was a 500 on every door)
MAX_VERSION_DIGITS = 18


def fingerprint(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What the files of a version directory look like now (name, size, mtime, inode): a change means load
    again (a failed version: try again; a served one: its files were replaced)."""
    return tuple((name, *stamp) for name in (CARD_FILE, MODEL_FILE) if (stamp := _stamp(path / name)))


@dataclass
class _Seen:
    """A version directory as the last scan left it."""

    status: VersionStatus
    fingerprint: tuple
    failures: int = 0  # consecutive failed loads of this very fingerprint (of a served version: its replacement's)


@dataclass
class ScanResult:
    changes: list[str] = field(default_factory=list)  # what happened, one line each, for the log
    removed: list[LoadedModel] = field(default_factory=list)  # versions no longer served: to drain and close


def _check_graph_against_card(session: ort.InferenceSession, card: ModelCard) -> None:
    """Run one blank image through the graph: its ``probs`` must have the card's shape per image (one column per
    label). A graph copied under another model's card (right sha256, wrong network) otherwise served its own
    classes under the card's labels; the input side fails inside onnxruntime already."""
    blank = np.zeros((1, *card.input.shape), np.uint8)
    try:
        probs = session.run([PROBS_NAME], {INPUT_NAME: blank})[0]
    except Exception as exc:  # onnxruntime's own errors: no such output, an input the graph does not take, ...
        raise CardError(f"model.onnx does not run on the card's input {card.input.shape}: {exc}") from exc
    if list(probs.shape[1:]) != list(card.probs.shape):
        raise CardError(f"model.onnx answers {PROBS_NAME} of shape {list(probs.shape[1:])} per image, the card says "
                        f"{card.probs.shape} ({len(card.labels)} labels): a graph and a card of different models?")


def _check_regular_files(path: Path) -> None:
    """A version's files present must be regular files (symbolic links to them too): reading a FIFO, a socket or a
    device such as /dev/zero would block or never end, holding every later scan of this worker with it."""
    for name in (CARD_FILE, MODEL_FILE):
        try:
            mode = (path / name).stat().st_mode
        except OSError:
            continue  # missing: reported by the reads that need it
        if not stat.S_ISREG(mode):
            raise CardError(f"{path / name} is not a regular file (a pipe, socket or device is never read)")


class ModelRepository:
    def __init__(self, settings: Settings, worker_slot: int = 0) -> None:
        """``worker_slot``: this worker's place among the server's workers (0-based), on the ``BusyBoard``."""
        self.settings = settings
        self.root = Path(settings.model_dir)
        self._providers = providers_for(settings.device)
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._seen: dict[tuple[str, int], _Seen] = {}
        self._ignored: set[Path] = set()  # entries that are not version directories, logged once
        self._unloaded: set[str] = set()  # models taken out of service by unload(), whatever is on disk
        self._unloaded_stamp: tuple[int, int, int] | None = None  # the shared unloaded file as last read
        self._unloaded_versions: list[tuple[str, int]] = []  # the versions on disk of the unloaded models
        self._loads_applied: dict[str, int] = {}  # each model's shared load count as this worker last applied it
        # files shared by the workers of one server (children of one BentoML arbiter); not kept across restarts
        self.shared_dir = server_dir()
        self.unloaded_file = self.shared_dir / "unloaded.json"
        self._slot, self._workers = worker_slot, settings.worker_count
        self._applied = map_slots(self.shared_dir / "unloaded-applied", self._workers, worker_slot, APPLIED.size)
        # started, nothing applied yet: a load / unload answered while this worker's first scan runs waits for it
        # (that scan may have read the state from before the change)
        APPLIED.pack_into(self._applied, worker_slot * APPLIED.size, 1)
        # a lone request may use every core when no worker is busy: needs more cores than a session's threads
        self._wide_threads = settings.idle_threads or os.cpu_count() or 1
        wide = CUDA not in self._providers and self._wide_threads > settings.threads_per_session
        self.board = BusyBoard(self.shared_dir / "busy", settings.worker_count, worker_slot) if wide else None
        self._served: set[str] = set()  # models that have served since start (strict readiness)
        self.fallbacks: dict[str, str] = {}  # model -> why requests without a version get an older one now
        self._lock = threading.Lock()  # serialises scans; readers never take it
        self.device_note: str | None = None
        self.scanned = False
        self._root_missing = False  # the root could not be listed at the last scan (logged once)

    # --- loading -----------------------------------------------------------------------------------------
    def scan(self, retry: set[str] | frozenset[str] = frozenset()) -> ScanResult:
        """Load versions not seen yet, retry failed versions whose files changed (and every version of the
        models in ``retry``), drop versions removed from disk or unloaded.

        A version that fails to load on its first sight after startup is only *pending*: it may be half
        copied. It is judged failed when the same files fail again on the next scan; a failed version is
        tried again whenever its files change. Versions present at the first scan are judged at once."""
        with self._lock:
            result = ScanResult()
            unloaded, loads, generation = self._read_unloaded()
            # a load() answered by any worker retries the model's failed versions in every worker
            retry = set(retry) | {n for n, count in loads.items() if count > self._loads_applied.get(n, 0)}
            self._loads_applied = loads
            listing = self._versions_on_disk()
            if listing is None:  # the root cannot be listed for now: what was on disk is taken as is
                listing = {key: None for key in self._seen}
            on_disk = {key: path for key, path in listing.items() if key[0] not in unloaded}
            models = {name: dict(versions) for name, versions in self._models.items()}
            seen = dict(self._seen)
            for key in sorted(set(seen) - set(on_disk)):
                seen.pop(key)
                dropped = models.get(key[0], {}).pop(key[1], None)
                if dropped is not None:
                    result.removed.append(dropped)
                result.changes.append(f"removed {key[0]}/{key[1]}")
            for (name, version), path in sorted(on_disk.items()):
                if path is None:
                    continue
                now = fingerprint(path)
                before = seen.get((name, version))
                if before is not None and before.fingerprint == now and (
                        (before.status.ready and not before.failures)
                        or (name not in retry and before.status.state == UNAVAILABLE)):
                    continue
                # a served version whose files changed (replaced in place, or its directory swapped): what is on
                # disk is what every worker serves, a worker restarted later included, so it is loaded again
                served = models.get(name, {}).get(version) if before is not None and before.status.ready else None
                try:
                    loaded = self._load(path, name, version)
                except Exception as exc:  # any failure: that version is not ready, the rest serve
                    reason = str(exc) or type(exc).__name__
                    failures = before.failures + 1 if before is not None and before.fingerprint == now else 1
                    state = UNAVAILABLE if not self.scanned or failures >= 2 else LOADING
                    if served is not None and state == LOADING:  # maybe half rewritten: the old files serve on
                        seen[(name, version)] = _Seen(before.status, now, failures)
                        result.changes.append(f"pending replacement of {name}/{version} (will retry: {reason})")
                        continue
                    if served is not None:
                        result.removed.append(models[name].pop(version))
                    seen[(name, version)] = _Seen(VersionStatus(name, version, False, reason, state=state), now,
                                                  failures)
                    if state == UNAVAILABLE:
                        log.error("model %s/%s not loaded: %s", name, version, reason)
                        result.changes.append(f"failed {name}/{version}")
                    elif before is None:
                        result.changes.append(f"pending {name}/{version} (will retry: {reason})")
                    continue
                if served is not None:
                    result.removed.append(served)
                    log.warning("model repository: %s/%s files changed on disk: loaded again", name, version)
                    result.changes.append(f"reloaded {name}/{version} (its files changed)")
                models.setdefault(name, {})[version] = loaded
                seen[(name, version)] = _Seen(VersionStatus(name, version, True, loaded.device_note or "",
                                                            loaded.providers), now)
                log.debug("loaded %s/%s on %s", name, version, loaded.providers[0])  # INFO: the scan's change line
                if served is None:
                    result.changes.append(f"loaded {name}/{version}")
            result.changes += self._fallbacks(self._models, models)
            # readers (the event loop, while this runs in a thread) see a model that is being unloaded or loaded
            # as served or as unloaded at every moment, never as not found: the unloaded set grows before the
            # swap and shrinks after it
            self._unloaded = self._unloaded | unloaded
            self._models = {n: v for n, v in models.items() if v}  # one atomic swap for readers
            self._unloaded = unloaded
            self._seen = seen
            self._unloaded_versions = sorted(key for key in listing if key[0] in unloaded)
            self._served |= set(self._models)
            self.scanned = True
            APPLIED.pack_into(self._applied, self._slot * APPLIED.size, generation + 1)
            return result

    def _fallbacks(self, old: dict[str, dict[int, LoadedModel]], new: dict[str, dict[int, LoadedModel]]) -> list[str]:
        """Models whose default version went down (its version removed or unloaded): logged and counted."""
        changes = []
        for name, versions in old.items():
            if not versions or not new.get(name):
                continue
            was, now = max(versions), max(new[name])
            if now < was:
                message = f"fallback {name}: version {was} is gone, requests without a version now get {now}"
                log.warning("model repository: %s", message)
                observe_fallback(name)
                self.fallbacks[name] = message
                changes.append(message)
        for name, versions in new.items():  # a newer version ends a fallback
            if versions and name in old and old[name] and max(versions) > max(old[name]):
                self.fallbacks.pop(name, None)
        return changes

    def _versions_on_disk(self) -> dict[tuple[str, int], Path] | None:
        """The version directories: named by a positive whole number in ASCII digits without leading zeros (so
        ``²`` or ``03`` beside ``3`` cannot break or confuse a scan); other entries are ignored, each logged once.

        None when the root itself cannot be listed after the first scan: a repository renamed away for a moment
        (swapped with ``mv``), a root directory gone with its volume or a lost permission would otherwise unload
        every model at once; what is served serves on, and the next scan that can list the root applies what
        changed. (A volume unmounted under a root that stays, empty, lists fine: its models are removed.)"""
        try:
            model_dirs = list(self.root.iterdir())
        except OSError as exc:
            if not self.scanned:
                return {}  # at start: nothing to keep, not ready
            if not self._root_missing:
                log.error("model repository: %s cannot be listed (%s): the %d models loaded serve on until it can",
                          self.root, exc.strerror or exc, len(self._models))
            self._root_missing = True
            return None
        if self._root_missing:
            log.warning("model repository: %s can be listed again", self.root)
            self._root_missing = False
        found = {}
        for model_dir in model_dirs:
            if not model_dir.is_dir() or model_dir.name.startswith("."):
                continue
            try:
                entries = list(model_dir.iterdir())
            except OSError as exc:  # unreadable: its versions are not on disk as far as this scan can tell
                self._ignore(model_dir, f"cannot be read ({exc.strerror or exc})")
                continue
            for version_dir in entries:
                if (version_dir.is_dir() and VERSION_NAME.fullmatch(version_dir.name)
                        and len(version_dir.name) <= MAX_VERSION_DIGITS):
                    found[(model_dir.name, int(version_dir.name))] = version_dir
                elif not version_dir.name.startswith("."):
                    self._ignore(version_dir, f"is not a version directory (a positive whole number of at most "
                                             f"{MAX_VERSION_DIGITS} digits, e.g. 3)")
        return found

    def _ignore(self, path: Path, why: str) -> None:
        if path not in self._ignored:
            self._ignored.add(path)
            log.warning("model repository: ignoring %s: it %s", path, why)

    def _read_unloaded(self) -> tuple[set[str], dict[str, int], int]:
        """The shared state of load / unload: (the models unloaded, how many times each model was loaded, its
        generation, one more at each change). The counts reach the other workers however soon a load follows an
        unload (a set alone was back as it was by the time their pollers read it, so they never retried the model's
        failed versions)."""
        self._unloaded_stamp = _stamp(self.unloaded_file)
        try:
            shared = json.loads(self.unloaded_file.read_text())
            return (set(shared["unloaded"]), {name: int(n) for name, n in shared["loads"].items()},
                    int(shared.get("generation", 0)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return set(), {}, 0

    def unloaded_changed(self) -> bool:
        """Whether a worker changed the shared load / unload state since this one last read it (one ``stat``)."""
        return _stamp(self.unloaded_file) != self._unloaded_stamp

    @contextlib.contextmanager
    def _shared_state_locked(self) -> Iterator[None]:
        """Hold the lock on the shared load / unload state, for a read-modify-write: two calls at once (in two
        workers, or two threads of one) each wrote their change over the other's."""
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        with open(self.shared_dir / "unloaded.lock", "a") as lock:  # each open is a lock of its own, threads too
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield  # unlocked as the file closes

    def _set_unloaded(self, names: set[str], loads: dict[str, int], generation: int) -> None:
        """Share the unloaded set and the load counts as the next generation; this worker applies them at its
        scan, the others as their pollers see the file change (under ``_shared_state_locked``, which made the
        directory)."""
        write_json_atomic(self.unloaded_file, {"unloaded": sorted(names), "loads": loads, "generation": generation + 1})

    def workers_behind(self) -> int:
        """How many of the other workers that have started have not yet applied the load / unload state this one
        last applied (``DataPlane.load`` / ``unload`` wait for them: Triton answers once the change is done)."""
        mine = APPLIED.unpack_from(self._applied, self._slot * APPLIED.size)[0]
        theirs = [APPLIED.unpack_from(self._applied, slot * APPLIED.size)[0] for slot in range(self._workers)
                  if slot != self._slot]
        return sum(1 for applied in theirs if 0 < applied < mine)

    def _model_names_on_disk(self) -> set[str]:
        try:
            return {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        except OSError:
            return set()

    def _load(self, path: Path, name: str, version: int) -> LoadedModel:
        _check_regular_files(path)
        card = read_card(path / CARD_FILE)
        if (card.name, card.version) != (name, version):
            raise CardError(f"card says {card.name}/{card.version} but lives in {name}/{version}")
        onnx_path = path / MODEL_FILE
        if not onnx_path.exists():
            raise CardError(f"{onnx_path} is missing")
        digest = file_sha256(onnx_path)
        if digest != card.sha256:
            raise CardError(f"sha256 of model.onnx is {digest}, the card says {card.sha256}")
        session = self._session(onnx_path, self.settings.threads_per_session)
        _check_graph_against_card(session, card)
        wide = self._session(onnx_path, self._wide_threads, spin=False) if self.board else None
        used = session.get_providers()
        note = None
        if CUDA in self._providers and CUDA not in used:
            if self.settings.device == "cuda":
                raise DeviceError(f"{name}/{version}: CUDA provider requested but onnxruntime fell back to {used}")
            note = "CNNSERVE_DEVICE=auto: the CUDA provider did not load, running on CPU"
            log.warning("%s/%s: %s", name, version, note)
            self.device_note = note
        batcher = self._batcher(card, session, wide)
        batcher.warm_up(np.zeros((1, *card.input.shape), np.uint8))
        return LoadedModel(card, path, session, batcher, used, note)

    def _session(self, onnx_path: Path, threads: int, spin: bool = True) -> ort.InferenceSession:
        """``spin=False``: onnxruntime's pool threads sleep as soon as a run is done instead of spinning for the
        next one (the wide session runs a lone request, or a batch while the other workers are idle, one at a time
        per worker: spinning between them took a core from the client and the event loop: serving/README.md, "A
        lone request")."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(onnx_path), options, providers=self._providers)

    def _batcher(self, card: ModelCard, session: ort.InferenceSession,
                 wide: ort.InferenceSession | None) -> DynamicBatcher:
        """The model's batcher, with the card's batching settings unless the environment overrides them;
        ``wide``: a session with every core's threads, for runs that find the whole server idle."""
        s, batching = self.settings, card.batching
        delay_ms = s.max_queue_delay_ms if s.max_queue_delay_ms >= 0 else batching.max_queue_delay_ms

        def runner(sess: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
            return lambda images: sess.run([PROBS_NAME], {INPUT_NAME: images})[0]

        return DynamicBatcher(runner(session), s.max_batch_size or batching.max_batch_size, delay_ms / 1000,
                              max_queue_images=s.max_queue_images or batching.max_queue_images,
                              queue_budget_s=s.queue_budget_ms / 1000, max_queue_wait_s=s.max_queue_wait_ms / 1000,
                              observe=lambda n, q: observe_batch(card.name, n, q), name=card.name,
                              inline_max_images=s.inline_max_images, run_wide=runner(wide) if wide else None,
                              board=self.board)

    # --- load / unload (Triton's model repository extension) ---------------------------------------------
    def unload(self, name: str) -> ScanResult:
        """Take every version of ``name`` out of service, files untouched, until ``load(name)``. The other
        workers of this server follow within a tenth of a second plus the load time (the set is shared through
        ``unloaded_file``, which their pollers watch: ``unloaded_changed``; ``workers_behind`` tells when)."""
        if name not in self._model_names_on_disk() and name not in self._models:
            raise ModelNotFound(f"model {name!r} not found in the repository")
        with self._shared_state_locked():
            unloaded, loads, generation = self._read_unloaded()
            self._set_unloaded(unloaded | {name}, loads, generation)
        self._served.discard(name)
        return self.scan()

    def load(self, name: str) -> ScanResult:
        """Serve ``name`` again (after ``unload``) and try its failed versions again, files changed or not."""
        if name not in self._model_names_on_disk():
            raise ModelNotFound(f"model {name!r} not found in the repository")
        with self._shared_state_locked():
            unloaded, loads, generation = self._read_unloaded()
            self._set_unloaded(unloaded - {name}, {**loads, name: loads.get(name, 0) + 1}, generation)
        result = self.scan()  # retries its failed versions: its load count went up
        if name not in self._models:
            reasons = "; ".join(f"{s.version}: {s.reason}" for s in self.statuses() if s.name == name) or "no versions"
            raise ModelNotReady(f"model {name} did not load: {reasons}")
        return result

    # --- lookup ------------------------------------------------------------------------------------------
    def get(self, name: str, version: int | str | None = None) -> LoadedModel:
        versions, unloaded = self._models.get(name), False
        if not versions:
            # a scan (in another thread) grows the unloaded set before it swaps the table and shrinks it after:
            # the set looked at once, then the table once more, see a model being unloaded or loaded as one or
            # the other, never as neither
            unloaded = name in self._unloaded
            versions = self._models.get(name)
        if version in (None, ""):
            if not versions:
                self._raise_missing(name, None, unloaded)
            return versions[max(versions)]
        if isinstance(version, str):  # a version folder's name: int() took "+2", " 2", "0_2", full-width digits
            named = VERSION_NAME.fullmatch(version) is not None
            if named and len(version) > MAX_VERSION_DIGITS:
                if not versions:  # no such model, or unloaded: said as for any version
                    self._raise_missing(name, None, unloaded)
                raise ModelNotFound(f"model {name!r} has no version of {len(version)} digits")
            v = int(version) if named else 0
        else:  # a JSON number: whole (1.9 is no version 1)
            v = int(version) if isinstance(version, int) or (isinstance(version, float) and version.is_integer()) else 0
        if v < 1 or isinstance(version, bool):  # 0 and -1 mean "latest" to some servers: here, one rule everywhere
            raise InvalidInput(f"model version must be a positive integer (or none, for the latest), got {version!r}")
        if not versions or v not in versions:
            self._raise_missing(name, v, unloaded or name in self._unloaded)
        return versions[v]

    def _raise_missing(self, name: str, version: int | None, unloaded: bool) -> None:
        if unloaded:
            raise ModelNotReady(f"model {name} is unloaded (a repository load serves it again: "
                                f"POST /v2/repository/models/{name}/load, or gRPC RepositoryModelLoad)")
        failed = [s for s in self.statuses() if s.name == name and not s.ready
                  and (version is None or s.version == version)]
        if failed:
            raise ModelNotReady(f"model {name}/{failed[0].version} is not ready: {failed[0].reason}")
        versions = sorted({s.version for s in self.statuses() if s.name == name and s.version})
        if version is not None and versions:
            raise ModelNotFound(f"model {name!r} has no version {version}; its versions: "
                                f"{', '.join(map(str, versions))}")
        known = ", ".join(sorted({s.name for s in self.statuses()})) or "none"
        what = f"model {name!r}" + (f" version {version}" if version is not None else "")
        raise ModelNotFound(f"{what} not found; models: {known}")

    def latest(self) -> list[LoadedModel]:
        return [versions[max(versions)] for _, versions in sorted(self._models.items())]

    def all_loaded(self) -> list[LoadedModel]:
        return [m for _, versions in sorted(self._models.items()) for _, m in sorted(versions.items())]

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def statuses(self) -> list[VersionStatus]:
        """Every version on disk or loaded, the unloaded models' versions (or the model alone, when none is on disk)
        among them, in order."""
        found = [s.status for s in self._seen.values()]
        unloaded = self._unloaded_versions + [(n, 0) for n in self._unloaded - {n for n, _ in self._unloaded_versions}]
        found += [VersionStatus(name, v, False, "unloaded", state=UNAVAILABLE) for name, v in unloaded
                  if name in self._unloaded]  # a model loaded again while a scan swaps its tables: not listed
        return sorted(found, key=lambda s: (s.name, s.version))

    @property
    def ready(self) -> bool:
        """True once the first scan has tried every version on disk and at least one model serves; with
        ``strict_readiness``, also every model in the repository (or served since start, and not unloaded)
        has a version that serves.

        Without strict readiness a broken version does not hold the others back: it is reported in its own
        model readiness."""
        if not (self.scanned and self._models):
            return False
        if not self.settings.strict_readiness:
            return True
        expected = (self._served | {s.name for s in self.statuses()}) - self._unloaded
        return expected <= set(self._models)

    def close(self, reason: str = "the server is shutting down") -> None:
        for m in self.all_loaded():
            m.batcher.close(reason)
        if self.board:
            self.board.close()
        self._applied.close()
