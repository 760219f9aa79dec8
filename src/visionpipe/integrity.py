"""What `visionpipe predict` checks in an export before it runs it.

- The files: export writes the SHA-256 and size of every file it wrote into export.json
  (``files``, by path inside the export folder); predict compares the files of the format it
  runs with them before loading anything, so a damaged or replaced file is named, not loaded.
- export.json itself: the keys predict reads, with their types, so a missing or mistyped key
  is one line naming it instead of a KeyError deep inside predict.
- A SavedModel's graph: a SavedModel is a TensorFlow program, and its functions may hold ops
  that read or write files, call Python or talk to other processes. predict refuses one whose
  graph holds such ops (:data:`RISKY_OPS`) unless told to trust it. TFLite and ONNX files name
  operators from a fixed set of built-in kernels that compute on tensors; they hold no file,
  Python or network operators.

:func:`open_checked` is how predict loads an export: the checks, then
:func:`visionpipe.serving.open_runner`.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from visionpipe.errors import ModelError
from visionpipe.serving import (
    DEFAULT_REMEDY,
    FILES,
    META_FILE,
    first_line,
    format_path,
    open_runner,
    read_meta,
)

FILES_KEY = "files"  # export.json: {relative path: {"sha256": hex, "bytes": size}}
_CHUNK = 1 << 20
MAX_SHOWN = 60  # characters of a bad value quoted in a message

# --------------------------------------------------------------------------------- checksums


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def record_files(folder: Path) -> dict[str, dict]:
    """``{relative path: {"sha256": ..., "bytes": ...}}`` of every file under ``folder`` (the
    files of a SavedModel folder each by its own path), sorted by path."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): {"sha256": sha256_of(path),
                                                  "bytes": path.stat().st_size}
            for path in sorted(p for p in folder.rglob("*") if p.is_file())}


def _model(meta: dict) -> str:
    return meta["model"] if isinstance(meta.get("model"), str) else "<model>"


def remedy(export_dir: Path, meta: dict) -> str:
    """What to do about a damaged export: restore it from DVC or rebuild it."""
    model = _model(meta)
    return (f"restore the export with `dvc checkout {export_dir}` (where DVC tracks it) or "
            f"rebuild it with `dvc repro export@{model}`")


def _check_record(record, meta_path: Path, fix: str) -> dict[str, dict]:
    """export.json's ``files`` as written by :func:`record_files`; anything else is an error."""
    if not isinstance(record, dict):
        raise ModelError(f"{meta_path}: key {FILES_KEY!r} is {_shown(record)}; expected a "
                         f"mapping of file path to its sha256 and bytes; {fix}")
    for rel, entry in record.items():
        parts = Path(rel).parts
        if (not rel or Path(rel).is_absolute() or ".." in parts or not isinstance(entry, dict)
                or not _is_hex64(entry.get("sha256")) or not _is_count(entry.get("bytes"))):
            raise ModelError(f"{meta_path}: key {FILES_KEY}.{_shown(rel)} is "
                             f"{_shown(entry)}; expected a path inside the export with "
                             f"{{\"sha256\": 64 hex digits, \"bytes\": a whole number}}; "
                             f"{fix}")
    return record


def _is_hex64(value) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def verify_files(export_dir: Path, meta: dict, part: str,
                 warn: Callable[[str], None]) -> None:
    """Check the file or folder ``part`` of the export against export.json's checksums.

    A missing, changed or added file is a ModelError naming it. An export.json written before
    checksums were recorded passes with a warning through ``warn``: it cannot be verified."""
    export_dir = Path(export_dir)
    meta_path = export_dir / META_FILE
    target = export_dir / part
    fix = remedy(export_dir, meta)
    if FILES_KEY not in meta:
        warn(f"{meta_path} records no checksums (an export written before visionpipe recorded "
             f"them): {target} cannot be verified; rerun `dvc repro export@{_model(meta)}` "
             "to record them")
        return
    record = _check_record(meta[FILES_KEY], meta_path, fix)
    listed = {rel: entry for rel, entry in record.items()
              if rel == part or rel.startswith(part + "/")}
    if not listed:
        raise ModelError(f"{meta_path}: key {FILES_KEY!r} lists no file of {part}; export.json "
                         f"was edited or belongs to another export: {fix}")
    for rel, entry in sorted(listed.items()):
        _verify_one(export_dir / rel, entry, fix)
    if target.is_dir():
        for extra in _files_under(target):
            rel = extra.relative_to(export_dir).as_posix()
            if rel not in listed:
                raise ModelError(f"{extra}: not one of the {len(listed)} file(s) export wrote "
                                 f"in {target} (export.json lists them): added since export; "
                                 f"remove it, or {fix}")


