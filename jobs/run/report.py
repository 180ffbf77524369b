"""OUTPUT/report.html: the run as a person looks at it. Throughput over time, a per-stage busy
timeline from the rows' own timestamps, the plan's prediction against what was achieved, the
error table, the contact sheets, GPU-hours and cost. One self-contained file (plots and sheets
inlined), so it opens from S3 or a laptop without a server; rewritten as shards commit (at most
every REFRESH_S) and at the end.

The driver keeps what the report needs as it streams the rows: one point per result block and
one interval per stage call, thinned to a fixed count, never the rows themselves.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import time

import pyarrow as pa

from jobs.manifest import Manifest
from jobs.output.layout import REPORT
from jobs.run.events import Clock, Observer
from jobs.run.report_job import Sample, input_facts, sample_grid, score_section, settings_table
from jobs.run.summary import Summary
from workers.storage import join, read_bytes, write_bytes

log = logging.getLogger(__name__)

REFRESH_S = 30  # at most one rewrite per this many seconds while the run goes on
MAX_POINTS = 2000  # per series: older points are thinned, every other one dropped
MAX_SHEETS = 6  # the latest shards' contact sheets shown
SHEET_PX = 1200  # the widest a sheet is shown on the page


def _smaller(sheet: bytes, width: int = SHEET_PX) -> bytes:
    """A contact sheet at most `width` px wide, for the page (each links to its full size): a
    shard of a thousand rows makes a sheet of megabytes. JPEG's draft mode decodes it at a fraction
    of its size, so the full picture is never held."""
    from PIL import Image

    with Image.open(io.BytesIO(sheet)) as img:
        if img.width <= width:
            return sheet
        img.draft("RGB", (width, width * img.height // img.width))
        small = img.convert("RGB")
        small.thumbnail((width, small.height))
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=85)
        return buf.getvalue()


def _thin(points: list) -> list:
    return points[::2] if len(points) > MAX_POINTS else points


class RunReport(Observer):
    def __init__(self, manifest: Manifest, clock: Clock, columns=None) -> None:
        self.manifest = manifest
        self.clock = clock
        self.columns = columns  # the input's (jobs/input/columns.Columns), for the page's input facts
        self.sample = Sample()
        self.done: list[tuple[float, int]] = []  # (seconds into the run, ok images so far)
        self.busy: dict[str, list[tuple[float, float]]] = {s: [] for s in manifest.stages()}
        self.written = 0.0
        self.sheets: list[int] = []  # shards committed by this run, latest last

    # ---- as the run's observer (jobs/run/state.py) ----------------------------------------

    def on_block(self, run, block: pa.Table, rows: pa.Table) -> None:
        self.add(block, run.summary)
        self.sample.add(rows, self.manifest.stages())

    def on_commit(self, run, commit) -> None:
        self.committed(commit.shard)
        self.maybe_write(run.summary)

    def on_end(self, run) -> None:
        self.write(run.summary, final=True)

    # ---- what it keeps of the run ------------------------------------------------------------

    def add(self, block: pa.Table, summary: Summary) -> None:
        self.done = _thin(self.done + [(self.clock.elapsed(), summary.ok)])
        names = block.column_names
        for stage, spans in self.busy.items():
            if f"{stage}_started" not in names:
                continue
            calls = set(
                zip(block.column(f"{stage}_started").to_pylist(), block.column(f"{stage}_finished").to_pylist())
            )
            spans += sorted((self.clock.at(a), self.clock.at(b)) for a, b in calls if a and b)
            self.busy[stage] = _thin(spans)

    def committed(self, shard: int) -> None:
        self.sheets = (self.sheets + [shard])[-MAX_SHEETS:]

    def maybe_write(self, summary: Summary) -> None:
        if time.perf_counter() - self.written >= REFRESH_S:
            self.write(summary, final=False)

    def write(self, summary: Summary, final: bool) -> None:
        """report.html, whole; a failure to draw or write it is logged, never the run's."""
        self.written = time.perf_counter()
        try:
            page = self.html(summary, final)
            write_bytes(join(self.manifest.output.path, REPORT), page.encode())
        except Exception as err:  # noqa: BLE001 - the report is a view of the run, not the run
            log.warning("report.html not written: %s", err)

    # ---- what the page says ----------------------------------------------------------------

    def gpu_hours(self, summary: Summary, now: float) -> float:
        """GPUs the chunks' pools held, times how long each chunk ran."""
        total = 0.0
        for chunk in summary.pool_sizes:
            end = chunk.get("ended_at_s", now)
            total += chunk.get("gpus_used", 0.0) * max(0.0, end - chunk["at_s"]) / 3600
        return total

    def prediction(self, summary: Summary) -> tuple[float | None, str]:
        """The planner's images/s for the last chunk's pools on its GPUs, from the same profile
        `ifrender plan` uses by default (FLOP counts)."""
        from jobs.plan.costs import flops_profile
        from jobs.plan.search import Allocation, predict

        if not summary.pool_sizes or not summary.pool_sizes[-1].get("gpus_used"):
            return None, "no prediction: the pools use no GPU (the planner models GPUs)"
        chunk = summary.pool_sizes[-1]
        pools = {
            name: Allocation(stages, chunk["pools"].get(name, pool.pool_size), pool.num_gpus, pool.batch_size)
            for name, (stages, pool) in self.manifest.model_pools().items()
        }
        profile = flops_profile(self.manifest)
        rate, limit, _ = predict(profile, pools, int(chunk["gpus"]), self.manifest.ray.mps)
        return rate, f"profile: {profile.source}; limited by {limit}"

    def html(self, summary: Summary, final: bool) -> str:
        now = self.clock.elapsed()
        achieved = summary.ok / now if now > 0 else 0.0
        predicted, basis = self.prediction(summary)
        hours = self.gpu_hours(summary, now)
        price = self.manifest.ray.gpu_hour_usd
        esc = html.escape
        state = "finished" if final else "running (this page is rewritten as shards commit)"
        stopped = summary.stalled or summary.stopped
        facts = input_facts(self.manifest, self.columns) + [
            ("state", state + (f"; stopped early: {stopped}" if final and stopped else "")),
            ("elapsed", f"{now:.0f} s"),
            ("rows", f"{summary.rows} this run: {summary.ok} ok, {summary.error} error"),
            ("prompts cut at T5's 77 tokens", f"{summary.truncated} (prompt_truncated)"),
            (
                "compute per image",
                f"{summary.tflop / summary.ok if summary.ok else 0:,.1f} TFLOP at the full-size models' FLOP counts, "
                "as the rows ran (steps, strength, guidance interval)",
            ),
            (
                "shards",
                f"{summary.committed_shards} committed this run, {summary.skipped_shards} before, "
                f"{summary.uncommitted_shards} left incomplete",
            ),
            ("images/s achieved", f"{achieved:.3f}"),
            (
                "images/s predicted",
                (f"{predicted:.3f} ({achieved / predicted:.0%} achieved); " if predicted else "") + basis,
            ),
            ("GPU-hours", f"{hours:.3f}"),
            ("cost", f"${hours * price:,.2f} at ${price:g} per GPU-hour (ray.gpu_hour_usd)"),
        ]
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
        errors = "".join(
            f"<tr><td class=n>{n}</td><td><code>{esc(m)}</code></td></tr>"
            for m, n in sorted(summary.errors.items(), key=lambda kv: -kv[1])[:20]
        )
        errors = (
            f"<table class=errors><tr><th>rows</th><th>error</th></tr>{errors}</table>"
            if errors
            else "<p>No row failed.</p>"
        )
        pools = "".join(
            f"<tr><td>{c['at_s']:.0f} s</td><td>{c['shards']}</td><td>{esc(', '.join(f'{k} {v}' for k, v in c['pools'].items()))}"
            f"</td><td>{c['nodes']}</td><td>{c['gpus']:g}</td></tr>"
            for c in summary.pool_sizes
        )
        refresh = "" if final else f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<title>ifrender report: {esc(self.manifest.name)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
th, td {{ text-align: left; padding: 3px 10px; border-bottom: 1px solid #ddd; vertical-align: top; }}
td.n {{ text-align: right; }}
img {{ max-width: 100%; border: 1px solid #ccc; margin: 4px 0; }}
.sheets img {{ max-width: 380px; margin-right: 8px; }}
.sample {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.sample figure {{ width: 200px; margin: 0; font-size: 12px; }}
</style></head><body>
<h1>ifrender: {esc(self.manifest.name)}</h1>
<p>Layout {esc(self.manifest.layout)}, written {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}.
The data: <a href="data/">data/</a> (Parquet, one file per shard); the images: <a href="images/">images/</a>;
the dataset card: <a href="README.md">README.md</a>.</p>
<table class=facts>{rows}</table>
<h2>Models and settings</h2>
{settings_table(self.manifest, self.sample)}
<h2>Sample</h2>
{sample_grid(self.manifest.output.path, self.sample)}
<h2>Scores</h2>
{score_section(self.manifest.output.path, self.sample)}
<h2>Throughput</h2>
<img id=throughput alt="ok images over time" src="{self._throughput()}">
<h2>Stages busy</h2>
<img id=busy alt="per-stage busy timeline" src="{self._timeline(now, summary.actor_starts)}">
<h2>Pools by chunk</h2>
<table><tr><th>started</th><th>shards</th><th>actors per pool</th><th>nodes</th><th>GPUs</th></tr>{pools}</table>
<h2>Errors</h2>
{errors}
<h2>Contact sheets</h2>
<div class=sheets>{self._sheets()}</div>
<script>
// The page checks itself: every picture decoded (a browser test reads these attributes).
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  const bad = imgs.filter((i) => !(i.complete && i.naturalWidth > 0));
  document.body.dataset.images = imgs.length;
  document.body.dataset.broken = bad.map((i) => i.alt).join("|");
  document.body.dataset.boxes = JSON.stringify(imgs.map((i) => {{
    const r = i.getBoundingClientRect();
    return {{alt: i.alt, x: r.x, y: r.y + window.scrollY, w: r.width, h: r.height}};
  }}));
}});
</script>
</body></html>
"""

    # ---- the pictures ----------------------------------------------------------------------

    @staticmethod
    def _png(fig) -> str:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
        plt.close(fig)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def _throughput(self) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.2))
        t = [0.0] + [p[0] for p in self.done]
        ok = [0] + [p[1] for p in self.done]
        left.step(t, ok, where="post", color="#1f77b4")
        left.set(xlabel="seconds into the run", ylabel="ok images", title="images rendered")
        # Images per second in about 40 equal bins of the run: each block's new images in its bin.
        width = max(t[-1] / 40, 1.0)
        bins = [0.0] * (int(t[-1] / width) + 1)
        for k in range(1, len(t)):
            bins[int(t[k] / width)] += ok[k] - ok[k - 1]
        centres = [(b + 0.5) * width for b in range(len(bins))]
        rate = [n / width for n in bins]
        right.bar(centres, rate, width=width * 0.9, color="#2ca02c")
        right.set(xlabel="seconds into the run", ylabel="images/s", title=f"throughput ({width:.0f} s bins)")
        for ax in (left, right):
            ax.grid(alpha=0.3)
        return self._png(fig)

    def _timeline(self, now: float, starts: list[dict] | None = None) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        stages = list(self.busy)
        fig, ax = plt.subplots(figsize=(12, 0.6 + 0.5 * len(stages)))
        for i, stage in enumerate(stages):
            spans = [(a, b - a) for a, b in self.busy[stage]]
            # Overlapping calls (several actors) draw darker.
            ax.broken_barh(spans, (i - 0.4, 0.8), facecolors="#ff7f0e", alpha=0.35)
            begun = [s["at_s"] for s in starts or [] if s["stage"] == stage]
            ax.plot(begun, [i] * len(begun), "k|", markersize=14)
        ax.set_yticks(range(len(stages)), stages)
        ax.set_xlim(0, max(now, 1.0))
        ax.invert_yaxis()
        ax.set(
            xlabel="seconds into the run",
            title="stage calls (from each row's started/finished times); | an actor started",
        )
        ax.grid(axis="x", alpha=0.3)
        return self._png(fig)

    def _sheets(self) -> str:
        from jobs.output.layout import sheet_key

        if not self.manifest.contact_sheets:
            return "<p>Contact sheets are off (contact_sheets: true draws one per shard).</p>"
        images = []
        for shard in sorted(self.sheets):
            try:
                data = read_bytes(join(self.manifest.output.path, sheet_key(shard)))
            except Exception:  # noqa: BLE001 - not published yet: the next rewrite shows it
                continue
            if not data:
                continue
            images.append(
                f'<a href="{sheet_key(shard)}"><img class=sheet alt="shard {shard}" title="shard {shard}" '
                f'src="data:image/jpeg;base64,{base64.b64encode(_smaller(data)).decode()}"></a>'
            )
        return "".join(images) or "<p>No shard committed by this run yet.</p>"
