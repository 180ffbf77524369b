"""The batch contract every model stage keeps, and what the stages share to keep it.

A batch is a dict of numpy arrays, one entry per column, as Ray Data hands it over. A stage adds
its columns and keeps the others. Rows whose `status` is not "ok" pass through untouched (their
new columns zero-filled), and a row that fails fails alone: one bad row never stops its neighbours.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from typing import Any

import numpy as np
import torch

from workers.batch import Batch, require_columns, stacked
from workers.columns import ROW_COLUMNS
from workers.errors import MissingColumnsError, row_error
from workers.keys import derive_seed
from workers.progress import Reporter, process_started
from workers.stages import STAGES

log = logging.getLogger(__name__)

# Errors after which a CUDA context is unusable: retrying in this process would fail forever.
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "illegal memory access")


def is_fatal(err: BaseException) -> bool:
    return type(err).__name__ == "AcceleratorError" or any(m in str(err) for m in _FATAL_MARKERS)


def exit_for_restart(stage: str, reason: str) -> None:
    """End this actor's process: Ray restarts the actor and retries its batch on the new one."""
    log.error("%s: %s; exiting so Ray restarts this actor and retries the batch", stage, reason)
    logging.shutdown()
    os._exit(1)


def row_generators(seeds: np.ndarray, stage: str) -> list[torch.Generator]:
    """One CPU generator per row, so a row's noise never depends on its batch or device."""
    return [torch.Generator("cpu").manual_seed(derive_seed(int(s), stage)) for s in seeds]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: bf16 tensors travel as fp32.
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def _ray_gpu_ids() -> list:
    """The GPUs Ray assigned to this actor (none outside Ray or without num_gpus)."""
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - provenance only, never worth failing a stage
        return []


