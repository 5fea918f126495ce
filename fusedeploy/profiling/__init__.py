"""Hardware profiles, planning, measurement and reports."""
