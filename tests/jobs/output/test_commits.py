"""Commits in process: racing creates have one winner, a losing writer drops its copy, and the
published files replace older attempts' without touching a newer one's."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from jobs.input.shards import Shard
from jobs.output.commits import Commit, Work, commit_shard, list_commits
from workers.columns import METADATA_SCHEMA
from workers.storage import create_exclusive, delete, join, list_prefix, read_bytes, write_bytes


def test_racing_creates_have_exactly_one_winner(output):
    key = join(output, "commits/000001-000.json")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: create_exclusive(key, f"writer {i}".encode()), range(8)))
    assert results.count(True) == 1
    assert read_bytes(key) == f"writer {results.index(True)}".encode()


def _work(shard: int, rows: int, run: str, attempt: int = 0) -> Work:
    work = Work(Shard(shard, "in.txt", "text", shard * rows, rows, 0, 0, 1), attempt)
    for r in range(shard * rows, shard * rows + rows):
        row = dict.fromkeys(METADATA_SCHEMA.names)
        key = f"images/{shard:06d}-{attempt:03d}-{run}/{r}.png"
        row.update(id=str(r), row=r, shard=shard, status="ok", image_key=key, prompt="p", seed=r)
        work.rows[r] = row
    return work


def test_losing_writer_drops_its_copy_and_publishing_clears_leftovers(output):
    from jobs.output.layout import Derived
    from jobs.output.publish import publish

    # a killed run left images and metadata of shard 3 behind
    write_bytes(join(output, "images/000003-000-killed1/6.png"), b"old")
    write_bytes(join(output, "attempts/000003-000-killed1.parquet"), b"old")
    won = {}
    for run_id in ("first", "second"):
        for r in range(6, 8):
            write_bytes(join(output, f"images/000003-000-{run_id}/{r}.png"), run_id.encode())
        won[run_id] = commit_shard(output, _work(3, 2, run_id), run_id) is not None
    assert won == {"first": True, "second": False}
    assert publish(output, 3, Derived()) == 0
    left = [k for k in list_prefix(output) if not k.startswith("stamps/")]
    assert left == [
        "attempts/000003-000-first.parquet",
        "commits/000003-000.json",
        "data/000003.parquet",
        "images/000003-000-first/6.png",
        "images/000003-000-first/7.png",
    ]
    assert read_bytes(join(output, "data/000003.parquet")) == read_bytes(
        join(output, "attempts/000003-000-first.parquet")
    )
    assert list_commits(output)[3] == Commit(
        3,
        0,
        "attempts/000003-000-first.parquet",
        2,
        2,
        0,
        "first",
        list_commits(output)[3].stage_seconds,
        {"file": "in.txt", "first_row": 6, "rows": 2, "sha256": ""},  # what the commit covered of the input
    )


def test_a_slow_writer_of_an_older_attempt_never_deletes_or_replaces_a_newer_one(output):
    from jobs.output.commits import clean
    from jobs.output.layout import Derived
    from jobs.output.publish import publish, published

    for attempt in (0, 1):
        for r in range(6, 8):
            write_bytes(join(output, f"images/000003-{attempt:03d}-r{attempt}/{r}.png"), b"x")
    old = commit_shard(output, _work(3, 2, "r0"), "r0")
    assert publish(output, 3, Derived()) == 0
    new = commit_shard(output, _work(3, 2, "r1", attempt=1), "r1")
    # attempt 0's writer wakes up late: its cleanup keeps attempt 1's files...
    clean(output, old)
    assert set(list_prefix(output, "images/000003-001-r1/")) == {f"images/000003-001-r1/{r}.png" for r in (6, 7)}
    assert read_bytes(join(output, new.metadata))
    # ...and its publish publishes the latest commit, not its own attempt
    assert publish(output, 3, Derived()) == 1
    assert published(output)[("data", 3)] == 1
    assert not list_prefix(output, "images/000003-000-") and not list_prefix(output, "attempts/000003-000-")


def test_a_retry_renders_every_image_of_a_row_that_failed_before_it_was_expanded(tmp_path):
    import json

    import numpy as np

    from jobs.input.rows import read_shards
    from jobs.input.shards import plan_shards, shard_items
    from jobs.manifest import load_manifest
    from jobs.output.commits import work_left
    from tests.helpers import png
    from workers.keys import item_key

    rows = [{"prompt": "late", "num_images": 3, "image": "late.png"}, {"prompt": "fine", "num_images": 2}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = load_manifest(None, [f"input.path={tmp_path / 'rows.jsonl'}", f"output.path={tmp_path / 'out'}"])
    out, shards = m.output.path, plan_shards(m.input)

    def read(shard: Shard) -> list[dict]:
        item = shard_items([shard])[0]
        batch = read_shards({k: np.array([v], dtype=object) for k, v in item.items()}, job_seed=0, cfg=m.input)
        return [dict(zip(batch, values)) for values in zip(*batch.values())]

    first = read(shards[0])
    assert [(r["row"], r["image_index"], r["status"]) for r in first] == [(0, 0, "error"), (1, 0, "ok"), (1, 1, "ok")]
    first[2].update(status="error", error="stage1: RuntimeError: CUDA error")  # one image of row 1 failed too
    work = Work(shards[0], 0)
    names = METADATA_SCHEMA.names
    work.rows = {r["item"]: dict.fromkeys(names) | {k: v for k, v in r.items() if k in names} for r in first}
    assert commit_shard(out, work, "r1")
    (tmp_path / "late.png").write_bytes(png((5, 5, 5)))
    [retry] = work_left(out, shards, list_commits(out), retry_errors=True)
    assert retry.shard.whole_rows == (0,) and retry.shard.only_rows == (item_key(1, 1),)
    again = read(retry.shard)
    assert [(r["row"], r["image_index"], r["status"]) for r in again] == [
        (0, 0, "ok"),
        (0, 1, "ok"),
        (0, 2, "ok"),
        (1, 1, "ok"),
    ]
    assert {r["shard_items"] for r in again} == {4} and retry.shard.todo == 2


def test_marker_names_hold_any_number_of_shards_and_attempts(tmp_path):
    from jobs.output.commits import try_commit

    out = str(tmp_path / "out")
    for shard, attempt in ((0, 0), (1_000_000, 0), (7, 999), (7, 1000)):
        assert try_commit(out, Commit(shard, attempt, f"attempts/{shard}-{attempt}.parquet", 1, 1, 0, "r"))
    commits = list_commits(out)
    assert sorted(commits) == [0, 7, 1_000_000]
    assert commits[1_000_000].shard == 1_000_000 and commits[0].metadata == "attempts/0-0.parquet"
    assert commits[7].attempt == 1000  # the highest attempt counts, past three digits too


def test_two_different_jobs_starting_at_once_on_one_output_cannot_both_start(output):
    from jobs.manifest import load_manifest
    from jobs.output.job_record import check_job
    from workers.errors import ChangedManifestError

    manifests = [load_manifest(None, [f"output.path={output}", f"seed={seed}"]) for seed in (1, 2)] * 4
    barrier = __import__("threading").Barrier(len(manifests))

    def start(m):
        barrier.wait()
        try:
            check_job(output, m, allow_changed=False)
            return m.seed
        except ChangedManifestError:
            return None

    with ThreadPoolExecutor(len(manifests)) as pool:
        started = list(pool.map(start, manifests))
    assert len({s for s in started if s is not None}) == 1  # one manifest's jobs start, the other's are refused
    assert started.count(None) == 4


def test_a_changed_input_file_re_renders_its_shard_or_is_refused_and_no_row_is_lost_or_doubled(tmp_path):
    from jobs.input.shards import plan_shards
    from jobs.manifest import load_manifest
    from jobs.output.commits import check_input, work_left
    from jobs.output.layout import Derived
    from jobs.output.publish import publish
    from workers.errors import ChangedInputError

    data = tmp_path / "in"
    data.mkdir()
    for name in ("a", "b", "c"):
        (data / f"{name}.txt").write_text(f"{name} one\n{name} two\n")
    out = str(tmp_path / "out")

    def plan(shard_size: int = 2):
        return plan_shards(load_manifest(None, [f"input.path={data}", f"input.shard_size={shard_size}"]).input)

    def commit_all(shards, run_id: str) -> None:
        for shard in shards:
            work = Work(shard, list_commits(out)[shard.index].attempt + 1 if shard.index in list_commits(out) else 0)
            for r in range(shard.first_row, shard.first_row + shard.num_rows):
                work.rows[r] = dict.fromkeys(METADATA_SCHEMA.names) | dict(
                    id=str(r), row=r, shard=shard.index, status="ok", prompt="p", seed=r
                )
            assert commit_shard(out, work, run_id)
            publish(out, shard.index, Derived())

    commit_all(plan(), "r1")
    assert check_input(out, plan(), list_commits(out), allow_changed=False) == []  # unchanged: nothing to do
    (data / "b.txt").write_text("b one\nb changed\n")
    with pytest.raises(ChangedInputError, match=r"shard 1 \(.*b\.txt, rows from 2\).*--allow-changed"):
        check_input(out, plan(), list_commits(out), allow_changed=False)
    commits = list_commits(out)
    changed = check_input(out, plan(), commits, allow_changed=True)
    work = work_left(out, plan(), commits, retry_errors=False, changed=changed)
    assert [(w.shard.index, w.attempt) for w in work] == [(1, 1)]  # only b's shard, as its next attempt
    commit_all([w.shard for w in work], "r2")
    assert {i: c.run_id for i, c in list_commits(out).items()} == {0: "r1", 1: "r2", 2: "r1"}
    # Another shard_size: refused without --allow-changed; with it, every row exactly once, both ways
    # (1 row a shard: six shards; back to 2: shards 3-5 are no longer in the input and retire).
    for size, expect in ((1, 6), (2, 3)):
        with pytest.raises(ChangedInputError, match="shard 0 "):
            check_input(out, plan(size), list_commits(out), allow_changed=False)
        commits = list_commits(out)
        changed = check_input(out, plan(size), commits, allow_changed=True)
        commit_all([w.shard for w in work_left(out, plan(size), commits, False, changed)], f"size{size}")
        rows = pq.read_table(join(out, "data")).column("row").to_pylist()  # what a reader of data/ sees
        assert sorted(rows) == list(range(6)) and sorted(list_commits(out)) == list(range(expect)), size
    assert not [k for k in list_prefix(out) if "000004" in k]


def test_a_listing_tolerates_another_writer_deleting_under_it(tmp_path):
    # A loser removes its files and folders while the winner lists: nothing raises, and what
    # remains is listed. 200 rounds of a racing delete.
    import shutil
    import threading

    out = tmp_path / "out"
    for round_ in range(200):
        for r in range(40):  # folders inside folders: a listing descends into what is being removed
            (out / "images" / f"000001-000-run{round_}" / f"part{r % 8}" / f"{r}").mkdir(parents=True, exist_ok=True)
            (out / "images" / f"000001-000-run{round_}" / f"part{r % 8}" / f"{r}" / "x.png").write_bytes(b"x")
        gone = threading.Thread(target=shutil.rmtree, args=(out / "images" / f"000001-000-run{round_}",))
        gone.start()
        listed = list_prefix(str(out), "images/000001-")
        gone.join()
        assert all(k.startswith(f"images/000001-000-run{round_}/") for k in listed)
    assert list_prefix(str(out), "images/") == [] and list_prefix(str(out / "nowhere")) == []


def test_a_write_survives_another_writer_removing_its_emptied_folder(tmp_path):
    # A loser's clean-up deletes files and then their folder once it is empty; a writer still
    # rendering into that folder (a racing run of the same shard attempt) has made the folder and
    # not yet its file. Every write and exclusive create lands whole; 500 rounds against a delete
    # that keeps emptying the folder (without the retry, 131 of 500 rounds raised FileNotFoundError).
    import threading

    folder, crashes, done = tmp_path / "images" / "000001-000-b", [], threading.Event()
    key = folder.relative_to(tmp_path).as_posix()

    def writer():
        try:
            for i in range(500):
                data = f"row {i}".encode()
                write_bytes(str(folder / f"r{i}.png"), data)
                assert create_exclusive(str(folder / f"m{i}"), data)
                assert read_bytes(str(folder / f"r{i}.png")) == data == read_bytes(str(folder / f"m{i}"))
                delete(str(tmp_path), [f"{key}/r{i}.png", f"{key}/m{i}"])  # empty again: the worst case
        except Exception as err:  # noqa: BLE001 - each is counted
            crashes.append(repr(err))
        finally:
            done.set()

    def cleaner():
        while not done.is_set():
            delete(str(tmp_path), [f"{key}/gone.png"])  # removes the folder whenever it is empty
            time.sleep(0.0001)

    threads = [threading.Thread(target=writer), threading.Thread(target=cleaner)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert crashes == [] and not folder.exists()