def _files_under(folder: Path) -> Iterator[Path]:
    """Every entry under ``folder`` that is not a folder (links not followed), sorted."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _verify_one(path: Path, entry: dict, fix: str) -> None:
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ModelError(f"{path}: not a regular file, so not the file export wrote; "
                             f"{fix}")
        if info.st_size != entry["bytes"]:
            raise ModelError(f"{path}: changed or damaged since export ({info.st_size} bytes; "
                             f"export.json records {entry['bytes']}); {fix}")
        digest = sha256_of(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; export.json lists it among the files export "
                         f"wrote; {fix}") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc.strerror or exc}); check its "
                         f"permissions, or {fix}") from None
    if digest != entry["sha256"]:
        raise ModelError(f"{path}: changed or damaged since export (SHA-256 {digest[:12]}..., "
                         f"export.json records {entry['sha256'][:12]}...); {fix}")


# ---------------------------------------------------------------------------- export.json


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def _size_pair(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))


def _overlap(value) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value < 1)


def _names(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(v, str) for v in value))


@dataclass(frozen=True)
class Key:
    """A key of export.json predict reads: its test and what it should hold."""

    name: str
    ok: Callable[[object], bool]
    expected: str
    required: bool = True


def meta_keys(policies: Iterable[str]) -> tuple[Key, ...]:
    """The keys predict reads (``policies``: the resize policies it knows)."""
    policies = tuple(policies)
    return (
        Key("task", lambda v: isinstance(v, str), "a task name (a string)"),
        Key("class_names", _names, "a non-empty list of class names (strings)"),
        Key("image_size", _size_pair, "[height, width]: two whole numbers of at least 1"),
        Key("resize", lambda v: v in policies, "one of " + ", ".join(policies)),
        Key("formats", lambda v: isinstance(v, dict) and all(
            isinstance(e, dict) for e in v.values()), "a mapping of format name to its entry"),
        Key("outputs", lambda v: isinstance(v, dict), "a mapping of output name to its meaning"),
        Key("model", lambda v: isinstance(v, str), "the model's name (a string)", False),
        Key("scale", _size_pair, "[height, width]: two whole numbers of at least 1", False),
        Key("tile_overlap", _overlap, "a number from 0 to below 1", False),
    )


def check_meta(meta: dict, meta_path: Path, policies: Iterable[str]) -> None:
    """Raise a ModelError naming the first key predict reads that is missing or holds the
    wrong kind of value."""
    fix = remedy(meta_path.parent, meta)
    for key in meta_keys(policies):
        if key.name not in meta:
            if key.required:
                raise ModelError(f"{meta_path}: key {key.name!r} is missing; predict needs "
                                 f"{key.expected}. export.json was edited or damaged: {fix}")
            continue
        if not key.ok(meta[key.name]):
            raise ModelError(f"{meta_path}: key {key.name!r} is {_shown(meta[key.name])}; "
                             f"expected {key.expected}. export.json was edited or damaged: "
                             f"{fix}")
    if len(meta["class_names"]) != len(set(meta["class_names"])):
        raise ModelError(f"{meta_path}: key 'class_names' names a class twice; expected "
                         f"distinct names. export.json was edited or damaged: {fix}")


# ------------------------------------------------------------------- SavedModel graph ops

# Ops of TensorFlow's op registry (TF 2.21) that reach outside the tensors of the graph, by
# what they do. A vision model's serving graph needs none; our exports' hold none (their
# functions compute with Conv2D, MatMul, resizing, NMS and the like). Ops that only turn
# tensors into strings (ScalarSummary, SerializeTensor) or print to the console (Print) are
# left out: they touch nothing outside the process.
WRITES_FILES = frozenset({
    "WriteFile", "Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints",
    "DatasetToTFRecord", "ExperimentalDatasetToTFRecord", "SaveDataset", "SaveDatasetV2",
    "DistributedSave", "SnapshotDataset", "SnapshotDatasetV2", "CacheDataset", "CacheDatasetV2",
    "CalibrationStatisticsSaver", "DumpTensor",
    # tfdbg: dump tensors to the file:// (or grpc://) URLs in their attributes
    "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3", "DebugNanCount",
    "DebugNumericSummary",
    # summary writers (event files, sqlite)
    "CreateSummaryFileWriter", "CreateSummaryDbWriter", "SummaryWriter", "WriteSummary",
    "WriteScalarSummary", "WriteImageSummary", "WriteHistogramSummary", "WriteAudioSummary",
    "WriteGraphSummary", "WriteRawProtoSummary", "ImportEvent", "FlushSummaryWriter",
    "CloseSummaryWriter", "StatsAggregatorSetSummaryWriter",
})
READS_FILES = frozenset({
    "ReadFile", "MatchingFiles", "ImmutableConst", "Restore", "RestoreV2", "RestoreSlice",
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2", "Skipgram", "RecordInput",
    "GenerateVocabRemapping", "LoadAndRemapMatrix",
    "WholeFileReader", "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2",
    "FixedLengthRecordReader", "FixedLengthRecordReaderV2", "TFRecordReader",
    "TFRecordReaderV2", "LMDBReader",
    "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "CSVDataset", "CSVDatasetV2", "ExperimentalCSVDataset",
    "SqlDataset", "ExperimentalSqlDataset", "LMDBDataset", "ExperimentalLMDBDataset",
    "MatchingFilesDataset", "ExperimentalMatchingFilesDataset", "LoadDataset",
    "SnapshotDatasetReader", "SnapshotNestedDatasetReader", "SnapshotChunkDataset",
    "ListSnapshotChunksDataset",
})
CALLS_PYTHON = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
# Other processes and machines: RPC, the tf.data service, cross-process collectives and
# send/receive pairs; besides the network, these wait for a peer that never comes (a hang).
OTHER_PROCESSES = frozenset({
    "RpcServer", "RpcServerRegister", "RpcServerStart", "RpcClient", "RpcCall",
    "DataServiceDataset", "DataServiceDatasetV2", "DataServiceDatasetV3",
    "DataServiceDatasetV4", "FileSystemSetConfiguration",
    "Send", "Recv", "_Send", "_Recv", "_HostSend", "_HostRecv",
    "CollectiveReduce", "CollectiveReduceV2", "CollectiveReduceV3", "CollectiveGather",
    "CollectiveGatherV2", "CollectiveBcastSend", "CollectiveBcastSendV2",
    "CollectiveBcastRecv", "CollectiveBcastRecvV2", "CollectiveAllToAllV2",
    "CollectiveAllToAllV3", "CollectiveReduceScatterV2", "CollectiveInitializeCommunicator",
})
RISKY_OPS = {**{op: "writes files" for op in WRITES_FILES},
             **{op: "reads files" for op in READS_FILES},
             **{op: "calls Python" for op in CALLS_PYTHON},
             **{op: "talks to other processes" for op in OTHER_PROCESSES}}
# The checkpoint ops a SavedModel's own saver holds (its save and restore functions, which
# TensorFlow runs on the variables/ folder it names): allowed there and nowhere else.
CHECKPOINT_OPS = frozenset({"Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints", "Restore",
                            "RestoreV2", "RestoreSlice"})


def _attr_risk(node) -> str | None:
    """Ops risky only by an attribute: PrintV2 to a file, proto ops reading a descriptor file."""
    if node.op == "PrintV2":
        stream = node.attr["output_stream"].s.decode(errors="replace")
        return "writes files" if stream.startswith("file://") else None
    if node.op in ("DecodeProtoV2", "EncodeProto") and "descriptor_source" in node.attr:
        source = node.attr["descriptor_source"].s.decode(errors="replace")
        return None if source in ("", "local://") or source.startswith("bytes://") \
            else "reads files"
    return None


@dataclass(frozen=True)
class Finding:
    """A risky op in a SavedModel: its type, what it does and where (a function's name)."""

    op: str
    does: str
    where: str


def _attr_funcs(value) -> Iterator[str]:
    """Names of the functions an attribute value refers to (a call, a loop's body)."""
    if value.HasField("func"):
        yield value.func.name
        for inner in value.func.attr.values():
            yield from _attr_funcs(inner)
    elif value.HasField("list"):
        for func in value.list.func:
            yield func.name
            for inner in func.attr.values():
                yield from _attr_funcs(inner)


def _calls(nodes, library: dict) -> set[str]:
    """The library functions ``nodes`` call: through function attributes, or as op type."""
    called = set()
    for node in nodes:
        if node.op in library:
            called.add(node.op)
        for value in node.attr.values():
            called.update(_attr_funcs(value))
    return called & set(library)


def _closure(roots: set[str], library: dict) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_calls(library[name].node_def, library) - seen)
    return seen


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _ancestors(names: list[str], graph_nodes: dict) -> set[str]:
    seen, todo = set(), [n for n in names if n in graph_nodes]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(i for i in map(_node_name, graph_nodes[name].input)
                        if i in graph_nodes and i not in seen)
    return seen


