"""The manifest in another layout or at other pool sizes: what the planner proposes, the bench
compares and each chunk of a run renders with."""

from __future__ import annotations

from typing import Any

from jobs.manifest import Manifest, drop_grouped_pool_settings
from workers.config import POOL_FIELDS
from workers.stages import group_name


def with_groups(manifest: Manifest, groups: list[dict[str, Any]]) -> Manifest:
    """The manifest in another layout: `groups` replace its groups, and each grouped stage's own
    pool settings give way to its group's (a stage's micro_batch, and so its pixels, stay)."""
    data = manifest.model_dump(exclude_unset=True)
    data["groups"] = groups
    drop_grouped_pool_settings(data)
    for stage in manifest.stages():  # stages that leave a group get back their own settings
        if not any(stage in g["stages"] for g in groups) and manifest.stage_config(stage) is not getattr(
            manifest, stage
        ):
            data[stage] |= {k: getattr(manifest.stage_config(stage), k) for k in POOL_FIELDS}
    return Manifest.model_validate(data)


def with_pool_sizes(manifest: Manifest, sizes: dict[str, int]) -> Manifest:
    """The manifest with these pools (named as in job_pools: the model pools and the writer's) at these sizes."""
    groups = {group_name(manifest.group_stages(g)): i for i, g in enumerate(manifest.groups)}
    update: dict[str, Any] = {}
    new_groups = list(manifest.groups)
    for name, size in sizes.items():
        if name in groups:
            new_groups[groups[name]] = new_groups[groups[name]].model_copy(update={"pool_size": size})
        else:
            update[name] = getattr(manifest, name).model_copy(update={"pool_size": size})
    return manifest.model_copy(update=update | {"groups": new_groups})
