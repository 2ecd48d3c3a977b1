"""The processing service's HTTP API: the autoscaler's state, and its limits changed at run time."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from services.common.auth import Access, AccessRules
from services.common.errors import InvalidInput
from services.common.timestamps import iso_utc
from services.processing.autoscaler import Autoscaler, ScalingChange
from services.processing.service import ProcessingService
from services.processing.settings import MAX_WORKERS_LIMIT

router = APIRouter()

# What each route needs (services/common/auth.py); a route not named here needs admin. Reading the
# autoscaler is monitoring (service); changing it is the operator's (admin), never the page's.
ACCESS = AccessRules(
    [
        ("GET", "/autoscaler", Access.SERVICE),
        ("PUT", "/autoscaler", Access.ADMIN),
    ]
)


async def get_service(request: Request) -> ProcessingService:
    service: ProcessingService = request.app.state.processing
    return service


ServiceDep = Annotated[ProcessingService, Depends(get_service)]


class ScalingOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    at: str = Field(description="When, RFC 3339 in UTC to the millisecond.", json_schema_extra={"format": "date-time"})
    from_: int = Field(alias="from")
    to: int
    backlog: int
    in_flight: int = Field(description="Queue-wide: jobs received by any instance and not yet settled.")
    busy: int = Field(description="This instance's running jobs when it scaled.")
    reason: str


class AutoscalerOut(BaseModel):
    instance: str = Field(description="This instance's name (CATTUBE_INSTANCE; default the hostname).")
    min_workers: int
    max_workers: int
    max_workers_effective: int = Field(
        description="The most workers this instance runs: max_workers, or less when its own limits allow fewer."
    )
    max_workers_reason: str = Field(description="Why max_workers_effective is what it is.")
    target_backlog_per_worker: int
    scale_in_cooldown_s: float
    desired: int = Field(description="Workers the queue asks for, within the limits.")
    running: int = Field(description="Workers in the group, busy or idle.")
    busy: int = Field(description="Workers running a job.")
    retiring: int = Field(description="Retired workers not gone yet (retiring an idle worker is immediate).")
    backlog: int = Field(description="Jobs waiting in the transcode queue, as last seen.")
    in_flight: int = Field(
        description="Jobs received and not yet settled, on any instance, as last seen (not sized on: "
        "desired counts the backlog and this instance's busy workers)."
    )
    history: list[ScalingOut] = Field(description="Recent changes of the worker count, oldest first.")


class AutoscalerIn(BaseModel):
    # Strict: JSON `false` is not 0 workers (it would pause processing), nor is "3" a number.
    model_config = ConfigDict(extra="forbid", strict=True)

    min_workers: int | None = Field(None, ge=0, le=MAX_WORKERS_LIMIT)
    max_workers: int | None = Field(None, ge=0, le=MAX_WORKERS_LIMIT, description="0 pauses processing.")
    target_backlog_per_worker: int | None = Field(None, ge=1, le=MAX_WORKERS_LIMIT)


def _change_out(change: ScalingChange) -> ScalingOut:
    return ScalingOut(
        at=iso_utc(change.at),
        from_=change.from_,
        to=change.to,
        backlog=change.backlog,
        in_flight=change.in_flight,
        busy=change.busy,
        reason=change.reason,
    )


def _state(service: ProcessingService) -> AutoscalerOut:
    autoscaler: Autoscaler = service.autoscaler
    pool = service.pool
    limits = autoscaler.limits
    effective = autoscaler.effective_limits.max_workers
    cap = service.fleet_cap
    if cap.workers is not None and cap.workers < limits.max_workers:
        reason = f"capped below max_workers: {cap.reason}"
    else:
        reason = f"max_workers, as set ({cap.reason})"
    return AutoscalerOut(
        instance=service.instance,
        min_workers=limits.min_workers,
        max_workers=limits.max_workers,
        max_workers_effective=effective,
        max_workers_reason=reason,
        target_backlog_per_worker=limits.target_backlog_per_worker,
        scale_in_cooldown_s=autoscaler.cooldown_s,
        desired=autoscaler.desired,
        running=pool.running,
        busy=pool.busy,
        retiring=pool.retiring,
        backlog=autoscaler.backlog,
        in_flight=autoscaler.in_flight,
        history=[_change_out(change) for change in autoscaler.history],
    )


@router.get("/autoscaler", response_model=AutoscalerOut, tags=["autoscaler"])
async def get_autoscaler(service: ServiceDep) -> AutoscalerOut:
    """The autoscaler's limits, the worker counts, the queue's numbers and the recent scaling history."""
    return _state(service)


@router.put("/autoscaler", response_model=AutoscalerOut, tags=["autoscaler"])
async def put_autoscaler(body: AutoscalerIn, service: ServiceDep) -> AutoscalerOut:
    """Change min_workers, max_workers or target_backlog_per_worker now (until the service restarts)."""
    try:
        service.autoscaler.set_limits(
            min_workers=body.min_workers,
            max_workers=body.max_workers,
            target_backlog_per_worker=body.target_backlog_per_worker,
        )
    except InvalidInput as exc:
        raise InvalidInput(f"body.{exc.field}", exc.expected) from None
    return _state(service)
