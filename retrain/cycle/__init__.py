"""One flywheel cycle: `mining` -> `dataset` (snapshots) -> `finetune` -> compression -> `verify` (shadow replay and
`closed_loop`) -> `gates` -> `registry`, run and resumed by `cycle`; `results` types what it returns, `report` and
`report_data` draw it."""
