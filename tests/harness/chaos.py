"""The chaos harness: the real commit path (jobs/output/commits.py, jobs/output/publish.py) interrupted at every
storage call, mid-write included, or raced by a second writer with random delays, then resumed;
and the reader checks that every trial, in process or end to end, ends with.

A kill is a `Killed` raised at the n-th storage call. A kill mid-write leaves the temporary file
with half its bytes, as a crashed process would. What a "run" does here is what a job's driver and
its publish tasks do once the rows are rendered: write each row's image as the writer would,
commit each shard, publish it, finish the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs.input.shards import Shard
from jobs.output.card import write_card
from jobs.output.commits import Work, commit_shard, list_commits, read_metadata, work_left
from jobs.output.layout import Derived, data_key, image_dir, tar_key
from jobs.output.publish import finish_output, publish
from workers import storage
from workers.columns import METADATA_SCHEMA
from workers.keys import item_key
from workers.storage import join, list_prefix, read_bytes, write_bytes

READERS = ("duckdb", "pyarrow", "ray", "datasets")


class Killed(BaseException):
    """A process dying at a storage call: nothing above may catch it as an ordinary error."""


# ---- readers ---------------------------------------------------------------------------------


def read_rows(out: str, reader: str, hf_cache: str | None = None) -> list[tuple[int, int]]:
    """(row, image_index) of every row a reader of OUT/data sees, repeats included."""
    if not list_prefix(out, "data/"):
        return []  # an output before its job claimed it: nothing to read yet
    if reader == "duckdb":
        import duckdb

        return duckdb.sql(f"SELECT row, image_index FROM read_parquet('{out}/data/*.parquet')").fetchall()
    if reader == "pyarrow":
        import pyarrow.dataset as pads

        fs, path = storage.resolve(join(out, "data"))
        t = pads.dataset(path, format="parquet", filesystem=fs).to_table(columns=["row", "image_index"])
        return list(zip(t.column("row").to_pylist(), t.column("image_index").to_pylist()))
    if reader == "ray":
        import ray

        return [
            (r["row"], r["image_index"])
            for r in ray.data.read_parquet(f"{out}/data", columns=["row", "image_index"]).take_all()
        ]
    if reader == "datasets":
        import tempfile

        from datasets import load_dataset

        # A new reader each time: datasets reuses what it cached for a folder even after the folder
        # gained files (the README says so), and a cache is not the output.
        os.makedirs(hf_cache or tempfile.gettempdir(), exist_ok=True)
        cache = tempfile.mkdtemp(dir=hf_cache)
        ds = load_dataset(out, split="train", cache_dir=cache, columns=["row", "image_index"])
        return list(zip(ds["row"], ds["image_index"]))
    raise ValueError(f"reader {reader!r}: expected one of {READERS}")


@dataclass
class Figures:
    """What a chaos run found, per reader: kill points tried, rows lost, rows duplicated."""

    trials: int = 0
    reads: Counter = field(default_factory=Counter)  # reader -> checks made
    lost: Counter = field(default_factory=Counter)  # reader -> committed rows missing after a resume
    duplicated: Counter = field(default_factory=Counter)  # reader -> rows seen more than once
    uncommitted: Counter = field(default_factory=Counter)  # reader -> rows seen of an uncommitted shard
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            f"{self.trials} trials",
            f"{'reader':10s} {'checks':>7s} {'lost':>5s} {'duplicated':>10s} {'uncommitted':>11s}",
        ]
        for r in READERS:
            if self.reads[r]:
                lines.append(
                    f"{r:10s} {self.reads[r]:7d} {self.lost[r]:5d} {self.duplicated[r]:10d} {self.uncommitted[r]:11d}"
                )
        return "\n".join(lines + [f"problem: {p}" for p in self.problems[:20]])


def check_readers(out: str, figures: Figures, readers, expected: set | None = None, hf_cache=None, what="") -> None:
    """Each reader sees no row twice and no row outside a committed shard; with `expected` (a
    finished output), exactly those rows. Temporary files are never visible in data/."""
    committed = set(list_commits(out))
    local = not storage.is_s3(out)
    if local and os.path.isdir(join(out, "data")):
        names = [n for n in os.listdir(join(out, "data")) if not n.startswith(".")]
        if any(not n.endswith(".parquet") for n in names):
            figures.problems.append(f"{what}: data/ shows {names}")
    for reader in readers:
        seen = Counter(read_rows(out, reader, hf_cache))
        figures.reads[reader] += 1
        figures.duplicated[reader] += sum(n - 1 for n in seen.values())
        figures.uncommitted[reader] += sum(n for (r, _), n in seen.items() if row_shard(r) not in committed)
        if expected is not None:
            figures.lost[reader] += len(expected - set(seen))
            if set(seen) - expected:
                figures.problems.append(f"{what}: {reader} sees rows that should not exist")


def check_finished(out: str, derived: Derived, figures: Figures, what="") -> None:
    """A finished output: no orphaned image or attempt, and tars and embedded images equal the
    stored image files of the rows in data/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    commits = list_commits(out)
    referenced, attempts = set(), {c.metadata for c in commits.values()}
    for shard, commit in commits.items():
        table = pq.read_table(pa.BufferReader(read_bytes(join(out, data_key(shard)))))
        rows = table.to_pylist()
        if [r["id"] for r in rows] != [r["id"] for r in read_metadata(out, commit)]:
            figures.problems.append(f"{what}: data/ of shard {shard} is not its committed attempt {commit.attempt}")
        ok = {r["image_key"]: r["sha256"] for r in rows if r["status"] == "ok"}
        referenced |= set(ok)
        for key, digest in ok.items():
            data = read_bytes(join(out, key))
            if data is None or hashlib.sha256(data).hexdigest() != digest:
                figures.problems.append(f"{what}: {key} missing or not its row's sha256")
        if derived.embed_images:
            for r in rows:
                embedded = r["image"]["bytes"] if r["image"] else None
                if (embedded and hashlib.sha256(embedded).hexdigest()) != (
                    ok.get(r["image_key"]) if r["status"] == "ok" else None
                ):
                    figures.problems.append(f"{what}: shard {shard} row {r['row']}: embedded image differs")
        if derived.webdataset:
            import tarfile

            with tarfile.open(fileobj=io.BytesIO(read_bytes(join(out, tar_key(shard))))) as tar:
                pngs = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if m.name.endswith(".png")}
            want = {f"{r['row']:09d}": ok[r["image_key"]] for r in rows if r["status"] == "ok"}
            if {k: hashlib.sha256(v).hexdigest() for k, v in pngs.items()} != want:
                figures.problems.append(f"{what}: shard {shard}'s tar differs from its data")
    images = set(list_prefix(out, "images/"))
    if images != referenced:
        figures.problems.append(
            f"{what}: {len(images - referenced)} orphaned, {len(referenced - images)} missing images"
        )
    if set(list_prefix(out, "attempts/")) != attempts:
        figures.problems.append(
            f"{what}: attempts/ holds {sorted(set(list_prefix(out, 'attempts/')) - attempts)} beyond the commits"
        )


