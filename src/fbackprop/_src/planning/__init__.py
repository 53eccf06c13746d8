"""Memory-budget planning for checkpoint regions: :mod:`.memplan` (the budget and
the planner), :mod:`.frames` (the planner's frames in the sweep context and the
scan handler's hook), :mod:`.memcut` (the min-cut solver) and
:mod:`.residual_rows` (the description of each kept value)."""
