"""Create (or update) the automation that marks a flow run Crashed when its heartbeats stop.

    python deployments/create-zombie-automation.py          # run by create-pools.sh

A shard whose host dies (power, kernel panic, a SIGKILL of its worker and processes) leaves its run
`Running` forever: nothing is left on that host to report the crash. Flow runs started by our
workers send a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (start-workers.sh
sets 30, Prefect's minimum). This automation (Prefect's documented zombie-flow recipe) marks a run
Crashed when no heartbeat and no final state came within ZOMBIE_AFTER_S seconds (default 90) of its
last heartbeat; the batch flow then resubmits the shard to a live worker, and rows the dead host
finished are found in the sink and skipped. Runs that never sent a heartbeat are never touched.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

NAME = "turbo-batch: crash flow runs whose heartbeats stopped"
FINAL = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
         "prefect.flow-run.Crashed")


def save(after_s: float) -> str:
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    trigger = EventTrigger(after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *FINAL},
                           match={"prefect.resource.id": ["prefect.flow-run.*"]},
                           for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                           within=timedelta(seconds=after_s))
    action = ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"no heartbeat for {after_s:.0f} s: the run's host or process is gone")
    try:
        old = Automation.read(name=NAME)
    except Exception:            # ValueError / ObjectNotFound, by Prefect version: there is none yet
        old = None
    automation = Automation(name=NAME, description=__doc__.split("\n\n")[1].replace("\n", " "),
                            trigger=trigger, actions=[action])
    if old is not None:
        automation.id = old.id
        automation.update()
        return f"updated automation {NAME!r}"
    automation.create()
    return f"created automation {NAME!r}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--after-s", type=float, default=float(os.environ.get("ZOMBIE_AFTER_S") or 90))
    print(save(ap.parse_args().after_s))


if __name__ == "__main__":
    main()
