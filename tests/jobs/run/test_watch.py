"""The no-progress check's diagnosis: the stage a stall is blamed on."""

from __future__ import annotations

from jobs.run.watch import stalled_stage, stream


def actor(stage: str, node: str) -> dict:
    return {"stage": stage, "node": node, "state": "busy", "since": 0.0}


def test_the_stage_whose_actors_went_with_their_node_is_named_before_an_idle_writer_behind_it():
    """The multi-node test's case: the replicas' node was killed mid-batch; the writer on the head
    waits with rows queued for it. The writer is idle for want of rows, not stalled."""
    queues = {"encode": 0, "stage1": 0, "stage2": 2, "upscale": 2, "write": 2}
    actors = [actor(s, "gpu-node") for s in ("encode", "stage1", "stage2", "upscale")] + [actor("write", "head")]
    assert stalled_stage(queues, actors, alive={"head"}) == "stage2"


def test_a_stage_that_never_started_is_named():
    queues = {"encode": 4, "stage1": 0, "write": 0}
    assert stalled_stage(queues, [actor("write", "head")], alive={"head"}) == "encode"


def test_with_every_actor_alive_the_last_stage_with_rows_waiting_is_named():
    """Stages before it back up behind it."""
    queues = {"encode": 3, "stage1": 2, "stage2": 0, "write": 0}
    actors = [actor(s, "n1") for s in ("encode", "stage1", "stage2", "write")]
    assert stalled_stage(queues, actors, alive={"n1"}) == "stage1"
    assert stalled_stage({"encode": 0, "write": 0}, actors, alive={"n1"}) is None


def test_a_result_block_reaches_the_driver_as_soon_as_it_is_written_not_with_the_next(ray_local):
    """The driver commits a shard when its rows arrive: a block held until the next one is ready
    (Ray Data's prefetch) commits every shard a batch late, and a kill loses that batch."""
    import time

    import ray

    def written(batch):
        if batch["i"][0] == 1:
            time.sleep(4)  # the next block takes a while
        batch["at"] = [time.time()] * len(batch["i"])
        return batch

    ds = ray.data.from_items([{"i": 0}, {"i": 1}], override_num_blocks=2).map_batches(
        written, batch_size=1, concurrency=1
    )
    seen = [(b.column("i")[0].as_py(), time.time() - b.column("at")[0].as_py()) for b in stream(ds, None)]
    assert [i for i, _ in seen] == [0, 1]
    assert seen[0][1] < 2, f"the first block reached the driver {seen[0][1]:.1f} s after it was written"