def row_shard(row: int) -> int:
    return row // ROWS


# ---- the commit path, and faults in it ---------------------------------------------------------

ROWS = 4  # per shard
SHARDS = 3
FAILS = {5}  # rows that fail on their first attempt (a retry renders them)


def manifest():
    """The job the chaos output claims to be (its card names it): local-tiny's, named chaos."""
    from jobs.manifest import load_manifest

    return load_manifest(None, ["name=chaos", "output.path=/nonexistent/chaos"])


def plan() -> list[Shard]:
    return [Shard(s, "in.txt", "text", s * ROWS, ROWS, 0, 0, 1) for s in range(SHARDS)]


def png(row: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (row * 40 % 256, 90, 20)).save(buf, format="PNG")
    return buf.getvalue()


def render(out: str, work: Work, run_id: str) -> None:
    """What the stage actors and the writer leave behind for a shard: image files, metadata rows."""
    shard = work.shard
    rows = range(shard.first_row, shard.first_row + shard.num_rows)
    if shard.only_rows or shard.whole_rows:  # a retry: the failed outputs, and rows that failed whole
        items = set(shard.only_rows) | {item_key(r, 0) for r in shard.whole_rows}
    else:
        items = {item_key(r, 0) for r in rows}
    for r in rows:
        item = item_key(r, 0)
        if item not in items:
            continue
        row = dict.fromkeys(METADATA_SCHEMA.names) | dict(
            id=f"r{r}", row=r, image_index=0, shard=shard.index, prompt=f"p{r}", seed=r
        )
        if r in FAILS and work.attempt == 0:
            row.update(status="error", error="stage1: RuntimeError: out of GPU memory")  # retryable
        else:
            data = png(r)
            key = f"{image_dir(shard.index, work.attempt, run_id)}/r{r}.png"
            write_bytes(join(out, key), data)
            row.update(status="ok", error=None, image_key=key, sha256=hashlib.sha256(data).hexdigest())
        work.rows[item] = row


