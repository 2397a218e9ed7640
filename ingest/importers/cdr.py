"""Columnar decoding of ROS 2 CDR messages: every message of one schema at once, driven by the schema in the file.

`mcap-ros2-support` decodes one message at a time in Python (about 2 ms for a TrackedObjects message of 30 objects
with their covariances). Here the schema embedded in the MCAP file (`ros2msg`, parsed by the same parser
`mcap-ros2-support` uses, so the field types are the ones it would read) is compiled once into a program of
operations, and the program runs over all messages together with numpy: each operation moves a cursor per message
(N,) and gathers the wanted fields at the cursors. Layout rules (XCDR1, as `mcap_ros2._cdr.CdrReader` reads it):
a 4-byte encapsulation header, then each primitive of size s aligned to s relative to the end of that header;
strings and sequences are a uint32 count (aligned to 4) followed by their elements, an element of a primitive
sequence aligned only when there is one; fixed arrays have no count; nested messages add no alignment of their
own; an empty message holds one uint8. Runs of fixed-size fields are merged into one operation whose offsets are
precomputed for each of the 8 possible cursor phases (cursor mod 8), so a Pose with its covariance costs one step.

A sequence of messages (e.g. the objects of a TrackedObjects) is decoded element by element across all messages:
step j decodes the j-th element of every message that has one. Its fields come back flat in message order, with
the element counts per message (`Decoded.counts`).

Every read is bounds-checked against its message: a message that ends early, or a count that claims more elements
than the message could hold, raises `CdrError` naming the message's index. Strings are skipped but checked to be
UTF-8, as the reference decoder does. Constructs this decoder does not handle (wstring, the ROS 1 time and
duration primitives, big-endian messages) raise `Unsupported`: the caller then decodes with `mcap-ros2-support`.
"""

from __future__ import annotations

import numpy as np

try:  # the msg-definition parser mcap-ros2-support decodes with, so both decoders read the same field types
    from mcap_ros2._dynamic import TimeDefinition, _for_each_msgdef
except ImportError:  # pragma: no cover - a release that moved them: every message goes through mcap-ros2-support
    TimeDefinition = _for_each_msgdef = None

from ingest.importers.common import MessageError

_DTYPE = {"bool": "u1", "byte": "u1", "char": "i1", "int8": "i1", "uint8": "u1", "int16": "<i2", "uint16": "<u2",
          "int32": "<i4", "uint32": "<u4", "int64": "<i8", "uint64": "<u8", "float32": "<f4", "float64": "<f8"}


_MAX_DEPTH = 32


class Unsupported(Exception):
    """The schema or the messages use what the columnar decoder does not handle: decode with mcap-ros2-support."""


class CdrError(MessageError):
    """Message `index` (of the batch) cannot be decoded: truncated, or a count larger than the message."""


# ------------------------------------------------------------------------------------------------- compiling


def _msgdefs(schema_name: str, schema_text: str) -> dict:
    if _for_each_msgdef is None:
        raise Unsupported("mcap-ros2-support's msg-definition parser is not where this decoder expects it")
    defs = {"builtin_interfaces/Time": TimeDefinition, "builtin_interfaces/Duration": TimeDefinition}

    def add(name, short, msgdef):
        defs[name] = msgdef
        defs[short] = msgdef

    try:
        _for_each_msgdef(schema_name, schema_text, add)
    except Exception as exc:  # the vendored parser raises many kinds; the reference decoder would too
        raise Unsupported(f"schema {schema_name} does not parse: {exc}") from None
    return defs