class StageWorker:
    """Base of the model stages. A subclass sets `stage` and implements `run` and `blank`;
    what it needs from a batch is the stage registry's (workers/stages.py)."""

    stage: str = ""
    needs: tuple[str, ...] = ()  # only for stages outside the registry

    def __init__(self, cfg: Any, recorded: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
        from workers.models import pick_device

        self.report = Reporter(self.stage)
        # When this process started: the time before `loading` is the worker's start-up and imports.
        self.report("loading", process_started())
        self.cfg = cfg
        self.micro_batch = cfg.micro_batch
        self.needs = STAGES[self.stage].needs if self.stage in STAGES else type(self).needs
        self.drop = drop
        self.device = pick_device(self.stage, cfg.device, cfg.num_gpus)
        # Recorded with every row: what rendered it, with which settings, on which device.
        self.recorded = {
            "dtype": cfg.dtype,
            "variant": cfg.variant,
            "micro_batch": cfg.micro_batch,
            "device": str(self.device),
            "gpus": _ray_gpu_ids(),
        } | recorded

    def row_settings(self, batch: Batch, row: int) -> dict[str, Any]:
        """This stage's effective settings for one row (the job's with the row's overrides);
        rows with equal settings run together."""
        return {}

    def check_size(self, settings: dict[str, Any]) -> None:
        """A UNet stage refuses images over its max_pixels: what its GPU memory was sized for."""
        area = settings["width"] * settings["height"]
        if area > self.cfg.max_pixels:
            raise ValueError(
                f"{settings['width']}x{settings['height']} is {area} pixels, over {self.stage}.max_pixels="
                f"{self.cfg.max_pixels} (what this stage's GPU memory was sized for); expected a smaller image. "
                f"Fix: a smaller width/height or init image, or raise {self.stage}.max_pixels"
            )

    def tensor(self, batch: Batch, column: str, rows: np.ndarray) -> torch.Tensor:
        """Rows of a column as a tensor on this stage's device and dtype."""
        from workers.models import torch_dtype

        # A column of several shapes arrives as an object array; a group's rows share one.
        return torch.from_numpy(np.stack(list(batch[column][rows]))).to(self.device, torch_dtype(self.cfg.dtype))

    def run(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any]) -> Batch:
        """The new columns for `rows` (indexes of ok rows, all with these settings). May add
        `flagged`: per row, a reason to fail it ("" for none)."""
        raise NotImplementedError

    def blank(self, batch: Batch, n: int) -> Batch:
        """Zero-filled new columns for n rows, with the shapes `run` returns."""
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        # A batch that outlives the watchdog is taken as hung (a stuck kernel, a dead NCCL or
        # filesystem call): the process exits and Ray retries the batch on a fresh actor.
        watchdog = threading.Timer(
            self.cfg.watchdog_s, exit_for_restart, (self.stage, f"a batch ran over watchdog_s={self.cfg.watchdog_s:g}")
        )
        watchdog.daemon = True
        watchdog.start()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.time()
        ok_in = int(np.count_nonzero(batch["status"] == "ok"))
        self.report("started", len(batch["id"]))
        try:
            result = self._call(batch)
        finally:
            watchdog.cancel()
        ok_out = int(np.count_nonzero(result["status"] == "ok"))
        self.report("finished", ok_out, ok_in - ok_out)
        # Peak GPU memory of this call, for the summary: what a stage needs at this batch size.
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else 0
        n = len(batch["id"])
        result[f"{self.stage}_peak_gpu_bytes"] = np.full(n, peak, dtype=np.int64)
        # When this row's call ran (wall clock): busy fractions and the time between stages.
        result[f"{self.stage}_started"] = np.full(n, started)
        result[f"{self.stage}_finished"] = np.full(n, time.time())
        return result

    def _call(self, batch: Batch) -> Batch:
        # 1. The batch must carry what this stage needs: a missing column is a wiring error.
        require_columns(self.stage, batch, ROW_COLUMNS + self.needs)
        n = len(batch["id"])
        status, error = batch["status"].copy(), batch["error"].copy()
        # 2. Every new column starts blank, so rows that fail (or failed before) pass on zeros.
        out = self.blank(batch, n)
        seconds = np.zeros(n, dtype=np.float64)
        params = np.full(n, json.dumps(self.recorded, sort_keys=True), dtype=object)
        # 3. The ok rows, grouped by their effective settings.
        groups: dict[str, list[int]] = {}
        settings: dict[str, dict[str, Any]] = {}
        for row in np.flatnonzero(status == "ok"):
            mine = self.row_settings(batch, int(row))
            key = json.dumps(mine, sort_keys=True)
            groups.setdefault(key, []).append(int(row))
            settings[key] = mine
        # 4. Each group rendered in fixed-size model calls; a failing group is retried row by row.
        for key, rows in groups.items():
            params[rows] = json.dumps(self.recorded | settings[key], sort_keys=True)
            self._run_isolating(batch, np.array(rows), settings[key], out, seconds, status, error)
        # 5. The batch handed on: payload no later stage reads dropped, this stage's columns added.
        result = {k: v for k, v in batch.items() if k not in self.drop}
        result.update({k: stacked(v) for k, v in out.items()})
        result["status"] = status
        result["error"] = error
        result[f"{self.stage}_model"] = np.full(n, self.cfg.model, dtype=object)
        result[f"{self.stage}_params"] = params
        result[f"{self.stage}_seconds"] = seconds
        return result

    def _run_micro_batches(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any]) -> Batch:
        """Call `run` on exactly `micro_batch` rows at a time, padding the last call with copies
        of its last row. Kernels pick their algorithm from the whole tensor shape, so one fixed
        shape per stage is what makes a row's pixels independent of batch size and neighbours."""
        mb = self.micro_batch
        parts = []
        for i in range(0, len(rows), mb):
            chunk = rows[i : i + mb]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], mb - len(chunk))])
            values = self.run(batch, padded, settings)
            parts.append({k: v[: len(chunk)] for k, v in values.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _run_isolating(self, batch, rows, settings, out, seconds, status, error) -> None:
        """Run `rows` together; if that fails, run each alone so only the failing row errors."""
        if len(rows) == 0:
            return
        start = time.perf_counter()
        try:
            values = self._run_micro_batches(batch, rows, settings)
        except MissingColumnsError:
            raise
        except Exception as err:  # noqa: BLE001 - a row's failure is recorded, never raised
            if is_fatal(err):
                exit_for_restart(self.stage, f"fatal device error: {err}")
            if isinstance(err, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
                err = RuntimeError(f"out of GPU memory at micro_batch={self.micro_batch}; lower micro_batch or dtype")
            if len(rows) > 1:
                log.warning("%s: batch of %d failed (%s); retrying row by row", self.stage, len(rows), err)
                for row in rows:
                    self._run_isolating(batch, np.array([row]), settings, out, seconds, status, error)
                return
            row = int(rows[0])
            status[row] = "error"
            error[row] = row_error(self.stage, err)
            log.warning("%s: row %s failed:\n%s", self.stage, batch["id"][row], traceback.format_exc())
            return
        elapsed = time.perf_counter() - start
        flagged = values.pop("flagged", None)
        for column, value in values.items():
            if out[column].dtype == object and value.ndim > 1:  # images: each row its own shape
                for row, image in zip(rows, value):
                    out[column][row] = image
            else:
                out[column][rows] = value
        seconds[rows] = elapsed / len(rows)
        if flagged is not None:  # run's own verdicts (the safety checker's, with on_flagged=error)
            for row, reason in zip(rows, flagged):
                if reason:
                    status[row], error[row] = "error", f"{self.stage}: {reason}"
