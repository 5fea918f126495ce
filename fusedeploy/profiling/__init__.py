"""Hardware profiles, planning, measurement, projection and the sign-off report.

Modules: `schema` (profile YAML schema and loading), `planner` (candidates
projected onto a profile before any compute), `measure` (host calibration,
timing each artifact in its own process, roofline projection), `worker` (the
process that times one artifact), `report` (sign-off, JSON/HTML/Markdown).
Bits per weight, KV-cache widths and runtime overheads come from
`fusedeploy.formats`.
"""