def _fields(msgdef, defs: dict, prefix: str, depth: int = 0) -> list[tuple]:
    """Flat field list of a message: ("prim", path, type, n) (n 1 for a scalar), ("str", path),
    ("pseq", path, type), ("cseq", path, element fields, fixed count or None)."""
    if depth > _MAX_DEPTH:  # a type that holds itself (through a sequence): left to the reference decoder
        raise Unsupported(f"types nested deeper than {_MAX_DEPTH} at {prefix}")
    if not msgdef.fields:
        return [("prim", f"{prefix}structure_needs_at_least_one_member", "uint8", 1)]
    out: list[tuple] = []
    for f in msgdef.fields:
        t, path = f.type, f"{prefix}{f.name}"
        fixed = t.array_size if t.is_fixed_size_array() and t.array_size is not None else None
        if not t.is_primitive_type():
            sub = defs.get(f"{t.pkg_name}/{t.type}")
            if sub is None:
                raise Unsupported(f"no definition of {t.pkg_name}/{t.type} for field {path}")
            if t.is_array:
                out.append(("cseq", path, _fields(sub, defs, f"{path}[].", depth + 1), fixed))
            else:
                out.extend(_fields(sub, defs, f"{path}.", depth + 1))
        elif t.type == "string":
            out.append(("cseq", path, [("str", f"{path}[]")], fixed) if t.is_array else ("str", path))
        elif t.type not in _DTYPE:
            raise Unsupported(f"field {path} of type {t.type}")
        elif t.is_array and fixed is None:
            out.append(("pseq", path, t.type))
        else:
            out.append(("prim", path, t.type, fixed or 1))
    return out