def run_path(out: str, derived: Derived, run_id: str, retry_errors: bool = False) -> None:
    """One run of the commit path over what is left, as the driver and its publish tasks do it."""
    write_card(out, manifest(), derived)
    commits = list_commits(out)
    for work in work_left(out, plan(), commits, retry_errors):
        render(out, work, run_id)
        if commit_shard(out, work, run_id) is not None:
            publish(out, work.shard.index, derived)
    finish_output(out, derived)


def expected_rows() -> set[tuple[int, int]]:
    return {(r, 0) for r in range(SHARDS * ROWS)}


MUTATIONS = ("write_bytes", "create_exclusive", "delete", "copy_object", "local_output")


def leave_partial(uri: str, data: bytes) -> None:
    """What a process killed mid-write leaves: locally a temporary file holding half the bytes; on
    S3 nothing (an unfinished PUT or multipart upload is never an object)."""
    if storage.is_s3(uri):
        return
    with open(storage.new_temp(storage.resolve(uri)[1]), "wb") as f:
        f.write(data[: len(data) // 2])


class Faults:
    """Wraps workers.storage's writing calls where every module looks them up: counts them, kills
    the n-th (before it, or mid-write), or sleeps a random moment before each."""

    def __init__(self, kill_at: int | None = None, mid_write: bool = False, delay_s: float = 0.0, seed: int = 0):
        self.kill_at, self.mid_write, self.delay_s = kill_at, mid_write, delay_s
        self.calls = 0
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.saved: list[tuple[object, str, object]] = []

    def _tick(self) -> bool:
        """True when this call is the one to kill."""
        if self.delay_s:
            with self.lock:
                pause = self.random.uniform(0, self.delay_s)
            time.sleep(pause)
        with self.lock:
            self.calls += 1
            return self.calls - 1 == self.kill_at

    def __enter__(self) -> Faults:
        import sys

        originals = {name: getattr(storage, name) for name in MUTATIONS}
        faults = self

        def wrap(name: str, fn: Callable):
            if name == "local_output":

                @contextlib.contextmanager
                def local_output(uri: str):
                    kill = faults._tick()
                    if kill and not faults.mid_write:
                        raise Killed(f"before writing {uri}")
                    with fn(uri) as tmp:
                        yield tmp
                        if kill:  # the bytes are in the temporary file: leave half of them, and die
                            with open(tmp, "rb") as f:
                                leave_partial(uri, f.read())
                            raise Killed(f"mid-write of {uri}")

                return local_output

            def call(*args, **kwargs):
                if not faults._tick():
                    return fn(*args, **kwargs)
                if faults.mid_write and name == "delete":
                    fn(args[0], args[1][: len(args[1]) // 2])  # some keys gone, the rest not
                elif faults.mid_write and name in ("write_bytes", "create_exclusive"):
                    leave_partial(args[0], args[1])
                raise Killed(
                    f"{'mid-' if faults.mid_write else 'before '}{name}({str(args[1] if name == 'delete' else args[0])[:80]})"
                )

            return call

        wrapped = {name: wrap(name, fn) for name, fn in originals.items()}
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith(("jobs.", "workers.", __name__)):  # this harness renders too
                for name, fn in originals.items():
                    if getattr(module, name, None) is fn:
                        self.saved.append((module, name, fn))
                        setattr(module, name, wrapped[name])
        return self

    def __exit__(self, *exc) -> None:
        for module, name, fn in self.saved:
            setattr(module, name, fn)


# ---- the trials --------------------------------------------------------------------------------

PHASES = (False, True)  # a run, then a --retry-errors run


def _phases(out: str, derived: Derived, start: int = 0, run_id: str = "resume") -> None:
    for i, retry in enumerate(PHASES[start:], start):
        run_path(out, derived, f"{run_id}{i}", retry_errors=retry)


def count_calls(new_output: Callable[[], str], derived: Derived) -> list[int]:
    """Storage calls each phase makes, on a clean run."""
    out, counts = new_output(), []
    for i, retry in enumerate(PHASES):
        with Faults() as faults:
            run_path(out, derived, f"count{i}", retry_errors=retry)
        counts.append(faults.calls)
    return counts


def kill_trials(
    new_output: Callable[[], str],
    derived: Derived,
    readers=("duckdb", "pyarrow"),
    sampled=(),
    every: int = 10,
    hf_cache: str | None = None,
    limit: int | None = None,
    stride: int = 1,
) -> Figures:
    """Every kill point of both phases, before and mid each call: kill, check what readers see,
    resume, check again. `sampled` readers run on every `every`-th trial; `stride` tries every
    stride-th point only."""
    figures = Figures()
    points = [
        (p, k, mid) for p, n in enumerate(count_calls(new_output, derived)) for k in range(n) for mid in (False, True)
    ]
    for t, (phase, k, mid) in enumerate(points[::stride][:limit]):
        out, what = new_output(), f"phase {phase} call {k}{' mid-write' if mid else ''}"
        for i in range(phase):
            run_path(out, derived, f"first{i}", retry_errors=PHASES[i])
        use = readers + (sampled if t % every == 0 else ())
        try:
            with Faults(kill_at=k, mid_write=mid):
                run_path(out, derived, f"killed{phase}", retry_errors=PHASES[phase])
            figures.problems.append(f"{what}: no kill happened")
        except Killed:
            pass
        check_readers(out, figures, use, hf_cache=hf_cache, what=what + " (killed)")
        _phases(out, derived, phase)
        check_readers(out, figures, use, expected_rows(), hf_cache=hf_cache, what=what)
        check_finished(out, derived, figures, what)
        figures.trials += 1
    return figures


def race_trials(
    new_output: Callable[[], str], derived: Derived, trials: int, delay_s: float = 0.002, readers=("duckdb", "pyarrow")
) -> Figures:
    """Two writers on one output with random delays before every storage call: two runs of one
    job, or a run and a --retry-errors run racing it. Neither may crash; a last clean retry run
    then leaves every row exactly once, the committed attempt in data/, nothing orphaned."""
    figures = Figures()
    for t in range(trials):
        out, what = new_output(), f"race {t}"
        crashed: list[str] = []

        def writer(run_id: str, retry: bool, out: str = out, crashed: list = crashed) -> None:
            try:
                run_path(out, derived, run_id, retry_errors=retry)
            except Exception as err:  # noqa: BLE001 - a crash is what this counts
                crashed.append(f"{run_id}: {type(err).__name__}: {err}")

        with Faults(delay_s=delay_s, seed=t):
            threads = [
                threading.Thread(target=writer, args=("a", False)),
                threading.Thread(target=writer, args=("b", t % 2 == 1)),
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        figures.problems += [f"{what}: {c}" for c in crashed]
        check_readers(out, figures, readers, what=what + " (raced)")
        run_path(out, derived, "final", retry_errors=True)
        check_readers(out, figures, readers, expected_rows(), what=what)
        check_finished(out, derived, figures, what)
        figures.trials += 1
    return figures