def meta_graph_findings(meta_graph) -> list[Finding]:
    """Risky ops anywhere in one MetaGraph: its top-level graph and every function of its
    library. The saver's own save and restore subgraph (named by its SaverDef) may hold the
    checkpoint ops, and nothing else risky; a function it shares with anything else may not."""
    graph = meta_graph.graph_def
    library = {f.signature.name: f for f in graph.library.function}
    graph_nodes = {n.name: n for n in graph.node}
    saver = meta_graph.saver_def
    saver_nodes = _ancestors([_node_name(saver.save_tensor_name),
                              _node_name(saver.restore_op_name)], graph_nodes)
    other_nodes = [n for n in graph.node if n.name not in saver_nodes]
    saver_funcs = _closure(_calls([graph_nodes[n] for n in saver_nodes], library), library)
    strict_funcs = _closure(_calls(other_nodes, library) | (set(library) - saver_funcs),
                            library)
    findings: list[Finding] = []

    def check(nodes, where: str, allowed: frozenset[str]) -> None:
        for node in nodes:
            does = None if node.op in allowed else RISKY_OPS.get(node.op) or _attr_risk(node)
            if does:
                findings.append(Finding(node.op, does, where))

    check(other_nodes, "the top-level graph", frozenset())
    check([graph_nodes[n] for n in sorted(saver_nodes)], "the saver", CHECKPOINT_OPS)
    for name in sorted(library):
        check(library[name].node_def, name,
              frozenset() if name in strict_funcs else CHECKPOINT_OPS)
    return findings