class _Block:
    """A run of fixed-size primitive fields: per cursor phase (mod 8) their offsets and the run's size."""

    def __init__(self, prims: list[tuple]) -> None:
        self.sizes = np.zeros(8, np.int64)
        self.fields = [(path, np.dtype(_DTYPE[t]), n, np.zeros(8, np.int64)) for _, path, t, n in prims]
        for phase in range(8):
            at = phase
            for (path, dt, n, offs), (_, _, t, _) in zip(self.fields, prims):
                s = dt.itemsize
                at = -(-at // s) * s
                offs[phase] = at - phase
                at += s * n
            self.sizes[phase] = at - phase
        self.min_size = int(self.sizes.min())


def _program(fields: list[tuple]) -> list:
    ops: list = []
    run: list[tuple] = []
    for f in fields + [None]:
        if f is not None and f[0] == "prim":
            run.append(f)
            continue
        if run:
            ops.append(_Block(run))
            run = []
        if f is None:
            break
        if f[0] == "cseq":
            sub = _program(f[2])
            ops.append(("cseq", f[1], sub, f[3], _min_size(sub)))
        else:
            ops.append(f)
    return ops


def _min_size(ops: list) -> int:
    total = 0
    for op in ops:
        if isinstance(op, _Block):
            total += op.min_size
        elif op[0] == "cseq" and op[3] is not None:
            total += op[3] * _min_size(op[2])
        else:
            total += 4  # a count or a string's length
    return max(total, 1)


class Program:
    """A schema compiled for columnar decoding; `Program.of(name, text)` caches by schema."""

    _cache: dict[tuple[str, str], "Program"] = {}

    def __init__(self, schema_name: str, schema_text: str) -> None:
        defs = _msgdefs(schema_name, schema_text)
        root = defs.get(schema_name)
        if root is None:
            raise Unsupported(f"schema text does not define {schema_name}")
        self.name = schema_name
        self.ops = _program(_fields(root, defs, ""))
        self.paths: dict[str, tuple] = {}  # path -> (dtype, n) of a primitive, () of a string or sequence
        self.sequences: list[str] = []
        self.prim_sequences: set[str] = set()
        self._collect(self.ops)

    def _collect(self, ops: list) -> None:
        for op in ops:
            if isinstance(op, _Block):
                self.paths.update((f[0], (f[1], f[2])) for f in op.fields)
            else:
                self.paths[op[1]] = (np.dtype(_DTYPE[op[2]]), 1) if op[0] == "pseq" else ()
                if op[0] == "pseq":
                    self.prim_sequences.add(op[1])
                if op[0] == "cseq":
                    self.sequences.append(op[1])
                    self._collect(op[2])

    @classmethod
    def of(cls, schema_name: str, schema_text: str) -> "Program":
        key = (schema_name, schema_text)
        if key not in cls._cache:
            cls._cache[key] = cls(schema_name, schema_text)
        return cls._cache[key]


# ------------------------------------------------------------------------------------------------- running


class Decoded:
    """Decoded columns: `col(path)` in message order (sequence elements flat, in message then element order; a
    fixed array of n primitives as (rows, n)), `counts(path)` the elements of sequence `path` per parent row."""

    def __init__(self, cols: dict[str, np.ndarray], counts: dict[str, np.ndarray]) -> None:
        self._cols, self._counts = cols, counts

    def col(self, path: str) -> np.ndarray:
        return self._cols[path]

    def counts(self, path: str) -> np.ndarray:
        return self._counts[path]


def _view(buf: np.ndarray, dt: np.dtype, n: int) -> np.ndarray:
    """Every byte offset of `buf` read as one `dt` (n == 1) or as n consecutive ones: unaligned, zero-copy."""
    k = dt.itemsize * n
    rows = max(buf.shape[0] - k + 1, 0)
    if n == 1:
        return np.ndarray((rows,), dt, buffer=buf, strides=(1,))
    return np.ndarray((rows, n), dt, buffer=buf, strides=(1, dt.itemsize))


class _Run:
    def __init__(self, buf: np.ndarray, want: set[str]) -> None:
        self.buf, self.want = buf, want
        self.u32 = _view(buf, np.dtype("<u4"), 1)
        self.views: dict[tuple, np.ndarray] = {}
        self.out: dict[str, list] = {}      # path -> [(uids, values)]
        self.levels: dict[str, list] = {}   # sequence path -> [(uids, parent uids, element index)]
        self.next_uid: dict[str, int] = {}

    def view(self, dt: np.dtype, n: int) -> np.ndarray:
        key = (dt.str, n)
        if key not in self.views:
            self.views[key] = _view(self.buf, dt, n)
        return self.views[key]

    @staticmethod
    def check(ok: np.ndarray, msg: np.ndarray, what: str) -> None:
        if not ok.all():
            raise CdrError(int(msg[~ok].min()), what)

    def count(self, pos, base, end, msg, path):
        pos = base + ((pos - base + 3) & ~3)
        self.check(pos + 4 <= end, msg, f"truncated: the message ends inside the count of {path}")
        return self.u32[pos].astype(np.int64), pos + 4

    def strings(self, pos, base, end, msg, path):
        length, pos = self.count(pos, base, end, msg, path)
        self.check(pos + length <= end, msg, f"truncated: the message ends inside string {path}")
        text = length > 1
        if text.any():  # UTF-8, as the reference decoder requires: ASCII at once, the rest one by one
            starts, lens = pos[text], length[text] - 1
            idx = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
            if idx.size and self.buf[idx].max() >= 0x80:
                for i, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
                    try:
                        self.buf[s:s + n].tobytes().decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise CdrError(int(msg[text][i]), f"string {path} is not UTF-8 ({exc})") from None
        return pos + length

    def run(self, ops, level, uid, pos, base, end, msg) -> np.ndarray:
        for op in ops:
            if isinstance(op, _Block):
                phase = (pos - base) & 7
                new = pos + op.sizes[phase]
                self.check(new <= end, msg, f"truncated: the message ends inside {op.fields[0][0]}")
                for path, dt, n, offs in op.fields:
                    if path in self.want:
                        self.out.setdefault(path, []).append((uid, self.view(dt, n)[pos + offs[phase]]))
                pos = new
            elif op[0] == "str":
                pos = self.strings(pos, base, end, msg, op[1])
            elif op[0] == "pseq":
                count, pos = self.count(pos, base, end, msg, op[1])
                dt = np.dtype(_DTYPE[op[2]])
                s = dt.itemsize
                if s > 1:
                    pos = np.where(count > 0, base + ((pos - base + s - 1) & ~(s - 1)), pos)
                new = pos + count * s
                self.check(new <= end, msg, f"truncated: the message ends inside sequence {op[1]}")
                if op[1] in self.want:
                    idx = np.repeat(pos - np.cumsum(count) * s + count * s, count) + np.arange(int(count.sum())) * s
                    self.out.setdefault(op[1], []).append((uid, (count, self.view(dt, 1)[idx])))
                pos = new
            else:
                pos = self.sequence(op, level, uid, pos, base, end, msg)
        return pos

    def sequence(self, op, level, uid, pos, base, end, msg) -> np.ndarray:
        _, path, child_ops, fixed, min_size = op
        if fixed is None:
            count, pos = self.count(pos, base, end, msg, path)
            self.check(count * min_size <= end - pos, msg,
                       f"sequence {path} claims more elements than the message holds")
        else:
            count = np.full(pos.shape[0], fixed, np.int64)
        first = self.next_uid.get(path, 0) + np.cumsum(count) - count
        total = int(count.sum())
        self.next_uid[path] = self.next_uid.get(path, 0) + total
        self.levels.setdefault(path, []).append(
            (first[0] + np.arange(total) if total else np.zeros(0, np.int64), np.repeat(uid, count),
             np.arange(total) - np.repeat(first - first[0] if total else first, count)))
        pos = pos.copy()
        for j in range(int(count.max()) if count.size else 0):
            act = np.flatnonzero(count > j)
            pos[act] = self.run(child_ops, path, first[act] + j, pos[act], base[act], end[act], msg[act])
        return pos

    def finish(self, program: Program, n: int) -> Decoded:
        rank = {"": np.arange(n)}
        sizes = {"": n}
        counts: dict[str, np.ndarray] = {}
        empty = np.zeros(0, np.int64)
        for path in sorted(program.sequences, key=lambda p: p.count("[]")):
            parent = _parent(path)
            uids, parents, j = ((np.concatenate(a) for a in zip(*self.levels[path])) if path in self.levels
                                else (empty, empty, empty))
            prank = rank[parent][parents]
            key = prank * (int(j.max()) + 1) + j if j.size else j  # < 2^63: both bounded by the batch's bytes
            order = np.argsort(key, kind="stable") if j.size and (np.diff(key) < 0).any() else np.arange(j.size)
            r = np.empty(self.next_uid.get(path, 0), np.int64)
            r[uids[order]] = np.arange(uids.shape[0])
            rank[path], sizes[path] = r, uids.shape[0]
            counts[path] = np.bincount(prank, minlength=sizes[parent])
        cols: dict[str, np.ndarray] = {}
        for path in self.want - set(self.out):  # wanted fields of elements no message holds
            dt, k = program.paths[path] or (np.dtype("u1"), 1)
            cols[path] = np.zeros((0,) if k == 1 else (0, k), dt)
            if path in program.prim_sequences:
                counts[path] = np.zeros(sizes[_parent(path)], np.int64)
        for path, chunks in self.out.items():
            level = _parent(path)
            if isinstance(chunks[0][1], tuple):  # a primitive sequence: flat values, counts per row
                uids = np.concatenate([u for u, _ in chunks])
                cnt = np.concatenate([c for _, (c, _) in chunks])
                vals = np.concatenate([v for _, (_, v) in chunks])
                order = np.argsort(rank[level][uids], kind="stable")
                starts = np.cumsum(cnt) - cnt
                sel = np.concatenate([np.arange(starts[i], starts[i] + cnt[i]) for i in order]) if vals.size else []
                cols[path], counts[path] = vals[sel], cnt[order]
                continue
            uids = np.concatenate([u for u, _ in chunks])
            vals = np.concatenate([v for _, v in chunks])
            out = np.empty((sizes[level],) + vals.shape[1:], vals.dtype)
            out[rank[level][uids]] = vals
            cols[path] = out
        return Decoded(cols, counts)


def _parent(path: str) -> str:
    """The sequence level a path belongs to: the part up to its last '[]' ('' for the message itself)."""
    i = path.rfind("[]")
    return path[:i] if i >= 0 else ""


def decode(program: Program, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, want: set[str]) -> Decoded:
    """Decode the messages buf[starts[i]:ends[i]] (uint8 buffer, int64 offsets), keeping the paths in `want`.

    Raises CdrError naming a message that cannot be decoded, Unsupported for big-endian messages or a wanted path
    the schema lacks (a schema that differs from what the caller knows), in which case nothing is decoded here.
    """
    missing = sorted(p for p in want if not program.paths.get(p))
    if missing:
        raise Unsupported(f"{program.name} has no primitive field {missing[0]}")
    n = starts.shape[0]
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    short = ends - starts < 4
    if short.any():
        i = int(np.argmax(short))
        raise CdrError(i, f"Invalid CDR data size {int(ends[i] - starts[i])}, must contain at least a 4-byte header")
    if n and not (buf[starts + 1] & 1).all():
        raise Unsupported("big-endian CDR")
    r = _Run(buf, want)
    r.run(program.ops, "", np.arange(n), starts + 4, starts + 4, ends, np.arange(n))
    return r.finish(program, n)
