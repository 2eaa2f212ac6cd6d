"""The order in which both AWS backends make a plan's changes, so that a run that stops half-way leaves nothing
the next run cannot finish:

1. write the leaving record (Redis), then add the members about to be protected to the protection record
   (Redis, EC2 only), so that no protection this backend sets goes unrecorded;
2. turn scale-in protection on, or renew it;
3. send TSTP to the processes of leaving members that are not quiet yet (Redis);
4. turn protection off for drained members. On EC2, once nothing is leaving, turn it off for the members
   that this backend protected too. Then delete the unprotected members, and the members that are gone or have
   lost their protection, from the protection record;
5. remove drained members (EC2 only: ECS removes them through the desired count of step 6);
6. set the desired capacity or count when the plan changes it;
7. delete the leaving records of members that are gone.

`MemberScaler.apply` runs these steps; each backend supplies the API calls and the sentences that differ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_leaving import (
    forget_leaving,
    quiet_processes,
    redis_errors,
    save_leaving,
    save_protection,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_plan import (
    ApplyResult,
    Removal,
    ScalingPlan,
)


class MemberScaler:
    """Base class of AsgBackend and EcsBackend: the shared steps of `apply`, with one hook per API call."""

    def key(self, namespace_prefix: str = "") -> str:
        """Return the Redis key of the leaving record."""
        raise NotImplementedError

    def protection_key(self, namespace_prefix: str = "") -> str:
        """Return the Redis key of the record of members that this backend protected."""
        raise NotImplementedError

    def _protect(self, ids: Sequence[str], enabled: bool) -> None:
        raise NotImplementedError

    def _protected_sentence(self, ids: Sequence[str]) -> str:
        return f"Protected {', '.join(ids)} from scale-in."

    def _remove(self, removal: Removal, redis_client: Any, key: str) -> str | None:
        """Remove one drained member; return the sentence, or None when the desired count removes it."""
        return None

    def _set_capacity(self, capacity: int) -> str:
        raise NotImplementedError

    def _write_records(self, plan: ScalingPlan, redis_client: Any, namespace_prefix: str) -> list[str]:
        """Write the leaving entries and the members about to be protected (step 1); return the sentences."""
        actions: list[str] = []
        if plan.record:
            with redis_errors():
                save_leaving(redis_client, self.key(namespace_prefix), dict(plan.record))
            recorded = list(dict(plan.record))
            new = [member for member in recorded if member in plan.leave]
            updated = [member for member in recorded if member not in plan.leave]
            if new:
                actions.append(f"Recorded {', '.join(new)} as leaving.")
            if updated:
                actions.append(f"Updated the leaving records of {', '.join(updated)}.")
        if plan.record_protection:
            with redis_errors():
                save_protection(
                    redis_client, self.protection_key(namespace_prefix), plan.record_protection, time.time()
                )
        return actions

    def apply(self, plan: ScalingPlan, redis_client: Any, namespace_prefix: str = "") -> ApplyResult:
        """Make the plan's changes in the order of the module docstring; return what was done.

        Raises an AwsError or RedisAccessError subclass at the first failed step; the steps before it stay done,
        and the next run goes on from there.
        """
        key = self.key(namespace_prefix)
        actions = self._write_records(plan, redis_client, namespace_prefix)
        if plan.protect:
            self._protect(plan.protect, True)
            actions.append(self._protected_sentence(plan.protect))
        identities = [identity for member_processes in dict(plan.quiet).values() for identity in member_processes]
        if identities:
            with redis_errors():
                quiet_processes(redis_client, identities, namespace_prefix)
            actions.append(f"Sent TSTP to {', '.join(identities)}.")
        if plan.unprotect:
            self._protect(plan.unprotect, False)
            actions.append(f"Removed scale-in protection from {', '.join(plan.unprotect)}.")
        if plan.forget_protection:
            with redis_errors():
                forget_leaving(redis_client, self.protection_key(namespace_prefix), plan.forget_protection)
            others = [member for member in plan.forget_protection if member not in plan.unprotect]
            if others:
                actions.append(
                    f"Deleted {', '.join(others)} from the record of protected members: gone, or no longer protected."
                )
        for removal in plan.remove:
            sentence = self._remove(removal, redis_client, key)
            if sentence:
                actions.append(sentence)
        if plan.set_capacity:
            actions.append(self._set_capacity(plan.capacity_after))
        if plan.forget:
            with redis_errors():
                forget_leaving(redis_client, key, plan.forget)
            actions.append(f"Deleted the leaving records of {', '.join(plan.forget)}, which are gone.")
        return ApplyResult(actions=tuple(actions))
