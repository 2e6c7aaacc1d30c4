// Parlor chat widget: written next (see docs/handoff.md §6).