def saved_model_findings(path: Path, fix: str = DEFAULT_REMEDY) -> list[Finding]:
    """Risky ops in the SavedModel folder ``path``, read with the parser
    ``tf.saved_model.load`` itself uses (saved_model.pb, else saved_model.pbtxt); a file it
    cannot parse is a ModelError ending in ``fix``."""
    from tensorflow.python.saved_model import loader_impl

    try:
        proto = loader_impl.parse_saved_model(str(path))
    except Exception as exc:  # noqa: BLE001 - IOError, DecodeError, UnicodeError...
        raise ModelError(f"{path}: not a readable SavedModel ({first_line(exc, path=path)}); "
                         f"the file is damaged or not a SavedModel: {fix}") from None
    return [f for meta_graph in proto.meta_graphs for f in meta_graph_findings(meta_graph)]


def check_saved_model_ops(path: Path, fix: str = DEFAULT_REMEDY) -> None:
    """Refuse (ModelError) a SavedModel whose graph holds ops of :data:`RISKY_OPS`."""
    findings = saved_model_findings(path, fix)
    if not findings:
        return
    ops = {}
    for f in findings:
        ops.setdefault((f.op, f.does), f.where)
    listed = "; ".join(f"{op} ({does}, in {where})" for (op, does), where in list(ops.items())[:3])
    more = f" and {len(ops) - 3} more" if len(ops) > 3 else ""
    raise ModelError(f"{path}: refused: its graph holds {listed}{more}. A SavedModel is a "
                     "program, and a visionpipe export holds no such ops; run this export's "
                     "TFLite or ONNX file (--format tflite or onnx), or pass "
                     "--trust-saved-model if you trust its source")


# ------------------------------------------------------------------------- loading, checked


def warn_line(line: str) -> None:
    """A warning on standard error, on one line of its own."""
    print(f"visionpipe: warning: {line}", file=sys.stderr, flush=True)


def open_checked(export_dir: Path, fmt: str, meta: dict | None = None, *,
                 trust_saved_model: bool = False, warn: Callable[[str], None] = warn_line):
    """:func:`~visionpipe.serving.open_runner` after the checks: the format's files against
    export.json's checksums (an export without them loads with a warning through ``warn``),
    and a SavedModel whose graph reads or writes files, calls Python or talks to other
    processes refused unless ``trust_saved_model``."""
    export_dir = Path(export_dir)
    meta = meta if meta is not None else read_meta(export_dir)
    path = format_path(export_dir, fmt, meta)
    verify_files(export_dir, meta, FILES[fmt], warn)
    fix = remedy(export_dir, meta)
    if fmt == "saved_model" and not trust_saved_model:
        check_saved_model_ops(path, fix)
    return open_runner(export_dir, fmt, meta, fix)
