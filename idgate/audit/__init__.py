"""The audit trail: what happened, to whom, and why."""
